"""How far bfloat16 and TF32 SAE encodes are from the float32 one (saes[].dtype: bfloat16, tf32 = auto on a GPU).

    python bench/sae_precision.py                  # the embedded default SAE and a 16k JumpReLU, ~100k tokens
    python bench/sae_precision.py --tokens 20000   # quicker

The model runs once, as a worker runs it (gemma-3-270m, dtype auto = bfloat16), over real text (the
stdlib corpus); the hidden states at the hook, exactly the worker's encoder inputs, are encoded by the
same SAE loaded in float32 and in bfloat16 (sae-lens, each SAE's own encode), and in float32 under a SIMULATION of
TF32 (both operands of each matrix product rounded to TF32's 10-bit mantissa, accumulation in float32, as TF32
tensor cores compute; this machine has no GPU). Measured, per SAE and encode:

  - agreement of the active sets: of the (position, latent) pairs active in float32, the share also
    active in the other encode (recall), of those active there the share active in float32 (precision),
    and |both| / |either| (Jaccard);
  - value error on pairs active in both: median, p99 and max of |other - f32| / |f32|;
  - per latent: density error |d_bf16 - d_f32| (absolute, and relative where d_f32 >= 1e-3) and the
    relative error of the mean activation (latents with d_f32 >= 1e-3).

SAEs: the embedded default (saeray/assets/saes/gemma-3-270m-res6, TopK, 4,096 latents, trained) and a 16,384-
latent JumpReLU with RANDOM weights whose thresholds are set at each latent's (1 - 0.005) quantile of its
pre-activations on these inputs (L0 ~ 82, as GemmaScope 16k SAEs): no trained 16k JumpReLU for this model
ships with saeray. Runs on CPU; a GPU's bf16 GEMMs also accumulate in float32. Writes bench/sae_precision.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def hidden_states(model_name: str, hook: str, texts: list[str], max_tokens: int, context: int):
    """[n, d] bfloat16 hidden states at `hook` of every counted position, through saeray's own path."""
    import torch

    from saeray.engine import models
    from saeray.engine.batching import blocks
    from saeray.engine.config import ModelConfig, PositionsConfig
    from saeray.engine.contexts import Tokenization

    device = torch.device("cpu")
    model, tok = models.load_model(ModelConfig(name=model_name), device)
    site = models.parse_hook(hook, models.n_layers_of(model.config))
    t = Tokenization(tok, PositionsConfig(), prepend_bos=True, context_size=context, exclude_special=True)
    docs, n = [], 0
    for i, d in enumerate(t.text_documents([(i, text, {}) for i, text in enumerate(texts)])):
        docs.append(d)
        n += len(d.groups["all"])
        if n >= max_tokens:
            break
    out = []
    with models.Hooks(model, [site]) as hooks:
        for block in blocks(docs, 8192):
            for b in t.batches(block, 2048, device):
                h = hooks(b.input_ids, b.attention_mask)[site.name]
                rows, cols = b.selected["all"][:2]
                out.append(h[rows, cols])
    return torch.cat(out), str(model.dtype)


def random_jumprelu(x, d_sae: int, density: float, hook: str):
    """A JumpReLU SAE with random weights; thresholds at each latent's (1 - density) quantile of its
    pre-activations on `x` (so about density x d_sae latents fire per token)."""
    import torch
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(0)
    d_in = x.shape[1]
    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae, metadata=SAEMetadata(hook_name=hook)))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_in, d_sae) / d_in ** 0.5)
        sae.W_dec.copy_(sae.W_enc.T)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
        sample = x[torch.randperm(len(x))[:4096]].float()
        pre = sae.process_sae_in(sample) @ sae.W_enc + sae.b_enc
        k = int(round((1 - density) * len(pre)))
        sae.threshold.copy_(pre.kthvalue(k, dim=0).values.clamp_min(1e-3))
    return sae


