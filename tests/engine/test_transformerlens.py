"""saeray against TransformerLens / sae-lens `HookedSAETransformer`, fully offline.

TransformerLens is the reference implementation of the hook names sae-lens SAEs carry.
For the tiny Llama and Gemma 3 models of `helpers.make_model` we build a
`HookedSAETransformer` from the in-memory Hugging Face model without the hub:

* config: Llama goes through TL's own `get_pretrained_model_config` on the local model
  directory (it reads config.json with `AutoConfig`; TL's generic `LlamaForCausalLM`
  branch). TL has no generic branch for a custom-sized Gemma 3 (only name-matched
  `google/gemma-3-*` entries), so we take TL's own `google/gemma-3-270m` config dict
  (name-based, no download) for every architecture flag and replace only the sizes,
  sliding window, layer types and rope bases with the tiny model's;
* weights: TL's `get_pretrained_state_dict(..., hf_model=hf)` (TL's `convert_llama_weights` /
  `convert_gemma_weights`), loaded with no folding, centering or refactoring
  (`from_pretrained_no_processing` settings), float32.

TL's `HookedTransformer.from_pretrained(..., hf_model=...)` itself cannot be used: it
requires an official hub model name and sizes the model from that name's table. And TL's
`convert_hf_model_config` routes any path containing "llama"/"gemma" to name-based branches
(and then fails), so the model directories here have neutral names and are opened by
relative name.

Before any comparison the TL model's logits must equal HF's, so the reference is faithful.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import polars as pl
import pytest
import torch

pytest.importorskip("transformer_lens")
pytest.importorskip("sae_lens")

from helpers import base_config, canonical_doc_ids, corpus, make_model, make_sae, write_dataset  # noqa: E402

from saeray.engine import config as config_mod  # noqa: E402
from saeray.engine import models  # noqa: E402
from saeray.executors import run  # noqa: E402

ARCHS = ["llama", "gemma3"]
N_LAYERS = 4
MID = 2  # the middle layer compared for every hook kind (all layers are compared too)
ATOL = 1e-4
CONTEXT = 512  # = max_position_embeddings of the tiny models: every document fits in one window

MAX_DIFF: dict[str, float] = {}  # what was seen, printed at the end of the module (pytest -s)
COUNTS: dict[str, tuple[int, int, int]] = {}  # e2e: rows saeray wrote, TL entries >= ATOL, top-k boundary swaps


@pytest.fixture(scope="module", autouse=True)
def _one_thread_and_report() -> Iterator[None]:
    # Matrices here are tiny: one thread is many times faster than several on a busy CPU.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    if MAX_DIFF:
        print("\nmax abs differences vs TransformerLens:")
        for key, value in sorted(MAX_DIFF.items()):
            print(f"  {key}: {value:.3g}")
    for key, (mine, want, ties) in sorted(COUNTS.items()):
        print(f"  {key}: {mine} rows written, {want} TL entries >= {ATOL}, {ties} top-k boundary swaps")


def _note(key: str, value: float) -> None:
    MAX_DIFF[key] = max(MAX_DIFF.get(key, 0.0), float(value))


@contextmanager
def _cwd(path: Path) -> Iterator[None]:
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def _tl_config(model_dir: Path, hf: Any, arch: str) -> Any:
    import transformer_lens.loading_from_pretrained as loading
    from transformer_lens.config.hooked_transformer_config import HookedTransformerConfig

    common = dict(device="cpu", dtype=torch.float32, default_prepend_bos=True)
    if arch == "llama":
        # Opened by its neutral relative name: TL matches "llama" anywhere in the path.
        with _cwd(model_dir.parent):
            cfg = loading.get_pretrained_model_config(model_dir.name, hf_cfg=hf.config.to_dict(), fold_ln=False,
                                                      **common)
        assert cfg.original_architecture == "LlamaForCausalLM"
        return cfg
    hc = hf.config
    assert hc.attn_logit_softcapping is None and hc.final_logit_softcapping is None
    assert all(p.get("rope_type", "default") == "default" for p in hc.rope_parameters.values())
    try:
        d = loading.convert_hf_model_config("google/gemma-3-270m")  # name-based: no hub access
    except (ValueError, NotImplementedError) as e:
        pytest.skip(f"this TransformerLens has no Gemma 3 architecture to compare with: {e}")
    assert d["original_architecture"] == "Gemma3ForCausalLM"
    assert d["use_normalization_before_and_after"] and d["use_qk_norm"] and d["gated_mlp"]
    d.update(
        d_model=hc.hidden_size, d_head=hc.head_dim, n_heads=hc.num_attention_heads, d_mlp=hc.intermediate_size,
        n_layers=hc.num_hidden_layers, n_ctx=hc.max_position_embeddings, eps=hc.rms_norm_eps,
        d_vocab=hc.vocab_size, n_key_value_heads=hc.num_key_value_heads, act_fn=hc.hidden_activation,
        window_size=hc.sliding_window, use_local_attn=True,
        attn_types=["local" if t == "sliding_attention" else "global" for t in hc.layer_types],
        rotary_base=hc.rope_parameters["full_attention"]["rope_theta"],
        rotary_base_local=hc.rope_parameters["sliding_attention"]["rope_theta"],
        use_attn_scale=True, attn_scale=float(hc.query_pre_attn_scalar) ** 0.5,
        tokenizer_name=None, model_name="tiny-gemma3", init_weights=False, **common,
    )
    return HookedTransformerConfig.from_dict(d)


@pytest.fixture(scope="module", params=ARCHS)
def ref(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny HF model (saved to disk, for saeray) and the equivalent HookedSAETransformer."""
    import transformer_lens.loading_from_pretrained as loading
    from sae_lens import HookedSAETransformer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    arch = request.param
    root = tmp_path_factory.mktemp("tlref")
    model_dir = make_model(root / "tinymodel", arch, n_layers=N_LAYERS, seed=3)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    cfg = _tl_config(model_dir, hf, arch)
    state = loading.get_pretrained_state_dict(str(model_dir), cfg, hf_model=hf, dtype=torch.float32)
    tl = HookedSAETransformer(cfg, tokenizer=tok, move_to_device=False)
    tl.load_and_process_state_dict(state, fold_ln=False, center_writing_weights=False, center_unembed=False,
                                   fold_value_biases=False, refactor_factored_attn_matrices=False)
    tl.eval()

    docs = corpus(24, seed=11)
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in docs]
    assert max(len(i) for i in ids) + 1 <= CONTEXT
    # The TL model is a faithful copy of the HF model (else nothing below means anything).
    with torch.no_grad():
        for i in ids[:6]:
            x = torch.tensor([[tok.bos_token_id] + i])
            diff = (tl(x) - hf(x, use_cache=False).logits).abs().max().item()
            _note(f"{arch} logits TL vs HF", diff)
            assert diff < ATOL, f"TL and HF disagree on {arch} logits by {diff}"
    return {"arch": arch, "dir": model_dir, "hf": hf, "tok": tok, "tl": tl, "docs": docs, "ids": ids}


