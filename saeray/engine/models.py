"""Load a `transformers` causal LM (or a vision-language model) and read TransformerLens-named hook points.

Hook names are the ones sae-lens SAEs carry (`blocks.L.hook_resid_pre`, ...). They are
mapped onto the Hugging Face decoder layers (the language model's, for a vision-language
model). `Hooks` runs the full model's forward and stops it by an exception right after the deepest
hooked module (training and probing read activations this way); a worker runs `truncated.Truncated`,
the model up to its deepest hooked layer as a function of its own, where the model's family has one.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Self

import torch
from torch import nn

from .config import ModelConfig

log = logging.getLogger(__name__)

HOOK_KINDS = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out")
_HOOK_RE = re.compile(r"^blocks\.(\d+)\.(\w+)$")
_ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")
_MLP_NAMES = ("mlp", "feed_forward", "ffn")


class ModelError(ValueError):
    """The model cannot be loaded or does not have the requested hook point."""


class _StopForward(Exception):
    """Raised inside the deepest hook to end the forward pass early."""


@dataclass(frozen=True)
class HookSite:
    name: str
    layer: int
    kind: str


def torch_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            return torch.float16
        return torch.bfloat16
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def text_config(config: Any) -> Any:
    """The language model's config (the text config of a vision-language model)."""
    getter = getattr(config, "get_text_config", None)
    return getter() if getter else config


def is_image_text(config: Any) -> bool:
    """Whether a model config describes a vision-language model (it has a vision tower)."""
    return getattr(config, "vision_config", None) is not None


def model_kind(cfg: ModelConfig, config: Any) -> str:
    """'image_text' or 'causal_lm': the config's `kind`, resolved against the model's own config."""
    if cfg.kind == "auto":
        return "image_text" if is_image_text(config) else "causal_lm"
    if cfg.kind == "image_text" and not is_image_text(config):
        raise ModelError(f"model.kind is image_text but {cfg.name!r} (model type {config.model_type!r}) has no "
                         "vision_config: use a vision-language model or set model.kind: auto")
    return cfg.kind


def image_token_id(config: Any) -> int | None:
    """The id of the placeholder token whose positions hold image features (None for text models)."""
    for attr in ("image_token_id", "image_token_index"):
        value = getattr(config, attr, None)
        if value is not None:
            return int(value)
    return None


def n_layers_of(config: Any) -> int:
    tc = text_config(config)
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        if getattr(tc, attr, None):
            return int(getattr(tc, attr))
    raise ModelError(f"cannot tell the number of layers of model type {tc.model_type!r}")


def d_model_of(config: Any) -> int:
    tc = text_config(config)
    for attr in ("hidden_size", "n_embd", "d_model"):
        if getattr(tc, attr, None):
            return int(getattr(tc, attr))
    raise ModelError(f"cannot tell the hidden size of model type {tc.model_type!r}")


def vocab_size_of(config: Any) -> int | None:
    """Rows of the model's embedding matrix (token ids must be below it), None when the config does not say."""
    value = getattr(text_config(config), "vocab_size", None) or getattr(config, "vocab_size", None)
    return int(value) if value else None


def parse_hook(name: str, n_layers: int) -> HookSite:
    m = _HOOK_RE.match(name)
    valid = f"blocks.L.{{{','.join(HOOK_KINDS)}}} with L in 0-{n_layers - 1}"
    if not m or m.group(2) not in HOOK_KINDS:
        raise ModelError(f"unknown hook {name!r}: valid hooks are {valid}")
    layer = int(m.group(1))
    if layer >= n_layers:
        raise ModelError(f"unknown hook {name!r}: the model has {n_layers} layers (0-{n_layers - 1})")
    return HookSite(name, layer, m.group(2))


# ---- loading ------------------------------------------------------------------------


def resolve_source(name: str) -> tuple[str, dict[str, Any]]:
    """Turn a model name into (path or hub id, extra from_pretrained kwargs)."""
    from . import embedded

    if name in embedded.MODELS:
        return embedded.resolve(name)
    p = Path(name).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ModelError(f"GGUF file {p} does not exist")
        return str(p.parent), {"gguf_file": p.name}
    if p.exists():
        return str(p), {}
    if name.startswith((".", "/", "~")):
        raise ModelError(f"model directory {name} does not exist")
    return name, {}


def load_config(cfg: ModelConfig) -> Any:
    from transformers import AutoConfig

    source, kwargs = resolve_source(cfg.name)
    try:
        return AutoConfig.from_pretrained(source, revision=cfg.revision,
                                          trust_remote_code=cfg.trust_remote_code, **kwargs)
    except OSError as e:
        raise ModelError(f"cannot load the config of model {cfg.name!r}: {e}. Give an embedded short "
                         "name, a local directory, a .gguf file, or a hub id available offline") from None


