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

import polars as pl

from ..engine.run import open_run
from ..engine.tokenstr import token_strings
from .stats import scan_activations, scan_docs

log = logging.getLogger(__name__)

KEYS = ["sae", "group", "feature"]
DOC_KEYS = [*KEYS, "doc_id"]


def load_tokenizer(run: str | Path) -> Any:
    """The tokenizer of the run's model (only the tokenizer is loaded, not the weights; kept by an open run)."""
    return open_run(run).tokenizer


def _check_sae(run: str | Path, sae: str | None) -> None:
    if sae is None:
        return
    names = [s["name"] for s in open_run(run).read_manifest()["config"]["saes"]]
    if sae not in names:
        raise ValueError(f"SAE {sae!r} is not in run {run}: it has {', '.join(names)}")


def scan_feature_rows(run: str | Path, features: list[int], *, sae: str | None = None,
                      group: str | None = None) -> pl.LazyFrame:
    """Activation rows of `features` (optionally one SAE / position group), filter first for pushdown."""
    _check_sae(run, sae)
    if not features:
        raise ValueError("no features given: pass at least one feature index")
    pred = pl.col("feature").is_in(pl.Series(features, dtype=pl.Int32).implode())
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


def _partials_for(run: str | Path, k: int, window: tuple[int, int], kind: str) -> str | None:
    """Why the run's example partials cannot answer (None: they can): every committed unit must hold them,
    with at least `k` per feature (top: output.top_k; intervals: output.samples_per_bin) and contexts as wide
    as `window`."""
    from .stats import has_kind

    out = open_run(run).read_manifest()["config"]["output"]
    setting = "top_k" if kind == "top" else "samples_per_bin"
    if not has_kind(run, "examples"):
        return "its units hold no example partials (a run made before saeray kept them, or top_k and samples_per_bin 0)"
    if k > out.get(setting, 0):
        return f"it keeps {out.get(setting, 0)} per feature (output.{setting}) and {k} were asked"
    radius = out.get("context_radius", 0)
    if max(window) > radius:
        return f"it keeps contexts of {radius} tokens each side (output.context_radius) and a window of {window} was asked"
    return None


def _source(run: str | Path, k: int, window: tuple[int, int], kind: str, source: str) -> str:
    """'rows' or 'partials' for `source` = auto | rows | partials (auto: partials when they can answer)."""
    from .stats import check_source

    check_source(source)
    rows = bool(open_run(run).read_manifest()["config"]["output"]["activations"])
    why = _partials_for(run, k, window, kind) if source != "rows" else None
    if source == "partials" or (source == "auto" and not rows):
        if why is not None:
            raise ValueError(f"{run} cannot give these examples from its partials: {why}"
                             + ("" if rows else "; it has no activation rows either (output.activations: false)"))
        return "partials"
    if source == "rows" and not rows:
        raise FileNotFoundError(f"{run} is a statistics-only run (output.activations: false): it has no activation rows")
    return "partials" if why is None and source == "auto" else "rows"


def scan_examples(run: str | Path, features: list[int], kind: str, *, sae: str | None = None,
                  group: str | None = None) -> pl.LazyFrame:
    """The units' example partials (partials.EXAMPLES_SCHEMA) of `features`, `kind` top or sample."""
    from .stats import committed_files, scan_files

    _check_sae(run, sae)
    if not features:
        raise ValueError("no features given: pass at least one feature index")
    pred = pl.col("feature").is_in(pl.Series(features, dtype=pl.Int32).implode()) & (pl.col("kind") == kind)
    if sae is not None:
        pred &= pl.col("sae") == sae
    if group is not None:
        pred &= pl.col("group") == group
    return scan_files(committed_files(run, "examples")).filter(pred)


def top_examples(run: str | Path, features: list[int], *, sae: str | None = None, group: str | None = None,
                 k: int = 10, window: tuple[int, int] = (10, 10), tokenizer: Any = None,
                 source: str = "auto") -> pl.DataFrame:
    """For each (sae, group, feature): the k documents with the highest maximum activation.

    Ties in the maximum go to the smaller doc_id. Columns: sae, group, feature, rank (1..k),
    doc_id, value, pos, n_tokens, window_start, token_ids, acts (+ tokens when a tokenizer
    is given); token_ids/acts/tokens cover positions window_start .. pos+after, clipped to
    the document. `source`: rows (the activation rows), partials (the units' top documents,
    saeray/engine/partials.py) or auto (partials when they can answer, else rows): both give the same.
    """
    run = open_run(run)
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    _check_window(window)
    check_features(run, features, sae)
    if _source(run, k, window, "top", source) == "partials":
        chosen = _ranked(scan_examples(run, features, "top", sae=sae, group=group).collect(), k)
        return _partial_examples(run, chosen.drop("bin", "kind", "draw"), window=window, tokenizer=tokenizer)
    chosen = _ranked(doc_maxima(run, features, sae=sae, group=group), k)
    return _examples(run, chosen, features, sae=sae, group=group, window=window, tokenizer=tokenizer)


