"""Export of a run for delphi (auto-interpretation): its latent cache layout, one sequence per kept example."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import torch

from .export import Steps, opened

DELPHI_NOTE = ("each example `saeray top` shows (its output.top_k top documents and its interval examples, 5 intervals "
               "x output.samples_per_bin documents; saeray/engine/partials.py) is one "
               "sequence: the tokens pos - radius .. pos + radius of its document (clipped, padded on the right with "
               "the pad token, which never activates) with the feature's values there; load with delphi's "
               "ConstructorConfig(example_ctx_len=cache_ctx_len) so each sequence is one example")


def delphi(run: str | Path, out: str | Path, *, sae: str | None = None, group: str | None = None, n_splits: int = 5,
           hookpoint: str | None = None, n_intervals: int = 5, features_at_a_time: int = 4096) -> list[Path]:
    """Write delphi's latent cache layout for one (SAE, group) of `run`: out/latents/<hookpoint>/config.json and
    `{start}_{end}.safetensors` per latent range (delphi's split formula), each with locations [N, 3] (sequence,
    position, latent - start; uint16 when they fit, else uint32; sorted by (sequence, position, latent)),
    activations (float16) and the token matrix [n_sequences, 2 * radius + 1] (int64, in every split, as delphi
    writes it). The sequences are the run's kept examples (DELPHI_NOTE): delphi's LatentDataset then yields, per
    latent, exactly the run's examples of it. Return the files written."""
    from safetensors.numpy import save_file

    from ..analysis.top import interval_examples, top_examples

    run, manifest, cfg, _, sae_name, group, stats = opened(run, sae, group)
    width = stats.height
    out_cfg = manifest["config"]["output"]
    radius = int(out_cfg.get("context_radius", 32))
    from ..analysis.stats import has_kind

    if not has_kind(run, "examples"):
        raise ValueError(f"{run} holds no example partials (made before saeray kept them, or output.top_k and "
                         "output.samples_per_bin 0): rerun it to export it for delphi")
    k, per_bin = int(out_cfg.get("top_k", 0)), int(out_cfg.get("samples_per_bin", 0))
    parts = []
    starts = range(0, width, features_at_a_time)
    steps = Steps("delphi", len(starts))
    for a in starts:
        feats = list(range(a, min(width, a + features_at_a_time)))
        if k:
            parts.append(top_examples(run, feats, sae=sae_name, group=group, k=k, window=(radius, radius)))
        if per_bin:
            parts.append(interval_examples(run, feats, sae=sae_name, group=group, bins=n_intervals, per_bin=per_bin,
                                           window=(radius, radius)))
        steps.step(f"feature ranges read (features {a}-{feats[-1]})")
    cols = ["feature", "doc_id", "window_start", "token_ids", "acts"]
    ex = pl.concat([p.select(cols) for p in parts]).unique(["feature", "doc_id"], keep="first").sort("feature", "doc_id")
    ctx = 2 * radius + 1
    tok = run.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    # a sequence per distinct (doc_id, window_start), numbered in order of first appearance
    seqs: dict[tuple[int, int], int] = {}
    keys = zip(ex["doc_id"].to_list(), ex["window_start"].to_list())
    seq_of = np.fromiter((seqs.setdefault(key, len(seqs)) for key in keys), np.int64, ex.height)
    firsts = ex["token_ids"].gather(np.unique(seq_of, return_index=True)[1])
    row, col, ids = _flat(firsts)
    tokens = np.full((len(firsts), ctx), pad, np.int64)
    tokens[row, col] = ids
    row, pos, acts = _flat(ex["acts"])
    acts = acts.astype(np.float64)
    kept = np.abs(acts) > 1e-5  # what delphi's cache keeps
    seq, pos, lat = seq_of[row[kept]], pos[kept], ex["feature"].to_numpy().astype(np.int64)[row[kept]]
    val = acts[kept].astype(np.float32)
    order = np.lexsort((lat, pos, seq))
    seq, pos, lat, val = seq[order], pos[order], lat[order], val[order]
    hook = hookpoint or next(s["hook"] for s in manifest["resolved"]["saes"] if s["name"] == sae_name)
    d = Path(out) / "latents" / hook
    d.mkdir(parents=True, exist_ok=True)
    bounds = torch.linspace(0, width, n_splits + 1).long().tolist()
    written = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        m = (lat >= a) & (lat < b)
        loc = np.stack([seq[m], pos[m], lat[m] - a], axis=1) if m.any() else np.zeros((0, 3), np.int64)
        small = not m.any() or (loc[:, 0].max() < 65536 and loc[:, 2].max() < 65536)
        path = d / f"{a}_{b - 1}.safetensors"
        save_file({"locations": loc.astype(np.uint16 if small else np.uint32), "activations": val[m].astype(np.float16),
                   "tokens": tokens}, str(path))
        written.append(path)
    (d / "config.json").write_text(json.dumps({
        "dataset_repo": cfg.data.dataset, "dataset_split": cfg.data.split, "dataset_name": "",
        "dataset_column": cfg.data.text_column, "batch_size": len(tokens), "cache_ctx_len": ctx,
        "n_tokens": int(tokens.size), "n_splits": n_splits, "model_name": cfg.model.name,
        "saeray": {"run": str(run), "fingerprint": manifest["fingerprint"], "sae": sae_name, "group": group,
                   "radius": radius, "sequences": DELPHI_NOTE}}, indent=2))
    return written


def _flat(lists: pl.Series) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A list column's items flattened: (the row of each, its position in its list, the values)."""
    lengths = lists.list.len().to_numpy().astype(np.int64)
    row = np.repeat(np.arange(len(lengths)), lengths)
    starts = np.cumsum(lengths) - lengths
    return row, np.arange(len(row)) - starts[row], lists.explode(empty_as_null=False).to_numpy()