def load_model(cfg: ModelConfig, device: torch.device) -> tuple[nn.Module, Any]:
    """Load (model, tokenizer) in eval mode on `device`."""
    model, tokenizer, _ = load_model_and_processor(cfg, device)
    return model, tokenizer


def auto_attention(config: Any, device: torch.device) -> str | None:
    """model.attn_implementation auto: flex_attention on a GPU for a model whose attention logits are soft-capped
    (Gemma 2; flex applies the cap, sdpa cannot and transformers would pick eager), else None: transformers'
    choice for the class. Logged."""
    capped = getattr(text_config(config), "attn_logit_softcapping", None)
    choice = "flex_attention" if device.type == "cuda" and capped else None
    log.info("model.attn_implementation auto: %s (%s, %s)", choice or "transformers' choice for the class",
             device.type, f"attention logits soft-capped at {capped}" if capped else "no soft-capping")
    return choice


def load_model_and_processor(cfg: ModelConfig, device: torch.device, *, tokenizer: bool = True
                             ) -> tuple[nn.Module, Any, Any]:
    """Load (model, tokenizer, processor) in eval mode on `device`; processor is None for causal LMs.

    A vision-language model is loaded with AutoModelForImageTextToText and AutoProcessor; its
    tokenizer is the processor's. With tokenizer=False only the model is loaded (tokenizer and processor None):
    a 262k-token vocabulary alone takes seconds.
    """
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

    source, kwargs = resolve_source(cfg.name)
    dtype = torch_dtype(cfg.dtype, device)
    common = dict(revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, **kwargs)
    # Weights from safetensors only (never a pickle); GGUF files are not pickles either.
    safe = {} if "gguf_file" in kwargs else {"use_safetensors": True}
    attn = cfg.attn_implementation if cfg.attn_implementation != "auto" else auto_attention(load_config(cfg), device)
    if attn is not None:  # None: transformers' own choice for the class (see ModelConfig)
        safe["attn_implementation"] = attn
    try:
        processor = tok = None
        if "gguf_file" not in kwargs and model_kind(cfg, load_config(cfg)) == "image_text":
            if tokenizer:
                from transformers import AutoProcessor  # its import alone takes ~2 s: only where it is needed

                processor = AutoProcessor.from_pretrained(source, **common)
                tok = processor.tokenizer
            model = AutoModelForImageTextToText.from_pretrained(source, dtype=dtype, **common, **safe)
        else:
            if tokenizer:
                tok = AutoTokenizer.from_pretrained(source, **common)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **common, **safe)
    except (ValueError, ImportError) as e:
        if "attn_implementation" not in safe:
            raise
        raise ModelError(f"model.attn_implementation {cfg.attn_implementation!r} cannot run {cfg.name!r}: {e}. "
                         "Use model.attn_implementation: auto (flex_attention on a GPU for soft-capped Gemma 2, else "
                         "sdpa where the model supports it, else eager)") from None
    model.to(device).eval()
    model.requires_grad_(False)
    return model, tok, processor


