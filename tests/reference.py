"""The slow, obvious computation saeray must agree with: one window at a time, HF
`output_hidden_states`, `sae.encode`, keep the nonzeros."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import torch


def reference_rows(model_dir: Path, sae_dir: Path, docs: list[str], *, context_size: int, prepend_bos: bool = True,
                   mode: str = "all", threshold: float = 0.0, doc_ids: list[int] | None = None,
                   lengths: list[int] | None = None) -> pl.DataFrame:
    """Rows of `docs` (doc ids 0.. or `doc_ids`; each cut to `lengths` tokens where given)."""
    from sae_lens import SAE
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    sae = SAE.load_from_disk(sae_dir)
    hook = sae.cfg.metadata.hook_name
    layer, kind = int(hook.split(".")[1]), hook.split(".")[2]
    index = {"hook_resid_pre": layer, "hook_resid_post": layer + 1}[kind]
    special = set(tok.all_special_ids)
    step = context_size - int(prepend_bos)
    out = []
    with torch.no_grad():
        for i, (doc_id, text) in enumerate(zip(doc_ids if doc_ids is not None else range(len(docs)), docs)):
            ids = tok(text, add_special_tokens=False)["input_ids"]
            if lengths is not None:
                ids = ids[:lengths[i]]
            counted = [p for p, t in enumerate(ids) if t not in special]
            keep = set(counted if mode == "all" else counted[-1:])
            for start in range(0, len(ids), step):
                window = ([tok.bos_token_id] if prepend_bos else []) + ids[start:start + step]
                hs = model(torch.tensor([window]), output_hidden_states=True).hidden_states[index][0]
                acts = sae.encode(hs)
                for j in range(int(prepend_bos), len(window)):
                    pos = start + j - int(prepend_bos)
                    if pos not in keep:
                        continue
                    a = acts[j]
                    for f in torch.nonzero(a.abs() > threshold if threshold else a != 0).flatten().tolist():
                        out.append((doc_id, pos, f, float(a[f])))
    arr = np.array(out, dtype=np.float64).reshape(-1, 4)
    return pl.DataFrame({"doc_id": arr[:, 0].astype(np.int64), "pos": arr[:, 1].astype(np.int32),
                         "feature": arr[:, 2].astype(np.int32), "value": arr[:, 3].astype(np.float32)})


def read_rows(run: Path, sae: str | None = None, group: str | None = None) -> pl.DataFrame:
    df = pl.read_parquet(str(run / "activations" / "**" / "*.parquet"))
    if sae is not None:
        df = df.filter(pl.col("sae") == sae)
    if group is not None:
        df = df.filter(pl.col("group") == group)
    return df.sort(["sae", "group", "doc_id", "pos", "feature"])


def assert_same_rows(got: pl.DataFrame, want: pl.DataFrame, atol: float = 1e-4, small: float = 1e-3) -> None:
    """Every (doc_id, pos, feature) matches to `atol`; entries on one side only must be below `small`."""
    keys = [c for c in ("sae", "group") if c in got.columns and c in want.columns] + ["doc_id", "pos", "feature"]
    j = got.select(*keys, "value").join(want.select(*keys, pl.col("value").alias("ref")), on=keys, how="full",
                                        coalesce=True)
    only = j.filter(pl.col("value").is_null() | pl.col("ref").is_null())
    big = only.filter(pl.coalesce("value", "ref").abs() >= small)
    assert big.height == 0, f"{big.height} rows missing or extra, e.g.\n{big.head(5)}"
    both = j.drop_nulls()
    diff = (both["value"] - both["ref"]).abs().max() if both.height else 0.0
    assert both.height > 0 and diff <= atol + 1e-4 * both["ref"].abs().max(), f"max |diff| {diff}"
    print(f"rows compared: {both.height} (max |diff| {diff:.2e})")
