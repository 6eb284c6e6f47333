"""How far results move when only the batch composition changes: a bfloat16 model, and float32 as control.

    python bench/bf16_composition.py                   # Gemma 3 270M (bf16) + the shipped SAE, ~100k tokens
    python bench/bf16_composition.py --tokens 20000    # quicker
    python bench/bf16_composition.py --model tiny      # a tiny random model (seconds; the numbers mean nothing)

The same documents run through saeray's worker (`--local`, and Ray for the worker counts; activation rows
kept) under settings that change how the work is cut, but nothing the run defines:

  - data.unit_bytes: 64 MiB (the default: one unit) vs 8,000 bytes (many units; a unit's documents are
    batched among themselves, so batch neighbours, padding widths and matmul shapes change);
  - tokens.batch_tokens: 2,048 (the CPU default) vs 16,384;
  - torch threads: the machine's cores vs 1;
  - Ray workers: 1 vs 2 on 2 cores (the same 8,000-byte units; each of 2 workers gets 1 CPU, so 1 thread).

Each is compared with the run it differs from in that one setting, per SAE and group:

  - pairs: (document, position, latent) active in either run; the share active in only one ("flipped");
  - features whose n_active differs, the largest change of n_active, and the largest change of density
    (n_active / tokens, absolute, and relative where the baseline density >= 1e-3);
  - value change on pairs active in both: median and max of |a - b| / |a|.

`--dtype float32` runs the same comparisons with a float32 model, the control. Writes bench/bf16_composition.json (or --json).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SETTINGS = {
    "baseline": ({}, "local", None),
    "unit_bytes 8000": ({"data": {"unit_bytes": 8000}}, "local", None),
    "batch_tokens 16384": ({"tokens": {"batch_tokens": 16384}}, "local", None),
    "torch threads 1": ({}, "local", 1),
    "Ray, 1 worker": ({"workers": 1, "data": {"unit_bytes": 8000}}, "ray", None),
    "Ray, 2 workers": ({"workers": 2, "data": {"unit_bytes": 8000}}, "ray", None),
}
"""Per run: (what it changes against the baseline, executor, torch threads (None: the worker's default, all of
the machine's cores, or the CPUs Ray gives the actor: 1 each with 2 workers on 2 cores))."""
COMPARE = {"unit_bytes 8000": "baseline", "batch_tokens 16384": "baseline", "torch threads 1": "baseline",
           "Ray, 1 worker": "unit_bytes 8000", "Ray, 2 workers": "Ray, 1 worker"}


def documents(tokens: int, work: Path) -> Path:
    """A Parquet file of shuffled stdlib-corpus documents holding about `tokens` Gemma tokens (4 chars each)."""
    import polars as pl

    from saeray.assets import corpus

    docs = corpus.shipped()
    df = pl.DataFrame({"text": [d["text"] for d in docs]}).sample(fraction=1.0, seed=0, shuffle=True)
    keep = (df["text"].str.len_chars().cum_sum() <= tokens * 4).sum()
    folder = work / "data"
    folder.mkdir()
    df.head(max(int(keep), 2)).write_parquet(folder / "part-0.parquet", row_group_size=8)  # small units possible
    return folder


def run_one(model: str, sae: str, data: Path, out: Path, dtype: str, over: dict, executor: str,
            threads: int | None) -> dict:
    from saeray.engine import config
    from saeray.engine import worker as worker_mod
    from saeray.executors import run

    cfg = {"model": {"name": model, "dtype": dtype},
           "saes": [{"name": "a", "path": sae}],
           "data": {"dataset": str(data), "text_column": "text", "unit_bytes": 64 << 20},
           "tokens": {"batch_tokens": 2048},
           "output": {"dir": str(out), "activations": True},
           "workers": 1}
    for section, value in over.items():
        if isinstance(value, dict):
            cfg[section] = {**cfg[section], **value}
        else:
            cfg[section] = value
    default = worker_mod.default_threads
    if threads is not None:  # what the worker would set from the CPUs it was given
        worker_mod.default_threads = lambda: threads
    t0 = time.perf_counter()
    try:
        run(config.from_dict(cfg), executor=executor)
    finally:
        worker_mod.default_threads = default
    return {"seconds": round(time.perf_counter() - t0, 1), "settings": over, "executor": executor,
            "threads": threads, "units": len(list((out / "completions").glob("*.json")))}


def compare(a_dir: Path, b_dir: Path) -> dict:
    import polars as pl

    from saeray.analysis.stats import features

    key = ["sae", "group", "doc_id", "pos", "feature"]
    ra = pl.scan_parquet(str(a_dir / "activations" / "**" / "*.parquet")).select(*key, "value")
    rb = pl.scan_parquet(str(b_dir / "activations" / "**" / "*.parquet")).select(*key, pl.col("value").alias("b"))
    both = ra.join(rb, on=key, how="full", coalesce=True).collect()
    union = len(both)
    flipped = both.filter(pl.col("value").is_null() | pl.col("b").is_null())
    matched = both.drop_nulls(["value", "b"])
    rel = ((matched["value"] - matched["b"]).abs() / matched["value"].abs().clip(lower_bound=1e-12))
    sa = features(a_dir).collect().select("sae", "group", "feature", "n_active", "n_tokens")
    sb = features(b_dir).collect().select("sae", "group", "feature", pl.col("n_active").alias("n_b"),
                                          pl.col("n_tokens").alias("t_b"))
    f = sa.join(sb, on=["sae", "group", "feature"], how="full", coalesce=True).fill_null(0)
    f = f.with_columns(d_a=pl.col("n_active") / pl.col("n_tokens").clip(lower_bound=1),
                       d_b=pl.col("n_b") / pl.col("t_b").clip(lower_bound=1))
    changed = f.filter(pl.col("n_active") != pl.col("n_b"))
    dense = f.filter(pl.col("d_a") >= 1e-3)
    return {
        "pairs_either": union,
        "pairs_flipped": len(flipped),
        "flipped_share": len(flipped) / union if union else 0.0,
        "flipped_max_abs_value": float(flipped.select(pl.max_horizontal(pl.col("value").abs(), pl.col("b").abs()))
                                       .max().item() or 0.0),
        "value_rel_change_median": float(rel.median() or 0.0),
        "value_rel_change_max": float(rel.max() or 0.0),
        "features": len(f),
        "features_n_active_changed": len(changed),
        "n_active_change_max": int((changed["n_active"] - changed["n_b"]).abs().max() or 0),
        "density_change_max_abs": float((f["d_a"] - f["d_b"]).abs().max() or 0.0),
        "density_change_max_rel": float(((dense["d_a"] - dense["d_b"]).abs() / dense["d_a"]).max() or 0.0)
        if len(dense) else 0.0,
        "tokens": int(f["n_tokens"].max() or 0),
    }


def _folder(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="gemma-3-270m", help="embedded short name, model dir, or 'tiny'")
    p.add_argument("--sae", default="shipped:gemma-3-270m-res6")
    p.add_argument("--dtype", default="bfloat16", help="the model's dtype (float32: the control)")
    p.add_argument("--tokens", type=int, default=100_000, help="about this many tokens of the stdlib corpus")
    p.add_argument("--json", default=str(ROOT / "bench" / "bf16_composition.json"))
    a = p.parse_args(argv)
    import torch

    report: dict = {"inputs": {"model": a.model, "sae": a.sae, "dtype": a.dtype, "tokens_asked": a.tokens,
                               "torch": torch.__version__, "threads": torch.get_num_threads(), "device": "cpu"},
                    "runs": {}, "comparisons": {}}
    with tempfile.TemporaryDirectory(prefix="saeray-bf16-") as tmp:
        work = Path(tmp)
        model, sae = a.model, a.sae
        if a.model == "tiny":
            from saeray.assets import tiny

            model = str(tiny.make_model(work / "model", "llama", n_layers=4, d_model=64))
            sae = str(tiny.make_sae(work / "sae", "topk", 64, "blocks.2.hook_resid_post", d_sae=256,
                                    context_size=64, k=8))
            report["inputs"]["sae"] = "tiny topk, 256 latents"
        data = documents(a.tokens, work)
        for name, (over, executor, threads) in SETTINGS.items():
            report["runs"][name] = run_one(model, sae, data, work / _folder(name), a.dtype, over, executor, threads)
            print(f"  {name}: {report['runs'][name]['units']} units, {report['runs'][name]['seconds']}s", flush=True)
        for name, base in COMPARE.items():
            report["comparisons"][f"{name} vs {base}"] = compare(work / _folder(base), work / _folder(name))
    print(f"\n{a.model} ({a.dtype}), SAE {report['inputs']['sae']} (float32), CPU, "
          f"{next(iter(report['comparisons'].values()))['tokens']:,} tokens:")
    print(f"{'change':<44} {'flipped pairs':>16} {'features n_active changed':>26} {'max |dn|':>9} "
          f"{'max |d density|':>16} {'value change med/max':>22}")
    for name, c in report["comparisons"].items():
        print(f"{name:<44} {c['pairs_flipped']:>7,} ({100 * c['flipped_share']:.3f}%) "
              f"{c['features_n_active_changed']:>12,} of {c['features']:,} {c['n_active_change_max']:>9,} "
              f"{c['density_change_max_abs']:>16.2e} {c['value_rel_change_median']:>10.1e}/{c['value_rel_change_max']:.1e}")
    Path(a.json).write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
