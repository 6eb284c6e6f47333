"""Logit effects against the model's own final norm and LM head run on the decoder directions."""

from __future__ import annotations

import json

import polars as pl
import pytest
import torch
from helpers import base_config

from saeray.engine import config
from saeray.tools.logits import final_norm, logit_effects, logit_effects_for_run

FEATURES = [0, 3, 7, 11, 42]
K = 10


def _load(tiny, arch: str):
    from sae_lens import SAE
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny[arch], dtype=torch.float32).eval()
    # Random gains (Llama's default is all ones) so a wrong gain (weight vs 1 + weight) changes the answer.
    torch.manual_seed(11)
    with torch.no_grad():
        model.model.norm.weight.copy_(torch.randn_like(model.model.norm.weight))
    return model, AutoTokenizer.from_pretrained(tiny[arch]), SAE.load_from_disk(tiny["sae_standard"])


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_logit_effects_equal_norm_and_lm_head(tiny, arch):
    model, tok, sae = _load(tiny, arch)
    assert final_norm(model) is model.model.norm
    got = logit_effects(model, sae, FEATURES, k=K, tokenizer=tok)
    assert got.height == len(FEATURES) * 2 * K
    with torch.no_grad():
        # The model's own path on h = W_dec[f]: differs from ours by the norm's 1/rms(h) > 0 per feature.
        ref = model.lm_head(model.model.norm(sae.W_dec[FEATURES].float()))
    for i, f in enumerate(FEATURES):
        for direction, largest in (("promoted", True), ("suppressed", False)):
            rows = got.filter((pl.col("feature") == f) & (pl.col("direction") == direction)).sort("rank")
            vals, idx = ref[i].topk(K, largest=largest)
            assert rows["token_id"].to_list() == idx.tolist()
            scale = vals / torch.tensor(rows["logit"].to_numpy())
            assert (scale > 0).all() and torch.allclose(scale, scale[0].expand_as(scale), rtol=1e-4)
            for shown, t in zip(rows["token"].to_list(), idx.tolist()):  # fragments of a character: hex bytes
                text = tok.decode([t])
                assert shown == text if "\ufffd" not in text else (shown.startswith("<") and shown.endswith(">"))


def test_gemma_gain_is_one_plus_weight(tiny):
    """Reading `norm.weight` as the gain would give Gemma's wrong tokens: the check above can fail."""
    model, tok, sae = _load(tiny, "gemma3")
    w = model.model.norm.weight.detach()
    naive = (sae.W_dec[FEATURES].float() * w) @ model.lm_head.weight.detach().T
    got = logit_effects(model, sae, FEATURES, k=K)
    right = got.filter(pl.col("direction") == "promoted").group_by("feature", maintain_order=True).agg("token_id")
    wrong = [naive[i].topk(K).indices.tolist() for i in range(len(FEATURES))]
    assert right["token_id"].to_list() != wrong


def test_logit_effects_for_run_and_errors(tiny, tmp_path):
    cfg = base_config(tiny["gemma3"], [{"name": "a", "path": str(tiny["sae_standard"])}], tiny["data"], tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"config": config.from_dict(cfg).to_dict()}))
    got = logit_effects_for_run(tmp_path, [5], k=3)
    assert got["sae"].unique().to_list() == ["a"] and got.height == 6
    with pytest.raises(ValueError, match="out of range"):
        logit_effects_for_run(tmp_path, [96], k=3)
    with pytest.raises(ValueError, match="not one of"):
        logit_effects_for_run(tmp_path, [5], sae="b")