def check_features(run: Any, features: list[int], sae: str | None = None) -> None:
    """Refuse feature indices that no SAE of the run (or `sae`) has, naming the valid range."""
    resolved = open_run(run).read_manifest().get("resolved", {}).get("saes", [])
    saes = [s for s in resolved if (sae is None or s.get("name") == sae) and s.get("d_sae")]
    if not saes:
        return  # an unknown --sae is refused where the SAE is looked up; a manifest without widths is not checked
    widest = max(int(s["d_sae"]) for s in saes)
    bad = [f for f in features if not 0 <= f < widest]
    if bad:
        sizes = ", ".join(f"SAE {s['name']!r} has {int(s['d_sae']):,} (0-{int(s['d_sae']) - 1:,})" for s in saes)
        raise ValueError(f"feature {bad[0]} is out of range: {sizes}")


def _ranked(docs: pl.DataFrame, k: int) -> pl.DataFrame:
    """Per (sae, group, feature) the k documents with the largest value (ties: smaller doc_id), ranked 1..k."""
    return (docs.sort([*KEYS, "value", "doc_id"], descending=[False, False, False, True, False])
            .group_by(KEYS, maintain_order=True).head(k)
            .with_columns((pl.int_range(pl.len()).over(KEYS) + 1).cast(pl.Int32).alias("rank")))


def interval_examples(run: str | Path, features: list[int], *, sae: str | None = None, group: str | None = None,
                      bins: int = 5, per_bin: int = 3, seed: int = 0, window: tuple[int, int] = (10, 10),
                      tokenizer: Any = None, source: str = "auto") -> pl.DataFrame:
    """Documents sampled across each feature's range of activations, `bins` intervals from low to high.

    A document's value is its maximum for the feature (> 0). The log-spaced value bins the feature's
    documents occupy (partials.EDGES, 8 per decade), from the lowest to the highest, are cut into `bins`
    intervals of whole value bins (partials.intervals); from each, the `per_bin` documents with the smallest
    draw (partials.draws_np of (doc_id, feature, seed); ties: smaller doc_id) are shown: the same data and
    seed give the same examples, whichever other features are asked for. Whole value bins make the sample
    exact from the units' partials (seed 0 only; another seed reads the rows). Columns: those of
    `top_examples` with bin (the interval, 0 = lowest), bin_lo, bin_hi (its value range, (lo, hi]) instead
    of rank.
    """
    run = open_run(run)
    check_features(run, features, sae)
    from ..engine.partials import bin_edges, draws_np, interval_bins, intervals, value_bins_np

    if bins < 1 or per_bin < 1:
        raise ValueError(f"bins and per_bin must be at least 1, got bins={bins}, per_bin={per_bin}")
    _check_window(window)
    if seed != 0 and source == "partials":
        raise ValueError("the partials hold the samples of seed 0: use seed 0, or source rows")
    use = _source(run, per_bin, window, "sample", "rows" if seed != 0 and source == "auto" else source)
    if use == "partials":
        cand = (scan_examples(run, features, "sample", sae=sae, group=group).filter(pl.col("value") > 0).collect()
                .with_columns(pl.col("bin").cast(pl.Int32))
                .sort([*KEYS, "bin", "draw", "doc_id"]).group_by([*KEYS, "bin"], maintain_order=True).head(per_bin)
                .rename({"bin": "_vbin", "draw": "_draw"}))
    else:
        maxima = doc_maxima(run, features, sae=sae, group=group).filter(pl.col("value") > 0)
        cand = maxima.with_columns(
            pl.Series("_vbin", value_bins_np(maxima["value"].to_numpy()), dtype=pl.Int32),
            pl.Series("_draw", draws_np(maxima["doc_id"].to_numpy(), maxima["feature"].to_numpy(), seed)))
    cand = cand.with_columns(pl.col("_vbin").min().over(KEYS).alias("_lo"), pl.col("_vbin").max().over(KEYS).alias("_hi"))
    lo, hi = cand["_lo"].to_numpy(), cand["_hi"].to_numpy()
    iv = intervals(lo, hi, cand["_vbin"].to_numpy(), bins)
    first, last = interval_bins(lo, hi, iv, bins)
    chosen = (cand.with_columns(pl.Series("bin", iv, dtype=pl.Int32),
                                pl.Series("bin_lo", bin_edges(first)[0]), pl.Series("bin_hi", bin_edges(last)[1]))
              .sort([*KEYS, "bin", "_draw", "doc_id"])
              .group_by([*KEYS, "bin"], maintain_order=True).head(per_bin)
              .drop("_vbin", "_draw", "_lo", "_hi"))
    if use == "partials":
        out = _partial_examples(run, chosen, window=window, tokenizer=tokenizer)
    else:
        out = _examples(run, chosen, features, sae=sae, group=group, window=window, tokenizer=tokenizer)
    return out.sort([*KEYS, "bin", "value", "doc_id"], descending=[False, False, False, False, True, False])


