"""Logit effects of SAE features: which tokens a feature's decoder direction promotes or suppresses.

The direct path, as in Neuronpedia's and sae-lens' logit lens: a feature f writes its
decoder row `W_dec[f]` into the residual stream; the model's final norm and unembedding
turn it into logits

    logits_f = W_U @ (gain * W_dec[f])

- `gain` is the final norm's elementwise scale *as the model applies it*. It is measured by
  running the norm module itself on test vectors, not read from `norm.weight`: Llama's
  RMSNorm multiplies by `weight`, Gemma's by `1 + weight`, a LayerNorm by `weight`.
- The norm's data-dependent rescaling (1 / rms of the whole residual) is left out: it
  multiplies every logit of a feature by one positive number, so the order of tokens is
  unchanged. Values are therefore "logits per unit of feature activation, before the
  final norm's 1/rms factor" and compare across tokens, not across models.
- A LayerNorm's or LM head's bias adds the same offset whatever the direction: left out.
- Final logit softcapping (Gemma 2: `cap * tanh(logits / cap)`) is monotonic: left out.
- Later layers are not run: this is the direct effect only.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import polars as pl
import torch
from torch import nn

from ..engine.models import ModelError, decoder_layers
from ..engine.tokenstr import token_strings

log = logging.getLogger(__name__)

_NORM_NAMES = ("norm", "final_layernorm", "final_layer_norm", "ln_f", "final_norm")
VOCAB_CHUNK = 32768
"""Rows of the unembedding cast to float32 at a time (a 262k x 640 bf16 matrix stays bf16)."""


def final_norm(model: nn.Module) -> nn.Module:
    """The norm applied to the residual stream right before the LM head."""
    bases = []
    getter = getattr(model, "get_decoder", None)
    if getter is not None:
        try:
            bases.append(getter())
        except (AttributeError, NotImplementedError):
            pass
    bases += [getattr(model, n) for n in ("model", "transformer", "language_model") if hasattr(model, n)]
    for base in bases:
        for n in _NORM_NAMES:
            module = getattr(base, n, None)
            if isinstance(module, nn.Module):
                return module
    layers = decoder_layers(model)
    inside = {id(m) for m in layers.modules()}
    found = [(name, m) for name, m in model.named_modules()
             if name.split(".")[-1] in _NORM_NAMES and id(m) not in inside]
    if not found:
        raise ModelError(f"cannot find the final norm of {type(model).__name__} "
                         f"(looked for a module named {', '.join(_NORM_NAMES)} outside the decoder layers)")
    return found[-1][1]


@torch.inference_mode()
def norm_gain(norm: nn.Module, d_model: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The elementwise scale [d_model] (float32) the norm applies after normalising, measured by running it.

    For a zero-mean test vector x, RMSNorm and LayerNorm both give `gain * x / rms(x) + bias`;
    `norm(x) - norm(-x)` removes the bias. A second random vector checks the norm really is
    elementwise-affine after normalisation; anything else is refused.
    """
    x = torch.ones(d_model, dtype=torch.float32)
    x[1::2] = -1.0
    if d_model % 2:
        x[:3] = torch.tensor([1.0, 1.0, -2.0])  # odd width: keep the mean at zero
    x = x / x.pow(2).mean().sqrt()

    def run(v: torch.Tensor) -> torch.Tensor:
        return norm(v.to(device=device, dtype=dtype)[None]).float().cpu()[0]

    gain = (run(x) - run(-x)) / (2 * x)
    bias = (run(x) + run(-x)) / 2
    g = torch.Generator().manual_seed(0)
    y = torch.randn(d_model, generator=g)
    y = (y - y.mean()) / (y - y.mean()).pow(2).mean().sqrt()
    want = gain * y + bias
    tol = 2e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-4
    if not torch.allclose(run(y), want, atol=tol * (1 + want.abs().max().item()), rtol=tol):
        raise ModelError(f"the final norm {type(norm).__name__} is not an elementwise scale after RMS/LayerNorm "
                         "normalisation: logit effects need a norm of that kind")
    return gain


def _decode_all(tokenizer: Any, ids: list[int]) -> list[str]:
    return token_strings(tokenizer, ids) if tokenizer is not None else [None] * len(ids)


