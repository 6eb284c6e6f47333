"""positions.mode sample: seeded random (word-final) positions per document, the published reference rate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
from helpers import base_config
from transformers import AutoTokenizer

from saeray.analysis.stats import features
from saeray.engine import config
from saeray.engine.config import ConfigError
from saeray.engine.partials import draws_np
from saeray.engine.store import RunDir
from saeray.executors import run

POSITIONS = {"mode": "sample", "per_doc": 2, "word_final": True, "within": 48, "seed": 7}


def _run(tiny, out: Path, executor: str = "local", **over) -> Path:
    cfg = base_config(tiny["llama"], [{"name": "a", "path": str(tiny["sae_standard"]), "threshold": 1e-6}],
                      tiny["data"], out, positions=POSITIONS, **over)
    run(config.from_dict(cfg), executor=executor)
    return out


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory, ray_session) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sample")
    return {"one": _run(tiny, root / "one", data__shards=1), "seven": _run(tiny, root / "seven", data__shards=7),
            "batch": _run(tiny, root / "batch", data__shards=3, tokens__batch_tokens=64),
            "two_workers": _run(tiny, root / "two_workers", executor="ray", data__shards=7, workers=2)}


def test_positions_are_the_same_for_any_split_and_word_final(tiny, runs):
    tok = AutoTokenizer.from_pretrained(tiny["llama"])
    texts = dict(zip(tiny["doc_ids"], tiny["docs"]))
    one = features(runs["one"]).collect()
    for other in ("seven", "batch", "two_workers"):
        f = features(runs[other]).collect()
        assert f["n_tokens"].to_list() == one["n_tokens"].to_list()
        assert f["n_active"].to_list() == one["n_active"].to_list()
    rows = {k: pl.read_parquet(str(r / "activations" / "**" / "*.parquet")).sort("doc_id", "pos", "feature")
            for k, r in runs.items()}
    assert rows["one"].select("doc_id", "pos", "feature").equals(rows["seven"].select("doc_id", "pos", "feature"))
    assert rows["one"].select("doc_id", "pos", "feature").equals(rows["batch"].select("doc_id", "pos", "feature"))
    assert rows["one"].select("doc_id", "pos", "feature").equals(rows["two_workers"].select("doc_id", "pos", "feature"))
    assert len(RunDir(runs["two_workers"]).completions()) == 7
    # the chosen positions, recomputed here: word-final by decoding (the text after the token starts with
    # whitespace or is empty), < within, non-special; the 2 smallest draws of (doc_id, pos, seed)
    special = set(tok.all_special_ids)
    docs = pl.read_parquet(str(runs["one"] / "docs" / "**" / "*.parquet"))
    n_tokens = 0
    several = 0
    for doc_id, ids, positions in docs.select("doc_id", "token_ids", "positions").rows():
        text = texts[doc_id]
        assert tok.decode(ids) == text
        cand = [p for p in range(min(len(ids), 48)) if ids[p] not in special
                and (tok.decode(ids[p + 1:]) == "" or tok.decode(ids[p + 1:])[0].isspace())
                and tok.decode(ids[:p + 1]).rstrip() == tok.decode(ids[:p + 1])]
        draws = draws_np(np.full(len(cand), doc_id), np.array(cand, dtype=np.int64), 7)
        want = sorted(c for _, c in sorted(zip(draws.tolist(), cand))[:2])
        got = [p for p in positions if p["group"] == "sample"]
        assert (got[0]["n"], got[0]["last"]) == (len(want), want[-1]) if want else not got
        n_tokens += len(want)
        several += len(cand) > 2
        have = rows["one"].filter(pl.col("doc_id") == doc_id)["pos"].unique().to_list()
        assert set(have) <= set(want)
    assert several > 20 and n_tokens == one["n_tokens"][0]
    # mid-word tokens exist in this tokenizer's documents, so word_final chooses something
    assert any(not tok.decode(ids[p + 1:p + 2]).startswith(" ") for ids in docs["token_ids"] for p in range(len(ids) - 1))


def test_rate_equals_numpy_over_the_same_positions(runs):
    rows = pl.read_parquet(str(runs["one"] / "activations" / "**" / "*.parquet"))
    f = features(runs["one"]).collect().sort("feature")
    n = f["n_tokens"][0]
    active = np.bincount(rows.filter(pl.col("value") > 1e-6)["feature"].to_numpy(), minlength=f.height)
    np.testing.assert_allclose(f["density"].to_numpy(), active / n, rtol=1e-12)
    assert (f["density"] > 0).sum() > 5


def test_sample_settings_need_mode_sample(tiny, tmp_path):
    cfg = base_config(tiny["llama"], [{"name": "a", "path": str(tiny["sae_standard"])}], tiny["data"], tmp_path / "r")
    with pytest.raises(ConfigError, match="settings of mode 'sample'"):
        config.from_dict({**cfg, "positions": {"mode": "all", "per_doc": 3}})
    with pytest.raises(ConfigError, match="per_doc"):
        config.from_dict({**cfg, "positions": {"mode": "sample", "per_doc": 0}})
    with pytest.raises(ConfigError, match="token_column"):
        config.from_dict({**cfg, "positions": {"mode": "sample", "word_final": True},
                          "data": {**cfg["data"], "token_column": "ids"}})
