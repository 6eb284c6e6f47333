"""Explore the features of a run over categorized texts (workflow 4).

Meant for runs extracted with `positions.mode: last` (one position per document) and a
category column kept in docs (`data.keep_columns: [category]`). Every function works on
one (sae, group) pair and on per-document values: a document's value for a feature is its
maximum over the document's recorded positions (with mode last, the last counted token).

Definitions (parameters, returned in the frames where they matter):
- active: the run holds a row for (document, feature), i.e. value != 0 (or past the SAE's threshold);
- strong: value >= strong_frac * the feature's maximum over the whole run, and value > 0;
- specialist score: fraction of the category's documents where the feature is strong minus
  the same fraction over all other documents.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from .stats import scan_activations, scan_docs, scan_partials


def target(run: str | Path, sae: str | None = None, group: str | None = None) -> tuple[str, str]:
    """The (sae, group) pair to explore: the given one, or the run's only one."""
    pairs = scan_partials(run).select("sae", "group").unique().sort("sae", "group").collect().rows()
    chosen = [(s, g) for s, g in pairs if (sae is None or s == sae) and (group is None or g == group)]
    if len(chosen) != 1:
        listed = ", ".join(f"{s}/{g}" for s, g in pairs)
        what = "matches" if not chosen else "is ambiguous"
        raise ValueError(f"sae={sae!r} group={group!r} {what} in run {run}: it has (sae/group) {listed}; "
                         "pass sae= and group=")
    return chosen[0]


def doc_values(run: str | Path, *, sae: str | None = None, group: str | None = None,
               features: list[int] | None = None) -> pl.DataFrame:
    """(doc_id, feature, value): each active (document, feature) pair with its maximum in the document."""
    s, g = target(run, sae, group)
    pred = (pl.col("sae") == s) & (pl.col("group") == g)
    if features is not None:
        pred &= pl.col("feature").is_in(pl.Series(features, dtype=pl.Int32).implode())
    return (scan_activations(run).filter(pred).group_by("doc_id", "feature").agg(pl.col("value").max())
            .collect(engine="streaming").sort("feature", "doc_id"))


def documents(run: str | Path, category_col: str | None = None) -> pl.DataFrame:
    """doc_id (and `category`, from the kept column `category_col`) of every committed document."""
    docs = scan_docs(run)
    if category_col is None:
        return docs.select("doc_id").collect().sort("doc_id")
    names = docs.collect_schema().names()
    if category_col not in names:
        kept = [c for c in names if c not in ("doc_id", "n_tokens", "token_ids", "positions")]
        raise ValueError(f"docs of run {run} have no column {category_col!r}; kept columns: {kept or 'none'}. "
                         "Keep it at extraction with data.keep_columns")
    return docs.select("doc_id", pl.col(category_col).alias("category")).collect().sort("doc_id")


def _with_strong(values: pl.DataFrame, strong_frac: float) -> pl.DataFrame:
    if not 0 < strong_frac <= 1:
        raise ValueError(f"strong_frac must be in (0, 1], got {strong_frac}")
    fmax = pl.col("value").max().over("feature")
    return values.with_columns(((pl.col("value") > 0) & (pl.col("value") >= strong_frac * fmax)).alias("strong"))


def strongest(run: str | Path, *, n: int = 10, sae: str | None = None, group: str | None = None) -> pl.DataFrame:
    """The n features with the highest maximum: feature, max, max_doc_id (smallest on ties), n_docs."""
    v = doc_values(run, sae=sae, group=group)
    return (v.sort("feature", "value", "doc_id", descending=[False, True, False])
            .group_by("feature", maintain_order=True)
            .agg(pl.col("value").first().alias("max"), pl.col("doc_id").first().alias("max_doc_id"),
                 pl.len().alias("n_docs"))
            .sort(["max", "feature"], descending=[True, False]).head(n))


def most_frequent(run: str | Path, *, n: int = 10, sae: str | None = None, group: str | None = None) -> pl.DataFrame:
    """The n features active in the most documents: feature, n_docs, frac_docs, max."""
    total = documents(run).height
    v = doc_values(run, sae=sae, group=group)
    return (v.group_by("feature").agg(pl.len().alias("n_docs"), pl.col("value").max().alias("max"))
            .with_columns((pl.col("n_docs") / total).alias("frac_docs"))
            .select("feature", "n_docs", "frac_docs", "max")
            .sort(["n_docs", "feature"], descending=[True, False]).head(n))


def most_selective(run: str | Path, *, n: int = 10, strong_frac: float = 0.5, sae: str | None = None,
                   group: str | None = None) -> pl.DataFrame:
    """The n features strong on the fewest documents (ties: higher max first): feature, n_strong, n_docs, max."""
    v = _with_strong(doc_values(run, sae=sae, group=group), strong_frac)
    return (v.group_by("feature").agg(pl.col("strong").sum().alias("n_strong"), pl.len().alias("n_docs"),
                                      pl.col("value").max().alias("max"))
            .filter(pl.col("n_strong") > 0)
            .sort(["n_strong", "max", "feature"], descending=[False, True, False]).head(n))


