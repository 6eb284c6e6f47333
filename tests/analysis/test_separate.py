"""separate() against numpy/scipy on raw rows, shard-count invariance, a planted label feature, reference filter."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
from helpers import WORDS, make_model, write_dataset
from scipy import stats as st
from test_diff import D_SAE, NEW, extract, orthonormal_sae, plant

from saeray.analysis.separate import separate, write_separation

MARKER = "planet"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """A model whose marker token carries feature NEW; positives end with the marker, negatives never do."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("sep")
    base = make_model(root / "base", "llama")
    sae = orthonormal_sae(root / "sae")
    tok = AutoTokenizer.from_pretrained(base)
    t_marker = tok(" " + MARKER, add_special_tokens=False)["input_ids"][-1]
    model = plant(base, root / "model", sae, [(NEW, [t_marker], 3.0)])
    rng = random.Random(3)
    words = [w for w in WORDS if w != MARKER]
    docs, labels = [], []
    while len(docs) < 80:
        text = " ".join(rng.choice(words) for _ in range(rng.randint(2, 30)))
        positive = len(docs) % 3 == 0
        text = text + " " + MARKER if positive else text
        if positive != (tok(text, add_special_tokens=False)["input_ids"][-1] == t_marker):
            continue  # a negative that happens to end on the marker's last token
        docs.append(text)
        labels.append(positive)
    data = write_dataset(root / "data", docs, 3, {"label": labels, "cls": ["pos" if y else "neg" for y in labels]})
    ref_docs = [" ".join(rng.choice(words + [MARKER] * 40) for _ in range(20)) for _ in range(30)]
    ref_data = write_dataset(root / "ref_data", ref_docs, 2)
    out = {"special": set(tok.all_special_ids), "labels": np.array(labels), "root": root}
    for name, shards in [("one", None), ("many", 7)]:
        out[name] = extract(model, sae, data, root / name, data__shards=shards, data__keep_columns=["label", "cls"],
                            positions={"mode": "last"})
    # statistics only: no activation rows, the values at the last positions as lastvals partials (keep_columns)
    out["stats_only"] = extract(model, sae, data, root / "stats_only", data__shards=7, data__keep_columns=["label"],
                                positions={"mode": "last"}, output__activations=False, output__docs="none")
    out["ref"] = extract(model, sae, ref_data, root / "ref")
    out["all_positions"] = extract(model, sae, data, root / "all_positions", data__keep_columns=["label"])
    return out


def last_dense(run: Path, special: set[int]) -> np.ndarray:
    """[docs, features] activation at each document's last counted token, from raw files."""
    rows = pl.read_parquet(str(run / "activations" / "**" / "*.parquet"))
    docs = pl.read_parquet(str(run / "docs" / "**" / "*.parquet")).sort("doc_id")
    last = {d: max(p for p, t in enumerate(ids) if t not in special) for d, ids in zip(docs["doc_id"], docs["token_ids"])}
    x = np.zeros((len(docs), D_SAE))
    row_of = {d: i for i, d in enumerate(docs["doc_id"])}  # doc ids are file << 32 | row, not 0..n-1
    for d, p, f, v in rows.select("doc_id", "pos", "feature", "value").iter_rows():
        if last[d] == p:
            x[row_of[d], f] = v
    return x


