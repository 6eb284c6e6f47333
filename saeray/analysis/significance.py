"""Per-document statistics and the tests `diff` and `separate` share: Welch's t, Benjamini-Hochberg.

A document's value for a feature (doc_value) is the mean of the feature's values over the
document's counted positions of a group; `doc_moments` gives its mean and sample variance per
feature, from the rows (the reference) or merged from the units' partials. Both variances and
p-values follow scipy.stats.ttest_ind(equal_var=False); q is Benjamini-Hochberg within each (sae, group).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from ..engine.partials import chan_m2
from ..engine.run import open_run
from .stats import merged_doc_moments, scan_docs, scan_files, source_for

KEYS = ["sae", "group", "feature"]


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


def with_t(frame: pl.DataFrame, m1: str, v1: str, n1: str, m0: str, v0: str, n0: str) -> pl.DataFrame:
    """`frame` with columns t and p (`t_pvalues` of the named columns; NaN becomes null)."""
    t, p = t_pvalues(*(frame[c].to_numpy() for c in (m1, v1, n1, m0, v0, n0)))
    return frame.with_columns(pl.Series("t", t), pl.Series("p", p)).with_columns(pl.col("t", "p").fill_nan(None))


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


def with_q(frame: pl.DataFrame) -> pl.DataFrame:
    """`frame` with column q: Benjamini-Hochberg over the rows of each (sae, group); a null p counts as 1."""
    q = np.empty(frame.height)
    p = frame["p"].fill_null(1.0).to_numpy()
    for idx in frame.with_row_index("_i").group_by("sae", "group").agg("_i")["_i"]:
        idx = idx.to_numpy()
        q[idx] = benjamini_hochberg(p[idx])
    return frame.with_columns(pl.Series("q", q))


def positions_of(docs: pl.LazyFrame) -> pl.LazyFrame:
    """(group, doc_id, n_counted, last_pos) from docs.positions, one row per group a document has positions in."""
    return (docs.select("doc_id", "positions").explode("positions").drop_nulls("positions").unnest("positions")
            .select("group", "doc_id", pl.col("n").cast(pl.UInt32).alias("n_counted"), pl.col("last").alias("last_pos")))


def doc_positions(run: str | Path) -> pl.LazyFrame:
    """Per (group, doc_id) with at least one counted position: n_counted and last_pos, from docs.positions
    (written by the engine). Documents without counted positions are absent. Raises ValueError for a run
    whose docs lack the column (written by an older saeray)."""
    docs = scan_docs(run)
    if "positions" not in docs.collect_schema():
        raise ValueError(f"the docs of {run} have no `positions` column (each document's counted positions per "
                         "group): the run was written by an older saeray. Extract it again with `saeray run "
                         "CONFIG --overwrite`")
    return positions_of(docs)


def doc_moments(run: str | Path) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(per (sae, group, feature) mean and sample variance (ddof=1) of doc_value; n_docs per group), from the rows.

    Documents never span shards, so the moments are computed exactly shard by shard (two
    passes in float64; documents where the feature never fires contribute x = 0) and merged
    across shards with Chan's formula: memory is bounded by one shard, not by the run.
    """
    rd = open_run(run)
    n_docs = doc_positions(run).group_by("group").agg(pl.len().alias("n_docs")).collect()
    parts = []
    for shard, marker in sorted(rd.completions().items()):  # the files each marker lists (local and s3:// alike)
        acts = rd.shard_files(shard, "activations", marker)
        docs = rd.shard_files(shard, "docs", marker)
        if docs and acts:
            parts.append(_shard_moments(scan_files(acts), positions_of(scan_files(docs)).collect()))
    if not parts:
        return pl.DataFrame(schema={"sae": pl.String, "group": pl.String, "feature": pl.Int32,
                                    "doc_mean": pl.Float64, "doc_var": pl.Float64}), n_docs
    allp = pl.concat(parts)
    # Shards where a feature never fired hold n docs at x = 0: they enter with mean 0, m2 0.
    totals = allp.group_by(KEYS).agg((pl.col("mean") * pl.col("n")).sum().alias("_s")).join(n_docs, on="group")
    totals = totals.with_columns((pl.col("_s") / pl.col("n_docs")).alias("doc_mean"))
    spread = (allp.join(totals.select(*KEYS, "doc_mean"), on=KEYS)
              .group_by(KEYS).agg(chan_m2("m2", "n", "mean", "doc_mean").alias("_m2"), pl.col("n").sum().alias("_n_seen")))
    moments = (totals.join(spread, on=KEYS)
               .with_columns(((pl.col("_m2") + (pl.col("n_docs") - pl.col("_n_seen")) * pl.col("doc_mean") ** 2)
                              / (pl.col("n_docs") - 1)).alias("doc_var"))
               .select(*KEYS, "doc_mean", "doc_var"))
    return moments, n_docs


