"""Logit effects saved with a run (RUN/logits.parquet), read without loading the model.

`saeray.tools.logits.save_logit_effects` (or `saeray logits RUN --feature F --save`) computes them,
which loads the model's weights, and `write_logits` writes the file; reports read it. Columns: those of `saeray.tools.logits.logit_effects` with `sae` first;
the run's fingerprint and the SAEs' digests are kept in the file's metadata, so a file left from
another run (an overwritten run directory, a copied file) is not shown as this run's.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import polars as pl

from ..engine.run import open_run
from ..engine.store import LOGITS

LOGITS_FILE = LOGITS
META_KEY = b"saeray.logits"


def identity(run: str | Path) -> dict[str, Any]:
    """What saved logit effects are valid for: the run's fingerprint and each SAE's digest."""
    manifest = open_run(run).read_manifest()
    return {"fingerprint": manifest["fingerprint"],
            "saes": {s["name"]: s["digest"] for s in manifest["resolved"]["saes"]}}


def read_logits(run: str | Path) -> pl.DataFrame | None:
    """The run's saved logit effects, or None when it has none. Raises ValueError when the file was written
    for another run (fingerprint or SAE digests differ)."""
    import pyarrow.parquet as pq

    rd = open_run(run)
    if not rd.exists(LOGITS_FILE):
        return None
    table = pq.read_table(io.BytesIO(rd.read_bytes(LOGITS_FILE)))
    meta = json.loads((table.schema.metadata or {}).get(META_KEY, b"{}"))
    if {k: meta.get(k) for k in ("fingerprint", "saes")} != identity(rd):
        raise ValueError(f"{rd.uri(LOGITS_FILE)} was computed for another run or other SAEs (fingerprint or SAE "
                         "digests differ): delete it, or compute it again with saeray logits RUN --feature F --save")
    return pl.from_arrow(table)  # type: ignore[return-value]


def saved_effects(run: str | Path, features: list[int], *, sae: str, k: int) -> tuple[pl.DataFrame | None, list[int]]:
    """(the saved top-k promoted and suppressed tokens of `features` of `sae`, or None when none are saved;
    the features without k of each saved: none, or fewer, saved with a smaller k)."""
    saved = read_logits(run)
    if saved is None:
        return None, list(features)
    mine = saved.filter((pl.col("sae") == sae) & pl.col("feature").is_in(pl.Series(features, dtype=pl.Int32).implode())
                        & (pl.col("rank") < k))
    counts = mine.group_by("feature").len()
    have = set(counts.filter(pl.col("len") == 2 * k)["feature"].to_list())
    mine = mine.filter(pl.col("feature").is_in(pl.Series(sorted(have), dtype=pl.Int32).implode()))
    return (mine if mine.height else None), [f for f in features if f not in have]


def write_logits(run: str | Path, frame: pl.DataFrame) -> str:
    """Save `frame` (from `saeray.tools.logits.logit_effects_for_run`: one SAE) with the run in RUN/logits.parquet,
    replacing its features' earlier rows. Returns the file's path or URI."""
    from ..engine.store import parquet_bytes

    rd = open_run(run)
    try:
        old = read_logits(rd)
    except ValueError:  # saved for another run or other SAEs: replaced
        old = None
    if old is not None:
        name = frame["sae"][0]
        keep = ~((pl.col("sae") == name) & pl.col("feature").is_in(frame["feature"].unique().cast(pl.Int32).implode()))
        frame = pl.concat([old.filter(keep), frame])
    frame = frame.sort("sae", "feature", pl.col("direction").replace_strict({"promoted": 0, "suppressed": 1}), "rank")
    rd.write_bytes(LOGITS_FILE, parquet_bytes(frame.to_arrow(), {META_KEY.decode(): identity(rd)}))
    return rd.uri(LOGITS_FILE)
