"""diff_runs against numpy/scipy on raw rows, shard-count invariance, planted differences, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
import torch
from helpers import base_config, corpus, make_model, make_sae, write_dataset
from scipy import stats as st

from saeray.analysis.diff import diff_runs, top_changes, write_diff
from saeray.analysis.significance import benjamini_hochberg
from saeray.engine import config
from saeray.executors import run

HOOK = "blocks.0.hook_resid_pre"  # = the embeddings: a change to embedding rows reaches the SAE unmixed
D_SAE = 32
NEW, UP, LOST = 0, 1, 2  # planted: dead in A and fires on token t1 in B; raised on t2; pushed below zero everywhere


def orthonormal_sae(path: Path, seed: int = 0, bias: float = -0.02) -> Path:
    """A standard SAE whose encoder columns = decoder rows = orthonormal directions, so adding
    c * W_dec[f] to an input moves feature f's pre-activation by c and no other feature's."""
    from sae_lens import SAE

    make_sae(path, "standard", 64, HOOK, d_sae=D_SAE, seed=seed)
    sae = SAE.load_from_disk(str(path))
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(64, D_SAE, generator=g))
    with torch.no_grad():
        sae.W_enc.copy_(u)
        sae.W_dec.copy_(u.T)
        sae.b_dec.zero_()
        sae.b_enc.fill_(bias)  # embeddings ~ N(0, 0.02): a feature fires on ~16% of tokens
        sae.b_enc[NEW] = -1.0  # never fires on the base model
    sae.save_model(str(path))
    return path


def plant(model_dir: Path, out: Path, sae_dir: Path, changes: list[tuple[int, list[int] | None, float]]) -> Path:
    """Save a copy of the model whose embedding rows `ids` (None: all) moved by c * W_dec[f]."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    w_dec = load_file(str(sae_dir / "sae_weights.safetensors"))["W_dec"]
    emb = model.get_input_embeddings().weight
    with torch.no_grad():
        for f, ids, c in changes:
            emb[slice(None) if ids is None else ids] += c * w_dec[f]
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return out


def extract(model: Path, sae: Path, data: Path, out: Path, **over) -> Path:
    run(config.from_dict(base_config(model, [{"name": "s", "path": str(sae)}], data, out, **over)), executor="local")
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("diff")
    from transformers import AutoTokenizer

    model_a = make_model(root / "a", "llama")
    sae = orthonormal_sae(root / "sae")
    docs = corpus(60, seed=11)
    tok = AutoTokenizer.from_pretrained(model_a)
    special = set(tok.all_special_ids)
    ids = [t for d in docs for t in tok(d, add_special_tokens=False)["input_ids"] if t not in special]
    t1, t2 = [int(t) for t in np.argsort(-np.bincount(ids))[:2]]  # the two most frequent tokens
    model_b = plant(model_a, root / "b", sae, [(NEW, [t1], 3.0), (UP, [t2], 0.1), (LOST, None, -1.0)])
    data = write_dataset(root / "data", docs, 3)
    out = {"special": special, "sae": sae, "data": data, "root": root}
    for name, model, shards in [("a1", model_a, None), ("a7", model_a, 7), ("b1", model_b, None), ("b7", model_b, 7)]:
        out[name] = extract(model, sae, data, root / name, data__shards=shards)
    return out


