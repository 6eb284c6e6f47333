"""`saeray demo`: the whole extraction job end to end, offline, on parts built in-process.

For now the default is a tiny randomly initialised Llama-style model, a random-weight
sae-lens SAE and a synthetic corpus, all built on the spot: it exercises the real
engine (Ray actors, sharded Parquet data, hooks, SAE encoding, run directory, stats)
but its features mean nothing. The real embedded default (Gemma 3 270M and SmolLM2 with
SAEs trained by saeray) is tracked as a separate issue.
"""

from __future__ import annotations

import logging
from pathlib import Path

import polars as pl
import yaml

from . import config, tiny
from .executor import run
from .stats import summary, write_features

log = logging.getLogger(__name__)


def build_assets(root: Path) -> Path:
    """Model, SAE, dataset and config under `root`; returns the config path (reused if present)."""
    cfg_path = root / "demo.yaml"
    if cfg_path.is_file():
        return cfg_path
    model = tiny.make_model(root / "model", "llama", n_layers=4, d_model=64)
    sae = tiny.make_sae(root / "sae", "standard", 64, "blocks.2.hook_resid_post", d_sae=256, context_size=64)
    docs = tiny.corpus(600, seed=11, min_words=5, max_words=120)
    data = tiny.write_dataset(root / "data", docs, n_files=6,
                              extra={"kind": ["code" if i % 2 else "prose" for i in range(len(docs))]})
    raw = {
        "model": {"name": str(model), "dtype": "float32"},
        "saes": [{"name": "res2", "path": str(sae)}],
        "data": {"dataset": str(data), "keep_columns": ["kind"]},
        "tokens": {"batch_tokens": 2048},  # 64-token windows x 32 rows per forward pass
        "output": {"dir": str(root / "run")},
        "workers": "auto",
    }
    cfg_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return cfg_path


def main(out: str | Path = "runs/demo", workers: int | None = None) -> int:
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    print("saeray demo: a TINY RANDOM model and SAE built in-process (no download); the engine is real, "
          "the features are meaningless.")
    cfg_path = build_assets(root)
    cfg = config.load(cfg_path)
    result = run(cfg, workers=workers, executor="ray", progress_sink=print)
    feats_path = write_features(result.run_dir)
    feats = pl.read_parquet(feats_path)
    top = feats.sort("density", descending=True).head(5).select("feature", "density", "mean", "max", "max_doc_id")
    with pl.Config(tbl_rows=20, tbl_width_chars=140):
        print(summary(feats))
        print("most frequent features:")
        print(top)
    print(f"""
outputs:
  config          {cfg_path}
  run directory   {result.run_dir}   ({len(result.done)} shards processed, {len(result.skipped)} already there,
                  {result.tokens:,} tokens in {result.seconds:.1f}s)
  activations     {result.run_dir}/activations/shard=*/   one row per (token, active feature)
  documents       {result.run_dir}/docs/shard=*/          token ids + kept columns (kind)
  per-shard stats {result.run_dir}/stats/*.parquet         mergeable partials
  features        {feats_path}   density, mean, std, max (+ where) per feature
next: polars.scan_parquet('{result.run_dir}/activations/**/*.parquet') to explore rows.""")
    return 0
