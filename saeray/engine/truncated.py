"""The model up to its deepest hooked layer, as a module of its own that returns the hooked tensors.

`Truncated` runs the Hugging Face modules themselves (the token embedding, with Gemma's scaling inside it;
the rotary embedding, once per layer type for Gemma 3's local and global attention; transformers' own
causal / sliding-window mask functions; the decoder layers 0..L) in the order the HF model's forward calls
them, and stops after layer L: no final norm, no LM head, no exception to end the pass. A vision-language
model (PaliGemma) first merges its image features into the embeddings and builds the bidirectional
image + prompt prefix mask the way its own forward does. Being one plain function of tensors, it is what
`torch.compile` compiles (model.compile).

Hook points inside a layer (attn_out, mlp_out, resid_mid) are read by recording forward hooks on the same
submodules `models.hook_target` names; resid_pre and resid_post are the loop's own values.
"""

from __future__ import annotations

import functools
import inspect
import logging
import time
from typing import Any

import torch
from torch import nn

from .models import HookHandles, HookSite, ModelError, _first, _takes_token_types, decoder_layers, hook_target, is_image_text

log = logging.getLogger(__name__)

_INNER = ("hook_attn_out", "hook_mlp_out", "hook_resid_mid")


def _text_model(model: nn.Module) -> nn.Module:
    """The module holding embed_tokens, rotary_emb and the decoder layers (the language model of a VLM)."""
    layers = decoder_layers(model)
    for m in model.modules():
        if getattr(m, "layers", None) is layers and hasattr(m, "embed_tokens") and hasattr(m, "rotary_emb"):
            return m
    raise ModelError(f"{type(model).__name__} has no text model with embed_tokens, rotary_emb and layers")


def why_not(model: nn.Module) -> str | None:
    """Why `Truncated` cannot run this model (None: it can); the caller falls back to `models.Hooks`."""
    try:
        tm = _text_model(model)
    except ModelError as e:
        return str(e)
    if getattr(tm.config, "use_bidirectional_attention", False) and _reads_bidirectional(type(tm)):
        return "its text model attends bidirectionally (use_bidirectional_attention)"
    if is_image_text(model.config) and not hasattr(model, "model"):
        return "its vision-language base model is not at .model"
    return None


@functools.lru_cache(maxsize=None)
def _reads_bidirectional(cls: type) -> bool:
    """Whether the text model's forward acts on config.use_bidirectional_attention (Gemma 3's does; Gemma 2's,
    under PaliGemma, which sets it, does not); True when its source cannot be read."""
    try:
        return "use_bidirectional_attention" in inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return True