def _check_window(window: tuple[int, int]) -> None:
    if window[0] < 0 or window[1] < 0:
        raise ValueError(f"window must be two non-negative token counts (before, after), got {window}")


def _partial_examples(run: str | Path, chosen: pl.DataFrame, *, window: tuple[int, int], tokenizer: Any) -> pl.DataFrame:
    """`_examples` for examples chosen from the partials: the position and the contexts are in the partials,
    the token ids in the merged examples' windows (merged.py) where the run has them, else in docs."""
    from ..engine import merged
    from .stats import scan_docs, scan_files

    before, after = window
    ex = chosen.with_row_index("_i")
    keys = ex.select("_i", pl.col("doc_id").cast(pl.Int64), pl.col("pos").cast(pl.Int32))
    parts, rest = [], keys
    rd = open_run(run)
    windows = merged.files(rd, merged.record(rd, rd.completions()), "windows")
    if windows:
        parts.append(merged.stored_windows(scan_files(windows), keys, before, after))
        rest = keys.join(parts[0], on="_i", how="anti")
    if rest.height:
        spans = merged.doc_spans(scan_docs(run), rest["doc_id"])
        missing = rest.join(spans, on="doc_id", how="anti")
        if missing.height:
            raise FileNotFoundError(f"{run}: document {missing['doc_id'][0]} of an example is not in docs")
        parts.append(merged.cut_windows(rest, spans, before, after, on=["doc_id"]))
    got = (pl.concat(parts).select("_i", "n_tokens", "window_start", "token_ids") if parts else
           pl.DataFrame(schema={"_i": pl.UInt32, "n_tokens": pl.Int32, "window_start": pl.Int32,
                                "token_ids": pl.List(pl.Int32)}))
    if got.height < ex.height:
        bad = ex.join(got, on="_i", how="anti").row(0, named=True)
        raise FileNotFoundError(f"{run} keeps no token ids of document {bad['doc_id']} around position {bad['pos']} "
                                "(output.docs: none): rerun with output.docs: examples or all")
    # each window position's activation: the context value at its offset from pos, 0.0 where the partials hold none
    grid = (got.select("_i", pl.int_ranges("window_start", pl.col("window_start") + pl.col("token_ids").list.len(),
                                           dtype=pl.Int32).alias("_p"))
            .explode("_p").drop_nulls("_p")
            .join(ex.select("_i", "pos"), on="_i").with_columns((pl.col("_p") - pl.col("pos")).alias("_off")))
    ctx = (ex.select("_i", "ctx_offset", "ctx_value").explode("ctx_offset", "ctx_value").drop_nulls("ctx_offset")
           .unique(["_i", "ctx_offset"], keep="first").rename({"ctx_offset": "_off"}))
    acts = (grid.join(ctx, on=["_i", "_off"], how="left").sort("_i", "_p")
            .group_by("_i", maintain_order=True).agg(pl.col("ctx_value").fill_null(0.0).cast(pl.Float32).alias("acts")))
    ex = (ex.join(got, on="_i", how="left").join(acts, on="_i", how="left").sort("_i")
          .with_columns(pl.col("acts").fill_null(pl.lit([], dtype=pl.List(pl.Float32)))).drop("_i"))
    return _finish(ex, tokenizer)


def _examples(run: str | Path, chosen: pl.DataFrame, features: list[int], *, sae: str | None, group: str | None,
              window: tuple[int, int], tokenizer: Any) -> pl.DataFrame:
    """Position of the max, window of token ids and per-token activations for chosen (feature, doc) pairs."""
    before, after = window
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
    return _finish(ex, tokenizer)


def _finish(ex: pl.DataFrame, tokenizer: Any) -> pl.DataFrame:
    """The examples' columns in order (rank or bin first, pos as int32), by rank; token strings with a tokenizer."""
    order = [c for c in ("rank", "bin", "bin_lo", "bin_hi") if c in ex.columns]
    ex = ex.select(*KEYS, *order, "doc_id", "value", pl.col("pos").cast(pl.Int32), "n_tokens", "window_start",
                   "token_ids", "acts")
    if "rank" in ex.columns:
        ex = ex.sort([*KEYS, "rank"])
    if tokenizer is not None:
        ex = ex.with_columns(pl.Series("tokens", [token_strings(tokenizer, ids) for ids in ex["token_ids"]],
                                       dtype=pl.List(pl.String)))
    return ex
