"""The SAEs shipped in saeray/assets/saes/: plain sae-lens loading, size, and quality on held-out text.

The full measurement (1M held-out tokens, dead latents included) is `python bench/sae_quality.py`;
here a smaller held-out sample is recomputed independently of the training report.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from saeray.engine import embedded

SAES = sorted(d for d in (Path(__file__).resolve().parents[2] / "saeray" / "assets" / "saes").iterdir() if d.is_dir())


def _report(sae_dir: Path) -> dict:
    return json.loads((sae_dir / "saeray_training.json").read_text())


@pytest.mark.parametrize("sae_dir", SAES, ids=[d.name for d in SAES])
def test_loads_with_plain_sae_lens_and_fits_the_size_limit(sae_dir):
    from sae_lens import SAE

    sae = SAE.load_from_disk(str(sae_dir))
    size = sum(f.stat().st_size for f in sae_dir.iterdir())
    assert size <= 25 * 2**20
    meta = sae.cfg.metadata
    assert meta.hook_name.startswith("blocks.") and meta.model_name == _report(sae_dir)["model"]
    # the training report's held-out figures meet the targets over >= 1M tokens
    held = _report(sae_dir)["held_out"]
    assert held["tokens"] >= 1_000_000
    assert held["explained_variance"] >= 0.75 and held["l0"] <= 64 and held["dead_fraction"] <= 0.05


SHORT_OUTSIDE: dict[str, str] = {}
"""Shipped SAEs known to miss the outside-the-corpus target, with the reason (an xfail, strict); none now."""


def _outside_or_xfail() -> list:
    return [pytest.param(d, marks=pytest.mark.xfail(reason=SHORT_OUTSIDE[d.name], strict=True))
            if d.name in SHORT_OUTSIDE else d for d in SAES]


@pytest.mark.parametrize("sae_dir", SAES, ids=[d.name for d in SAES])
def test_training_report_meets_the_targets_on_every_kind(sae_dir):
    from saeray.assets.corpus import BUDGETS

    report = _report(sae_dir)
    held = report["held_out"]
    assert "by_kind" in held, "the training report has no per-kind figures"
    assert set(held["by_kind"]) == set(BUDGETS)
    assert sum(f["tokens"] for f in held["by_kind"].values()) == held["tokens"]
    for kind, f in held["by_kind"].items():
        assert f["explained_variance"] >= 0.75, (kind, f)


@pytest.mark.parametrize("sae_dir", _outside_or_xfail(), ids=[d.name for d in SAES])
def test_training_report_meets_the_target_outside_the_corpus(sae_dir):
    outside = _report(sae_dir)["outside_texts"]
    assert outside["tokens"] >= 660 and outside["explained_variance"] >= 0.65


@pytest.mark.slow
@pytest.mark.parametrize("sae_dir", SAES, ids=[d.name for d in SAES])
def test_quality_recomputed_on_held_out_text(sae_dir, tmp_path):
    """EV (centred) and L0 on 20k held-out tokens spread over the held-out documents, computed here directly
    rather than by train.evaluate."""
    from sae_lens import SAE

    from saeray.assets import corpus
    from saeray.engine.config import from_dict
    from saeray.tools.train import Streamer

    report = _report(sae_dir)
    if not embedded.available(report["model"]):
        pytest.skip(f"the embedded model {report['model']} is not installed")
    data = corpus.build(tmp_path / "corpus")  # the same deterministic corpus the SAE was trained against
    sae = SAE.load_from_disk(str(sae_dir))
    meta = sae.cfg.metadata
    cfg = from_dict({"model": {"name": report["model"], "dtype": "bfloat16"}, "data": {"dataset": str(data)},
                     "tokens": {"context_size": meta.context_size, "batch_tokens": 4096}})
    st = Streamer(cfg, meta.hook_name, meta.context_size, meta.prepend_bos)
    start, end = report["held_out_docs"]
    assert end == st.plan.n_rows, "the corpus differs from the one the SAE was trained against"
    # 4 x 5,000 tokens from across the held-out documents (the first 20k alone come from a few modules)
    starts = [start + i * (end - start) // 4 for i in range(4)]
    x = torch.cat([a for s in starts for a in st.stream(s, end, 5_000)]).double()
    with torch.no_grad():
        z = sae.encode(x.float())
        x_hat = sae.decode(z).double()
    ev = 1 - ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    l0 = (z != 0).sum(1).double().mean()
    assert len(x) == 20_000
    assert ev >= 0.75, f"explained variance {ev:.3f}"
    assert l0 <= 64


@pytest.mark.slow
@pytest.mark.parametrize("sae_dir", _outside_or_xfail(), ids=[d.name for d in SAES])
def test_quality_on_texts_outside_the_corpus_recomputed_with_plain_transformers(sae_dir):
    """The training report's figure on saeray/assets/outside_texts.py, recomputed with a plain Hugging Face forward
    (output_hidden_states, windows of context_size - 1 tokens after BOS) instead of saeray's streamer."""
    from sae_lens import SAE
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from saeray.assets.outside_texts import TEXTS

    report = _report(sae_dir)
    if not embedded.available(report["model"]):
        pytest.skip(f"the embedded model {report['model']} is not installed")
    model_dir, _ = embedded.resolve(report["model"])
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    sae = SAE.load_from_disk(str(sae_dir))
    meta = sae.cfg.metadata
    layer = int(meta.hook_name.split(".")[1])
    assert meta.hook_name.endswith("hook_resid_post")
    xs = []
    with torch.no_grad():
        for text in TEXTS.values():
            ids = tok(text, add_special_tokens=False)["input_ids"]
            w = meta.context_size - 1
            for s in range(0, len(ids), w):
                window = torch.tensor([[tok.bos_token_id] + ids[s:s + w]])
                xs.append(model(window, output_hidden_states=True).hidden_states[layer + 1][0, 1:].float())
        x = torch.cat(xs)
        x_hat = sae.decode(sae.encode(x))
    x, x_hat = x.double(), x_hat.double()
    ev = float(1 - ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())
    outside = report["outside_texts"]
    assert len(x) == outside["tokens"] >= 660
    assert ev == pytest.approx(outside["explained_variance"], abs=0.02)  # bf16 forwards batched differently
    assert ev >= 0.65, f"explained variance {ev:.3f} on the texts outside the corpus"
