"""The truncated forward (engine.truncated) against the hooked full forward (models.Hooks) it replaces."""

from __future__ import annotations

import os

import pytest
import torch

from saeray.assets.tiny import make_model, make_vlm
from saeray.engine import models
from saeray.engine.truncated import Truncated, forward_to_hooks

KINDS = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out")
FAMILIES = ("llama", "gemma2", "gemma3", "paligemma")


@pytest.fixture(scope="module")
def family_models(tmp_path_factory):
    """Tiny float32 models of each family saeray supports (6 layers: Gemma's sliding and global layers both run)."""
    root = tmp_path_factory.mktemp("families")
    out = {}
    for fam in FAMILIES:
        path = make_vlm(root / fam, n_layers=6) if fam == "paligemma" else make_model(root / fam, fam, n_layers=6)
        cfg = models.ModelConfig(name=str(path), dtype="float32")
        out[fam] = models.load_model_and_processor(cfg, torch.device("cpu"))
    return out


def _batch(model, processor, fam: str, seed: int = 0):
    """Right-padded rows of different lengths, longer than the sliding window (8); a VLM also gets images."""
    g = torch.Generator().manual_seed(seed)
    vocab = 300
    rows, lengths = 3, [20, 13, 7]
    ids = torch.randint(10, vocab, (rows, max(lengths)), generator=g)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        ids[i, n:] = 0
    extra = {}
    if fam == "paligemma":
        n_img = (28 // 14) ** 2
        image_id = models.image_token_id(model.config)
        ids[:2, :n_img] = image_id  # rows 0 and 1 start with an image, row 2 is text only
        types = torch.ones_like(ids)
        types[:2, : n_img + 3] = 0  # image + a 3-token prompt attend bidirectionally
        extra = {"pixel_values": torch.randn(2, 3, 28, 28, generator=g), "token_type_ids": types}
    return ids, mask, extra


@pytest.mark.parametrize("fam", FAMILIES)
@pytest.mark.parametrize("kind", KINDS)
def test_truncated_equals_hooked_forward(family_models, fam, kind):
    model, _, processor = family_models[fam]
    n = models.n_layers_of(model.config)
    sites = [models.parse_hook(f"blocks.{layer}.{kind}", n) for layer in (0, 3, 5)]
    ids, mask, extra = _batch(model, processor, fam)
    with models.Hooks(model, sites) as hooks:
        want = hooks(ids, mask, **extra)
    with Truncated(model, sites) as trunc:
        got = trunc(ids, mask, **extra)
    assert set(got) == set(want) == {s.name for s in sites}
    for name in want:
        valid = mask.bool()
        torch.testing.assert_close(got[name][valid], want[name][valid], rtol=0, atol=1e-6)
        assert got[name].shape == want[name].shape


def test_mixed_sites_stop_at_deepest_layer(family_models):
    """Several kinds at several layers at once; layers past the deepest never run (a hook on them never fires)."""
    model, _, _ = family_models["gemma3"]
    n = models.n_layers_of(model.config)
    names = ["blocks.0.hook_resid_pre", "blocks.2.hook_attn_out", "blocks.2.hook_resid_post", "blocks.3.hook_mlp_out"]
    sites = [models.parse_hook(s, n) for s in names]
    ids, mask, _ = _batch(model, None, "gemma3", seed=1)
    ran = []
    later = models.decoder_layers(model)[4].register_forward_hook(lambda *a: ran.append(1))
    try:
        with models.Hooks(model, sites) as hooks:
            want = hooks(ids, mask)
        with Truncated(model, sites) as trunc:
            got = trunc(ids, mask)
            again = trunc(ids, mask)  # a second call returns fresh values (nothing left from the first)
    finally:
        later.remove()
    assert not ran
    for name in names:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6)
        torch.testing.assert_close(again[name], want[name], rtol=0, atol=1e-6)


def test_hooks_removed_on_close(family_models):
    model, _, _ = family_models["llama"]
    site = models.parse_hook("blocks.1.hook_mlp_out", models.n_layers_of(model.config))
    mlp = models.decoder_layers(model)[1].mlp
    before = len(mlp._forward_hooks)
    trunc = forward_to_hooks(model, [site])
    assert isinstance(trunc, Truncated) and len(mlp._forward_hooks) == before + 1
    trunc.close()
    assert len(mlp._forward_hooks) == before


@pytest.mark.slow
@pytest.mark.parametrize("fam", FAMILIES)
def test_compiled_equals_eager(family_models, fam, tmp_path, monkeypatch):
    """model.compile: the inductor-compiled truncated forward agrees with eager in float32 (fusions reorder
    sums: 1e-5), and a second call of the same shape runs the compiled graph again without recompiling; on a
    CPU (dynamic shapes, frozen weights) a text model runs batches of another length, or of one row, on the same
    graph too."""
    import torch._dynamo

    monkeypatch.setenv("SAERAY_CACHE", str(tmp_path))
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    # as inductor leaves it once used: its default in the environment (use_compile_cache moves it)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", os.path.abspath(default_cache_dir()))
    model, _, processor = family_models[fam]
    n = models.n_layers_of(model.config)
    sites = [models.parse_hook(s, n) for s in ("blocks.0.hook_resid_pre", "blocks.2.hook_attn_out",
                                               "blocks.3.hook_resid_mid", "blocks.3.hook_mlp_out",
                                               "blocks.3.hook_resid_post")]
    ids, mask, extra = _batch(model, processor, fam, seed=2)
    torch._dynamo.reset()
    with Truncated(model, sites) as eager:
        want = eager(ids, mask, **extra)
    with Truncated(model, sites, compile=True) as compiled:
        # the worker compiles at its start on a full-shape batch (a VLM's batches carry images: not there)
        assert (compiled.warm_up(batch_tokens=40, context_size=20) > 0) == (fam != "paligemma")
        warmed = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        got = compiled(ids, mask, **extra)
        frames_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        assert fam == "paligemma" or frames_before == warmed
        again = compiled(ids, mask, **extra)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames_before  # no recompilation
        # another batch shape: the same rows cut to 16 tokens (still past the sliding window)
        ids16, mask16 = ids[:, :16].contiguous(), mask[:, :16].contiguous()  # as the batcher's are
        short = {k: (v[:, :16].contiguous() if k == "token_type_ids" else v) for k, v in extra.items()}
        other = compiled(ids16, mask16, **short)
        # one row (a block's last window): padded to two, so the dynamic graph does not specialize size 1
        one = {k: v[:1] for k, v in extra.items()}  # row 0 (with an image on a VLM: its image is pixel_values[0])
        single = compiled(ids[:1], mask[:1], **one)
        if fam != "paligemma":  # a VLM's image merge breaks the graph and its sizes follow the images: it recompiles
            assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames_before  # CPU: one graph, any shape
    with Truncated(model, sites) as eager:
        want_other = eager(ids16, mask16, **short)
        want_single = eager(ids[:1], mask[:1], **one)
    valid = mask.bool()
    for name in want:
        torch.testing.assert_close(got[name][valid], want[name][valid], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(again[name][valid], want[name][valid], rtol=1e-5, atol=1e-5)
        cut = mask16.bool()
        torch.testing.assert_close(other[name][cut], want_other[name][cut], rtol=1e-5, atol=1e-5)
        assert single[name].shape == want_single[name].shape
        cut = mask[:1].bool()
        torch.testing.assert_close(single[name][cut], want_single[name][cut], rtol=1e-5, atol=1e-5)
    assert any((tmp_path / "inductor").iterdir())  # compiled code cached where SAERAY_CACHE says