class Truncated(HookHandles):
    """The model's forward up to the deepest layer of `sites`; calling it returns {hook name: [batch, seq, d]}.

    Same call as `models.Hooks` (input_ids, attention_mask, pixel_values, token_type_ids), so the extractor
    takes either. `compile`: wrap the forward in torch.compile (inductor; see `compile_options`)."""

    def __init__(self, model: nn.Module, sites: list[HookSite], compile: bool = False):
        reason = why_not(model)
        if reason:
            raise ModelError(f"no truncated forward for {type(model).__name__}: {reason}")
        self.model = model
        self.sites = list(sites)
        tm = _text_model(model)
        self.text = tm
        self.vlm = model.model if is_image_text(model.config) else None
        self.depth = max(s.layer for s in self.sites) + 1
        self.layers = list(decoder_layers(model))[: self.depth]
        types = getattr(tm.config, "layer_types", None) or ["full_attention"] * len(decoder_layers(model))
        self.layer_types = list(types[: self.depth])
        self.rope_per_type = "layer_type" in inspect.signature(tm.rotary_emb.forward).parameters
        self.token_types = _takes_token_types(model)
        self.pre = {(s.layer, "hook_resid_pre"): s.name for s in self.sites if s.kind == "hook_resid_pre"}
        self.post = {(s.layer, "hook_resid_post"): s.name for s in self.sites if s.kind == "hook_resid_post"}
        # one slot per inner hook, None between calls (a compiled forward's guards see the same state each call)
        self._slots: dict[str, list[torch.Tensor | None]] = {}
        self._handles = []
        for s in self.sites:
            if s.kind in _INNER:
                module, where = hook_target(self.layers[s.layer], s.kind)
                self._slots[s.name] = [None]
                self._handles.append(self._record(module, where, self._slots[s.name]))
        self.compiled = compile
        self._min_size = 1
        """Batches smaller than this in rows or length are padded to it (see `_padded`)."""
        if compile:
            use_compile_cache()
            options = compile_options(_device_of(model))
            self._forward = torch.compile(self.forward_tensors, **options)
            if options["dynamic"]:
                self._min_size = 2
        else:
            self._forward = self.forward_tensors

    def warm_up(self, batch_tokens: int, context_size: int) -> float:
        """Compile now, on a batch of the run's full shape (batch_tokens // context rows of context tokens): the
        worker calls it once it has loaded the model, so compiling is part of its start, not of its first unit's
        time (or timeout). On a CPU the graph has dynamic shapes and serves every batch; on a GPU this is the
        shape most batches have. Seconds it took; 0 when not compiled or for a vision-language model (whose
        batches carry images)."""
        if not self.compiled or self.vlm is not None:
            return 0.0
        device = _device_of(self.model)
        width = min(context_size, batch_tokens)
        ids = torch.zeros((max(1, batch_tokens // width), width), dtype=torch.long, device=device)
        t0 = time.perf_counter()
        self(ids, torch.ones_like(ids))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    def _padded(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor | None,
                token_type_ids: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The forward of a batch with 1 row or 1 position, padded to 2 (masked out, as padding is) and cut back.
        A graph with dynamic shapes specializes sizes 0 and 1: without this, a run's first one-row batch (a
        block's last window) would compile a second graph (~30 s on 2 cores). Rows and positions do not mix,
        except through attention, where padding is masked."""
        n, length = input_ids.shape
        rows, cols = max(n, self._min_size), max(length, self._min_size)
        with torch.inference_mode(False):  # tensors like the batcher's (an inference tensor fails the graph's guards)
            ids, mask = _pad_to(input_ids, rows, cols, 0), _pad_to(attention_mask, rows, cols, 0)
            types = None if token_type_ids is None else _pad_to(token_type_ids, rows, cols, 1)
        out = self._forward(ids, mask, pixel_values, types)
        return {name: t[:n, :length] for name, t in out.items()}

    @staticmethod
    def _record(module: nn.Module, where: str, slot: list[torch.Tensor | None]) -> Any:
        if where == "input":
            def pre_hook(mod, args, kwargs):
                slot[0] = args[0] if args else kwargs["hidden_states"]
            return module.register_forward_pre_hook(pre_hook, with_kwargs=True)

        def post_hook(mod, args, kwargs, output):
            slot[0] = _first(output)
        return module.register_forward_hook(post_hook, with_kwargs=True)

    # ---- before the layers: as the HF model's forward does it -----------------------------------
    def _embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs_embeds, position_ids)."""
        if self.vlm is None:
            emb = self.text.embed_tokens(input_ids)
            return emb, torch.arange(emb.shape[1], device=emb.device).unsqueeze(0)
        vlm = self.vlm
        ids = input_ids
        if vlm.config.image_token_id >= vlm.vocab_size:  # an out-of-vocabulary image token embeds as id 0
            ids = torch.where(input_ids == vlm.config.image_token_id, torch.zeros_like(input_ids), input_ids)
        emb = vlm.get_input_embeddings()(ids)
        positions = torch.arange(emb.shape[1], device=emb.device).unsqueeze(0) + 1  # PaliGemma counts from 1
        if pixel_values is not None:
            feats = vlm.get_image_features(pixel_values).pooler_output.to(emb.device, emb.dtype)
            mask = vlm.get_placeholder_mask(input_ids, inputs_embeds=emb, image_features=feats)
            emb = emb.masked_scatter(mask, feats)
        return emb, positions

    def _masks(self, emb: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor,
               token_type_ids: torch.Tensor | None) -> dict[str, Any]:
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        kw: dict[str, Any] = dict(config=self.text.config, inputs_embeds=emb, attention_mask=attention_mask,
                                  cache=None, position_ids=positions)
        if token_type_ids is not None:  # the image + prompt prefix attends bidirectionally
            kw["block_sequence_ids"] = torch.where(token_type_ids == 0, 0, -1)
        masks: dict[str, Any] = {}
        for t in set(self.layer_types):
            if t == "sliding_attention":
                masks[t] = create_sliding_window_causal_mask(**kw)
            elif t == "full_attention":
                masks[t] = create_causal_mask(**kw)
            else:
                raise ModelError(f"layer type {t!r} of {type(self.model).__name__} has no truncated forward")
        return masks

    def forward_tensors(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        pixel_values: torch.Tensor | None = None,
                        token_type_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The pure forward (what torch.compile traces): {hook name: tensor}."""
        emb, positions = self._embed(input_ids, pixel_values)
        masks = self._masks(emb, attention_mask, positions, token_type_ids)
        rope = self.text.rotary_emb
        if self.rope_per_type:
            pe = {t: rope(emb, positions, t) for t in set(self.layer_types)}
        else:
            shared = rope(emb, positions)
            pe = {t: shared for t in set(self.layer_types)}
        out: dict[str, torch.Tensor] = {}
        h = emb
        for i, (layer, t) in enumerate(zip(self.layers, self.layer_types)):
            if (i, "hook_resid_pre") in self.pre:
                out[self.pre[(i, "hook_resid_pre")]] = h
            h = _first(layer(h, attention_mask=masks[t], position_embeddings=pe[t], position_ids=positions))
            if (i, "hook_resid_post") in self.post:
                out[self.post[(i, "hook_resid_post")]] = h
        for name, slot in self._slots.items():
            if slot[0] is not None:
                out[name], slot[0] = slot[0], None
        return out

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor | None = None,
                 token_type_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Forward `input_ids` to the deepest hooked layer; the hooked values (see `models.Hooks.__call__`)."""
        if pixel_values is not None:
            pixel_values = pixel_values.to(input_ids.device, dtype=next(self.model.parameters()).dtype)
        if self.token_types and token_type_ids is None:
            token_type_ids = torch.ones_like(input_ids)  # text stays causal (see models.Hooks)
        if not self.token_types:
            token_type_ids = None
        if min(input_ids.shape) < self._min_size:
            out = self._padded(input_ids, attention_mask, pixel_values, token_type_ids)
        else:
            out = self._forward(input_ids, attention_mask, pixel_values, token_type_ids)
        missing = {s.name for s in self.sites} - set(out)
        if missing:
            raise ModelError(f"hooks {sorted(missing)} never fired during the truncated forward pass")
        return out


def _pad_to(t: torch.Tensor, rows: int, length: int, value: int) -> torch.Tensor:
    return torch.nn.functional.pad(t, (0, length - t.shape[1], 0, rows - t.shape[0]), value=value)


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def compile_options(device: torch.device) -> dict[str, Any]:
    """torch.compile's arguments for the truncated forward on `device`.

    On a GPU: static shapes (dynamic=False), one graph per (rows, length) batch shape, which the batcher's
    buckets bound (a few dozen in a long run), each with kernels for its sizes; compiled graphs are cached
    on disk for later workers. On a CPU, where inductor compiles a graph of Gemma 3 270M's first 7 layers in
    ~30 s on 2 cores: one graph with symbolic rows and length (dynamic=True) for every shape, and inductor's
    freezing, which folds the weights into the graph as constants and packs them for oneDNN's matmuls (the
    compiled forward alone ran at 1.3-1.5x eager's in bench/throughput.py --compile). A frozen graph is not
    loaded from the cache: each process compiles it again. Freezing also keeps a packed copy of the hooked
    layers' weights beside the model's own: they count twice in host memory."""
    if device.type == "cpu":
        return {"dynamic": True, "options": {"freezing": True}}
    return {"dynamic": False}


def resolve_compile(setting: bool | str, device: torch.device) -> bool:
    """model.compile resolved for `device`: auto compiles on a GPU only (on a CPU each worker process compiles
    for tens of seconds: see ModelConfig.compile and bench/throughput.py --compile)."""
    if setting == "auto":
        return device.type == "cuda"
    return bool(setting)


def use_compile_cache() -> None:
    """Inductor's compiled kernels and FX graphs under $SAERAY_CACHE/inductor (unless TORCHINDUCTOR_CACHE_DIR
    says elsewhere), so a later worker process loads them instead of compiling again."""
    import os

    from .embedded import cache_root

    import torch._inductor.config as inductor_config
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    # inductor writes its default into the environment once used (imports may have used it already)
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, os.path.abspath(default_cache_dir())):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_root() / "inductor")

    inductor_config.fx_graph_cache = True


def forward_to_hooks(model: nn.Module, sites: list[HookSite], compile: bool = False) -> Any:
    """The worker's forward: `Truncated` where the model's family has one, else `models.Hooks` (eager, stopped
    by an exception at the deepest hook; never compiled)."""
    from .models import Hooks

    reason = why_not(model)
    if reason is None:
        return Truncated(model, sites, compile=compile)
    log.info("hooked full forward for %s (%s)%s", type(model).__name__, reason, ", not compiled" if compile else "")
    return Hooks(model, sites)