def category_specialists(run: str | Path, category_col: str, *, n: int = 10, strong_frac: float = 0.5,
                         sae: str | None = None, group: str | None = None) -> pl.DataFrame:
    """Per category, the n features with the highest score = frac strong inside - frac strong outside.

    Columns: category, feature, n_in, n_out (documents), strong_in, strong_out, frac_in,
    frac_out, score. Only features strong somewhere are scored.
    """
    docs = documents(run, category_col)
    sizes = docs.group_by("category").agg(pl.len().alias("n_in"))
    strong = (_with_strong(doc_values(run, sae=sae, group=group), strong_frac).filter("strong")
              .join(docs, on="doc_id"))
    total = strong.group_by("feature").agg(pl.len().alias("strong_all"))
    inside = strong.group_by("category", "feature").agg(pl.len().alias("strong_in"))
    return (sizes.join(total, how="cross")
            .join(inside, on=["category", "feature"], how="left", nulls_equal=True)
            .with_columns(pl.col("strong_in").fill_null(0), (docs.height - pl.col("n_in")).alias("n_out"))
            .with_columns((pl.col("strong_all") - pl.col("strong_in")).alias("strong_out"))
            .with_columns((pl.col("strong_in") / pl.col("n_in")).alias("frac_in"),
                          (pl.col("strong_out") / pl.col("n_out")).fill_nan(0.0).alias("frac_out"))
            .with_columns((pl.col("frac_in") - pl.col("frac_out")).alias("score"))
            .sort(["category", "score", "feature"], descending=[False, True, False], nulls_last=True)
            .group_by("category", maintain_order=True).head(n)
            .select("category", "feature", "n_in", "n_out", "strong_in", "strong_out", "frac_in", "frac_out",
                    "score"))


def coactivation(run: str | Path, features: list[int], category_col: str | None = None, *,
                 sae: str | None = None, group: str | None = None) -> pl.DataFrame:
    """Per category (or overall), every pair a < b of `features`: documents where both are active.

    Columns: category (when category_col is given), n_docs (documents in the category),
    feature_a, feature_b, n_both. Pairs that never co-occur are listed with n_both = 0.
    """
    feats = sorted(set(features))
    docs = documents(run, category_col)
    if category_col is None:
        docs = docs.with_columns(pl.lit(None, dtype=pl.String).alias("category"))
    active = doc_values(run, sae=sae, group=group, features=feats).select("doc_id", "feature").join(docs, on="doc_id")
    both = (active.join(active.select("doc_id", pl.col("feature").alias("feature_b")), on="doc_id")
            .filter(pl.col("feature") < pl.col("feature_b")).rename({"feature": "feature_a"})
            .group_by("category", "feature_a", "feature_b").agg(pl.len().alias("n_both")))
    pairs = pl.DataFrame([(a, b) for i, a in enumerate(feats) for b in feats[i + 1:]],
                         schema={"feature_a": pl.Int32, "feature_b": pl.Int32}, orient="row")
    out = (docs.group_by("category").agg(pl.len().alias("n_docs")).join(pairs, how="cross")
           .join(both, on=["category", "feature_a", "feature_b"], how="left", nulls_equal=True)
           .with_columns(pl.col("n_both").fill_null(0))
           .sort("category", "feature_a", "feature_b", nulls_last=True))
    return out.drop("category") if category_col is None else out


def feature_by_doc_matrix(run: str | Path, features: list[int], category_col: str | None = None, *,
                          sae: str | None = None, group: str | None = None) -> pl.DataFrame:
    """Wide documents x features frame for heatmaps: doc_id, [category], one column per feature ("F").

    Every committed document is a row (0.0 where the feature is inactive), ordered by
    category then doc_id; feature columns in the order given.
    """
    feats = list(dict.fromkeys(features))
    docs = documents(run, category_col)
    v = doc_values(run, sae=sae, group=group, features=feats)
    wide = docs.select("doc_id")
    if v.height:
        wide = wide.join(v.pivot(on="feature", index="doc_id", values="value"), on="doc_id", how="left")
    cols = [str(f) for f in feats]
    wide = wide.with_columns([pl.col(c).fill_null(0.0).cast(pl.Float32) if c in wide.columns
                              else pl.lit(0.0, dtype=pl.Float32).alias(c) for c in cols])
    out = docs.join(wide.select("doc_id", *cols), on="doc_id", how="left")
    return out.sort(["category", "doc_id"] if category_col else ["doc_id"], nulls_last=True)
