"""Separation of labelled groups of documents by SAE features (e.g. correct from incorrect code).

One position per document: the last counted position of each group (extract with
`positions.mode: last`; in other modes the last selected position of the document is read,
not the last position where a given feature fires). A document with no row for a feature
has value 0 there. Per feature: firing fractions, Cohen's d, Welch's t, AUROC; then a
held-out check of a simple classifier chosen on a training split. See DEFINITIONS.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from ..engine.run import open_run
from .significance import KEYS, doc_positions, with_q, with_t
from .stats import committed_files, features, has_kind, scan_activations, scan_docs, scan_files, source_for
from .tables import with_neuronpedia, write_parquet_with_meta

log = logging.getLogger(__name__)

SELECT_BY = {"auroc": "auroc", "f_diff": "f_diff", "cohens_d": "cohens_d"}
DEFINITIONS = {
    "value": "the feature's activation at the document's last counted position of the group; 0 without a row",
    "f_pos, f_neg": "fraction of positive / negative documents where value != 0",
    "f_diff": "f_pos - f_neg",
    "cohens_d": "(mean_pos - mean_neg) / pooled s.d., pooled s.d. = sqrt(((n_pos-1) var_pos + (n_neg-1) var_neg) "
                "/ (n_pos + n_neg - 2)), sample variances (a variance below (1e-6 max|mean|)^2, float32 "
                "rounding, counts as 0); null when the pooled s.d. is 0",
    "t, p": "Welch's unequal-variance t-test, positives vs negatives, two-sided; both variances 0: null if the "
              "means are equal, else t = +-inf, p = 0",
    "q": "Benjamini-Hochberg adjusted p over the kept features of each (sae, group)",
    "auroc": "P(value_pos > value_neg) + P(equal) / 2 = U / (n_pos n_neg), U from average ranks (ties share ranks)",
    "ref_density": "the feature's density in the reference run's features(); features above max_density are dropped",
    "reference_positions": "the reference run's positions settings: mode sample gives the published reference rate "
                           "(e.g. one random word-final token per document within 128 tokens), mode all a token density",
    "split": "stratified by label: each class's doc_ids, sorted, are permuted with numpy default_rng(seed); the first "
             "round(train_fraction * n) go to training",
    "classifier": "on the training split pick the top_k kept features by |auroc - 0.5| (or |f_diff|, |cohens_d|); "
                  "score = sum of sign * value / (training s.d.); threshold = the training score maximising F1; "
                  "a document is predicted positive when score >= threshold",
}


HELDOUT_SCHEMA = {"sae": pl.String, "group": pl.String, "features": pl.String, "signs": pl.String,
                  "threshold": pl.Float64, "n_train": pl.Int64, "n_test": pl.Int64, "train_auroc": pl.Float64,
                  "test_auroc": pl.Float64, "train_f1": pl.Float64, "test_f1": pl.Float64}


@dataclass(frozen=True)
class Separation:
    features: pl.DataFrame
    """Per kept (sae, group, feature): the scores above, over all labelled documents."""
    heldout: pl.DataFrame
    """Per (sae, group): the classifier chosen on the training split and its test AUROC / F1."""
    metadata: dict[str, Any]


def read_labels(run: str | Path, label: str, positive: Any) -> tuple[pl.DataFrame, Any]:
    """(doc_id, y) of documents with a non-null label, and the positive value used."""
    schema = scan_docs(run).collect_schema()
    if label not in schema:
        kept = [c for c in schema if c not in ("doc_id", "n_tokens", "token_ids", "positions")]
        raise ValueError(f"docs of {run} have no column {label!r} (kept columns: {kept or 'none'}): "
                         f"extract with data.keep_columns: [{label}]")
    docs = scan_docs(run).select("doc_id", label).drop_nulls(label).collect()
    values = docs[label].unique().sort().to_list()
    if positive is None:
        if docs.schema[label] == pl.Boolean or set(values) <= {0, 1}:
            positive = True if docs.schema[label] == pl.Boolean else 1
        else:
            raise ValueError(f"label {label!r} has values {values[:10]}: say which is positive (positive=VALUE)")
    if isinstance(positive, str) and docs.schema[label] != pl.String:
        import yaml  # a value typed on the command line: "1", "true", "2.5"

        positive = yaml.safe_load(positive)
    y = docs[label] == positive
    if y.all() or not y.any():
        raise ValueError(f"label {label!r} == {positive!r} holds for {int(y.sum())} of {len(y)} documents: "
                         f"both classes are needed (values: {values[:10]})")
    return docs.select("doc_id", y.alias("y")), positive


def _scores(x: pl.DataFrame, docs: pl.DataFrame, keys: pl.DataFrame) -> pl.DataFrame:
    """Scores per row of `keys` (sae, group, feature) from nonzero values x (sae, group, doc_id, feature,
    value, y) over the documents `docs` (group, doc_id, y)."""
    n = docs.group_by("group").agg(pl.col("y").sum().cast(pl.Int64).alias("n_pos"),
                                   (~pl.col("y")).sum().cast(pl.Int64).alias("n_neg"))
    x = x.join(docs.select("group", "doc_id"), on=["group", "doc_id"]).join(n, on="group").with_columns(
        (pl.col("n_pos") + pl.col("n_neg") - pl.len().over(KEYS)).alias("_zeros"),
        pl.col("value").rank("average").over(KEYS).alias("_r"),
        (pl.col("value") < 0).sum().over(KEYS).alias("_nneg"))
    x = x.with_columns(pl.when(pl.col("value") > 0).then(pl.col("_r") + pl.col("_zeros")).otherwise(pl.col("_r"))
                       .alias("_rank"))
    agg = x.group_by(KEYS).agg(
        *[e for cls, yv in (("pos", True), ("neg", False)) for e in (
            (pl.col("y") == yv).sum().alias(f"nz_{cls}"),
            pl.col("value").filter(pl.col("y") == yv).cast(pl.Float64).sum().alias(f"sum_{cls}"))],
        pl.col("_rank").filter(pl.col("y")).sum().alias("_rsum"), pl.col("_nneg").first())
    s = (keys.join(n, on="group").join(agg, on=KEYS, how="left")
         .with_columns(pl.col("^nz_.*$", "^sum_.*$", "_rsum", "_nneg").fill_null(0))
         .with_columns(*[(pl.col(f"sum_{c}") / pl.col(f"n_{c}")).alias(f"mean_{c}") for c in ("pos", "neg")]))
    ss = (x.join(s.select(*KEYS, "mean_pos", "mean_neg"), on=KEYS)
          .with_columns(((pl.col("value") - pl.when(pl.col("y")).then("mean_pos").otherwise("mean_neg")) ** 2)
                        .alias("value"))
          .group_by(KEYS).agg(*[pl.col("value").filter(pl.col("y") == yv).sum().alias(f"_ss_{c}")
                                for c, yv in (("pos", True), ("neg", False))]))
    s = s.join(ss, on=KEYS, how="left").with_columns(pl.col("^_ss_.*$").fill_null(0.0))
    var = {c: (pl.col(f"_ss_{c}") + (pl.col(f"n_{c}") - pl.col(f"nz_{c}")) * pl.col(f"mean_{c}") ** 2)
           / (pl.col(f"n_{c}") - 1) for c in ("pos", "neg")}
    # Activations are float32: a spread below their resolution (1e-6 of the means) is rounding
    # noise from batch layout, not signal, and counts as 0 (else d and t swing between null and 1e7).
    eps = (1e-6 * pl.max_horizontal(pl.col("mean_pos").abs(), pl.col("mean_neg").abs())) ** 2
    var = {c: pl.when(v > eps).then(v).otherwise(0.0) for c, v in var.items()}
    zero_rank = pl.col("_nneg") + (pl.col("n_pos") + pl.col("n_neg") - pl.col("nz_pos") - pl.col("nz_neg") + 1) / 2
    pooled = (((pl.col("n_pos") - 1) * var["pos"] + (pl.col("n_neg") - 1) * var["neg"])
              / (pl.col("n_pos") + pl.col("n_neg") - 2)).sqrt()
    s = s.with_columns(
        (pl.col("nz_pos") / pl.col("n_pos")).alias("f_pos"), (pl.col("nz_neg") / pl.col("n_neg")).alias("f_neg"),
        var["pos"].alias("var_pos"), var["neg"].alias("var_neg"),
        pl.when(pooled > 0).then((pl.col("mean_pos") - pl.col("mean_neg")) / pooled).alias("cohens_d"),
        ((pl.col("_rsum") + (pl.col("n_pos") - pl.col("nz_pos")) * zero_rank
          - pl.col("n_pos") * (pl.col("n_pos") + 1) / 2) / (pl.col("n_pos") * pl.col("n_neg"))).alias("auroc"),
    ).with_columns((pl.col("f_pos") - pl.col("f_neg")).alias("f_diff"))
    s = with_t(s, "mean_pos", "var_pos", "n_pos", "mean_neg", "var_neg", "n_neg")
    return s.select(*KEYS, "n_pos", "n_neg", "f_pos", "f_neg", "f_diff", "mean_pos", "mean_neg", "cohens_d",
                    "t", "p", "auroc")


def last_values(run: str | Path, labels: pl.DataFrame, source: str = "auto") -> tuple[pl.DataFrame, pl.DataFrame]:
    """(nonzero values at each labelled document's last position: sae, group, doc_id, feature, value, y;
    the labelled documents with a position per group: group, doc_id, y). `source`: rows (the activation rows at
    the documents' last positions), partials (the units' lastvals, partials.DEFINITIONS) or auto (partials
    when every unit has them): the same values."""
    docs = doc_positions(run).collect().join(labels, on="doc_id")
    if _source(run, source) == "partials":
        x = (scan_files(committed_files(run, "lastvals"))
             .join(docs.lazy().select("group", "doc_id", "y"), on=["group", "doc_id"]))
    else:
        x = (scan_activations(run).filter(pl.col("value") != 0)
             .join(docs.lazy().select("group", "doc_id", pl.col("last_pos").alias("pos"), "y"),
                   on=["group", "doc_id", "pos"]))
    x = x.select(*KEYS[:2], "doc_id", "feature", "value", "y").collect()
    return x, docs.select("group", "doc_id", "y")


def _source(run: str | Path, source: str) -> str:
    """'rows' or 'partials' for `source` (auto | rows | partials), with a clear error when neither is there."""
    got = source_for(run, source, "lastvals")
    rows = bool(open_run(run).read_manifest()["config"]["output"]["activations"])
    if got == "partials" and not has_kind(run, "lastvals"):
        raise ValueError(f"{run} has no lastvals partials (values at each document's last position): extract it "
                         "with output.last_values: true (the default when data.keep_columns keeps labels)"
                         + ("" if rows else "; it has no activation rows either (output.activations: false)"))
    if got == "rows" and not rows:
        raise ValueError(f"{run} has neither activation rows (output.activations: false) nor lastvals partials in "
                         "every unit: extract the labelled corpus with output.last_values: true (the default when "
                         "data.keep_columns keeps labels; documents x active latents rows)")
    return got


def _reference_density(run: str | Path, reference: str | Path, group: str | None) -> pl.DataFrame:
    """(sae, feature, ref_density) from the reference run, after checking it used the same SAEs."""
    mine = {s["name"]: s["digest"] for s in open_run(run).read_manifest()["resolved"]["saes"]}
    ref = {s["name"]: s["digest"] for s in open_run(reference).read_manifest()["resolved"]["saes"]}
    bad = [n for n in mine if ref.get(n) != mine[n]]
    if bad:
        raise ValueError(f"reference run {reference} lacks or used different SAEs for {bad} (digests of config and "
                         "weights differ): extract the reference corpus with the same `saes:` entries")
    f = features(reference).collect()
    groups = sorted(f["group"].unique())
    if group is None:
        group = "all" if "all" in groups else (groups[0] if len(groups) == 1 else None)
    if group not in groups:
        raise ValueError(f"reference run has groups {groups}: choose one with reference_group=")
    return f.filter(pl.col("group") == group).select("sae", "feature", pl.col("density").alias("ref_density"))


def split(docs: pl.DataFrame, train_fraction: float, seed: int) -> pl.DataFrame:
    """(doc_id, train) stratified by y; deterministic given the documents and the seed."""
    d = docs.select("doc_id", "y").unique().sort("doc_id")
    rng = np.random.default_rng(seed)
    train = []
    for yv in (False, True):
        ids = d.filter(pl.col("y") == yv)["doc_id"].to_numpy()
        train.extend(rng.permutation(ids)[: int(round(train_fraction * len(ids)))].tolist())
    return d.select("doc_id", pl.col("doc_id").is_in(train).alias("train"))


def auroc(score: np.ndarray, y: np.ndarray) -> float:
    """U / (n_pos n_neg) with average ranks for ties."""
    from scipy.stats import rankdata

    n1, n0 = int(y.sum()), int((~y).sum())
    return float((rankdata(score)[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0)) if n1 and n0 else float("nan")


def _best_threshold(score: np.ndarray, y: np.ndarray) -> float:
    """The candidate threshold (a training score) that maximises F1 of `score >= threshold`."""
    cand = np.unique(score)
    pred = score[None, :] >= cand[:, None]
    tp = (pred & y).sum(1)
    f1 = 2 * tp / (pred.sum(1) + y.sum())
    return float(cand[int(np.argmax(f1))])


def _f1(pred: np.ndarray, y: np.ndarray) -> float:
    tp = int((pred & y).sum())
    return 2 * tp / (int(pred.sum()) + int(y.sum())) if (pred.sum() + y.sum()) else 0.0


def _heldout(x: pl.DataFrame, docs: pl.DataFrame, keys: pl.DataFrame, *, select_by: str, top_k: int,
             train_fraction: float, seed: int) -> pl.DataFrame:
    """Pick top_k features per (sae, group) on the training split; AUROC and F1 on the test split."""
    parts = split(docs, train_fraction, seed)
    docs = docs.join(parts, on="doc_id")
    train_docs = docs.filter(pl.col("train")).drop("train")
    x = x.join(parts, on="doc_id")
    train = _scores(x.filter(pl.col("train")).drop("train"), train_docs, keys)
    strength = (pl.col(select_by) - 0.5 if select_by == "auroc" else pl.col(select_by))
    chosen = (train.with_columns(strength.alias("_s")).filter(pl.col("_s").is_not_null())
              .sort([pl.col("_s").abs(), "feature"], descending=[True, False])
              .group_by("sae", "group", maintain_order=True).head(top_k)
              .with_columns(pl.col("_s").sign().replace(0, 1).alias("sign")))
    out = []
    for (sae, group), sel in chosen.group_by("sae", "group", maintain_order=True):
        d = docs.filter(pl.col("group") == group).sort("doc_id")
        ids = d["doc_id"].to_numpy()
        xs = x.filter((pl.col("sae") == sae) & (pl.col("group") == group) & pl.col("feature").is_in(sel["feature"].implode()))
        dense = np.zeros((len(ids), sel.height))
        col = {f: j for j, f in enumerate(sel["feature"].to_list())}
        row = np.searchsorted(ids, xs["doc_id"].to_numpy())
        dense[row, [col[f] for f in xs["feature"].to_list()]] = xs["value"].to_numpy()
        is_train, y = d["train"].to_numpy(), d["y"].to_numpy()
        sd = dense[is_train].std(axis=0, ddof=1)
        score = (dense * sel["sign"].to_numpy() / np.where(sd > 0, sd, 1.0)).sum(axis=1)
        thr = _best_threshold(score[is_train], y[is_train])
        test = ~is_train
        out.append({"sae": sae, "group": group, "features": ",".join(map(str, sel["feature"].to_list())),
                    "signs": ",".join(str(int(v)) for v in sel["sign"].to_list()), "threshold": thr,
                    "n_train": int(is_train.sum()), "n_test": int(test.sum()),
                    "train_auroc": auroc(score[is_train], y[is_train]), "test_auroc": auroc(score[test], y[test]),
                    "train_f1": _f1(score[is_train] >= thr, y[is_train]), "test_f1": _f1(score[test] >= thr, y[test])})
    return pl.DataFrame(out, schema=HELDOUT_SCHEMA)


def separate(run: str | Path, *, label: str, positive: Any = None, reference: str | Path | None = None,
             max_density: float = 0.02, reference_group: str | None = None, train_fraction: float = 0.5,
             seed: int = 0, select_by: str = "auroc", top_k: int = 1, source: str = "auto") -> Separation:
    """Score every feature's separation of documents with `label == positive` from the rest (DEFINITIONS).

    With `reference`, features whose density there exceeds `max_density` are dropped (counted in
    metadata['dropped']). `positive` defaults to True for a boolean label and 1 for a 0/1 label. `source`:
    where each document's value comes from (last_values); rows and partials give the same result.
    """
    run, reference = open_run(run), (open_run(reference) if reference is not None else None)
    if select_by not in SELECT_BY:
        raise ValueError(f"select_by must be one of {', '.join(SELECT_BY)}, got {select_by!r}")
    if not 0 < train_fraction < 1:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    mode = open_run(run).read_manifest()["config"]["positions"]["mode"]
    if mode != "last":
        log.warning("%s was extracted with positions.mode %r: reading each document's last selected position "
                    "(positions.mode: last extracts only what separation needs)", run, mode)
    labels, positive = read_labels(run, label, positive)
    x, docs = last_values(run, labels, source)
    keys = features(run).select(KEYS).collect()
    dropped: dict[str, int] = {}
    ref = None
    if reference is not None:
        ref = _reference_density(run, reference, reference_group)
        keys = keys.join(ref, on=["sae", "feature"], how="left")
        gone = keys.filter(pl.col("ref_density") > max_density)
        dropped = {f"{s}/{g}": n for s, g, n in gone.group_by("sae", "group").len().sort("sae", "group").iter_rows()}
        keys = keys.filter(~(pl.col("ref_density") > max_density).fill_null(False))
        log.info("dropped %d features with reference density > %g", gone.height, max_density)
    scores = with_q(_scores(x, docs, keys.select(KEYS)))
    if ref is not None:
        scores = scores.join(ref, on=["sae", "feature"], how="left")
    scores = with_neuronpedia(scores, run).sort(["sae", "group", "auroc", "feature"], descending=[False, False, True, False])
    heldout = _heldout(x, docs, keys.select(KEYS), select_by=select_by, top_k=top_k,
                       train_fraction=train_fraction, seed=seed)
    n = docs.group_by("group").agg(pl.col("y").sum().alias("pos"), (~pl.col("y")).sum().alias("neg")).sort("group")
    meta = {"run": str(run), "fingerprint": open_run(run).read_manifest()["fingerprint"],
            "completeness": open_run(run).completeness().meta(), "label": label,
            "positive": positive, "positions_mode": mode, "source": _source(run, source), "documents": {g: {"positive": a, "negative": b}
                                                                        for g, a, b in n.iter_rows()},
            "reference": str(reference) if reference is not None else None, "max_density": max_density,
            "reference_positions": (open_run(reference).read_manifest()["config"]["positions"]
                                    if reference is not None else None),
            "dropped": dropped, "train_fraction": train_fraction, "seed": seed, "select_by": select_by,
            "top_k": top_k, "heldout": heldout.to_dicts(), "definitions": DEFINITIONS}
    return Separation(scores, heldout, meta)


def write_separation(run: str | Path, out_dir: str | Path, **options: Any) -> Path:
    """Write out_dir/separation.parquet (metadata under 'saeray.separation'), separation.json, heldout.csv."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sep = separate(run, **options)
    write_parquet_with_meta(sep.features, out / "separation.parquet", "saeray.separation", sep.metadata)
    (out / "separation.json").write_text(json.dumps(sep.metadata, indent=2, sort_keys=True, default=str))
    sep.heldout.write_csv(out / "heldout.csv")
    return out / "separation.parquet"
