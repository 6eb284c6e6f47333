"""Top and interval-sampled examples per feature, from a run's activation rows.

Built to run over hundreds of millions of rows in bounded memory with Polars' streaming
engine. Each query has two passes over the activation files, both filtered on `feature`
first (so only the requested features' rows are decoded past the filter):

1. per (sae, group, feature, doc_id) the document's maximum, a streaming group_by whose
   output is at most one row per (feature, active document);
2. the rows of the chosen (feature, document) pairs only, a streaming join against the
   small chosen table; then the chosen documents' token ids are read from `docs`.

An example is a document: its maximum activation `value` for the feature, the position
`pos` of that maximum (ties: smallest pos), a window of token ids around it and the
feature's activation at each window position (0.0 where the run holds no row: inactive,
or a position the position mode does not record, such as special tokens).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from .stats import scan_activations, scan_docs
from .store import RunDir
from .tokenstr import token_strings

log = logging.getLogger(__name__)

KEYS = ["sae", "group", "feature"]
DOC_KEYS = [*KEYS, "doc_id"]


def load_tokenizer(run: str | Path) -> Any:
    """The tokenizer of the run's model (only the tokenizer is loaded, not the weights)."""
    from transformers import AutoTokenizer

    from .models import resolve_source

    model = RunDir(run).read_manifest()["config"]["model"]
    source, kwargs = resolve_source(model["name"])
    return AutoTokenizer.from_pretrained(source, revision=model.get("revision"),
                                         trust_remote_code=bool(model.get("trust_remote_code", False)), **kwargs)


def _check_sae(run: str | Path, sae: str | None) -> None:
    if sae is None:
        return
    names = [s["name"] for s in RunDir(run).read_manifest()["config"]["saes"]]
    if sae not in names:
        raise ValueError(f"SAE {sae!r} is not in run {run}: it has {', '.join(names)}")


def scan_feature_rows(run: str | Path, features: list[int], *, sae: str | None = None,
                      group: str | None = None) -> pl.LazyFrame:
    """Activation rows of `features` (optionally one SAE / position group), filter first for pushdown."""
    _check_sae(run, sae)
    if not features:
        raise ValueError("no features given: pass at least one feature index")
    pred = pl.col("feature").is_in(pl.Series(features, dtype=pl.Int32))
    if sae is not None:
        pred &= pl.col("sae") == sae
    if group is not None:
        pred &= pl.col("group") == group
    return scan_activations(run).filter(pred)


def doc_maxima(run: str | Path, features: list[int], *, sae: str | None = None,
               group: str | None = None) -> pl.DataFrame:
    """Per (sae, group, feature, doc_id): the feature's maximum activation in the document."""
    return (scan_feature_rows(run, features, sae=sae, group=group)
            .group_by(DOC_KEYS).agg(pl.col("value").max())
            .collect(engine="streaming"))