# ---- hooks --------------------------------------------------------------------------


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder layers (the language model's, for multimodal models).

    A vision tower's encoder layers are a ModuleList too, possibly of the same length: lists under
    `language_model` / `text_model` come first, lists under a vision module last.
    """
    n = n_layers_of(model.config)
    candidates = [(name, m) for name, m in model.named_modules()
                  if isinstance(m, nn.ModuleList) and len(m) == n]
    if not candidates:
        raise ModelError(f"no list of {n} decoder layers found in {type(model).__name__}")

    def rank(name: str) -> tuple[bool, bool, bool]:
        parts = name.split(".")
        vision = any("vision" in p or p in ("visual", "image_encoder") for p in parts)
        language = any(p in ("language_model", "text_model") for p in parts)
        return vision, not language, parts[-1] not in ("layers", "h", "layer", "blocks")

    return min(candidates, key=lambda c: rank(c[0]))[1]


def _child(block: nn.Module, names: tuple[str, ...], what: str) -> nn.Module:
    for n in names:
        if hasattr(block, n):
            return getattr(block, n)
    raise ModelError(f"{type(block).__name__} has no {what} submodule (looked for {', '.join(names)})")


def _first(x: Any) -> torch.Tensor:
    return x[0] if isinstance(x, (tuple, list)) else x


def hook_target(block: nn.Module, kind: str) -> tuple[nn.Module, str]:
    """(module, 'input' | 'output') whose value is the hook point `kind` of this block."""
    sandwich = hasattr(block, "pre_feedforward_layernorm") and hasattr(block, "post_feedforward_layernorm")
    if kind == "hook_resid_pre":
        return block, "input"
    if kind == "hook_resid_post":
        return block, "output"
    if kind == "hook_attn_out":
        # Gemma 2/3 normalise the attention output before adding it to the residual stream.
        return (block.post_attention_layernorm, "output") if sandwich else (_child(block, _ATTN_NAMES, "attention"), "output")
    if kind == "hook_mlp_out":
        return (block.post_feedforward_layernorm, "output") if sandwich else (_child(block, _MLP_NAMES, "MLP"), "output")
    if kind == "hook_resid_mid":
        if sandwich:
            return block.pre_feedforward_layernorm, "input"
        for n in ("post_attention_layernorm", "ln_2"):
            if hasattr(block, n):
                return getattr(block, n), "input"
        raise ModelError(f"cannot locate hook_resid_mid in {type(block).__name__}")
    raise ModelError(f"unknown hook kind {kind!r}")


class HookHandles:
    """Hooks registered on a model (`_handles`), removed by `close` or at the end of a `with` block."""

    _handles: list[Any]

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Hooks(HookHandles):
    """Forward hooks at `sites`, registered once (a worker keeps one for its whole life); each call runs
    the model until every hook has fired and returns {hook name: [batch, seq, d]}. The model's other
    forward passes are stopped at the hooks too while this object is open: `close` it (or use `with`)."""

    def __init__(self, model: nn.Module, sites: list[HookSite]):
        self.model = model
        self.sites = list(sites)
        self.captured: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []
        names = {s.name for s in self.sites}
        layers = decoder_layers(model)
        captured = self.captured

        def make(name: str, where: str):
            def record(value: torch.Tensor) -> None:
                captured[name] = value
                if names.issubset(captured):
                    raise _StopForward

            if where == "input":
                def pre_hook(module, args, kwargs):
                    record(args[0] if args else kwargs["hidden_states"])
                return pre_hook, True

            def post_hook(module, args, kwargs, output):
                record(_first(output))
            return post_hook, False

        try:
            for s in self.sites:
                module, where = hook_target(layers[s.layer], s.kind)
                fn, is_pre = make(s.name, where)
                register = module.register_forward_pre_hook if is_pre else module.register_forward_hook
                self._handles.append(register(fn, with_kwargs=True))
        except BaseException:
            self.close()
            raise
        self.token_types = _takes_token_types(model)

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor | None = None,
                 token_type_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Forward `input_ids` until every hook has fired; their values.

        Vision-language models also take `pixel_values` (one image per row holding image tokens, in row
        order) and `token_type_ids` (0: the image + prompt prefix, attended bidirectionally; 1: causal).
        """
        extra: dict[str, torch.Tensor] = {}
        if pixel_values is not None:
            extra["pixel_values"] = pixel_values.to(input_ids.device, dtype=next(self.model.parameters()).dtype)
        if self.token_types:
            # Explicit types keep text causal: PaliGemma's text config asks for bidirectional attention, which
            # SDPA would apply to unpadded text-only batches if no mask were materialised.
            extra["token_type_ids"] = token_type_ids if token_type_ids is not None else torch.ones_like(input_ids)
        self.captured.clear()
        try:
            self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **extra)
        except _StopForward:
            pass
        out = dict(self.captured)
        self.captured.clear()
        missing = {s.name for s in self.sites} - set(out)
        if missing:
            raise ModelError(f"hooks {sorted(missing)} never fired during the forward pass")
        return out


@contextlib.contextmanager
def capture(model: nn.Module, sites: list[HookSite]) -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, a forward pass fills the dict {hook name: [batch, seq, d]} and stops right
    after the deepest hook: the early stop ends the block, which then returns normally."""
    with Hooks(model, sites) as hooks:
        try:
            yield hooks.captured
        except _StopForward:
            pass


def _takes_token_types(model: nn.Module) -> bool:
    """Whether the model is a vision-language model whose forward takes token_type_ids (PaliGemma's prefix)."""
    return is_image_text(model.config) and _forward_takes(type(model), "token_type_ids")


@functools.lru_cache(maxsize=None)
def _forward_takes(cls: type, name: str) -> bool:
    """Whether `cls.forward` has a parameter `name` (looked up once per class, not per batch)."""
    return name in inspect.signature(cls.forward).parameters


def run_to_hooks(model: nn.Module, sites: list[HookSite], input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 pixel_values: torch.Tensor | None = None,
                 token_type_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """One forward pass to `sites` with hooks registered for it alone (see `Hooks`, which keeps them)."""
    with Hooks(model, sites) as hooks:
        return hooks(input_ids, attention_mask, pixel_values=pixel_values, token_type_ids=token_type_ids)
