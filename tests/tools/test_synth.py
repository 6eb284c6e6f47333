"""Synthetic maximizers: they beat the real maxima of a tiny run, never return NaN, leave the model
untouched, and the values they report equal independent HF forward passes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from helpers import base_config
from reference import read_rows

from saeray.cli import main as cli_main
from saeray.engine import config
from saeray.engine.models import n_layers_of, parse_hook
from saeray.executors import run
from saeray.tools.probe import Prober
from saeray.tools.synth import SynthOptions, embedding_scale, synth, synthesize

OPTS = SynthOptions(seq_len=5, steps=60, batch_features=8)


@pytest.fixture(scope="module")
def synth_run(tiny, tmp_path_factory) -> Path:
    """The tiny Gemma3-style model (it scales embeddings by sqrt(d_model)) with a TopK and a standard SAE."""
    out = tmp_path_factory.mktemp("synth") / "run"
    saes = [{"name": "topk", "path": str(tiny["sae_topk"])}, {"name": "std", "path": str(tiny["sae_standard"])}]
    run(config.from_dict(base_config(tiny["gemma3"], saes, tiny["data"], out)), executor="local")
    return out


def _live(run_dir: Path, sae: str, n: int) -> list[int]:
    rows = read_rows(run_dir, sae, "all")
    counts = rows.group_by("feature").len().sort(["len", "feature"], descending=[True, False])
    return sorted(counts["feature"].head(n).to_list())


def _hidden(model, ids: torch.Tensor | None, embeds: torch.Tensor | None, hook: str) -> torch.Tensor:
    """The hook's value from HF's own output_hidden_states (no saeray hooks)."""
    layer, kind = int(hook.split(".")[1]), hook.split(".")[2]
    index = {"hook_resid_pre": layer, "hook_resid_post": layer + 1}[kind]
    with torch.no_grad():
        out = model(input_ids=ids, inputs_embeds=embeds, output_hidden_states=True)
    return out.hidden_states[index]


@pytest.mark.parametrize("sae_name", ["topk", "std"])
def test_synth_beats_real_maxima_and_matches_independent_forward(synth_run, tiny, sae_name):
    prober = Prober.open(synth_run, sae=sae_name)
    model, sae = prober.model, prober.sae
    feats = _live(synth_run, sae_name, 10)
    before = {k: v.clone() for k, v in {**model.state_dict(), **sae.state_dict()}.items()}
    site = parse_hook(prober.setup.hook, n_layers_of(model.config))
    frame, inputs = synthesize(model, sae, site, feats, bos_id=prober.tok.bos_id,
                               special_ids=[int(i) for i in prober.run_tok.special_ids], vocab=len(prober.tokenizer),
                               tokenizer=prober.tokenizer, options=OPTS, return_inputs=True)
    # model and SAE weights bitwise unchanged, no gradient left on them
    after = {**model.state_dict(), **sae.state_dict()}
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in [*model.parameters(), *sae.parameters()])
    assert frame["feature"].to_list() == feats
    assert frame["synth_activation"].is_finite().all() and frame["hard_activation"].is_finite().all()
    assert (frame["nan_restarts"] == 0).all()

    # the best real document of each feature, straight from the activation rows
    real = read_rows(synth_run, sae_name, "all").group_by("feature").agg(pl.col("value").max().alias("real"))
    j = frame.join(real, on="feature")
    beat = (j["synth_activation"] >= j["real"]).mean()
    assert beat >= 0.8, j.select("feature", "synth_activation", "real")

    # soft inputs: the reported activation is what HF gives for BOS + inputs * sqrt(d_model) (Gemma's scale)
    emb = model.get_input_embeddings()
    bos = emb(torch.tensor([[prober.tok.bos_id]])).expand(len(feats), 1, -1)
    soft = torch.cat([bos, inputs * model.config.hidden_size ** 0.5], dim=1)
    x = _hidden(model, None, soft, prober.setup.hook)[:, -1]
    want = sae.encode(x)[torch.arange(len(feats)), torch.tensor(feats)]
    np.testing.assert_allclose(frame["synth_activation"].to_numpy(), want.numpy(), rtol=1e-4, atol=1e-4)
    norms = inputs.norm(dim=-1)
    table = emb.weight.norm(dim=-1)
    table[prober.run_tok.special_ids] = float("nan")  # special tokens are not candidates
    assert norms.max() <= table.nanquantile(OPTS.norm_quantile) * (1 + 1e-5)

    # hard tokens: a fresh forward pass of BOS + ids gives the reported activation; ids are nearest by cosine
    ids = torch.tensor(frame["hard_token_ids"].to_list())
    assert not np.isin(ids.numpy(), prober.run_tok.special_ids).any()
    full = torch.cat([torch.full((len(feats), 1), prober.tok.bos_id), ids], dim=1)
    x = _hidden(model, full, None, prober.setup.hook)[:, -1]
    hard = sae.encode(x)[torch.arange(len(feats)), torch.tensor(feats)]
    np.testing.assert_allclose(frame["hard_activation"].to_numpy(), hard.numpy(), rtol=1e-5, atol=1e-5)
    cos = torch.nn.functional.normalize(inputs[0, 0], dim=0) @ torch.nn.functional.normalize(emb.weight, dim=1).T
    cos[prober.run_tok.special_ids] = -2
    assert int(cos.argmax()) == int(ids[0, 0])
    assert frame["hard_cosine"][0][0] == pytest.approx(float(cos.max()), abs=1e-5)
    assert frame["hard_tokens"][0].to_list() == prober.tokenizer.batch_decode([[i] for i in ids[0].tolist()])


def test_embedding_scale_is_measured(tiny):
    from transformers import AutoModelForCausalLM

    gemma = AutoModelForCausalLM.from_pretrained(tiny["gemma3"], dtype=torch.float32)
    llama = AutoModelForCausalLM.from_pretrained(tiny["llama"], dtype=torch.float32)
    assert embedding_scale(gemma) == pytest.approx(64 ** 0.5, rel=1e-5)
    assert embedding_scale(llama) == pytest.approx(1.0, rel=1e-6)


def test_non_finite_steps_are_restored_never_returned(synth_run):
    """A fault injected into layer 0 (NaN for one sequence on a few steps) is caught and undone."""
    prober = Prober.open(synth_run, sae="topk")
    model = prober.model
    calls = {"n": 0}

    def poison(module, args, output):
        calls["n"] += 1
        if calls["n"] in (3, 4, 9):
            hidden = output[0] if isinstance(output, tuple) else output
            hidden[1] = float("nan")
        return output

    layer0 = model.model.layers[0]
    handle = layer0.register_forward_hook(poison)
    try:
        frame = synthesize(model, prober.sae, parse_hook(prober.setup.hook, n_layers_of(model.config)), [3, 5, 7],
                           bos_id=prober.tok.bos_id, special_ids=[int(i) for i in prober.run_tok.special_ids],
                           vocab=len(prober.tokenizer), options=SynthOptions(seq_len=4, steps=20))
    finally:
        handle.remove()
    assert frame["synth_activation"].is_finite().all() and frame["hard_activation"].is_finite().all()
    assert frame["nan_restarts"].to_list() == [0, 3, 0]


def test_synth_from_config_has_no_real_max_and_bad_input_is_refused(synth_run, tiny, tmp_path):
    cfg = config.from_dict(base_config(tiny["gemma3"], [{"name": "topk", "path": str(tiny["sae_topk"])}],
                                       tiny["data"], tmp_path / "unused"))
    frame = synth(cfg, [1, 2], options=SynthOptions(seq_len=3, steps=5))
    assert frame["real_max"].is_null().all() and frame["ratio"].is_null().all()
    assert frame["synth_activation"].is_finite().all()
    with pytest.raises(ValueError, match="features must be indices in 0-95"):
        synth(cfg, [96], options=SynthOptions(steps=1))
    with pytest.raises(ValueError, match="no SAE with the weights of 'topk'"):
        jr = config.from_dict(base_config(tiny["gemma3"], [{"name": "topk", "path": str(tiny["sae_jumprelu"])}],
                                          tiny["data"], tmp_path / "unused"))
        synth(jr, [1], reference=synth_run, options=SynthOptions(steps=1))


def test_cli_writes_table_and_figure(synth_run, tmp_path, capsys):
    feats = _live(synth_run, "std", 4)
    out = tmp_path / "synth"
    code = cli_main(["synth", str(synth_run), "--sae", "std", "--features", ",".join(map(str, feats)),
                     "--steps", "30", "--seq-len", "4", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "features (" in printed and "synthetic > real maximum for" in printed
    frame = pl.read_parquet(out / "synth.parquet")
    assert frame["feature"].to_list() == feats
    assert set(frame.columns) >= {"feature", "synth_activation", "hard_tokens", "hard_activation", "real_max", "ratio"}
    real = read_rows(synth_run, "std", "all").group_by("feature").agg(pl.col("value").max())
    j = frame.join(real, on="feature")
    np.testing.assert_allclose(j["real_max"].to_numpy(), j["value"].to_numpy())
    np.testing.assert_allclose(frame["ratio"].to_numpy(), (frame["synth_activation"] / frame["real_max"]).to_numpy(),
                               rtol=1e-6)
    csv = pl.read_csv(out / "synth.csv")
    assert csv.height == len(feats) and "hard_tokens" in csv.columns
    png = (out / "synth.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert cli_main(["synth", str(synth_run), "--sae", "std", "--features", "500", "--out", str(out)]) == 2
