"""Probing new texts reproduces what `saeray run` wrote; concept features find a planted token."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from helpers import WORDS, base_config, canonical_doc_ids, make_sae, write_dataset
from reference import read_rows

from saeray.engine import config
from saeray.executors import run
from saeray.tools.probe import Prober, concept_features, probe

PLANT = " energy"


@pytest.fixture(scope="module")
def small_run(tiny, tmp_path_factory) -> tuple[Path, list[str]]:
    """A run over 12 documents, some longer than the SAE's 24-token windows, some with special tokens."""
    root = tmp_path_factory.mktemp("probe")
    docs = tiny["docs"][:12]
    data = write_dataset(root / "data", docs, 2)
    out = root / "run"
    run(config.from_dict(base_config(tiny["llama"], [{"name": "a", "path": str(tiny["sae_standard"])}], data, out)),
        executor="local")
    return out, docs


@pytest.fixture(scope="module")
def prober(small_run) -> Prober:
    return Prober.open(small_run[0])


def test_probe_equals_run_rows(small_run, prober):
    out, docs = small_run
    features = list(range(prober.d_sae))
    got = prober.probe(docs, features)
    ids = [prober.tok.encode(t) for t in docs]
    assert got.height == sum(len(i) for i in ids) * len(features)  # every token, zeros included
    assert any(len(i) > 24 for i in ids) and not got["counted"].all()
    rows = read_rows(out, "a", "all").select("doc_id", "pos", "feature", "value")
    ids_of = pl.DataFrame({"text": range(len(docs)), "doc_id": canonical_doc_ids(out.parent / "data")},
                          schema={"text": pl.Int64, "doc_id": pl.Int64})  # text i is the i-th row in canonical order
    j = (got.filter(pl.col("counted")).with_columns(pl.col("text").cast(pl.Int64)).join(ids_of, on="text").drop("text")
         .join(rows.rename({"value": "ran"}), on=["doc_id", "pos", "feature"], how="left"))
    assert j.filter(pl.col("ran").is_not_null()).height == rows.height  # every written row is probed
    assert (j["value"] - j["ran"].fill_null(0.0)).abs().max() <= 1e-4  # nonzeros agree, zeros elsewhere
    assert (j.filter(pl.col("ran").is_null())["value"] == 0).all()


def test_probe_one_feature_reads_like_text(small_run):
    out, _ = small_run
    got = probe(out, ["def value return", "the river"], [5])
    assert got.columns == ["text", "pos", "token_id", "token", "counted", "feature", "value"]
    assert got.filter(pl.col("text") == 0)["token"].str.join("").item() == "def value return"
    with pytest.raises(ValueError, match="features must be"):
        probe(out, ["x"], [1000])


def _texts(seed: int, n: int, plant: bool) -> list[str]:
    rng = random.Random(seed)
    words = [w for w in WORDS if w != PLANT.strip()]
    out = []
    for _ in range(n):
        ws = [rng.choice(words) for _ in range(12)]
        out.append("".join(f" {w}{PLANT if plant else ''}" for w in ws).strip())
    return out


@pytest.fixture(scope="module")
def token_prober(tiny, tmp_path_factory) -> Prober:
    """An SAE on layer 0's input (the token embeddings, no bias): its features are functions of the token
    alone, so a token planted only in the examples must be what the top concept feature fires on."""
    import torch
    from sae_lens import SAE

    path = make_sae(tmp_path_factory.mktemp("sae0") / "sae", "standard", 64, "blocks.0.hook_resid_pre", seed=4)
    sae = SAE.load_from_disk(path)
    with torch.no_grad():
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    sae.save_model(path)
    cfg = {"model": {"name": str(tiny["llama"]), "dtype": "float32"}, "saes": [{"name": "z", "path": str(path)}],
           "data": {"dataset": "unused"}}
    return Prober.open(cfg)  # a config, not a run: BOS and window size come from the SAE


def test_concept_features_find_planted_token(token_prober):
    pr = token_prober
    plant_id = pr.tok.encode(PLANT)
    assert len(plant_id) == 1, "the planted word must be one token"
    examples, counter = _texts(1, 8, True), _texts(2, 8, False)
    top = pr.concept(examples, counter_examples=counter, k=5)
    # The slow, obvious version: token means from the per-token probe of every feature.
    feats = list(range(pr.d_sae))
    p_in = pr.probe(examples, feats).filter(pl.col("counted"))
    p_out = pr.probe(counter, feats).filter(pl.col("counted"))
    mean_in = p_in.group_by("feature").agg(pl.col("value").mean()).sort("feature")["value"].to_numpy()
    mean_out = p_out.group_by("feature").agg(pl.col("value").mean()).sort("feature")["value"].to_numpy()
    assert top["feature"].to_list() == list(np.argsort(-(mean_in - mean_out), kind="stable")[:5])
    np.testing.assert_allclose(top["score"].to_numpy(), np.sort(mean_in - mean_out)[::-1][:5], atol=1e-5)
    np.testing.assert_allclose(top["mean_out"].to_numpy(), mean_out[top["feature"].to_numpy()], atol=1e-6)
    # The top feature fires on every planted token more than on any other token.
    f = top["feature"][0]
    both = pl.concat([p_in, p_out]).filter(pl.col("feature") == f)
    on = both.filter(pl.col("token_id") == plant_id[0])["value"]
    off = both.filter(pl.col("token_id") != plant_id[0])["value"]
    assert on.len() == 8 * 12 and on.min() > 0 and on.min() > off.max()
    assert 0 < top["frac_out"][0] < top["frac_in"][0] <= 1


def test_concept_features_against_reference_run(small_run):
    out, _ = small_run
    from saeray.analysis.stats import features

    got = concept_features(out, _texts(3, 4, True), reference_run=out, k=96)
    ref = features(out).filter(pl.col("group") == "all").collect().select("feature", "mean")
    j = got.join(ref, on="feature")
    assert j.height == 96 and (j["mean_out"] - j["mean"]).abs().max() < 1e-12
    assert (j["score"] - (j["mean_in"] - j["mean_out"])).abs().max() < 1e-12
    with pytest.raises(ValueError, match="not both"):
        concept_features(out, ["x"], counter_examples=["y"], reference_run=out)
