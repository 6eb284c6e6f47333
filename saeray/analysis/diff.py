"""Diff of two runs over the same SAE: per-feature deltas, fold changes, classes and significance.

Token-level statistics come from `stats.features` (so they match `features.parquet`);
significance is judged per document (Welch's t-test on per-document mean activations,
Benjamini-Hochberg across the features of each (sae, group)). See DEFINITIONS.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import polars as pl

from ..engine.run import open_run
from .significance import KEYS, doc_ttest, moments_source
from .stats import features, scan_activations
from .tables import check_same_saes, with_neuronpedia, write_parquet_with_meta

log = logging.getLogger(__name__)

PRESETS: dict[str, dict[str, float | None]] = {
    # active = fires on any token; "shifted" is everything active in both runs with rho <= 0.7.
    "default": {"active_value": None, "active_fraction": 0.0, "new_ratio": 3.0, "stable_rho": 0.7, "shifted_rho": 0.0},
    # text model vs its VLM (saeray transfer): active = fraction of tokens with value > 0.1 exceeds 0.01.
    "vlm_transfer": {"active_value": 0.1, "active_fraction": 0.01, "new_ratio": 3.0, "stable_rho": 0.7,
                     "shifted_rho": 0.3},
}
CLASSES = ("dead_in_both", "new_in_b", "lost_from_a", "stable", "shifted", "other")
METRICS = ("density", "mean", "mean_active")

DEFINITIONS = {
    "d_<metric>": "<metric>_b - <metric>_a (token-level statistics of each run, as in features.parquet)",
    "lfc_density": "log2((n_active_b + p) / (n_tokens_b + p)) - log2((n_active_a + p) / (n_tokens_a + p)), p = pseudo",
    "lfc_mean": "log2((sum_b + p*s) / (n_tokens_b + p)) - log2((sum_a + p*s) / (n_tokens_a + p)): p pseudo-tokens "
                "of value s = pooled mean_active of the feature over both runs; 0 if the feature never fires; "
                "NaN where a sum is negative",
    "lfc_mean_active": "log2((sum_b + p*s) / (n_active_b + p)) - log2((sum_a + p*s) / (n_active_a + p))",
    "rho": "min(mean_a, mean_b) / max(mean_a, mean_b); null when both are 0",
    "frac_above": "fraction of counted tokens with value > active_value (only when active_value is set)",
    "active": "density > active_fraction when active_value is null, else frac_above > active_fraction",
    "class": "dead_in_both: active in neither; new_in_b: active only in B and mean_b > new_ratio * mean_a; "
             "lost_from_a: active only in A and mean_a > new_ratio * mean_b; stable: active in both, rho > stable_rho; "
             "shifted: active in both, shifted_rho < rho <= stable_rho; other: none of these",
    "doc_value": "per document: sum of the feature's values over the document's counted positions of the group / "
                 "number of those positions (0 when it never fires); documents with no counted position are left out",
    "t, p": "Welch's unequal-variance t-test of doc_value, B's documents vs A's (two-sided); both variances 0: "
            "null if the means are equal, else t = +-inf and p = 0",
    "q": "Benjamini-Hochberg adjusted p over the features of each (sae, group); null p (no variance) counts as 1",
    "doc_moments_from": "partials: each unit's count, sum and centred sum of squares of doc_value (stats n_docs, "
                        "doc_sum, doc_m2), merged with Chan's formula; rows: recomputed from the activation rows",
}


def _token_table(run: str | Path, active_value: float | None) -> pl.LazyFrame:
    """features() plus the sum of values and, when asked, the fraction of tokens above `active_value`."""
    f = features(run).with_columns((pl.col("mean") * pl.col("n_tokens")).alias("sum"))
    if active_value is None:
        return f
    above = (scan_activations(run).filter(pl.col("value") > active_value)
             .group_by(KEYS).agg(pl.len().alias("_n_above")))
    return (f.join(above, on=KEYS, how="left")
            .with_columns((pl.col("_n_above").fill_null(0) / pl.col("n_tokens")).alias("frac_above"))
            .drop("_n_above"))


def diff_runs(run_a: str | Path, run_b: str | Path, *, preset: str = "default", pseudo: float = 1.0,
              active_value: float | None = None, active_fraction: float | None = None,
              new_ratio: float | None = None, stable_rho: float | None = None, shifted_rho: float | None = None,
              significance: bool = True, source: str = "auto") -> pl.DataFrame:
    """Per (sae, group, feature) comparison of run B against run A (see DEFINITIONS).

    Thresholds default to those of `preset` (PRESETS); explicit arguments override them.
    `significance=False` skips the per-document test. `source`: where its per-document moments come from:
    the units' partials (auto, when every unit has them; no pass over rows) or the rows (the reference).
    Raises ValueError if the runs' SAEs differ or they share no (sae, group).
    """
    run_a, run_b = open_run(run_a), open_run(run_b)
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    given = dict(active_value=active_value, active_fraction=active_fraction, new_ratio=new_ratio,
                 stable_rho=stable_rho, shifted_rho=shifted_rho)
    th = {k: (v if v is not None else PRESETS[preset][k]) for k, v in given.items()}
    if pseudo <= 0:
        raise ValueError(f"pseudo must be > 0 (a pseudo-count in tokens), got {pseudo}")
    check_same_saes(run_a, run_b)
    ta = _token_table(run_a, th["active_value"]).collect()
    tb = _token_table(run_b, th["active_value"]).collect()
    pairs_a, pairs_b = set(ta.select("sae", "group").unique().iter_rows()), set(tb.select("sae", "group").unique().iter_rows())
    if not pairs_a & pairs_b:
        raise ValueError(f"runs share no (sae, group): A has {sorted(pairs_a)}, B has {sorted(pairs_b)}; "
                         "extract both with the same positions settings")
    if pairs_a != pairs_b:
        log.warning("(sae, group) pairs in only one run are left out: %s", sorted(pairs_a ^ pairs_b))
    frame = ta.join(tb, on=KEYS, suffix="_b").rename({c: f"{c}_a" for c in ta.columns if c not in KEYS})
    frame = frame.with_columns(_expressions(pseudo, th)).with_columns(_classify(th))
    cols = [*KEYS, *[f"{m}_{r}" for m in METRICS for r in "ab"], *[f"d_{m}" for m in METRICS],
            *[f"lfc_{m}" for m in METRICS], "rho", *(["frac_above_a", "frac_above_b"] if th["active_value"] is not None else []),
            "active_a", "active_b", "class", "n_tokens_a", "n_tokens_b", "n_active_a", "n_active_b"]
    frame = frame.select(cols)
    if significance:
        frame = doc_ttest(run_a, run_b, frame, source)
    return with_neuronpedia(frame, run_a).sort(KEYS)


def _expressions(p: float, th: dict[str, Any]) -> list[pl.Expr]:
    a, b = (lambda c: pl.col(f"{c}_a")), (lambda c: pl.col(f"{c}_b"))
    s = ((a("sum") + b("sum")) / (a("n_active") + b("n_active"))).fill_nan(0.0)
    mn, mx = pl.min_horizontal(a("mean"), b("mean")), pl.max_horizontal(a("mean"), b("mean"))
    lfc = lambda num_a, den_a, num_b, den_b: ((num_b / den_b).log(2) - (num_a / den_a).log(2))  # noqa: E731
    alive = (a("n_active") + b("n_active")) > 0
    crit = "frac_above" if th["active_value"] is not None else "density"
    return [
        *[(b(m) - a(m)).alias(f"d_{m}") for m in ("density", "mean")],
        (b("mean_active").fill_null(0.0) - a("mean_active").fill_null(0.0)).alias("d_mean_active"),
        lfc(a("n_active") + p, a("n_tokens") + p, b("n_active") + p, b("n_tokens") + p).alias("lfc_density"),
        pl.when(alive).then(lfc(a("sum") + p * s, a("n_tokens") + p, b("sum") + p * s, b("n_tokens") + p))
        .otherwise(0.0).alias("lfc_mean"),
        pl.when(alive).then(lfc(a("sum") + p * s, a("n_active") + p, b("sum") + p * s, b("n_active") + p))
        .otherwise(0.0).alias("lfc_mean_active"),
        pl.when(mx != 0).then(mn / mx).otherwise(None).alias("rho"),
        (a(crit) > th["active_fraction"]).alias("active_a"),
        (b(crit) > th["active_fraction"]).alias("active_b"),
    ]


def _classify(th: dict[str, Any]) -> pl.Expr:
    aa, ab, rho = pl.col("active_a"), pl.col("active_b"), pl.col("rho")
    return (pl.when(~aa & ~ab).then(pl.lit("dead_in_both"))
            .when(~aa & ab & (pl.col("mean_b") > th["new_ratio"] * pl.col("mean_a"))).then(pl.lit("new_in_b"))
            .when(aa & ~ab & (pl.col("mean_a") > th["new_ratio"] * pl.col("mean_b"))).then(pl.lit("lost_from_a"))
            .when(aa & ab & (rho > th["stable_rho"])).then(pl.lit("stable"))
            .when(aa & ab & (rho > th["shifted_rho"]) & (rho <= th["stable_rho"])).then(pl.lit("shifted"))
            .otherwise(pl.lit("other")).alias("class"))


def top_changes(diff: pl.DataFrame, metric: str, k: int = 100, *, by: str = "diff") -> pl.DataFrame:
    """The k largest increases (B over A) of `metric` per (sae, group), flat columns for CSV.

    by="diff" ranks by d_<metric>, by="lfc" by lfc_<metric>.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}: choose one of {', '.join(METRICS)}")
    if by not in ("diff", "lfc"):
        raise ValueError(f"by must be 'diff' or 'lfc', got {by!r}")
    key = f"{'d' if by == 'diff' else 'lfc'}_{metric}"
    extra = [c for c in ("q", "neuronpedia") if c in diff.columns]
    return (diff.sort([key, "feature"], descending=[True, False], nulls_last=True)
            .group_by("sae", "group", maintain_order=True).head(k)
            .with_columns(pl.int_range(1, pl.len() + 1).over("sae", "group").alias("rank"))
            .select("sae", "group", "rank", "feature", f"{metric}_a", f"{metric}_b", f"d_{metric}",
                    f"lfc_{metric}", "class", *extra))


