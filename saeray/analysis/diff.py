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

import numpy as np
import polars as pl

from ..engine.store import open_run
from .stats import features, scan_activations, scan_docs

log = logging.getLogger(__name__)

PRESETS: dict[str, dict[str, float | None]] = {
    # active = fires on any token; "shifted" is everything active in both runs with rho <= 0.7.
    "default": {"active_value": None, "active_fraction": 0.0, "new_ratio": 3.0, "stable_rho": 0.7, "shifted_rho": 0.0},
    # WORKFLOWS.md workflow 1: active = fraction of tokens with value > 0.1 exceeds 0.01.
    "vlm_transfer": {"active_value": 0.1, "active_fraction": 0.01, "new_ratio": 3.0, "stable_rho": 0.7,
                     "shifted_rho": 0.3},
}
KEYS = ["sae", "group", "feature"]
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


def doc_moments(run: str | Path) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(per (sae, group, feature) mean and sample variance (ddof=1) of doc_value; n_docs per group).

    Documents never span shards, so the moments are computed exactly shard by shard (two
    passes in float64; documents where the feature never fires contribute x = 0) and merged
    across shards with Chan's formula: memory is bounded by one shard, not by the run.
    """
    from .stats import _scan

    rd = open_run(run)
    parts = []
    for shard, marker in sorted(rd.completions().items()):  # the files each marker lists (local and s3:// alike)
        acts = rd.shard_files(shard, "activations", marker)
        docs = rd.shard_files(shard, "docs", marker)
        if not docs:
            continue
        pos = _positions(_scan(docs)).collect()
        n = pos.group_by("group").agg(pl.len().alias("n"))
        if not acts:
            continue
        x = (_scan(acts).group_by([*KEYS, "doc_id"]).agg(pl.col("value").cast(pl.Float64).sum())
             .join(pos.lazy().select("group", "doc_id", "n_counted"), on=["group", "doc_id"])
             .select(*KEYS, (pl.col("value") / pl.col("n_counted")).alias("x"))
             .collect(engine="streaming"))
        mean = (x.group_by(KEYS).agg(pl.col("x").sum().alias("s"), pl.len().alias("nz"))
                .join(n, on="group").with_columns((pl.col("s") / pl.col("n")).alias("mean")))
        ss = (x.join(mean.select(*KEYS, "mean"), on=KEYS).group_by(KEYS)
              .agg(((pl.col("x") - pl.col("mean")) ** 2).sum().alias("ss")))
        parts.append(mean.join(ss, on=KEYS).select(
            *KEYS, "n", "mean", (pl.col("ss") + (pl.col("n") - pl.col("nz")) * pl.col("mean") ** 2).alias("m2")))
    n_docs = doc_positions(run).group_by("group").agg(pl.len().alias("n_docs")).collect()
    if not parts:
        return pl.DataFrame(schema={"sae": pl.String, "group": pl.String, "feature": pl.Int32,
                                    "doc_mean": pl.Float64, "doc_var": pl.Float64}), n_docs
    allp = pl.concat(parts)
    # Shards where a feature never fired hold n docs at x = 0: they enter with mean 0, m2 0.
    totals = allp.group_by(KEYS).agg((pl.col("mean") * pl.col("n")).sum().alias("_s")).join(n_docs, on="group")
    totals = totals.with_columns((pl.col("_s") / pl.col("n_docs")).alias("doc_mean"))
    spread = (allp.join(totals.select(*KEYS, "doc_mean"), on=KEYS)
              .group_by(KEYS).agg((pl.col("m2") + pl.col("n") * (pl.col("mean") - pl.col("doc_mean")) ** 2).sum()
                                  .alias("_m2"), pl.col("n").sum().alias("_n_seen")))
    moments = (totals.join(spread, on=KEYS)
               .with_columns(((pl.col("_m2") + (pl.col("n_docs") - pl.col("_n_seen")) * pl.col("doc_mean") ** 2)
                              / (pl.col("n_docs") - 1)).alias("doc_var"))
               .select(*KEYS, "doc_mean", "doc_var"))
    return moments, n_docs


def partial_doc_moments(run: str | Path) -> tuple[pl.DataFrame, pl.DataFrame]:
    """`doc_moments` from the units' per-document moments (stats.doc_moments): no pass over rows; raises
    LookupError for runs whose units predate them."""
    from .stats import doc_moments as merged

    m = merged(run)
    n_docs = m.group_by("group").agg(pl.col("n_docs").max())
    return m.select(*KEYS, "doc_mean", "doc_var"), n_docs


def run_doc_moments(run: str | Path, source: str = "auto") -> tuple[pl.DataFrame, pl.DataFrame]:
    """Per-document moments from the partials (auto, when every unit has them) or the rows (the reference)."""
    return partial_doc_moments(run) if _moments_source(run, source) == "partials" else doc_moments(run)


def _significance(run_a: str | Path, run_b: str | Path, frame: pl.DataFrame, source: str = "auto") -> pl.DataFrame:
    (ma, n_a), (mb, n_b) = run_doc_moments(run_a, source), run_doc_moments(run_b, source)
    out = (frame.join(n_a.rename({"n_docs": "n_docs_a"}), on="group", how="left")
           .join(n_b.rename({"n_docs": "n_docs_b"}), on="group", how="left")
           .join(ma.rename({"doc_mean": "doc_mean_a", "doc_var": "doc_var_a"}), on=KEYS, how="left")
           .join(mb.rename({"doc_mean": "doc_mean_b", "doc_var": "doc_var_b"}), on=KEYS, how="left")
           .with_columns(pl.col("^doc_(mean|var)_[ab]$").fill_null(0.0)))
    t, p = t_pvalues(out["doc_mean_b"].to_numpy(), out["doc_var_b"].to_numpy(), out["n_docs_b"].to_numpy(),
                     out["doc_mean_a"].to_numpy(), out["doc_var_a"].to_numpy(), out["n_docs_a"].to_numpy())
    out = out.with_columns(pl.Series("t", t), pl.Series("p", p)).with_columns(pl.col("t", "p").fill_nan(None))
    q = np.empty(out.height)
    p_filled = out["p"].fill_null(1.0).to_numpy()
    for idx in out.with_row_index("_i").group_by("sae", "group").agg("_i")["_i"]:
        idx = idx.to_numpy()
        q[idx] = benjamini_hochberg(p_filled[idx])
    return out.with_columns(pl.Series("q", q))


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
        frame = _significance(run_a, run_b, frame, source)
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
            "preset": preset, "thresholds": th, "pseudo": options.get("pseudo", 1.0),
            "significance": options.get("significance", True), "definitions": DEFINITIONS,
            "doc_moments_from": {r: _moments_source(run, options.get("source", "auto"))
                                 for r, run in (("a", run_a), ("b", run_b))}}


def _moments_source(run: str | Path, source: str) -> str:
    """Where the per-document moments of `run` come from under `source` (rows or partials; they came with the
    units' hist partials)."""
    from .stats import source_for

    return source_for(run, source, "hist")


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


# ---- helpers shared with separate.py ---------------------------------------------------


def check_same_saes(run_a: str | Path, run_b: str | Path) -> None:
    """Refuse to compare runs whose SAEs (names and weight/config digests) differ."""
    def saes(run: str | Path) -> dict[str, str]:
        return {s["name"]: s["digest"] for s in open_run(run).read_manifest()["resolved"]["saes"]}

    sa, sb = saes(run_a), saes(run_b)
    if sa != sb:
        diffs = [f"{n}: {sa.get(n, 'absent')[:12]} vs {sb.get(n, 'absent')[:12]}"
                 for n in sorted(set(sa) | set(sb)) if sa.get(n) != sb.get(n)]
        raise ValueError(f"runs {run_a} and {run_b} used different SAEs ({'; '.join(diffs)}; digests of config and "
                         "weights): features are only comparable under the same SAE. Extract both runs with the same "
                         "`saes:` entries")


def _tokenization(run: Any) -> Any:
    """The run's own Tokenization (its tokenizer + position rules, from its manifest)."""
    from ..engine import config as config_mod
    from ..engine.contexts import Tokenization

    run = open_run(run)
    manifest = run.read_manifest()
    cfg = config_mod.from_dict(manifest["config"])
    try:
        tok = run.tokenizer
    except OSError as e:
        raise FileNotFoundError(f"cannot load the tokenizer of model {cfg.model.name!r} (needed to count each "
                                f"document's positions): {e}") from None
    r = manifest["resolved"]
    return Tokenization(tok, cfg.positions, prepend_bos=r["prepend_bos"], context_size=r["context_size"],
                        exclude_special=cfg.tokens.exclude_special)


def _positions(docs: pl.LazyFrame) -> pl.LazyFrame:
    return (docs.select("doc_id", "positions").explode("positions").drop_nulls("positions").unnest("positions")
            .select("group", "doc_id", pl.col("n").cast(pl.UInt32).alias("n_counted"), pl.col("last").alias("last_pos")))


def doc_positions(run: str | Path) -> pl.LazyFrame:
    """Per (group, doc_id) with at least one counted position: n_counted and last_pos.

    Read from docs.positions (written by the engine); for runs made before that column
    existed, recomputed from docs.token_ids with the run's own tokenizer and position rules.
    Documents without counted positions are absent.
    """
    if "positions" in scan_docs(run).collect_schema():
        return _positions(scan_docs(run))
    tok = _tokenization(run)
    docs = scan_docs(run).select("doc_id", "token_ids")
    mode = tok.positions.mode
    if mode in ("all", "last"):
        special = tok.special_ids.tolist() if tok.exclude_special else []
        counted = (docs.explode("token_ids").with_columns(pl.int_range(pl.len()).over("doc_id").alias("pos"))
                   .filter(pl.col("token_ids").is_not_null() & ~pl.col("token_ids").is_in(special))
                   .group_by("doc_id").agg(pl.len().alias("n_counted"), pl.col("pos").max().alias("last_pos")))
        if mode == "last":
            counted = counted.with_columns(pl.lit(1, pl.UInt32).alias("n_counted"))
        return counted.select(pl.lit(mode).alias("group"), "doc_id", "n_counted",
                              pl.col("last_pos").cast(pl.Int32))
    out: list[tuple[str, int, int, int]] = []
    for doc_id, ids in docs.collect().iter_rows():
        for g, pos in tok.select(np.asarray(ids or [], dtype=np.int64), doc_id).items():
            if len(pos):
                out.append((g, doc_id, len(pos), int(pos[-1])))
    return pl.LazyFrame(out, schema={"group": pl.String, "doc_id": pl.Int64, "n_counted": pl.UInt32,
                                     "last_pos": pl.Int32}, orient="row")


def t_pvalues(m1: np.ndarray, v1: np.ndarray, n1: np.ndarray, m0: np.ndarray, v0: np.ndarray,
              n0: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Welch's t and two-sided p of group 1 vs group 0 from means, sample variances (ddof=1) and sizes.

    Both variances 0: NaN if the means are equal, else t = +-inf and p = 0 (as scipy.stats.ttest_ind).
    """
    from scipy import stats as st

    with np.errstate(divide="ignore", invalid="ignore"):
        a, b = v1 / n1, v0 / n0
        se2 = a + b
        t = (m1 - m0) / np.sqrt(se2)
        df = se2 ** 2 / (a ** 2 / (n1 - 1) + b ** 2 / (n0 - 1))
        p = 2 * st.t.sf(np.abs(t), df)
    flat = ~(se2 > 0)  # both groups constant: identical means give no test, different ones separate perfectly
    same = flat & (m1 == m0)
    t = np.where(same, np.nan, np.where(flat, np.copysign(np.inf, m1 - m0), t))
    return t, np.where(same, np.nan, np.where(flat, 0.0, p))


def benjamini_hochberg(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values: q_(i) = min_{j >= i} m p_(j) / j, capped at 1."""
    p = np.asarray(p, dtype=np.float64)
    m = len(p)
    if m == 0:
        return p.copy()
    order = np.argsort(p, kind="stable")
    scaled = p[order] * m / np.arange(1, m + 1)
    q = np.minimum(np.minimum.accumulate(scaled[::-1])[::-1], 1.0)
    out = np.empty(m)
    out[order] = q
    return out


def with_neuronpedia(frame: pl.DataFrame, run: str | Path) -> pl.DataFrame:
    """Add column `neuronpedia` (feature page URL) where the SAE config names a neuronpedia_id."""
    ids = {s["name"]: s.get("neuronpedia_id") for s in open_run(run).read_manifest()["resolved"]["saes"]}
    prefix = pl.DataFrame({"sae": list(ids), "_np": [f"https://www.neuronpedia.org/{v}/" if v else None
                                                    for v in ids.values()]}, schema={"sae": pl.String, "_np": pl.String})
    return (frame.join(prefix, on="sae", how="left")
            .with_columns((pl.col("_np") + pl.col("feature").cast(pl.String)).alias("neuronpedia")).drop("_np"))


def write_parquet_with_meta(frame: pl.DataFrame, path: Path, key: str, meta: dict[str, Any]) -> None:
    """Write `frame` atomically with `meta` as JSON under Parquet key-value metadata `key`."""
    import pyarrow.parquet as pq

    table = frame.to_arrow()
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), key: json.dumps(meta, sort_keys=True)})
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp, compression="zstd")
    tmp.replace(path)
