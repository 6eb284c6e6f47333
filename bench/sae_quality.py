"""Quality of the shipped SAEs on held-out text, recomputed from scratch.

For each SAE under saeray/saes/ (or the directories given), load it with plain
`sae_lens.SAE.load_from_disk`, stream activations at its hook from the documents its
`saeray_training.json` says were held out (never seen in training), and measure:

- explained variance, centred: 1 - sum|x - x_hat|^2 / sum|x - mean(x)|^2 over counted tokens
  (mean = the held-out mean activation vector);
- L0: mean number of nonzero latents per token;
- dead latents: the fraction that never fire on any of the held-out tokens.

Targets (issue 3): EV >= 0.75, L0 <= 64, dead <= 5% over 1M tokens. Prints a table and
writes bench/sae_quality.json. The corpus must exist (`saeray corpus --out runs/corpus`).

    python bench/sae_quality.py [--tokens 1000000] [SAE_DIR ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"explained_variance": (">=", 0.75), "l0": ("<=", 64.0), "dead_fraction": ("<=", 0.05)}


def measure(sae_dir: Path, tokens: int) -> dict:
    from sae_lens import SAE

    from saeray.config import from_dict
    from saeray.train import Streamer, evaluate

    report = json.loads((sae_dir / "saeray_training.json").read_text())
    sae = SAE.load_from_disk(str(sae_dir))
    meta = sae.cfg.metadata
    cfg = from_dict({"model": {"name": report["model"], "dtype": "bfloat16"},
                     "data": {"dataset": report["dataset"], "text_column": "text"},
                     "tokens": {"context_size": meta.context_size, "batch_tokens": 4096}})
    st = Streamer(cfg, meta.hook_name, meta.context_size, meta.prepend_bos)
    start, end = report["held_out_docs"]
    if end > st.plan.n_rows:
        raise SystemExit(f"{report['dataset']} has {st.plan.n_rows} documents, fewer than the {end} the SAE was "
                         f"trained against: rebuild it with `saeray corpus --out {report['dataset']}`")
    sae = sae.to(str(st.device))
    t = time.time()
    figures = evaluate(sae, st.stream(start, end, tokens))
    figures["seconds"] = round(time.time() - t, 1)
    figures["checks"] = {k: (figures[k] >= v if op == ">=" else figures[k] <= v) for k, (op, v) in TARGETS.items()}
    figures["checks"]["tokens"] = figures["tokens"] >= min(tokens, 1_000_000)
    return {"sae": sae_dir.name, "model": report["model"], "hook": meta.hook_name, "d_sae": sae.cfg.d_sae,
            "held_out_docs": [start, end], **figures}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("saes", nargs="*", type=Path, help="SAE directories (default: every SAE in saeray/saes/)")
    p.add_argument("--tokens", type=int, default=1_000_000, help="held-out tokens to evaluate on")
    p.add_argument("--json", type=Path, default=ROOT / "bench" / "sae_quality.json")
    args = p.parse_args(argv)
    dirs = args.saes or sorted(d for d in (ROOT / "saeray" / "saes").iterdir() if d.is_dir())
    rows = [measure(d, args.tokens) for d in dirs]
    print(f"{'sae':36} {'tokens':>9} {'EV':>7} {'L0':>6} {'dead':>7}  targets (EV>=0.75, L0<=64, dead<=5% over 1M)")
    for r in rows:
        ok = "all met" if all(r["checks"].values()) else "MISSED: " + ", ".join(k for k, v in r["checks"].items() if not v)
        print(f"{r['sae']:36} {r['tokens']:>9,} {r['explained_variance']:>7.3f} {r['l0']:>6.1f} "
              f"{100 * r['dead_fraction']:>6.2f}%  {ok}")
    args.json.write_text(json.dumps(rows, indent=2))
    return 0 if all(all(r["checks"].values()) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