def tf32_round(t):
    """float32 `t` with its mantissa rounded to TF32's 10 bits (to nearest, ties away from zero)."""
    import torch

    bits = t.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


def tf32_emulation():
    """A torch function mode under which float32 matrix products round both operands to TF32 first and accumulate
    in float32, as a GPU's TF32 tensor cores do: a CPU simulation of allow_tf32 for the SAE's encode."""
    import torch

    products = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.Tensor.mm, torch.bmm,
                torch.nn.functional.linear}

    def rounded(a):
        return tf32_round(a) if isinstance(a, torch.Tensor) and a.dtype == torch.float32 else a

    class TF32(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in products:
                args = (*map(rounded, args[:2]), *args[2:])
            elif func in (torch.addmm, torch.Tensor.addmm):
                args = (args[0], *map(rounded, args[1:3]), *args[3:])
            return func(*args, **(kwargs or {}))

    return TF32()


def compare(sae32, other, x, chunk: int = 2048) -> dict:
    """`other(x_chunk)` (float32 activations of a lower-precision encode) against `sae32`'s float32 encode."""
    import torch

    d_sae = int(sae32.cfg.d_sae)
    n32 = torch.zeros(d_sae, dtype=torch.float64)
    n16 = torch.zeros(d_sae, dtype=torch.float64)
    s32 = torch.zeros(d_sae, dtype=torch.float64)
    s16 = torch.zeros(d_sae, dtype=torch.float64)
    both = either = only32 = only16 = 0
    rel = []
    with torch.inference_mode():
        for start in range(0, len(x), chunk):
            xc = x[start:start + chunk]
            a32 = sae32.encode(xc.to(torch.float32))
            a16 = other(xc)
            m32, m16 = a32 != 0, a16 != 0
            both += int((m32 & m16).sum())
            either += int((m32 | m16).sum())
            only32 += int((m32 & ~m16).sum())
            only16 += int((m16 & ~m32).sum())
            n32 += m32.sum(0).double()
            n16 += m16.sum(0).double()
            s32 += a32.sum(0).double()
            s16 += a16.sum(0).double()
            k = m32 & m16
            rel.append(((a16[k] - a32[k]).abs() / a32[k].abs()).numpy())
    n = len(x)
    rel_all = np.concatenate(rel)
    d32, d16 = (n32 / n).numpy(), (n16 / n).numpy()
    live = d32 >= 1e-3
    mean32, mean16 = (s32 / n).numpy(), (s16 / n).numpy()
    return {
        "tokens": n, "d_sae": d_sae, "l0_float32": float(d32.sum()), "l0_other": float(d16.sum()),
        "active_recall": both / (both + only32), "active_precision": both / (both + only16),
        "active_jaccard": both / either,
        "value_rel_error": {"median": float(np.median(rel_all)), "p99": float(np.quantile(rel_all, 0.99)),
                            "max": float(rel_all.max())},
        "density_abs_error": {"max": float(np.abs(d16 - d32).max()), "mean": float(np.abs(d16 - d32).mean())},
        "density_rel_error_live": {"median": float(np.median(np.abs(d16 - d32)[live] / d32[live])),
                                   "max": float((np.abs(d16 - d32)[live] / d32[live]).max()), "latents": int(live.sum())},
        "mean_rel_error_live": {"median": float(np.median(np.abs(mean16 - mean32)[live] / np.abs(mean32[live]))),
                                "max": float((np.abs(mean16 - mean32)[live] / np.abs(mean32[live])).max())},
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--sae", default=str(ROOT / "saeray" / "assets" / "saes" / "gemma-3-270m-res6"))
    p.add_argument("--data", default=str(ROOT / "runs" / "corpus"))
    p.add_argument("--tokens", type=int, default=100_000)
    p.add_argument("--d-sae", type=int, default=16384)
    p.add_argument("--density", type=float, default=0.005)
    p.add_argument("--json", default=str(ROOT / "bench" / "sae_precision.json"))
    a = p.parse_args(argv)

    import polars as pl
    import torch
    from sae_lens import SAE

    from saeray.assets import corpus

    t0 = time.time()
    data = Path(a.data)
    if not data.exists():
        corpus.build(data)
    texts = pl.read_parquet(sorted(data.glob("*.parquet")), columns=["text"]).sample(fraction=1.0, seed=0,
                                                                                   shuffle=True)["text"].to_list()
    cfg = json.loads((Path(a.sae) / "cfg.json").read_text())
    hook = cfg["metadata"]["hook_name"]
    x, model_dtype = hidden_states(a.model, hook, texts, a.tokens, int(cfg["metadata"].get("context_size") or 1024))
    def bf16(sae):
        return lambda xc: sae.encode(xc.to(torch.bfloat16)).float()

    def tf32(sae):
        def encode(xc):
            with tf32_emulation():
                return sae.encode(xc.to(torch.float32))
        return encode

    results = {}
    sae32 = SAE.load_from_disk(a.sae, device="cpu", dtype="float32")
    sae16 = SAE.load_from_disk(a.sae, device="cpu", dtype="bfloat16")
    probe = x[:64].to(torch.float32)
    with torch.inference_mode():  # the emulation is in effect: its products differ from float32's
        assert not torch.equal(tf32(sae32)(probe), sae32.encode(probe))
    name = "embedded default (" + Path(a.sae).name + f", {cfg['architecture']}, trained)"
    results[name] = {"bfloat16": compare(sae32, bf16(sae16), x), "tf32": compare(sae32, tf32(sae32), x)}
    j32 = random_jumprelu(x, a.d_sae, a.density, hook)
    j16 = random_jumprelu(x, a.d_sae, a.density, hook).to(dtype=torch.bfloat16)
    j16.load_state_dict({k: v.to(torch.bfloat16) for k, v in j32.state_dict().items()})
    results[f"JumpReLU {a.d_sae:,} latents (random weights, calibrated thresholds)"] = {
        "bfloat16": compare(j32, bf16(j16), x), "tf32": compare(j32, tf32(j32), x)}
    report = {"model": a.model, "model_dtype": model_dtype, "hook": hook, "tokens": len(x), "device": "cpu",
              "tf32": "SIMULATED on the CPU: both operands of each float32 matrix product rounded to TF32's 10-bit "
                      "mantissa, products accumulated in float32 (what TF32 tensor cores do)",
              "results": results, "seconds": round(time.time() - t0, 1)}
    lines = [f"bf16 and tf32 (SIMULATED on CPU) vs float32 SAE encode on {len(x):,} positions of real text "
             f"({a.model} {model_dtype}, {hook}):",
             f"{'SAE':<62} {'encode':<6} {'recall':>7} {'precis':>7} {'jaccard':>7} {'val med':>8} {'val p99':>8} "
             f"{'dens max':>9} {'dens rel':>8} {'mean rel':>8}"]
    for name, by in results.items():
        for kind, r in by.items():
            lines.append(f"{name:<62} {kind:<6} {r['active_recall']:>7.4f} {r['active_precision']:>7.4f} "
                         f"{r['active_jaccard']:>7.4f} {r['value_rel_error']['median']:>8.2e} "
                         f"{r['value_rel_error']['p99']:>8.2e} {r['density_abs_error']['max']:>9.2e} "
                         f"{r['density_rel_error_live']['max']:>8.2e} {r['mean_rel_error_live']['max']:>8.2e}")
    lines.append("recall/precis/jaccard: active (position, latent) pairs; val: |other-f32|/|f32| on pairs active in both; "
                 "dens max: largest per-latent density error; dens rel, mean rel: largest relative error of a latent's "
                 "density / mean activation among latents with density >= 1e-3")
    report["table"] = "\n".join(lines)
    print(report["table"])
    Path(a.json).write_text(json.dumps(report, indent=2))
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
