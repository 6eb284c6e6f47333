"""The device path against the CPU on tiny models: truncated forward (eager and compiled) and the SAE's sparse
codes read through the in-flight path (nonzero_static, the blocking event), float32, per model family.

    python bench/gpu_check.py --json bench/gpu_check.json            # on a GPU machine: CUDA rows vs CPU rows
    python bench/gpu_check.py --device cpu --no-compile               # the same code on CPU (a self-check)

Each family's hooked values on the device must equal the CPU's within --atol (float32: matmul order differs),
and the SAE's active (row, feature) sets must agree except where a pre-activation sits within --atol of the
threshold. Writes a JSON report; exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from saeray.assets.tiny import make_model, make_sae, make_vlm  # noqa: E402
from saeray.engine import models, saes  # noqa: E402
from saeray.engine.config import ModelConfig, SAEConfig  # noqa: E402
from saeray.engine.truncated import Truncated  # noqa: E402

FAMILIES = ("llama", "gemma2", "gemma3", "paligemma")
SITES = ("blocks.0.hook_resid_pre", "blocks.1.hook_attn_out", "blocks.2.hook_resid_mid", "blocks.2.hook_mlp_out",
         "blocks.3.hook_resid_post")


def _inputs(fam: str, model, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, dict]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 300, (4, 24), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    mask[3, 6:] = 0
    extra: dict = {}
    if fam == "paligemma":
        ids[:2, :4] = models.image_token_id(model.config)
        types = torch.ones_like(ids)
        types[:2, :7] = 0
        extra = {"pixel_values": torch.randn(2, 3, 28, 28, generator=g), "token_type_ids": types}
    return ids, mask, extra


def check_family(fam: str, root: Path, device: torch.device, compile: bool, atol: float) -> dict:
    path = make_vlm(root / fam) if fam == "paligemma" else make_model(root / fam, fam)
    cfg = ModelConfig(name=str(path), dtype="float32")
    cpu_model, _, _ = models.load_model_and_processor(cfg, torch.device("cpu"))
    dev_model, _, _ = models.load_model_and_processor(cfg, device)
    n = models.n_layers_of(cpu_model.config)
    sites = [models.parse_hook(s, n) for s in SITES]
    ids, mask, extra = _inputs(fam, cpu_model)
    want = Truncated(cpu_model, sites)(ids, mask, **extra)
    dev_extra = {k: v.to(device) for k, v in extra.items()}
    out: dict = {"family": fam, "attn_implementation": dev_model.config._attn_implementation}
    variants = [("eager", False)] + ([("compiled", True)] if compile else [])
    valid = mask.bool()
    for name, comp in variants:
        t = time.perf_counter()
        got = Truncated(dev_model, sites, compile=comp)(ids.to(device), mask.to(device), **dev_extra)
        diff = max(float((got[k].cpu()[valid] - want[k][valid]).abs().max()) for k in want)
        out[name] = {"max_abs_diff": diff, "ok": diff <= atol, "first_call_s": round(time.perf_counter() - t, 2)}
    # the SAE path the worker runs with batches in flight on a GPU (encode_dense + active_entries) vs CPU's
    sae_cfg = SAEConfig(name="s", path=str(make_sae(root / f"sae-{fam}", "jumprelu", 64, SITES[-1])))
    x = want[SITES[-1]][valid]
    ref = saes.encode_sparse(saes.load(sae_cfg, torch.device("cpu")), x, 0.0, 64)
    dense = saes.encode_dense(saes.load(sae_cfg, device), x.to(device), 0.0, 64)
    r, f, v = (t.cpu() for t in saes.active_entries(dense))
    pairs_ref = set(zip(ref[0].tolist(), ref[1].tolist()))
    pairs_dev = set(zip(r.tolist(), f.tolist()))
    out["sae"] = {"active_cpu": len(pairs_ref), "active_device": len(pairs_dev),
                  "differing": len(pairs_ref ^ pairs_dev), "ok": len(pairs_ref ^ pairs_dev) <= max(1, len(pairs_ref) // 1000)}
    out["ok"] = all(out[k]["ok"] for k in ("sae", *(n for n, _ in variants)))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-compile", action="store_true", help="skip the compiled forward")
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--atol", type=float, default=1e-4)
    p.add_argument("--json", default=str(ROOT / "bench" / "gpu_check.json"))
    a = p.parse_args(argv)
    device = torch.device(a.device)
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="saeray-gpu-check-") as tmp:
        rows = [check_family(f, Path(tmp), device, not a.no_compile, a.atol) for f in a.families.split(",")]
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "atol": a.atol, "families": rows, "ok": all(r["ok"] for r in rows),
              "seconds": round(time.time() - t0, 1), "command": " ".join(["gpu_check.py", *(argv or sys.argv[1:])])}
    Path(a.json).write_text(json.dumps(report, indent=2))
    for r in rows:
        print(f"{r['family']:<10} {'ok' if r['ok'] else 'FAILED'}  " + "  ".join(
            f"{k} {r[k]['max_abs_diff']:.2e}" for k in ("eager", "compiled") if k in r)
              + f"  sae differing {r['sae']['differing']}/{r['sae']['active_cpu']}")
    print(f"wrote {a.json} ({report['seconds']}s)")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
