"""Planning and time to the first unit do not grow with the corpus: the same budget over mini-Piles 1x, 10x
and 100x larger.

    python bench/pile_scale.py                 # -> bench/pile_scale.json, and a table on stdout

The base corpus is the mini-Pile of the tests (`train/NN.jsonl.zst`, one zstd frame per file, JSON lines
with text and meta, log-normal document lengths); the 10x and 100x corpora list 10x and 100x as many files
of the same size (hard links of the base files under new names: the store reports them as files of their
full size; no run reads past the budget). Each corpus is run once with the same token budget, on a tiny
random model (saeray.assets.tiny) with the local executor, from a fresh run directory: the figures are planning
(seconds, bytes of data files read), time from `run` to the first committed unit, bytes read in all, and
disk use per token of the run directory (docs, statistics, activation rows).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _corpus(base: list[Path], root: Path, factor: int) -> Path:
    train = root / f"x{factor}" / "train"
    train.mkdir(parents=True)
    for i in range(factor * len(base)):
        os.link(base[i % len(base)], train / f"{i:03d}.jsonl.zst")
    return train.parent


def _disk(run: Path, sub: str) -> int:
    return sum(p.stat().st_size for p in (run / sub).rglob("*") if p.is_file())


def reader_throughput(base: list[Path], root: Path, mb: int = 200) -> dict:
    """One reader's speed: a `mb` MB JSON lines file in one zstd frame, streamed and cut into 64 MiB units."""
    import zstandard

    from saeray.engine.sources import line_units

    text = b"".join(zstandard.ZstdDecompressor().decompress(p.read_bytes()) for p in base)
    big = (text * (mb * 10**6 // len(text) + 1))[: mb * 10**6]
    big = big[: big.rfind(b"\n") + 1]
    path = root / "big.jsonl.zst"
    path.write_bytes(zstandard.ZstdCompressor(level=3).compress(big))
    t0 = time.perf_counter()
    n = sum(u.n_bytes for u, _ in line_units(str(path), 0, "json", 64 << 20, block_size=8 << 20))
    seconds = time.perf_counter() - t0
    assert n == len(big)
    return {"uncompressed_mb": round(n / 1e6, 1), "compressed_mb": round(path.stat().st_size / 1e6, 1),
            "seconds": round(seconds, 2), "mb_per_s": round(n / 1e6 / seconds, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--factors", default="1,10,100")
    ap.add_argument("--budget", type=int, default=100_000, help="token budget of every run")
    ap.add_argument("--repeats", type=int, default=2, help="runs per corpus and mode; the fastest counts (noisy VM)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "pile_scale.json"))
    a = ap.parse_args()

    from pile import write_mini_pile

    from saeray.assets.tiny import make_model, make_sae
    from saeray.engine import config
    from saeray.executors import run

    tmp = Path(tempfile.mkdtemp(prefix="saeray-pile-bench-"))
    model = make_model(tmp / "model", "llama")
    sae = make_sae(tmp / "sae", "standard", 64, "blocks.1.hook_resid_post")
    base = write_mini_pile(tmp / "base").files
    results = []
    for factor in (int(f) for f in a.factors.split(",")):
        data = _corpus(base, tmp, factor)
        size = sum(p.stat().st_size for p in (data / "train").iterdir())
        for activations in (False, True):
            runs = []
            for rep in range(a.repeats):
                out = tmp / f"run-x{factor}-{'rows' if activations else 'stats'}-{rep}"
                raw = {"model": {"name": str(model), "dtype": "float32"}, "saes": [{"name": "s", "path": str(sae)}],
                       "data": {"dataset": str(data), "max_tokens": a.budget, "unit_bytes": 64 << 10,
                                "keep_columns": ["meta"]},
                       "tokens": {"batch_tokens": 2048}, "output": {"dir": str(out), "activations": activations},
                       "workers": 1}
                t0 = time.time()
                r = run(config.from_dict(raw), executor="local")
                runs.append((r, time.time() - t0, out))
            r, wall, out = min(runs, key=lambda x: x[0].first_unit_seconds or 0)
            tokens = r.tokens
            row = {"factor": factor, "files": factor * len(base), "corpus_bytes": size, "activations": activations,
                   "plan_seconds": round(min(x[0].plan_seconds for x in runs), 3), "plan_bytes": r.plan_bytes,
                   "first_unit_seconds": round(r.first_unit_seconds or 0, 3),
                   "first_unit_seconds_all": [round(x[0].first_unit_seconds or 0, 3) for x in runs],
                   "bytes_read": r.bytes_read, "run_seconds": round(wall, 2), "tokens": tokens, "units": len(r.done),
                   "docs_bytes_per_token": round(_disk(out, "docs") / tokens, 3),
                   "stats_bytes_per_unit": round(_disk(out, "stats") / len(r.done)),
                   "rows_bytes_per_row": round(_disk(out, "activations") / max(1, sum(s["rows"] for s in r.done.values())), 2)
                   if activations else None}
            results.append(row)
            print(json.dumps(row))
    reader = reader_throughput(base, tmp)
    print(f"one reader (zstd + cutting units, one core): {reader['mb_per_s']} MB/s of text")
    report = {"reader": reader, "what": "same token budget over mini-Piles 1x/10x/100x larger (tiny random model, local executor, "
                      "2-core CPU; time to the first unit includes loading the model; fastest of --repeats runs); "
                      "planning reads metadata + the first rows of the first file",
              "budget_tokens": a.budget, "results": results}
    Path(a.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{'corpus':>8} {'files':>6} {'corpus MB':>10} {'plan s':>7} {'plan KB':>8} {'first unit s':>13} "
          f"{'read KB':>8}")
    for r in results:
        if r["activations"]:
            continue
        print(f"{r['factor']:>7}x {r['files']:>6} {r['corpus_bytes'] / 1e6:>10.1f} {r['plan_seconds']:>7.3f} "
              f"{r['plan_bytes'] / 1024:>8.0f} {r['first_unit_seconds']:>13.3f} {r['bytes_read'] / 1024:>8.0f}")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