def top_examples(run: str | Path, features: list[int], *, sae: str | None = None, group: str | None = None,
                 k: int = 10, window: tuple[int, int] = (10, 10), tokenizer: Any = None) -> pl.DataFrame:
    """For each (sae, group, feature): the k documents with the highest maximum activation.

    Ties in the maximum go to the smaller doc_id. Columns: sae, group, feature, rank (1..k),
    doc_id, value, pos, n_tokens, window_start, token_ids, acts (+ tokens when a tokenizer
    is given); token_ids/acts/tokens cover positions window_start .. pos+after, clipped to
    the document.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    chosen = (doc_maxima(run, features, sae=sae, group=group)
              .sort([*KEYS, "value", "doc_id"], descending=[False, False, False, True, False])
              .group_by(KEYS, maintain_order=True).head(k)
              .with_columns((pl.int_range(pl.len()).over(KEYS) + 1).cast(pl.Int32).alias("rank")))
    return _examples(run, chosen, features, sae=sae, group=group, window=window, tokenizer=tokenizer)


def interval_examples(run: str | Path, features: list[int], *, sae: str | None = None, group: str | None = None,
                      bins: int = 5, per_bin: int = 3, seed: int = 0, window: tuple[int, int] = (10, 10),
                      tokenizer: Any = None) -> pl.DataFrame:
    """Documents sampled from activation intervals: `bins` equal bins of (0, max] per feature.

    A document falls in bin b (0-based) when its maximum for the feature lies in
    (b * max / bins, (b + 1) * max / bins]. Up to `per_bin` documents per bin are drawn by a
    seeded hash of (seed, feature, doc_id): the same data and seed give the same examples,
    whichever other features are asked for. Columns: those of `top_examples` with bin,
    bin_lo, bin_hi instead of rank.
    """
    if bins < 1 or per_bin < 1:
        raise ValueError(f"bins and per_bin must be at least 1, got bins={bins}, per_bin={per_bin}")
    maxima = doc_maxima(run, features, sae=sae, group=group).filter(pl.col("value") > 0)
    maxima = maxima.with_columns(pl.col("value").max().over(KEYS).alias("_fmax"))
    b = (pl.col("value").cast(pl.Float64) / pl.col("_fmax").cast(pl.Float64) * bins).ceil().cast(pl.Int32) - 1
    draw = _mix(maxima["doc_id"].to_numpy().astype(np.uint64), maxima["feature"].to_numpy().astype(np.uint64), seed)
    chosen = (maxima.with_columns(b.clip(0, bins - 1).alias("bin"), pl.Series("_draw", draw))
              .sort([*KEYS, "bin", "_draw", "doc_id"])
              .group_by([*KEYS, "bin"], maintain_order=True).head(per_bin)
              .with_columns((pl.col("bin") * pl.col("_fmax") / bins).alias("bin_lo"),
                            ((pl.col("bin") + 1) * pl.col("_fmax") / bins).alias("bin_hi"))
              .drop("_fmax", "_draw"))
    out = _examples(run, chosen, features, sae=sae, group=group, window=window, tokenizer=tokenizer)
    return out.sort([*KEYS, "bin", "value", "doc_id"], descending=[False, False, False, False, True, False])


def _mix(doc_id: np.ndarray, feature: np.ndarray, seed: int) -> np.ndarray:
    """splitmix64 of (seed, feature, doc_id): a stable pseudo-random draw per pair."""
    with np.errstate(over="ignore"):
        x = doc_id * np.uint64(0x9E3779B97F4A7C15) ^ feature * np.uint64(0xC2B2AE3D27D4EB4F)
        x ^= np.uint64(seed & 0xFFFFFFFFFFFFFFFF) * np.uint64(0x165667B19E3779F9)
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


def _examples(run: str | Path, chosen: pl.DataFrame, features: list[int], *, sae: str | None, group: str | None,
              window: tuple[int, int], tokenizer: Any) -> pl.DataFrame:
    """Position of the max, window of token ids and per-token activations for chosen (feature, doc) pairs."""
    before, after = window
    if before < 0 or after < 0:
        raise ValueError(f"window must be two non-negative token counts (before, after), got {window}")
    rows = (scan_feature_rows(run, features, sae=sae, group=group)
            .join(chosen.lazy().select(DOC_KEYS), on=DOC_KEYS, how="inner")
            .select(*DOC_KEYS, "pos", "value")
            .collect(engine="streaming"))
    argmax = (rows.join(chosen.select(*DOC_KEYS, pl.col("value").alias("_max")), on=DOC_KEYS)
              .filter(pl.col("value") == pl.col("_max"))
              .group_by(DOC_KEYS).agg(pl.col("pos").min()))
    doc_ids = chosen["doc_id"].unique()
    docs = (scan_docs(run).filter(pl.col("doc_id").is_in(doc_ids.implode()))
            .select("doc_id", "n_tokens", "token_ids").collect())
    ex = (chosen.join(argmax, on=DOC_KEYS, how="left").join(docs, on="doc_id", how="left")
          .with_columns((pl.col("pos") - before).clip(lower_bound=0).alias("window_start"),
                        (pl.col("pos") + after + 1).clip(upper_bound=pl.col("n_tokens")).alias("_end")))
    ex = ex.with_columns(pl.col("token_ids").list.slice(pl.col("window_start"), pl.col("_end") - pl.col("window_start")))
    # one row per window position, left-joined to the feature's rows; absent rows are 0.0
    grid = (ex.select(*DOC_KEYS, pl.int_ranges("window_start", "_end", dtype=pl.Int32).alias("pos"))
            .explode("pos").drop_nulls("pos")
            .join(rows.select(*DOC_KEYS, "pos", pl.col("value").alias("act")), on=[*DOC_KEYS, "pos"], how="left")
            .sort([*DOC_KEYS, "pos"])
            .group_by(DOC_KEYS, maintain_order=True).agg(pl.col("act").fill_null(0.0).cast(pl.Float32).alias("acts")))
    ex = ex.join(grid, on=DOC_KEYS, how="left").drop("_end")
    order = [c for c in ("rank", "bin", "bin_lo", "bin_hi") if c in ex.columns]
    ex = ex.select(*KEYS, *order, "doc_id", "value", "pos", "n_tokens", "window_start", "token_ids", "acts")
    if "rank" in ex.columns:
        ex = ex.sort([*KEYS, "rank"])
    if tokenizer is not None:
        ex = ex.with_columns(pl.Series("tokens", [token_strings(tokenizer, ids) for ids in ex["token_ids"]],
                                       dtype=pl.List(pl.String)))
    return ex
