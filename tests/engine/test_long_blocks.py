"""A block of long documents reduced to (document, feature) pairs while it runs (Extractor._compact) leaves
every partial as the same block read whole: statistics, per-document moments, example lists with their
contexts, histograms and last values."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
from helpers import base_config

from saeray.engine import config
from saeray.engine import extract as extract_mod
from saeray.executors import run

PARTIALS = ("stats", "examples", "hist", "lastvals")


def _long_docs(folder: Path) -> Path:
    """Three documents of ~6k words (tens of windows each) between short ones, with a label column."""
    from saeray.assets import tiny

    folder.mkdir()
    texts = tiny.corpus(40, seed=3, max_words=40)
    rows = []
    for i, t in enumerate(texts):
        rows.append({"text": t, "label": i % 2})
        if i % 13 == 5:
            rows.append({"text": " ".join(tiny.corpus(200, seed=i, max_words=60)), "label": 1})
    with open(folder / "data.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return folder


def _run(tiny, data: Path, out: Path, sae: str, examples: bool) -> Path:
    cfg = base_config(tiny["llama"], [{"name": "a", "path": str(tiny[sae])}], data, out,
                      output={"dir": str(out), "activations": False, "top_k": 5 * examples,
                              "samples_per_bin": 3 * examples,
                              "context_radius": 4, "last_values": True, "docs": "examples" if examples else "none"},
                      data__keep_columns=["label"])
    run(config.from_dict(cfg), executor="local")
    return out


def _read(run_dir: Path, kind: str) -> pl.DataFrame:
    df = pl.read_parquet(str(run_dir / kind / "**" / "*.parquet"))
    return df.sort(df.columns)


@pytest.mark.parametrize("sae,examples", [("sae_standard", True), ("sae_topk", True), ("sae_topk", False)])
def test_compacted_blocks_equal_whole_blocks(tiny, tmp_path, monkeypatch, sae, examples):
    data = _long_docs(tmp_path / "data")
    whole = _run(tiny, data, tmp_path / "whole", sae, examples)
    calls = []
    real = extract_mod.Extractor._compact
    monkeypatch.setattr(extract_mod, "COMPACT_BATCHES", 1)  # compact after every batch of a block
    monkeypatch.setattr(extract_mod.Extractor, "_compact", lambda self, b: (calls.append(1), real(self, b)))
    compacted = _run(tiny, data, tmp_path / "compacted", sae, examples)
    assert len(calls) > 10
    for kind in PARTIALS if examples else ("stats", "hist", "lastvals"):
        a, b = _read(whole, kind), _read(compacted, kind)
        assert a.shape == b.shape and len(a), kind
        for c in a.columns:
            if a.schema[c] == pl.Float64:  # float64 sums added in another order
                assert ((a[c] - b[c]).abs() <= 1e-12 * a[c].abs().max() + 1e-300).all(), (kind, c)
            else:
                assert a[c].equals(b[c]), (kind, c)
    assert _read(whole, "docs").equals(_read(compacted, "docs"))  # the examples' token windows


def test_dense_grid_and_sorting_find_the_same_pairs(monkeypatch):
    """add_docs' two ways to the (document, feature) pairs: the dense grid, and sorting (reduce_pairs)."""
    import torch

    from saeray.engine import feature_stats as fs

    g = torch.Generator().manual_seed(0)
    n, d, docs = 4000, 64, 30
    feat, rank = torch.randint(0, d, (n,), generator=g), torch.randint(0, docs, (n,), generator=g)
    pos = torch.randint(0, 500, (n,), generator=g)
    val = torch.rand(n, generator=g).round(decimals=2)  # ties: the smallest position of a maximum counts
    counted = torch.randint(1, 600, (docs,), generator=g)
    out = []
    for cells in (fs.DENSE_PAIR_CELLS, 0):
        monkeypatch.setattr(fs, "DENSE_PAIR_CELLS", cells)
        st = fs.FeatureStats(d, torch.device("cpu"))
        out.append((st.add_docs(feat, rank, pos, val, counted, docs), st.n_docs, st.doc_mean, st.doc_m2))
    (a, na, ma, m2a), (b, nb, mb, m2b) = out
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert torch.equal(na, nb) and torch.equal(ma, mb) and torch.equal(m2a, m2b)
