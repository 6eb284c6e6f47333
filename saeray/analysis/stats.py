"""Merge per-shard partials into corpus statistics with Polars.

Only committed shards (those with a completion marker) are read. Counts and sums add;
max takes the max (ties: smallest doc_id, pos); mean and variance merge in float64 as
M2 = sum_i [m2_i + n_i (mean_i - mean)^2], the many-way form of Chan's formula, which
does not depend on shard order or count.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from ..engine.partials import chan_m2
from ..engine.run import open_run
from ..engine.storage import polars_options


def committed_files(run: str | Path, kind: str) -> list[str]:
    """Parquet files (paths or URIs) of `kind` (store.KINDS) of committed shards.

    Only the files each shard's completion marker lists: files of unfinished or concurrent
    attempts are never read. For the kinds the run-level tables hold (merged.MERGED_KINDS): the merged
    files, and the files of units committed since the merge.
    """
    from ..engine import merged

    rd = open_run(run)
    rd.read_manifest()
    markers = rd.completions()
    if not markers:
        raise FileNotFoundError(f"{run} has no committed shards yet: run `saeray run` to completion first")
    if kind not in merged.MERGED_KINDS:
        return [f for i, m in markers.items() for f in rd.shard_files(i, kind, m)]
    rec = merged.record(rd, markers)
    done = merged.covered(rec, kind)
    units = {i: rd.shard_files(i, kind, m) for i, m in markers.items()}  # every marker checked, read or not
    return merged.files(rd, rec, kind) + [f for i, fs in units.items() if i not in done for f in fs]


def has_kind(run: str | Path, kind: str) -> bool:
    """Whether every committed unit of the run lists a `kind` file (the partials saeray added later, such as
    examples and hist, are absent from units made before them)."""
    markers = open_run(run).completions()
    return bool(markers) and all(kind in (m.get("files") or {}) for m in markers.values())


def check_source(source: str) -> None:
    if source not in ("auto", "rows", "partials"):
        raise ValueError(f"source must be auto, rows or partials, got {source!r}")


def source_for(run: str | Path, source: str, kind: str) -> str:
    """'partials' or 'rows' for an analysis asked `source` (auto | rows | partials): auto reads the `kind`
    partials when every unit has them, else the rows."""
    check_source(source)
    if source == "auto":
        return "partials" if has_kind(run, kind) else "rows"
    return source


def scan_files(files: list[str]) -> pl.LazyFrame:
    """Scan parquet files; object-store URIs use the standard AWS_* / cloud variables for credentials."""
    return pl.scan_parquet(files, storage_options=polars_options(files[0]) if files else None)


def scan_partials(run: str | Path) -> pl.LazyFrame:
    return scan_files(committed_files(run, "stats"))


def scan_activations(run: str | Path) -> pl.LazyFrame:
    """Activation rows (sae, group, doc_id, pos, feature, value) of committed shards."""
    files = committed_files(run, "activations")
    if not files:
        manifest = open_run(run).read_manifest()
        if not manifest["config"]["output"]["activations"]:
            raise FileNotFoundError(f"{run} is a statistics-only run (output.activations: false): it has no activation rows")
        from ..engine.store import ACTIVATIONS_SCHEMA
        return pl.LazyFrame(schema=pl.from_arrow(ACTIVATIONS_SCHEMA.empty_table()).schema)
    return scan_files(files)


def scan_docs(run: str | Path) -> pl.LazyFrame:
    """Documents (doc_id, n_tokens, token_ids, kept columns) of committed shards."""
    return scan_files(committed_files(run, "docs"))


def merge_partials(partials: pl.LazyFrame) -> pl.LazyFrame:
    """Per (sae, group, feature) statistics from per-shard partials (merged as the module docstring says)."""
    keys = ["sae", "group", "feature"]
    with_mean = partials.with_columns(
        (pl.col("sum") / pl.col("n_tokens")).fill_nan(0.0).alias("_mean_i"))
    totals = with_mean.group_by(keys).agg(
        pl.col("n_tokens").sum(), pl.col("n_active").sum(), pl.col("n_docs_active").sum(),
        pl.col("sum").sum(),
    ).with_columns((pl.col("sum") / pl.col("n_tokens")).alias("mean"))
    spread = with_mean.join(totals.select(*keys, pl.col("mean").alias("_mean")), on=keys).group_by(keys).agg(
        chan_m2("m2", "n_tokens", "_mean_i", "_mean").alias("m2"))
    best = (with_mean.filter(pl.col("max").is_not_null())
            .sort(["max", "max_doc_id", "max_pos"], descending=[True, False, False])
            .group_by(keys).first().select(*keys, "max", "max_doc_id", "max_pos"))
    return (totals.join(spread, on=keys).join(best, on=keys, how="left")
            .with_columns(
                (pl.col("n_active") / pl.col("n_tokens")).alias("density"),
                pl.when(pl.col("n_active") > 0).then(pl.col("sum") / pl.col("n_active")).otherwise(None).alias("mean_active"),
                (pl.col("m2") / pl.col("n_tokens")).sqrt().alias("std"))
            .select(*keys, "n_tokens", "n_active", "density", "mean", "mean_active", "std",
                    "max", "max_doc_id", "max_pos", "n_docs_active")
            .sort(keys))


def merged_doc_moments(run: str | Path) -> pl.DataFrame:
    """Per (sae, group, feature) from the units' per-document moments (stats n_docs, doc_sum, doc_m2; see
    partials.DEFINITIONS): n_docs, doc_mean and doc_var (sample variance, ddof=1) of doc_value, merged with
    Chan's formula. Raises LookupError for runs whose units were written without these columns."""
    if not has_kind(run, "hist"):
        raise LookupError(f"{run}: its units hold no per-document moments (a run written without hist partials): "
                          "extract it again with this saeray to get them")
    keys = ["sae", "group", "feature"]
    p = scan_partials(run).select(*keys, "n_docs", "doc_sum", "doc_m2").filter(pl.col("n_docs") > 0)
    p = p.with_columns((pl.col("doc_sum") / pl.col("n_docs")).alias("_m"))
    tot = p.group_by(keys).agg(pl.col("n_docs").sum(), pl.col("doc_sum").sum()).with_columns(
        (pl.col("doc_sum") / pl.col("n_docs")).alias("doc_mean"))
    m2 = (p.join(tot.select(*keys, pl.col("doc_mean")), on=keys).group_by(keys)
          .agg(chan_m2("doc_m2", "n_docs", "_m", "doc_mean").alias("_m2")))
    return (tot.join(m2, on=keys).with_columns((pl.col("_m2") / (pl.col("n_docs") - 1)).alias("doc_var"))
            .select(*keys, "n_docs", "doc_mean", "doc_var").sort(keys).collect())