def _shard_moments(acts: pl.LazyFrame, pos: pl.DataFrame) -> pl.DataFrame:
    """One shard's n, mean and m2 (centred sum of squares) of doc_value per (sae, group, feature)."""
    n = pos.group_by("group").agg(pl.len().alias("n"))
    x = (acts.group_by([*KEYS, "doc_id"]).agg(pl.col("value").cast(pl.Float64).sum())
         .join(pos.lazy().select("group", "doc_id", "n_counted"), on=["group", "doc_id"])
         .select(*KEYS, (pl.col("value") / pl.col("n_counted")).alias("x"))
         .collect(engine="streaming"))
    mean = (x.group_by(KEYS).agg(pl.col("x").sum().alias("s"), pl.len().alias("nz"))
            .join(n, on="group").with_columns((pl.col("s") / pl.col("n")).alias("mean")))
    ss = (x.join(mean.select(*KEYS, "mean"), on=KEYS).group_by(KEYS)
          .agg(((pl.col("x") - pl.col("mean")) ** 2).sum().alias("ss")))
    return mean.join(ss, on=KEYS).select(
        *KEYS, "n", "mean", (pl.col("ss") + (pl.col("n") - pl.col("nz")) * pl.col("mean") ** 2).alias("m2"))


def partial_doc_moments(run: str | Path) -> tuple[pl.DataFrame, pl.DataFrame]:
    """`doc_moments` from the units' per-document moments (stats.merged_doc_moments): no pass over rows; raises
    LookupError for a run whose units lack them."""
    m = merged_doc_moments(run)
    n_docs = m.group_by("group").agg(pl.col("n_docs").max())
    return m.select(*KEYS, "doc_mean", "doc_var"), n_docs


def moments_source(run: str | Path, source: str) -> str:
    """Where the per-document moments of `run` come from under `source` (auto | rows | partials): 'rows' or
    'partials' (they come with the units' hist partials)."""
    return source_for(run, source, "hist")


def run_doc_moments(run: str | Path, source: str = "auto") -> tuple[pl.DataFrame, pl.DataFrame]:
    """Per-document moments from the partials (auto, when every unit has them) or the rows (the reference)."""
    return partial_doc_moments(run) if moments_source(run, source) == "partials" else doc_moments(run)


def doc_ttest(run_a: str | Path, run_b: str | Path, frame: pl.DataFrame, source: str = "auto") -> pl.DataFrame:
    """`frame` (sae, group, feature, ...) with n_docs_a/b, doc_mean_a/b, doc_var_a/b and Welch's t, p (B's
    documents vs A's) and q of doc_value; features a run never fires in have doc mean and variance 0."""
    (ma, n_a), (mb, n_b) = run_doc_moments(run_a, source), run_doc_moments(run_b, source)
    out = (frame.join(n_a.rename({"n_docs": "n_docs_a"}), on="group", how="left")
           .join(n_b.rename({"n_docs": "n_docs_b"}), on="group", how="left")
           .join(ma.rename({"doc_mean": "doc_mean_a", "doc_var": "doc_var_a"}), on=KEYS, how="left")
           .join(mb.rename({"doc_mean": "doc_mean_b", "doc_var": "doc_var_b"}), on=KEYS, how="left")
           .with_columns(pl.col("^doc_(mean|var)_[ab]$").fill_null(0.0)))
    out = with_t(out, "doc_mean_b", "doc_var_b", "n_docs_b", "doc_mean_a", "doc_var_a", "n_docs_a")
    return with_q(out)