def test_equals_numpy_and_scipy(runs):
    got = separate(runs["many"], label="label").features.sort("feature")
    x, y = last_dense(runs["many"], runs["special"]), runs["labels"]
    xp, xn = x[y], x[~y]
    np.testing.assert_allclose(got["f_pos"], (xp != 0).mean(0))
    np.testing.assert_allclose(got["f_neg"], (xn != 0).mean(0))
    np.testing.assert_allclose(got["mean_pos"], xp.mean(0), rtol=1e-6, atol=1e-12)
    # the documented rule (separate.DEFINITIONS): a variance below (1e-6 max|mean|)^2 is float32 rounding, 0
    eps = (1e-6 * np.maximum(np.abs(xp.mean(0)), np.abs(xn.mean(0)))) ** 2
    vp, vn = xp.var(0, ddof=1), xn.var(0, ddof=1)
    vp, vn = np.where(vp > eps, vp, 0.0), np.where(vn > eps, vn, 0.0)
    pooled = np.sqrt(((len(xp) - 1) * vp + (len(xn) - 1) * vn) / (len(x) - 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        d = np.where(pooled > 0, (xp.mean(0) - xn.mean(0)) / pooled, np.nan)
    np.testing.assert_allclose(got["cohens_d"].fill_null(np.nan), d, rtol=1e-6)
    res = st.ttest_ind(xp, xn, equal_var=False, axis=0)
    spread = (vp > 0) | (vn > 0)  # scipy's t on a rounding-level spread is noise; saeray's is null there
    np.testing.assert_allclose(got["p"].fill_null(np.nan).to_numpy()[spread], res.pvalue[spread], rtol=1e-5,
                               atol=1e-300)
    np.testing.assert_allclose(got["t"].fill_null(np.nan).to_numpy()[spread], res.statistic[spread], rtol=1e-5)
    u = np.array([st.mannwhitneyu(xp[:, f], xn[:, f]).statistic for f in range(D_SAE)])
    np.testing.assert_allclose(got["auroc"], u / (len(xp) * len(xn)), rtol=1e-12)
    assert len(set(np.round(u, 6))) > 5, "several distinct AUROCs (ties between zeros and values exercised)"
    np.testing.assert_allclose(got["q"], st.false_discovery_control(np.nan_to_num(res.pvalue, nan=1.0)), rtol=1e-6,
                               atol=1e-150)  # feature 0: p 0 here, 3e-180 from scipy on a rounding-level spread


def test_shard_count_and_position_mode_do_not_matter(runs):
    one = separate(runs["one"], label="label").features
    for other in (runs["many"], runs["all_positions"]):
        many = separate(other, label="label").features
        assert one["feature"].to_list() == many["feature"].to_list()
        if other == runs["all_positions"]:
            # NEW is constant within each class, up to float32 ulps that depend on the batch
            # layout: its s.d. is 0 in one run and ~1e-7 in the other, so d and t jump.
            one, many = (f.with_columns(pl.when(pl.col("feature") != NEW).then(pl.col("cohens_d", "t")))
                         for f in (one, many))
        for c, dt in one.schema.items():
            if dt.is_float():
                # float32 batching noise; test statistics amplify it (a p-value's relative error is ~|t| times t's)
                rtol = 1e-4 if c in ("t", "p", "q") else 3e-5
                np.testing.assert_allclose(one[c].fill_null(np.nan), many[c].fill_null(np.nan), rtol=rtol, atol=1e-7,
                                           err_msg=c)


def test_partials_equal_rows(runs):
    """The lastvals partials give the rows' result exactly (every score, the held-out classifier); a 7-unit
    statistics-only run gives the 7-unit row run's exactly and the 1-unit run's up to float32 batching noise."""
    from polars.testing import assert_frame_equal

    for name in ("one", "many", "all_positions"):
        rows = separate(runs[name], label="label", source="rows", top_k=2)
        parts = separate(runs[name], label="label", source="partials", top_k=2)
        assert rows.metadata["source"] == "rows" and parts.metadata["source"] == "partials"
        assert_frame_equal(rows.features, parts.features)
        assert_frame_equal(rows.heldout, parts.heldout)
        assert separate(runs[name], label="label").metadata["source"] == "partials"  # auto: every unit has them
    stats_only = separate(runs["stats_only"], label="label", top_k=2)
    assert stats_only.metadata["source"] == "partials"
    assert_frame_equal(stats_only.features, separate(runs["many"], label="label", source="rows", top_k=2).features)
    one = separate(runs["one"], label="label", source="rows").features
    assert one["feature"].to_list() == separate(runs["stats_only"], label="label").features["feature"].to_list()
    with pytest.raises(ValueError, match="statistics-only run|neither activation rows"):
        separate(runs["stats_only"], label="label", source="rows")


def test_finds_planted_feature_and_reference_drops_it(runs):
    sep = separate(runs["many"], label="cls", positive="pos")
    top = sep.features.row(0, named=True)
    assert top["feature"] == NEW and top["auroc"] == 1.0 and top["f_pos"] == 1.0 and top["f_neg"] == 0.0
    h = sep.heldout.row(0, named=True)
    assert h["features"] == str(NEW) and h["test_auroc"] == 1.0 and h["test_f1"] == 1.0
    assert h["n_train"] + h["n_test"] == len(runs["labels"])
    from saeray.analysis.stats import features

    density = dict(features(runs["ref"]).select("feature", "density").collect().iter_rows())
    cut = density[NEW] - 1e-9  # the marker is half the reference's words; most features fire on ~16% of tokens
    n_above = sum(d > cut for d in density.values())
    assert 1 <= n_above < D_SAE // 2
    dropped = separate(runs["many"], label="label", reference=runs["ref"], max_density=cut)
    assert NEW not in dropped.features["feature"].to_list()
    assert dropped.metadata["dropped"] == {"s/last": n_above} and dropped.features.height == D_SAE - n_above
    assert (dropped.features["ref_density"] <= cut).all()
    assert dropped.heldout["features"][0] != str(NEW)
    kept = separate(runs["many"], label="label", reference=runs["ref"], max_density=1.0)
    assert kept.features["feature"][0] == NEW and kept.metadata["dropped"] == {}
    none = separate(runs["many"], label="label", reference=runs["ref"])  # default 0.02: every feature is denser
    assert none.features.height == 0 and none.heldout.height == 0 and none.metadata["dropped"] == {"s/last": D_SAE}


def test_split_is_deterministic_and_stratified(runs):
    a = separate(runs["one"], label="label", seed=4, train_fraction=0.75).heldout
    b = separate(runs["many"], label="label", seed=4, train_fraction=0.75).heldout
    assert a["n_train"][0] == 60 and a.height == b.height
    for ra, rb in zip(a.to_dicts(), b.to_dicts()):
        floats = [k for k, v in ra.items() if isinstance(v, float)]
        assert {k: v for k, v in ra.items() if k not in floats} == {k: v for k, v in rb.items() if k not in floats}
        assert [ra[k] for k in floats] == pytest.approx([rb[k] for k in floats], rel=1e-5)  # batch-layout noise


def test_write_separation(runs, tmp_path):
    path = write_separation(runs["many"], tmp_path / "s", label="label", reference=runs["ref"], max_density=0.3,
                            top_k=2)  # drops NEW and the features its marker token fires
    meta = json.loads(pq.read_schema(path).metadata[b"saeray.separation"])
    assert meta["max_density"] == 0.3 and meta["dropped"]["s/last"] >= 1 and meta["top_k"] == 2 and "auroc" in meta["definitions"]
    assert pl.read_parquet(path).height + meta["dropped"]["s/last"] == D_SAE
    assert pl.read_csv(tmp_path / "s" / "heldout.csv").height == 1


def test_errors(runs):
    with pytest.raises(ValueError, match="no column 'nope'.*keep_columns"):
        separate(runs["one"], label="nope")
    with pytest.raises(ValueError, match="say which is positive"):
        separate(runs["one"], label="cls")
    with pytest.raises(ValueError, match="both classes"):
        separate(runs["one"], label="cls", positive="maybe")
    other = orthonormal_sae(runs["root"] / "sae_other", seed=1)
    ref = extract(runs["root"] / "model", other, runs["root"] / "ref_data", runs["root"] / "ref_other")
    with pytest.raises(ValueError, match="different SAEs"):
        separate(runs["one"], label="label", reference=ref)
    bare = extract(runs["root"] / "model", runs["root"] / "sae", runs["root"] / "data", runs["root"] / "bare",
                   data__keep_columns=["label"], output__activations=False, output__last_values=False)
    with pytest.raises(ValueError, match="neither activation rows.*output.last_values: true"):
        separate(bare, label="label")