def dense(run: Path, special: set[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(per-document mean activation [docs, features], token-level sums, counted tokens) from raw files."""
    rows = pl.read_parquet(str(run / "activations" / "**" / "*.parquet"))
    docs = pl.read_parquet(str(run / "docs" / "**" / "*.parquet")).sort("doc_id")
    counted = np.array([sum(t not in special for t in ids) for ids in docs["token_ids"]])
    keep = counted > 0
    x = np.zeros((len(docs), D_SAE))
    row_of = np.searchsorted(docs["doc_id"].to_numpy(), rows["doc_id"].to_numpy())  # doc ids are not 0..n-1
    np.add.at(x, (row_of, rows["feature"].to_numpy()), rows["value"].to_numpy().astype(np.float64))
    sums = x.sum(axis=0)
    above = np.bincount(rows.filter(pl.col("value") > 0.1)["feature"].to_numpy(), minlength=D_SAE)
    n_active = np.bincount(rows["feature"].to_numpy(), minlength=D_SAE)
    return (x[keep] / counted[keep, None]), sums, (counted.sum(), n_active, above)


def test_equals_numpy_and_scipy(runs):
    got = diff_runs(runs["a7"], runs["b7"]).sort("feature")
    xa, sa, (na, acta, _) = dense(runs["a7"], runs["special"])
    xb, sb, (nb, actb, _) = dense(runs["b7"], runs["special"])
    np.testing.assert_allclose(got["mean_a"], sa / na, rtol=1e-9)
    np.testing.assert_allclose(got["d_mean"], sb / nb - sa / na, rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(got["d_density"], actb / nb - acta / na, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(got["lfc_density"], np.log2((actb + 1) / (nb + 1)) - np.log2((acta + 1) / (na + 1)))
    ma, mb = sa / na, sb / nb
    with np.errstate(invalid="ignore"):
        rho = np.minimum(ma, mb) / np.maximum(ma, mb)
    np.testing.assert_allclose(got["rho"].fill_null(np.nan), rho, rtol=1e-9)
    assert got["n_docs_a"][0] == len(xa) and got["n_docs_b"][0] == len(xb)
    res = st.ttest_ind(xb, xa, equal_var=False, axis=0)
    tested = ~np.isnan(res.pvalue)
    np.testing.assert_allclose(got["t"].fill_null(np.nan).to_numpy()[tested], res.statistic[tested], rtol=1e-6)
    np.testing.assert_allclose(got["p"].fill_null(np.nan), res.pvalue, rtol=1e-6, atol=1e-300)
    np.testing.assert_allclose(got["q"], st.false_discovery_control(np.nan_to_num(res.pvalue, nan=1.0)), rtol=1e-9)


def test_significance_from_partials_equals_rows(runs):
    """diff's per-document test merges the units' per-document moments (the default): no pass over rows. The
    row-based moments (recomputed from every activation row) are the reference."""
    for a, b in [("a1", "b1"), ("a7", "b7"), ("a1", "b7")]:
        rows = diff_runs(runs[a], runs[b], source="rows")
        partials = diff_runs(runs[a], runs[b], source="partials")
        assert rows.columns == partials.columns
        for c in ("t", "p", "q", "n_docs_a", "n_docs_b"):
            x, y = rows[c].fill_null(np.nan).to_numpy(), partials[c].fill_null(np.nan).to_numpy()
            # (t of untouched features is a difference of near-equal means: float64 noise at t's scale)
            scale = np.nanmax(np.abs(x[np.isfinite(x)]), initial=0.0)
            np.testing.assert_allclose(y, x, rtol=1e-9, atol=1e-12 * scale, err_msg=c)
        assert (partials["q"] < 0.05).sum() > 0


def test_benjamini_hochberg_equals_scipy():
    rng = np.random.default_rng(0)
    p = np.concatenate([rng.uniform(size=200), rng.uniform(0, 1e-3, size=20), [0.5, 0.5, 1.0, 0.0]])
    np.testing.assert_allclose(benjamini_hochberg(p), st.false_discovery_control(p), rtol=1e-12)
    assert benjamini_hochberg(np.array([])).size == 0


def test_shard_count_does_not_matter(runs):
    one, many = diff_runs(runs["a1"], runs["b1"]), diff_runs(runs["a7"], runs["b7"])
    assert one.columns == many.columns and one["class"].to_list() == many["class"].to_list()
    # Shards batch different windows together; float32 kernels of other shapes round differently
    # (~1e-7 per value), so the float columns agree to that noise, not bit for bit.
    for c, dt in one.schema.items():
        if dt.is_float():
            # test statistics amplify that noise (a p-value's relative error is ~|t| times t's)
            # and differences of near-equal values (untouched features) carry it at the column's scale
            a, b = one[c].fill_null(np.nan).to_numpy(), many[c].fill_null(np.nan).to_numpy()
            rtol = 1e-4 if c in ("t", "p", "q") else 1e-6
            scale = np.nanmax(np.abs(a[np.isfinite(a)]), initial=0.0)
            np.testing.assert_allclose(a, b, rtol=rtol, atol=1e-6 * scale, err_msg=c)


def test_planted_features_top_and_untouched_stable(runs):
    got = diff_runs(runs["a7"], runs["b7"])
    cls = dict(zip(got["feature"].to_list(), got["class"].to_list()))
    assert cls[NEW] == "new_in_b" and cls[LOST] == "lost_from_a" and cls[UP] == "shifted"
    untouched = got.filter(~pl.col("feature").is_in([NEW, UP, LOST]))
    assert set(untouched["class"]) <= {"stable", "dead_in_both"} and (untouched["class"] == "stable").sum() > 10
    assert (untouched.filter(pl.col("class") == "stable")["rho"] > 0.9999).all()
    assert set(top_changes(got, "mean", k=2)["feature"]) == {NEW, UP}
    assert top_changes(got, "density", k=1)["feature"].to_list() == [NEW]
    assert top_changes(got, "mean", k=1, by="lfc")["feature"].to_list() == [NEW]
    planted = got.filter(pl.col("feature").is_in([NEW, UP, LOST]))
    assert (planted["q"] < 1e-3).all() and (untouched["q"] > 0.5).all()


def test_vlm_transfer_preset_rules(runs):
    got = diff_runs(runs["a7"], runs["b7"], preset="vlm_transfer", significance=False).sort("feature")
    assert "p" not in got.columns
    _, sa, (na, _, above_a) = dense(runs["a7"], runs["special"])
    _, sb, (nb, _, above_b) = dense(runs["b7"], runs["special"])
    np.testing.assert_allclose(got["frac_above_a"], above_a / na)
    act_a, act_b, ma, mb = above_a / na > 0.01, above_b / nb > 0.01, sa / na, sb / nb
    with np.errstate(invalid="ignore"):
        rho = np.minimum(ma, mb) / np.maximum(ma, mb)
    want = np.select([~act_a & ~act_b, ~act_a & act_b & (mb > 3 * ma), act_a & ~act_b & (ma > 3 * mb),
                      act_a & act_b & (rho > 0.7), act_a & act_b & (rho > 0.3) & (rho <= 0.7)],
                     ["dead_in_both", "new_in_b", "lost_from_a", "stable", "shifted"], "other")
    assert got["class"].to_list() == want.tolist()
    assert got["class"][NEW] == "new_in_b"


def test_write_diff(runs, tmp_path):
    path = write_diff(runs["a1"], runs["b7"], tmp_path / "d", k=5, stable_rho=0.8)
    meta = json.loads(pq.read_schema(path).metadata[b"saeray.diff"])
    assert meta["thresholds"]["stable_rho"] == 0.8 and meta["thresholds"]["new_ratio"] == 3.0
    assert "lfc_mean" in meta["definitions"] and meta == json.loads((tmp_path / "d" / "diff.json").read_text())
    top = pl.read_csv(tmp_path / "d" / "top_all_mean.csv")
    assert top.height == 5 and top["rank"].to_list() == [1, 2, 3, 4, 5]
    assert {"top_all_density.csv", "top_all_mean_active.csv"} <= {p.name for p in (tmp_path / "d").iterdir()}


def test_refuses_runs_with_different_saes(runs):
    other = orthonormal_sae(runs["root"] / "sae_other", seed=1)
    b = extract(runs["root"] / "b", other, runs["data"], runs["root"] / "other")
    with pytest.raises(ValueError, match="different SAEs"):
        diff_runs(runs["a1"], b)


def test_bad_options(runs):
    with pytest.raises(ValueError, match="unknown preset"):
        diff_runs(runs["a1"], runs["b1"], preset="nope")
    with pytest.raises(ValueError, match="unknown metric"):
        top_changes(pl.DataFrame(), "max")


def test_refuses_runs_without_doc_positions(runs, tmp_path):
    """A run whose docs lack `positions` (written by an older saeray) gets a clear error, not a recount."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(runs["a1"], old)
    for f in (old / "docs").rglob("*.parquet"):
        pq.write_table(pq.read_table(f).drop_columns(["positions"]), f)
    with pytest.raises(ValueError, match="older saeray"):
        diff_runs(old, runs["b1"], source="rows")