def histograms(run: str | Path, features: list[int], *, sae: str, group: str) -> pl.DataFrame:
    """Per (feature, value bin) the counted positions whose value falls in the bin (partials.EDGES), merged over
    the units' hist partials: feature, bin, count (bins with none are absent)."""
    if not has_kind(run, "hist"):
        raise LookupError(f"{run}: its units hold no histogram partials (a run written without them): extract it "
                          "again with this saeray to get them")
    pred = (pl.col("sae") == sae) & (pl.col("group") == group) & pl.col("feature").is_in(pl.Series(features, dtype=pl.Int32).implode())
    return (scan_files(committed_files(run, "hist")).filter(pred).group_by("feature", "bin").agg(pl.col("count").sum())
            .sort("feature", "bin").collect())


def features(run: str | Path) -> pl.LazyFrame:
    return merge_partials(scan_partials(run))


def write_features(run: str | Path) -> Path | str:
    """Merge the units' partials not merged yet (merged.merge_run), write RUN/features.parquet (atomically) and
    return its path (its URI in an object store)."""
    from ..engine import merged
    from ..engine.store import parquet_bytes

    rd = open_run(run)
    merged.merge_run(rd)
    rd.write_bytes("features.parquet", parquet_bytes(features(rd).collect().to_arrow(),
                                                     {"saeray.run": rd.completeness().meta()}))
    return rd.uri("features.parquet") if rd.remote else Path(rd.uri("features.parquet"))


DENSE, ULTRA_DENSE, ULTRA_RARE = 0.01, 0.10, 1e-6
"""The summary's density thresholds: fraction of counted tokens on which a feature fires."""


def summary(frame: pl.DataFrame) -> pl.DataFrame:
    """Per (sae, group): tokens behind the figures, features alive/dead, dense/ultra-dense/ultra-rare counts
    (`summary_notes` says what each column means)."""
    return frame.group_by(["sae", "group"]).agg(
        pl.col("n_tokens").first().alias("tokens"),
        pl.len().alias("features"),
        (pl.col("n_active") > 0).sum().alias("alive"),
        (pl.col("n_active") == 0).sum().alias("dead"),
        (pl.col("density") > DENSE).sum().alias("dense_gt_1pct"),
        (pl.col("density") > ULTRA_DENSE).sum().alias("ultra_dense_gt_10pct"),
        ((pl.col("density") < ULTRA_RARE) & (pl.col("n_active") > 0)).sum().alias("ultra_rare_lt_1e-6"),
    ).sort(["sae", "group"])


