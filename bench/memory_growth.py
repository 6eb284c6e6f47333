"""Peak memory of a saeray worker at two corpus sizes: it must not grow with the corpus.

    python bench/memory_growth.py                                   # SmolLM2-135M (embedded), random SAE
    python bench/memory_growth.py --model tiny --small 20000        # tiny in-process model, seconds

Each size is one shard (one parquet file), so the larger corpus is also a 10x larger
shard: the worker must stream it in bounded blocks. Runs go through Ray with 1 worker;
the worker's peak RSS comes from its completion marker (getrusage in the actor process).
Writes a JSON report next to the printed table.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from saeray.assets import tiny  # noqa: E402
from saeray.engine import config  # noqa: E402
from saeray.engine.resources import peak_rss_mb  # noqa: E402
from saeray.executors import run  # noqa: E402

WORDS = tiny.WORDS


def write_corpus(path: Path, n_tokens_approx: int, seed: int) -> Path:
    rng = random.Random(seed)
    docs, n = [], 0
    while n < n_tokens_approx:
        k = rng.randint(20, 400)
        docs.append(" ".join(rng.choice(WORDS) for _ in range(k)))
        n += k
    path.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"text": docs}), path / "part-0.parquet")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="embedded short name, a model dir, or 'tiny'")
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--small", type=int, default=20_000, help="approximate tokens of the small corpus")
    ap.add_argument("--factor", type=int, default=10)
    ap.add_argument("--d-sae", type=int, default=4096)
    ap.add_argument("--k", type=int, default=32, help="active latents per token of the random TopK SAE")
    ap.add_argument("--stats-only", action="store_true")
    ap.add_argument("--json", default="bench/memory_growth.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from saeray.engine import models

    work = Path(tempfile.mkdtemp(prefix="saeray-mem-"))
    if args.model == "tiny":
        model_name = str(tiny.make_model(work / "model", "llama", n_layers=4, d_model=64))
        layer = 2
    else:
        model_name, layer = args.model, args.layer
    d_model = models.d_model_of(models.load_config(config.ModelConfig(name=model_name)))
    # TopK with random weights: exactly k active latents per token, as sparse as a trained SAE.
    sae = tiny.make_sae(work / "sae", "topk", d_model, f"blocks.{layer}.hook_resid_post",
                        d_sae=args.d_sae, context_size=512, k=args.k)
    rows = []
    for i, n in enumerate([args.small, args.small * args.factor]):
        data = write_corpus(work / f"data{i}", n, seed=i)
        raw = {"model": {"name": model_name}, "saes": [{"name": "s", "path": str(sae)}],
               "data": {"dataset": str(data)}, "tokens": {"batch_tokens": "auto"},
               "output": {"dir": str(work / f"run{i}"), "activations": not args.stats_only}, "workers": 1}
        t0 = time.time()
        result = run(config.from_dict(raw), executor="ray")
        summary = next(iter(result.done.values()))
        rows.append({"tokens": result.tokens, "rows": summary["rows"], "seconds": round(time.time() - t0, 1),
                     "worker_peak_rss_mb": summary["peak_rss_mb"],
                     "driver_peak_rss_mb": peak_rss_mb()})
    growth = rows[1]["worker_peak_rss_mb"] / rows[0]["worker_peak_rss_mb"] - 1
    print(f"model {model_name} layer {layer}, random TopK SAE d_sae {args.d_sae} k {args.k}, batch 4096 tokens, 1 shard per corpus, "
          f"{'stats only' if args.stats_only else 'activations + stats'}")
    print(f"{'tokens':>10} {'act rows':>12} {'seconds':>8} {'worker peak RSS MB':>19} {'driver peak RSS MB':>19}")
    for r in rows:
        print(f"{r['tokens']:>10,} {r['rows']:>12,} {r['seconds']:>8} {r['worker_peak_rss_mb']:>19} {r['driver_peak_rss_mb']:>19}")
    print(f"corpus x{rows[1]['tokens'] / rows[0]['tokens']:.1f} -> worker peak RSS {growth:+.1%}")
    Path(args.json).write_text(json.dumps({"model": model_name, "layer": layer, "d_sae": args.d_sae, "k": args.k,
                                           "runs": rows, "growth": growth}, indent=2))


if __name__ == "__main__":
    main()