def _padded(ids: list[list[int]], bos: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded [BOS] + ids batch, as saeray builds it."""
    width = max(len(i) for i in ids) + 1
    x = torch.full((len(ids), width), pad, dtype=torch.long)
    mask = torch.zeros_like(x)
    for r, i in enumerate(ids):
        x[r, :len(i) + 1] = torch.tensor([bos] + i)
        mask[r, :len(i) + 1] = 1
    return x, mask


# ---- hook points ----------------------------------------------------------------------


def test_hook_points_match_transformerlens(ref: dict[str, Any]) -> None:
    """run_to_hooks on a right-padded batch == TL run_with_cache per document, every hook kind.

    Every layer, one hook per forward pass (the forward stops right after it), and once
    with all hooks of the middle layer in one pass."""
    arch, hf, tok, tl = ref["arch"], ref["hf"], ref["tok"], ref["tl"]
    ids = ref["ids"][:8]
    x, mask = _padded(ids, tok.bos_token_id, tok.pad_token_id)
    names = [f"blocks.{layer}.{kind}" for layer in range(N_LAYERS) for kind in models.HOOK_KINDS]
    caches = []
    with torch.no_grad():
        for i in ids:
            _, cache = tl.run_with_cache(torch.tensor([[tok.bos_token_id] + i]), names_filter=names)
            caches.append(cache)

    def check(got: dict[str, torch.Tensor], name: str) -> None:
        layer, kind = name.split(".")[1], name.split(".")[2]
        for r, i in enumerate(ids):
            want = caches[r][name][0]
            diff = (got[name][r, :len(i) + 1] - want).abs().max().item()
            key = f"{arch} {kind}" + (" (middle layer)" if int(layer) == MID else "")
            _note(key, diff)
            assert diff < ATOL, f"{arch} {name}: saeray differs from TransformerLens by {diff} (doc {r})"

    sites = {n: models.parse_hook(n, N_LAYERS) for n in names}
    for name in names:
        check(models.run_to_hooks(hf, [sites[name]], x, mask), name)
    middle = [n for n in names if n.startswith(f"blocks.{MID}.")]
    got = models.run_to_hooks(hf, [sites[n] for n in middle], x, mask)
    assert set(got) == set(middle)
    for name in middle:
        check(got, name)


# ---- end to end: run directory == HookedSAETransformer.run_with_cache_with_saes ---------


SAES = [("std", "standard", "blocks.2.hook_resid_post"), ("topk", "topk", "blocks.1.hook_mlp_out")]


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_run_matches_hooked_sae_transformer(ref: dict[str, Any], tmp_path: Path, compiled: bool) -> None:
    """Every nonzero (doc_id, pos, feature, value) saeray writes equals the SAE code of
    `run_with_cache_with_saes` on [BOS] + the document's tokens, and none is missing; with model.compile too."""
    from sae_lens import SAE

    arch, tok, tl, docs = ref["arch"], ref["tok"], ref["tl"], ref["docs"]
    sae_dirs = {name: make_sae(tmp_path / name, sae_arch, 64, hook, seed=i + 1)
                for i, (name, sae_arch, hook) in enumerate(SAES)}
    data = write_dataset(tmp_path / "data", docs, 2)
    raw = base_config(ref["dir"], [{"name": n, "path": str(p)} for n, p in sae_dirs.items()], data,
                      tmp_path / "run", tokens={"batch_tokens": 1024, "context_size": CONTEXT}, model__compile=compiled)
    result = run(config_mod.from_dict(raw), executor="local")
    run_dir = Path(result.run_dir)
    assert result.n_shards == 2 and not result.errors

    rows = pl.read_parquet(str(run_dir / "activations" / "**" / "*.parquet"))
    doc_table = pl.read_parquet(str(run_dir / "docs" / "**" / "*.parquet")).sort("doc_id")
    doc_ids = canonical_doc_ids(data)  # file index << 32 | row
    assert doc_table["doc_id"].to_list() == doc_ids
    assert set(rows["group"].unique()) == {"all"}
    special = set(tok.all_special_ids)

    # saeray's token ids are TL's tokenization of the text, BOS excluded.
    tokens = []
    for i, text in enumerate(docs):
        ids = doc_table["token_ids"][i].to_list()
        assert ids == ref["ids"][i]
        tl_ids = tl.to_tokens(text, prepend_bos=True)[0].tolist()
        assert tl_ids == [tok.bos_token_id] + ids
        assert len(tl_ids) <= CONTEXT
        tokens.append(tl_ids)

    for name, sae_arch, hook in SAES:
        sae = SAE.load_from_disk(sae_dirs[name], device="cpu")
        sae.eval()
        layer = int(hook.split(".")[1])
        mine = rows.filter(pl.col("sae") == name)
        assert mine.select(["doc_id", "pos", "feature"]).is_duplicated().sum() == 0
        assert (mine["value"] != 0).all()
        by_doc = mine.partition_by("doc_id", as_dict=True)
        n_ref = n_mine = ties = 0
        max_diff = 0.0
        for doc_id, ids in zip(doc_ids, tokens):
            with torch.no_grad():
                _, cache = tl.run_with_cache_with_saes(torch.tensor([ids]), saes=[sae], stop_at_layer=layer + 1)
            want = cache[f"{hook}.hook_sae_acts_post"][0, 1:].float()  # BOS is no position
            keep = torch.tensor([t not in special for t in ids[1:]])
            want[~keep] = 0  # special tokens are not counted (tokens.exclude_special defaults to true)
            got = torch.zeros_like(want)
            part = by_doc.get((doc_id,))
            if part is not None:
                pos = torch.from_numpy(part["pos"].to_numpy().astype(np.int64))
                feat = torch.from_numpy(part["feature"].to_numpy().astype(np.int64))
                assert pos.max() < len(ids) - 1 and bool(keep[pos].all()), f"doc {doc_id}: rows at uncounted positions"
                got[pos, feat] = torch.from_numpy(part["value"].to_numpy().copy())
                n_mine += len(part)
            n_ref += int((want.abs() >= ATOL).sum())
            diff = (got - want).abs()
            bad = diff >= ATOL
            if sae_arch == "topk" and bool(bad.any()):
                # A near-tie at the k-th largest pre-activation may select a different feature
                # under float noise: allow a swap only where both values sit at that boundary.
                pre = cache[f"{hook}.hook_sae_acts_pre"][0, 1:].float()
                kth = pre.topk(int(sae.cfg.k), dim=-1).values[:, -1:]
                at_boundary = ((got - kth).abs() < ATOL) | ((want - kth).abs() < ATOL)
                ties += int((bad & at_boundary).sum())
                bad &= ~at_boundary
            assert not bool(bad.any()), (
                f"{arch} {name} doc {doc_id}: {int(bad.sum())} entries differ from HookedSAETransformer, e.g. "
                f"(pos, feature) {bad.nonzero()[:5].tolist()}: saeray {got[bad][:5].tolist()} "
                f"vs TL {want[bad][:5].tolist()}")
            max_diff = max(max_diff, float(diff[~bad].max()) if diff.numel() else 0.0)
        _note(f"{arch} e2e {sae_arch} SAE at {hook} (acts_post)", max_diff)
        assert n_ref > 0 and n_mine > 0, f"{arch} {name}: no active features at all, the check is vacuous"
        COUNTS[f"{arch} {name}"] = (n_mine, n_ref, ties)