SUMMARY_COLUMNS = ("tokens: counted token positions; features: the SAE's latents; alive / dead: features that fired on "
                   "at least one of them / on none",
                   "density: the fraction of tokens a feature fires on; dense_gt_1pct, ultra_dense_gt_10pct: features "
                   "of density above 1%, 10%; ultra_rare_lt_1e-6: alive features of density below 1e-6")
"""What the summary's columns mean, printed under it (two lines)."""


def summary_notes(table: pl.DataFrame) -> list[str]:
    """Lines to print under `summary(...)`: what its columns mean, and which thresholds its token counts are too
    few to resolve (one firing is already a density of 1/tokens)."""
    notes = list(SUMMARY_COLUMNS)
    if table.is_empty():
        return notes
    fewest = int(table["tokens"].min())
    if fewest <= round(1 / ULTRA_RARE):
        notes.append(f"with {fewest:,} tokens, one firing is a density of {1 / max(fewest, 1):.1e}: a density below "
                     f"1e-6 needs more than {round(1 / ULTRA_RARE):,} tokens to be observed, so ultra_rare_lt_1e-6 "
                     "is 0 here whatever the SAE does")
    if fewest < round(1 / DENSE):
        notes.append(f"with {fewest:,} tokens, any feature that fires at all has a density above 1%: dense_gt_1pct "
                     f"needs at least {round(1 / DENSE):,} tokens to mean anything")
    return notes


def reconstruction(run: str | Path) -> pl.DataFrame:
    """Per (sae, group): tokens, MSE per token, centred explained variance, L0, dead fraction, and
    the histogram of per-token squared error (edges: `saeray.engine.saes.ReconStats.BINS`).

    Needs a run extracted with output.reconstruction: true.
    """
    import numpy as np

    files = committed_files(run, "recon")
    if not files:
        raise FileNotFoundError(f"{run} has no reconstruction partials: extract with output.reconstruction: true")
    parts = scan_files(files).collect()
    rows = []
    for (sae, group), g in parts.group_by(["sae", "group"], maintain_order=True):
        n = int(g["n_tokens"].sum())
        sum_x = np.sum(np.array(g["sum_x"].to_list(), dtype=np.float64), axis=0)
        total = float(g["sum_sq"].sum()) - float(sum_x @ sum_x) / n
        sse = float(g["sse"].sum())
        rows.append({"sae": sae, "group": group, "n_tokens": n, "mse": sse / n, "explained_variance": 1 - sse / total,
                     "l0": float(g["l0_sum"].sum()) / n,
                     "sq_err_hist": np.sum(np.array(g["sq_err_hist"].to_list()), axis=0).tolist()})
    out = pl.DataFrame(rows)
    dead = features(run).group_by("sae", "group").agg((pl.col("n_active") == 0).mean().alias("dead_fraction")).collect()
    return out.join(dead, on=["sae", "group"], how="left").sort("sae", "group")


EV_MARGIN = 0.10
"""`saeray stats` warns when a run's explained variance is this far below the SAE's training report."""


def training_gaps(run: str | Path, margin: float = EV_MARGIN) -> list[dict]:
    """Per (sae, group) of a run with reconstruction partials: where the run's explained variance is more
    than `margin` below the held-out figure of the SAE's own training report (saeray_training.json beside
    a disk SAE, written by `saeray train-sae`). SAEs without a report, or whose weights changed since the
    run (digest), are skipped. Empty when the run has no reconstruction partials."""
    import json

    if not committed_files(run, "recon"):
        return []
    manifest = open_run(run).read_manifest()
    paths = {s["name"]: s.get("path") for s in manifest["config"].get("saes", [])}
    digests = {s["name"]: s.get("digest") for s in manifest["resolved"].get("saes", [])}
    reports = {}
    for name, path in paths.items():
        report_file = Path(path).expanduser() / "saeray_training.json" if path else None
        if report_file is None or not report_file.is_file():
            continue
        from ..engine.config import SAEConfig
        from ..engine.saes import describe

        try:
            if describe(SAEConfig(name=name, path=path)).digest != digests.get(name):
                continue
        except Exception:  # noqa: BLE001 - an SAE that cannot be read now has no comparable report
            continue
        reports[name] = (report_file, json.loads(report_file.read_text())["held_out"])
    out = []
    for row in reconstruction(run).iter_rows(named=True):
        if row["sae"] not in reports:
            continue
        report_file, held = reports[row["sae"]]
        if row["explained_variance"] < held["explained_variance"] - margin:
            out.append({"sae": row["sae"], "group": row["group"], "tokens": row["n_tokens"],
                        "explained_variance": row["explained_variance"],
                        "report_explained_variance": held["explained_variance"], "report_tokens": held["tokens"],
                        "report": str(report_file)})
    return out