@torch.inference_mode()
def logit_effects(model: nn.Module, sae: Any, features: list[int], *, k: int = 10,
                  tokenizer: Any | None = None) -> pl.DataFrame:
    """Top-k promoted and suppressed tokens of each feature's decoder direction (see the module docstring).

    Returns one row per (feature, direction, rank): feature (int32), direction ("promoted" |
    "suppressed"), rank (0 = strongest), token_id (int32), token (decoded string; null
    without a tokenizer), logit (float32; the suppressed ones are negative).
    """
    if not features:
        raise ValueError("no features given: pass a list like [0, 5, 10]")
    w_dec = sae.W_dec.detach()
    bad = [f for f in features if not 0 <= f < w_dec.shape[0]]
    if bad:
        raise ValueError(f"feature {bad[0]} is out of range: the SAE has {w_dec.shape[0]} features (0-{w_dec.shape[0] - 1})")
    w_u = model.get_output_embeddings().weight.detach()
    if w_u.shape[1] != w_dec.shape[1]:
        raise ModelError(f"the SAE writes {w_dec.shape[1]}-wide directions but the model's unembedding reads "
                         f"{w_u.shape[1]}-wide vectors: pick an SAE trained on this model")
    norm = final_norm(model)
    gain = norm_gain(norm, w_u.shape[1], w_u.device, next(norm.parameters(), w_u).dtype)
    dirs = (w_dec[features].float().cpu() * gain).to(w_u.device)
    vocab = w_u.shape[0] if tokenizer is None else min(w_u.shape[0], len(tokenizer))
    logits = torch.cat([dirs @ w_u[a:min(a + VOCAB_CHUNK, vocab)].float().T
                        for a in range(0, vocab, VOCAB_CHUNK)], dim=1).cpu()
    k = min(k, vocab)
    cols: dict[str, list] = {"feature": [], "direction": [], "rank": [], "token_id": [], "logit": []}
    for direction, largest in (("promoted", True), ("suppressed", False)):
        vals, idx = logits.topk(k, dim=1, largest=largest)
        for i, f in enumerate(features):
            cols["feature"] += [f] * k
            cols["direction"] += [direction] * k
            cols["rank"] += list(range(k))
            cols["token_id"] += idx[i].tolist()
            cols["logit"] += vals[i].tolist()
    frame = pl.DataFrame(cols, schema={"feature": pl.Int32, "direction": pl.String, "rank": pl.Int32,
                                       "token_id": pl.Int32, "logit": pl.Float32})
    tokens = pl.Series("token", _decode_all(tokenizer, frame["token_id"].to_list()), dtype=pl.String)
    return (frame.insert_column(4, tokens)
            .sort("feature", pl.col("direction").replace_strict({"promoted": 0, "suppressed": 1}), "rank"))


def logit_effects_for_run(run: str | Path, features: list[int], *, sae: str | None = None,
                          k: int = 10) -> pl.DataFrame:
    """`logit_effects` for the model and SAE named in a run's manifest, loaded on CPU; adds column `sae`."""
    from ..engine import config as config_mod
    from ..engine.models import load_model
    from ..engine.run import open_run
    from ..engine.saes import load
    from .probe import pick_sae

    cfg = config_mod.from_dict(open_run(run).read_manifest()["config"])
    sae_cfg = pick_sae(cfg, sae)
    device = torch.device("cpu")
    model, tokenizer = load_model(cfg.model, device)
    frame = logit_effects(model, load(sae_cfg, device), features, k=k, tokenizer=tokenizer)
    return frame.insert_column(0, pl.lit(sae_cfg.name, pl.String).alias("sae"))


def save_logit_effects(run: str | Path, features: list[int], *, sae: str | None = None, k: int = 10) -> str:
    """Compute `logit_effects_for_run` (this loads the model's weights) and save them with the run
    (analysis.saved_logits.write_logits). Returns the file's path or URI."""
    from ..analysis.saved_logits import write_logits
    from ..engine.run import open_run

    rd = open_run(run)
    return write_logits(rd, logit_effects_for_run(rd, features, sae=sae, k=k))
