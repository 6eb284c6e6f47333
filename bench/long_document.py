"""Peak memory of `saeray run` on one very long document against ordinary documents of the same bytes.

    python bench/long_document.py                 # 20 MB of text, tiny in-process model, stats only
    python bench/long_document.py --mb 5          # quicker

Four runs, each `saeray run --local` in its own process (peak RSS from the kernel's rusage of that
process): a JSON lines file holding one document of MB megabytes on a single line, and one holding the same
bytes as ordinary documents (~5 KB each), each without and with a token budget (--budget). The tiny model
(saeray/assets/tiny.py) keeps the forward cheap, so what is measured is the input path: reading, tokenizing
and windowing. Writes bench/long_document.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from saeray.assets import tiny  # noqa: E402


def write_texts(path: Path, total_bytes: int, single: bool, seed: int = 0) -> Path:
    rng = random.Random(seed)
    words = tiny.WORDS
    docs, cur, n = [], [], 0
    while n < total_bytes:
        w = rng.choice(words)
        cur.append(w)
        n += len(w) + 1
        if not single and len(cur) >= 900:  # ordinary documents of ~5 KB
            docs.append(" ".join(cur))
            cur = []
    if cur:
        docs.append(" ".join(cur))
    path.mkdir(parents=True, exist_ok=True)
    with open(path / "data.jsonl", "w") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    return path


def run_peak(cfg: Path) -> tuple[float, float, str]:
    """(peak RSS in MB, seconds, stderr tail) of `saeray run CFG --local` in a process of its own."""
    t = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "saeray.cli", "run", str(cfg), "--local"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"run failed ({status}):\n{err[-2000:]}")
    return usage.ru_maxrss / 1024, time.time() - t, err[-300:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=20.0, help="megabytes of text in each dataset")
    ap.add_argument("--budget", type=int, default=20_000, help="data.max_tokens of the budgeted runs")
    ap.add_argument("--json", default="bench/long_document.json")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="saeray-longdoc-"))
    model = tiny.make_model(root / "model", "llama")
    sae = tiny.make_sae(root / "sae", "topk", 64, "blocks.1.hook_resid_post")
    total = int(args.mb * 1e6)
    data = {"one line": write_texts(root / "single", total, True), "ordinary": write_texts(root / "ordinary", total, False)}
    results = []
    for budget in (None, args.budget):
        for kind, path in data.items():
            cfg = {"model": {"name": str(model), "dtype": "float32"}, "saes": [{"name": "a", "path": str(sae)}],
                   "data": {"dataset": str(path), "max_tokens": budget}, "tokens": {"context_size": 128},
                   "output": {"dir": str(root / f"run-{kind.replace(' ', '-')}-{budget}"), "activations": False,
                              "docs": "none"},
                   "workers": 1}
            cfg_path = root / f"cfg-{len(results)}.yaml"
            cfg_path.write_text(yaml.safe_dump(cfg))
            peak, secs, _ = run_peak(cfg_path)
            tokens = sum(json.loads(p.read_text())["tokens"] for p in Path(cfg["output"]["dir"], "completions").glob("*.json"))
            results.append({"data": kind, "budget": budget, "tokens": tokens, "peak_rss_mb": round(peak, 1),
                            "seconds": round(secs, 1)})
            print(f"{kind:>9} budget {str(budget):>7}: {tokens:>10,} tokens  peak RSS {peak:8.1f} MB  {secs:6.1f} s",
                  flush=True)
    for budget in (None, args.budget):
        one, ordinary = [next(r for r in results if r["data"] == k and r["budget"] == budget) for k in data]
        print(f"budget {budget}: one line / ordinary = {one['peak_rss_mb'] / ordinary['peak_rss_mb']:.2f}x")
    Path(args.json).write_text(json.dumps({"mb": args.mb, "command": " ".join(sys.argv), "runs": results}, indent=2))


if __name__ == "__main__":
    main()