def diff_metadata(run_a: str | Path, run_b: str | Path, **options: Any) -> dict[str, Any]:
    """What a diff table means: runs, thresholds (after preset resolution), formulas."""
    preset = options.get("preset", "default")
    th = {k: (options[k] if options.get(k) is not None else v) for k, v in PRESETS[preset].items()}
    return {"run_a": str(run_a), "run_b": str(run_b),
            "fingerprint_a": open_run(run_a).read_manifest()["fingerprint"],
            "fingerprint_b": open_run(run_b).read_manifest()["fingerprint"],
            "completeness_a": open_run(run_a).completeness().meta(),
            "completeness_b": open_run(run_b).completeness().meta(),
            "preset": preset, "thresholds": th, "pseudo": options.get("pseudo", 1.0),
            "significance": options.get("significance", True), "definitions": DEFINITIONS,
            "doc_moments_from": {r: moments_source(run, options.get("source", "auto"))
                                 for r, run in (("a", run_a), ("b", run_b))}}


def write_diff(run_a: str | Path, run_b: str | Path, out_dir: str | Path, *, k: int = 100,
               **options: Any) -> Path:
    """Write out_dir/diff.parquet (metadata under key 'saeray.diff'), diff.json, top_<group>_<metric>.csv."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    frame = diff_runs(run_a, run_b, **options)
    meta = diff_metadata(run_a, run_b, **options)
    meta["counts"] = {f"{s}/{g}": dict(d.group_by("class").len().sort("class").iter_rows())
                      for (s, g), d in frame.group_by("sae", "group")}
    write_parquet_with_meta(frame, out / "diff.parquet", "saeray.diff", meta)
    (out / "diff.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    for (group,), d in frame.group_by("group"):
        for m in METRICS:
            top_changes(d, m, k).write_csv(out / f"top_{group}_{m}.csv")
    return out / "diff.parquet"
