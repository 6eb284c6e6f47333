"""The SAEs shipped in saeray/saes/: plain sae-lens loading, size, and quality on held-out text.

The full measurement (1M held-out tokens, dead latents included) is `python bench/sae_quality.py`;
here a smaller held-out sample is recomputed independently of the training report.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from saeray import embedded

SAES = sorted(d for d in (Path(__file__).resolve().parent.parent / "saeray" / "saes").iterdir() if d.is_dir())


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
    """EV (centred) and L0 on 20k held-out tokens spread over the held-out documents, computed here directly
    rather than by train.evaluate."""
    from sae_lens import SAE

    from saeray import corpus
    from saeray.config import from_dict
    from saeray.train import Streamer

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
