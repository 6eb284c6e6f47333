"""Throughput of saeray against what researchers run today and against this machine's matmul limit.

    python bench/throughput.py                            # Gemma 3 270M + its SAE, stdlib corpus, 100M-row aggregation
    python bench/throughput.py --agg-rows 10_000_000      # a smaller aggregation (the 100M one generates ~7 min)
    python bench/throughput.py --skip-aggregate --docs 60 # a quicker look
    python bench/throughput.py --memory-growth            # also bench/memory_growth.py on the same model (minutes)
    python bench/throughput.py --gpu-sized                # Gemma-2-2B-sized model + JumpReLU SAEs (16k eager and
                                                          # compiled, 131k, 3 x 16k), random weights, CUDA
    python bench/throughput.py --gpu-sized --scale toy    # the same code at toy size (runs on CPU in seconds)
    python bench/throughput.py --tiny --skip-aggregate    # a tiny random in-process model (seconds; numbers mean nothing)
    python bench/throughput.py --compile --docs 40 --notebook-docs 0 --skip-saelens --skip-ray --skip-aggregate \
        --rounds 1 --json bench/throughput_compile.json   # compiled worker vs eager, forward alone vs the bf16 limit

One invocation runs, on the same documents, model, hook and SAE (each in its own process, so
each gets its own peak RSS):
  (a) the notebook loop: one window per forward pass, full model with LM head, dense SAE codes to CPU, numpy stats;
  (b) sae-lens' HookedSAETransformer, batched run_with_cache_with_saes (stop_at_layer, SAE code cached only),
      in TransformerLens' default float32 and in bfloat16;
  (c) saeray's worker path (no Ray) and `saeray run` (Ray, 1 worker), statistics only and writing activations.
The paths run in --rounds rounds (each path once per round, in a fresh process) and make --repeats timed
passes over their documents each time; the fastest pass counts (a shared machine's other tenants only slow
a pass down, and taking turns spreads a slow spell over all paths; later passes run with warm kernel caches,
as a long run does). It then measures bf16 and fp32 matmul FLOP/s on the model's own GEMM shapes (at the start and the end; the best
counts) and divides it by the FLOPs per token up to the hooked layer plus the SAE encoder: the compute limit
in tokens/s. The notebook and sae-lens paths get fewer documents (the same ones, a prefix): they are slow,
and tokens/s does not depend on how many documents there are. Prints a table; writes bench/throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if not os.environ.get("SAERAY_BENCH_SRC"):  # a --baseline-src step imports the saeray it was pointed at
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import throughput_paths as paths  # noqa: E402

ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
H100_BF16_DENSE = 989.4e12
"""NVIDIA's H100 SXM dense bf16 tensor-core peak (FLOP/s), for MFU on a lent H100."""


def child(step: str, spec: dict, work: Path) -> dict:
    """Run one measured step in a fresh process; return its JSON result. spec["src"]: the step imports the
    saeray checkout there (--baseline-src) instead of this one."""
    spec_file = work / f"spec-{step}-{time.time_ns()}.json"
    spec_file.write_text(json.dumps(spec))
    t0 = time.perf_counter()
    env = {**os.environ, **ENV}
    if spec.get("src"):
        env.update(PYTHONPATH=f"{spec['src']}{os.pathsep}{env.get('PYTHONPATH', '')}", SAERAY_BENCH_SRC=spec["src"])
    done = subprocess.run([sys.executable, __file__, "--step", step, "--spec", str(spec_file)],
                          capture_output=True, text=True, env=env, cwd=spec.get("src") or None)
    if done.returncode:
        raise RuntimeError(f"step {step} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_s"] = round(time.perf_counter() - t0, 2)
    return result


def ray_run(spec: dict) -> dict:
    """`saeray run CONFIG --workers 1` as a user types it; shard seconds and worker RSS from the markers."""
    import yaml

    cfg = paths.saeray_config(spec, spec["out"], spec["activations"])
    cfg_file = Path(spec["out"] + ".yaml")
    cfg_file.write_text(yaml.safe_dump(cfg))
    exe = Path(sys.executable).with_name("saeray")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "saeray.cli"]

    def one_pass() -> dict:  # a whole `saeray run` into an empty directory: a fresh Ray worker each time
        shutil.rmtree(spec["out"], ignore_errors=True)
        t0 = time.perf_counter()
        done = subprocess.run([*cmd, "run", str(cfg_file), "--workers", "1", "--overwrite"], capture_output=True,
                              text=True)
        wall = time.perf_counter() - t0
        if done.returncode:
            raise RuntimeError(f"saeray run failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
        markers = [json.loads(p.read_text()) for p in sorted(Path(spec["out"], "completions").glob("*.json"))]
        return {"tokens": sum(m["tokens"] for m in markers), "seconds": sum(m["seconds"] for m in markers),
                "wall_s": wall, "rows": sum(m["rows"] for m in markers),
                "peak_rss_mb": max(m["peak_rss_mb"] for m in markers)}

    return {**paths.best_of(spec, one_pass),
            "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
            "dtype": spec["dtype"], "sae_dtype": spec["sae_dtype"]}


STEPS = {"notebook": paths.notebook, "saelens": paths.saelens, "worker": paths.worker, "ray": ray_run,
         "flops": paths.matmul_flops, "facts": paths.model_facts, "gpu_sized": paths.gpu_sized}


# ---- preparing the inputs ----------------------------------------------------------------------


def prepare_inputs(a: argparse.Namespace, work: Path) -> dict:
    """Model directory, SAE facts and the document files (saeray's set; prefixes for the slow paths)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from saeray.assets import tiny
    from saeray.engine import config, models, saes

    if a.tiny:
        model_dir = str(tiny.make_model(work / "model", "llama", n_layers=4, d_model=64))
        sae_path = str(tiny.make_sae(work / "sae", "topk", 64, "blocks.2.hook_resid_post", d_sae=256,
                                     context_size=64, k=8))
        texts = tiny.corpus(max(a.docs, 8), seed=1, max_words=200)
        model_name = "tiny"
    else:
        model_name = a.model
        model_dir, _ = models.resolve_source(a.model)
        sae_path = a.sae
        texts = _corpus_texts(a.data)
    info = saes.describe(config.SAEConfig(name="sae", path=sae_path))
    order = np.random.default_rng(a.seed).permutation(len(texts))
    picked = [texts[i] for i in order[:a.docs]]
    files = {}
    for name, n in (("saeray", a.docs), ("saelens", a.saelens_docs), ("notebook", a.notebook_docs)):
        d = work / f"data-{name}"
        d.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"text": picked[:min(n, a.docs)]}), d / "part-0.parquet")
        files[name] = str(d / "part-0.parquet")
    site = models.parse_hook(info.hook, models.n_layers_of(models.load_config(config.ModelConfig(name=model_dir))))
    return {"model": model_name, "model_dir": model_dir, "sae": sae_path, "hook": info.hook, "layer": site.layer,
            "kind": site.kind, "d_sae": info.d_sae, "architecture": info.architecture,
            "context": a.context or info.context_size or 1024, "files": files}


def _corpus_texts(data: str) -> list[str]:
    import polars as pl

    root = Path(data)
    if not root.exists():
        from saeray.assets import corpus

        print(f"{root} does not exist: building the stdlib corpus there (saeray corpus --out {root})", flush=True)
        corpus.build(root)
    files = sorted(root.glob("*.parquet")) if root.is_dir() else [root]
    return pl.read_parquet(files, columns=["text"])["text"].to_list()


# ---- the run -----------------------------------------------------------------------------------


def run_cpu(a: argparse.Namespace, work: Path) -> dict:
    inp = prepare_inputs(a, work)
    base = {**{k: inp[k] for k in ("model", "model_dir", "sae", "hook", "layer", "kind", "context")},
            "repeats": a.repeats}
    facts = child("facts", {**base, "data": inp["files"]["saeray"], "d_sae": inp["d_sae"]}, work)
    shapes = [[a.gemm_rows, k, n] for k, n in facts["gemm_shapes"]] + [[2048, 2048, 2048]]
    flops_spec = {"shapes": shapes, "dtypes": ["bfloat16", "float32"], "seconds": a.flops_seconds, "threads": a.threads}
    report: dict[str, Any] = {"inputs": {**inp, "docs": a.docs, "saelens_docs": a.saelens_docs,
                                         "notebook_docs": a.notebook_docs, "batch_tokens": a.batch_tokens, "rounds": a.rounds, "repeats": a.repeats,
                                         "threads": a.threads, "seed": a.seed}, "facts": facts, "paths": {}}
    report["flops_start"] = child("flops", flops_spec, work)
    log = lambda key, r: print(f"  {key}: {r.get('tokens', '')} tokens in {r.get('seconds', 0):.1f}s "  # noqa: E731
                               f"(process {r.get('process_s', 0):.0f}s)", flush=True)
    runs: list[tuple[str, str, dict]] = []
    if a.notebook_docs:
        runs.append(("a_notebook", "notebook", {**base, "data": inp["files"]["notebook"], "dtype": "float32"}))
    if a.saelens_docs and not a.skip_saelens and not a.tiny:  # TL has no name for the tiny model
        for dt in a.saelens_dtypes.split(","):
            runs.append((f"b_saelens_{dt}", "saelens", {**base, "data": inp["files"]["saelens"], "dtype": dt,
                                                        "batch": a.saelens_batch}))
    sae_cfg = {**base, "data": inp["files"]["saeray"], "dtype": a.dtype, "sae_dtype": a.sae_dtype,
               "batch_tokens": a.batch_tokens, "threads": a.threads}
    for act in (False, True):
        tag = "activations" if act else "stats"
        runs.append((f"c_worker_{tag}", "worker", {**sae_cfg, "out": str(work / f"worker-{tag}"), "activations": act,
                                                   "profile": not act and not a.skip_profile}))
        if a.baseline_src:  # the same worker path in an older checkout: the ratio is the change's effect
            runs.append((f"c_worker_{tag}@baseline", "worker", {**sae_cfg, "out": str(work / f"worker-{tag}-base"),
                                                                "activations": act, "src": a.baseline_src}))
        if a.compile and not act:  # the same worker with model.compile on; model_only: its compiled forward
            runs.append((f"c_worker_{tag}@compiled", "worker", {**sae_cfg, "out": str(work / f"worker-{tag}-compiled"),
                                                                "activations": act, "profile": True, "compile": True}))
        if not a.skip_ray:
            runs.append((f"c_ray_{tag}", "ray", {**sae_cfg, "out": str(work / f"ray-{tag}"), "activations": act}))
            if a.compile and not act:  # `saeray run` with model.compile: true (inductor's cache warmed by the worker)
                runs.append((f"c_ray_{tag}@compiled", "ray", {**sae_cfg, "out": str(work / f"ray-{tag}-compiled"),
                                                              "activations": act, "compile": True}))
    for r in range(a.rounds):  # every path once per round: a slow spell on the machine hits them alike
        for key, step, spec in runs:
            got, prev = child(step, spec, work), report["paths"].get(key)
            got["round_seconds"] = (prev["round_seconds"] if prev else []) + [round(got["seconds"], 3)]
            if prev is not None and prev["seconds"] <= got["seconds"]:
                got = {**prev, "round_seconds": got["round_seconds"]}
            report["paths"][key] = got
            log(f"round {r + 1}/{a.rounds} {key}", got)
    report["flops_end"] = child("flops", flops_spec, work)
    if not a.skip_aggregate:
        report["aggregate"] = aggregate(a)
    if a.memory_growth:
        report["memory_growth"] = memory_growth(a, inp, work)
    summarize(report)
    return report


def aggregate(a: argparse.Namespace) -> dict:
    """bench/aggregate_100m.py in a subprocess: stats (merge partials), top, interval, diff on synthetic rows."""
    cmd = [sys.executable, str(ROOT / "bench" / "aggregate_100m.py"), "--rows", str(a.agg_rows)]
    if a.agg_dir:
        cmd += ["--dir", a.agg_dir] + (["--reuse"] if (Path(a.agg_dir) / "completions").is_dir() else ["--keep"])
    print(f"aggregation: {' '.join(cmd[1:])}", flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **ENV})
    if done.returncode:
        raise RuntimeError(f"aggregate_100m.py failed:\n{done.stderr[-4000:]}")
    lines = done.stdout.splitlines()
    start = max(i for i, line in enumerate(lines) if line == "{")
    return json.loads("\n".join(lines[start:]))


def memory_growth(a: argparse.Namespace, inp: dict, work: Path) -> dict:
    """bench/memory_growth.py on the same model and hooked layer (Ray, 1 worker, random TopK SAE)."""
    out = work / "memory_growth.json"
    cmd = [sys.executable, str(ROOT / "bench" / "memory_growth.py"), "--model",
           "tiny" if a.tiny else inp["model"], "--layer", str(inp["layer"]), "--small", str(a.memory_small),
           "--d-sae", str(inp["d_sae"]), "--json", str(out)]
    print(f"memory growth: {' '.join(cmd[1:])}", flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **ENV})
    if done.returncode:
        raise RuntimeError(f"memory_growth.py failed:\n{done.stderr[-4000:]}")
    return json.loads(out.read_text())


# ---- the table and the targets -----------------------------------------------------------------


LABELS = {"a_notebook": "(a) notebook loop", "b_saelens_float32": "(b) sae-lens HookedSAETransformer",
          "b_saelens_bfloat16": "(b) sae-lens HookedSAETransformer", "c_worker_stats": "(c) saeray worker, stats only",
          "c_worker_activations": "(c) saeray worker, + activations",
          "c_worker_stats@baseline": "(c) --baseline-src worker, stats only",
          "c_worker_activations@baseline": "(c) --baseline-src worker, + activations", "c_ray_stats": "(c) saeray run (Ray), stats only",
          "c_ray_activations": "(c) saeray run (Ray), + activations",
          "c_worker_stats@compiled": "(c) saeray worker, stats, compiled", "c_ray_stats@compiled": "(c) saeray run, stats, compiled"}
_SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def summarize(report: dict) -> None:
    """Add tokens/s, ratios, fractions of the compute limit and the target verdicts to `report`."""
    f0, f1 = report["flops_start"], report["flops_end"]
    peak = {dt: max(f0[dt]["best_flops_per_s"], f1[dt]["best_flops_per_s"]) for dt in ("bfloat16", "float32")}
    peak_cpu = max(f0["bfloat16"]["best_flops_per_cpu_s"], f1["bfloat16"]["best_flops_per_cpu_s"])
    work = report["facts"]["saeray"]["total"]
    limit = {dt: peak[dt] / work for dt in peak}
    report["limit"] = {"flops_per_token": work, "matmul_flops_per_s": peak, "bf16_flops_per_cpu_s": peak_cpu,
                       "tokens_per_s": limit, "tokens_per_cpu_s_bf16": peak_cpu / work}
    p = report["paths"]
    for r in p.values():
        r["tokens_per_s"] = r["tokens"] / r["seconds"]
        r["limit_fraction_bf16"] = r["tokens_per_s"] / limit["bfloat16"]
        r["limit_fraction_fp32"] = r["tokens_per_s"] / limit["float32"]
        if r.get("cpu_seconds"):
            r["tokens_per_cpu_s"] = r["tokens"] / r["cpu_seconds"]
            r["limit_fraction_bf16_cpu_time"] = r["tokens_per_cpu_s"] / report["limit"]["tokens_per_cpu_s_bf16"]
    for key in ("c_worker_stats", "c_worker_stats@compiled"):
        mo = p.get(key, {}).get("model_only")
        if mo:
            mo["tokens_per_s"] = mo["tokens"] / mo["seconds"]
            mo["limit_fraction_bf16"] = mo["tokens_per_s"] / limit["bfloat16"]
    if "c_worker_stats@compiled" in p and "c_worker_stats" in p:
        comp, eager = p["c_worker_stats@compiled"], p["c_worker_stats"]
        comp["vs_eager"] = comp["tokens_per_s"] / eager["tokens_per_s"]
        if comp.get("model_only") and eager.get("model_only"):
            comp["model_only"]["vs_eager"] = comp["model_only"]["tokens_per_s"] / eager["model_only"]["tokens_per_s"]
    ref_a = p.get("a_notebook", {}).get("tokens_per_s")
    ref_b = p.get("b_saelens_float32", {}).get("tokens_per_s")
    for r in p.values():
        if r.get("wall_s"):  # `saeray run` as a user times it: Ray's start, model load and the driver's end included
            r["tokens_per_wall_s"] = r["tokens"] / r["wall_s"]
            r["wall_vs_notebook"] = r["tokens_per_wall_s"] / ref_a if ref_a else None
        r["vs_notebook"] = r["tokens_per_s"] / ref_a if ref_a else None
        r["vs_saelens"] = r["tokens_per_s"] / ref_b if ref_b else None
    for key, r in p.items():
        if key.endswith("@baseline") and key[:-len("@baseline")] in p:
            p[key[:-len("@baseline")]]["vs_baseline"] = p[key[:-len("@baseline")]]["tokens_per_s"] / r["tokens_per_s"]
    report["targets"] = targets(report)


def targets(report: dict) -> list[dict]:
    p = report["paths"]
    ours = {k: v for k, v in p.items() if k.startswith("c_") and not k.endswith("@baseline")}
    out = []

    def add(name: str, want: float, values: dict[str, float | None], unit: str = "x") -> None:
        vals = {k: v for k, v in values.items() if v is not None}
        if not vals:
            out.append({"target": name, "status": "not measured"})
            return
        worst = min(vals, key=vals.get)
        best = max(vals, key=vals.get)
        out.append({"target": name, "want": want, "worst": [worst, vals[worst]], "best": [best, vals[best]],
                    "status": "met" if vals[worst] >= want else ("met by some saeray paths" if vals[best] >= want
                                                                 else "missed"), "unit": unit})

    if "c_worker_stats@compiled" in p:
        add("compiled worker >= 1.25x the eager worker (stats only, tokens/s, same run)", 1.25,
            {"c_worker_stats@compiled": p["c_worker_stats@compiled"].get("vs_eager")})
    if any(k.endswith("@baseline") for k in p):
        add("worker >= the --baseline-src worker (tokens/s, same run)", 1.0,
            {k: v.get("vs_baseline") for k, v in ours.items() if "vs_baseline" in v})
    add("saeray >= 20x the notebook loop (tokens/s)", 20, {k: v.get("vs_notebook") for k, v in ours.items()})
    rays = {k: v for k, v in ours.items() if k.startswith("c_ray_stats")}
    if rays and p.get("a_notebook"):
        add("`saeray run` (Ray, stats only) >= 25x the notebook loop (tokens/s of its units)", 25,
            {k: v.get("vs_notebook") for k, v in rays.items()})
        add("`saeray run` (Ray, stats only) >= 25x the notebook loop (tokens per wall-clock second, start-up "
            "included)", 25, {k: v.get("wall_vs_notebook") for k, v in rays.items()})
    add("saeray >= 3x sae-lens (float32, TL's default) (tokens/s)", 3, {k: v.get("vs_saelens") for k, v in ours.items()})
    if "b_saelens_bfloat16" in p:
        bf = p["b_saelens_bfloat16"]["tokens_per_s"]
        add("saeray >= 3x sae-lens in bfloat16 too (tokens/s)", 3, {k: v["tokens_per_s"] / bf for k, v in ours.items()})
    add("saeray >= 70% of the bf16 compute limit (wall clock)", 0.7,
        {k: v["limit_fraction_bf16"] for k, v in ours.items()}, "fraction")
    add("saeray >= 70% of the bf16 compute limit (per CPU-second: insensitive to other processes' load)", 0.7,
        {k: v.get("limit_fraction_bf16_cpu_time") for k, v in ours.items()}, "fraction")
    mg = report.get("memory_growth")
    if mg:
        out.append({"target": "peak RSS of saeray run grows < 10% for a 10x corpus", "want": 0.10,
                    "value": mg["growth"], "status": "met" if mg["growth"] < 0.10 else "missed", "unit": "fraction"})
    else:
        out.append({"target": "peak RSS of saeray run grows < 10% for a 10x corpus",
                    "status": "not measured here (--memory-growth)"})
    out.append({"target": ">= 50% MFU on an H100, Gemma-2-2B-sized", "status": "not run: no GPU in this run (--gpu-sized)"})
    return out


def _batch(report: dict) -> str:
    """tokens.batch_tokens as the worker used it ('auto' is resolved per device)."""
    used = report["paths"].get("c_worker_stats", {}).get("batch_tokens")
    asked = report["inputs"]["batch_tokens"]
    return f"{used:,} ({asked})" if asked == "auto" and used else f"{asked:,}" if isinstance(asked, int) else str(asked)


def fmt_table(report: dict) -> str:
    inp, facts, lim = report["inputs"], report["facts"], report["limit"]
    lines = [f"model {inp['model']}, hook {inp['hook']}, SAE {inp['architecture']} d_sae {inp['d_sae']:,}, "
             f"context {inp['context']}, saeray batch {_batch(report)} tokens",
             f"compute limit: {lim['flops_per_token'] / 1e6:.1f} MFLOP/token (layers 0-{facts['layers_run'] - 1} "
             f"+ SAE encoder; the notebook also pays {(facts['notebook']['total'] - lim['flops_per_token']) / 1e6:.0f} "
             f"for the other layers and the LM head) / matmul peak {lim['matmul_flops_per_s']['bfloat16'] / 1e9:.0f} "
             f"GFLOP/s bf16, {lim['matmul_flops_per_s']['float32'] / 1e9:.0f} fp32 = "
             f"{lim['tokens_per_s']['bfloat16']:,.0f} tok/s bf16, {lim['tokens_per_s']['float32']:,.0f} tok/s fp32",
             "",
             f"{'path':<40} {'model/SAE':>9} {'tokens':>8} {'sec':>7} {'tok/s':>8} {'vs (a)':>7} {'vs (b)':>7} "
             f"{'RSS MB':>7} {'%bf16':>6} {'%bf16 cpu':>9}"]
    for key, r in report["paths"].items():
        dt = f"{_SHORT.get(r['dtype'], r['dtype'])}/{_SHORT.get(r['sae_dtype'], r['sae_dtype'])}"
        x = lambda v: f"{v:.1f}x" if v is not None else "-"  # noqa: E731
        cpu = f"{100 * r['limit_fraction_bf16_cpu_time']:.0f}%" if "limit_fraction_bf16_cpu_time" in r else "-"
        lines.append(f"{LABELS.get(key, key):<40} {dt:>9} {r['tokens']:>8,} {r['seconds']:>7.1f} "
                     f"{r['tokens_per_s']:>8,.0f} {x(r['vs_notebook']):>7} {x(r['vs_saelens']):>7} "
                     f"{r['peak_rss_mb']:>7,.0f} {100 * r['limit_fraction_bf16']:>5.0f}% {cpu:>9}")
    lines.append("vs (b): against sae-lens in float32 (TransformerLens' default dtype); %bf16: tok/s over the "
                 "bf16 limit; %bf16 cpu: tokens per CPU-second over bf16 FLOPs per CPU-second")
    prof = report["paths"].get("c_worker_stats", {}).get("profile")
    if prof:
        lines += ["", f"where saeray's worker spends its time (torch.profiler, {prof['tokens']:,} tokens, "
                      f"{prof['seconds']:.1f}s wall):"]
        lines += [f"  {k:<62} {v['seconds']:>7.2f}s {100 * v['share']:>5.1f}%" for k, v in prof["by_kind"].items()]
        lines.append("  top ops by self time:")
        lines += [f"    {o['op']:<50} {o['self_s']:>7.2f}s {100 * o['share']:>5.1f}% {o['calls']:>6} calls"
                  for o in prof["top_ops"]]
    mo = report["paths"].get("c_worker_stats", {}).get("model_only")
    if mo:
        lines += ["", f"the model's forward alone, to the hooked layer, on the worker's batches (no SAE, statistics "
                      f"or I/O): {mo['tokens_per_s']:,.0f} tok/s = {100 * mo['limit_fraction_bf16']:.0f}% of the bf16 "
                      "limit, a ceiling for any SAE pipeline running this model's ops; its time (torch.profiler):"]
        lines += [f"  {k:<62} {v['seconds']:>7.2f}s {100 * v['share']:>5.1f}%" for k, v in mo["profile"]["by_kind"].items()]
    comp = report["paths"].get("c_worker_stats@compiled")
    if comp:
        cmo = comp.get("model_only") or {}
        lines += ["", f"model.compile: true (inductor): worker {comp['vs_eager']:.2f}x eager (statistics only); worker "
                      f"start {comp.get('worker_start_s', 0):.1f}s (model load and compile), first pass "
                      f"{comp.get('first_pass_s', 0):.1f}s, {comp.get('graphs_compiled', '?')} graph(s) compiled in all; "
                      f"forward alone {cmo.get('tokens_per_s', 0):,.0f} tok/s = "
                      f"{100 * cmo.get('limit_fraction_bf16', 0):.0f}% of the bf16 limit "
                      f"({cmo.get('vs_eager', 0):.2f}x eager's forward)"]
    walls = {k: r for k, r in report["paths"].items() if r.get("tokens_per_wall_s")}
    if walls:
        lines += ["", "`saeray run` as a user times it (wall clock: Ray's start, model load, driver's end included):"]
        lines += [f"  {LABELS.get(k, k):<40} {r['tokens_per_wall_s']:>8,.0f} tok/s "
                  f"({r['wall_s']:.1f}s for {r['tokens']:,} tokens)"
                  + (f", {r['wall_vs_notebook']:.1f}x the notebook loop" if r.get("wall_vs_notebook") else "")
                  for k, r in walls.items()]
    agg = report.get("aggregate")
    if agg:
        lines += ["", f"aggregation over {agg.get('generate', {}).get('rows', agg['config']['rows']):,} synthetic "
                      "activation rows (bench/aggregate_100m.py, one process per step):"]
        for k in ("features", "top", "interval", "diff"):
            if k in agg:
                lines.append(f"  {k:<10} {agg[k]['wall_s']:>8.1f}s  peak RSS {agg[k]['peak_rss_mb']:>8,.0f} MB")
    mg = report.get("memory_growth")
    if mg:
        lines += ["", "memory growth (bench/memory_growth.py): " + ", ".join(
            f"{r['tokens']:,} tokens -> worker peak RSS {r['worker_peak_rss_mb']:,.0f} MB" for r in mg["runs"])
            + f": {100 * mg['growth']:+.1f}%"]
    lines += ["", "targets:"]
    for t in report["targets"]:
        if "worst" in t:
            fmt = (lambda v: f"{v:.1f}x") if t["unit"] == "x" else (lambda v: f"{100 * v:.0f}%")
            lines.append(f"  [{t['status']}] {t['target']}: worst {LABELS.get(t['worst'][0], t['worst'][0])} "
                         f"{fmt(t['worst'][1])}, best {LABELS.get(t['best'][0], t['best'][0])} {fmt(t['best'][1])}")
        elif "value" in t:
            lines.append(f"  [{t['status']}] {t['target']}: {100 * t['value']:+.1f}%")
        else:
            lines.append(f"  [{t['status']}] {t['target']}")
    return "\n".join(lines)


# ---- GPU-sized mode ----------------------------------------------------------------------------


GPU_CONFIGS = {  # name: (latents per SAE, layers hooked (full size), compile); toy size: latents / 64, layers 1-3
    "16k-eager": (16384, [12], False), "16k": (16384, [12], None), "131k": (131072, [12], None),
    "3x16k": (16384, [6, 12, 18], None)}
"""--gpu-configs: GemmaScope's layer-12 16k SAE (the Pile job's), the same with model.compile false (the
compiled/eager ratio), its 131k-latent width, and three 16k SAEs on layers 6, 12 and 18 in one pass. None:
--gpu-compile decides."""


def run_gpu_sized(a: argparse.Namespace) -> dict:
    """Each of --gpu-configs in turn (the JSON is rewritten after each, so a run cut short keeps what finished);
    MFU against the measured bf16 matmul peak and, on an H100, against its nominal dense peak."""
    full = a.scale == "full"
    res: dict[str, Any] = {"scale": a.scale, "configs": {}}
    peak = None
    for name in a.gpu_configs.split(","):
        if name not in GPU_CONFIGS:
            raise SystemExit(f"--gpu-configs: unknown {name!r} (choose from {', '.join(GPU_CONFIGS)})")
        d_sae, layers, compile_ = GPU_CONFIGS[name]
        spec = {"scale": a.scale, "docs": a.gpu_docs if full else min(a.gpu_docs, 48),
                "layers": layers if full else [min(x // 6, 3) for x in layers],
                "d_sae": d_sae if full else d_sae // 64, "context": 1024 if full else 64,
                "batch_tokens": a.gpu_batch_tokens if full else 512, "units": a.gpu_units,
                "dtype": "bfloat16", "sae_dtype": a.gpu_sae_dtype, "density": 0.005, "threads": a.threads,
                "last_values": a.gpu_last_values,
                "compile": ({"auto": "auto", "true": True, "false": False}[a.gpu_compile] if compile_ is None
                            else compile_)}
        r = paths.gpu_sized(spec)  # in this process: the GPU's state is what is measured
        on_gpu = r["device"] != "cpu"
        if peak is None:
            dm = r["model"]
            shapes = [[8192 if on_gpu else 256, dm["hidden_size"], dm["intermediate_size"]],
                      [8192 if on_gpu else 256, dm["intermediate_size"], dm["hidden_size"]]]
            peak = paths.matmul_flops({"shapes": shapes, "dtypes": ["bfloat16"], "seconds": 1.0 if on_gpu else 0.2,
                                       "device": "cuda" if on_gpu else "cpu", "threads": a.threads})
            res.update(device=r["device"], matmul=peak, model=r["model"])
        fpt = r["flops_per_token"]["total"]
        nominal = H100_BF16_DENSE if "H100" in r["device"] else None
        for mode in ("stats_only", "rows"):
            m = r[mode]
            m["mfu_vs_measured_matmul"] = m["tokens_per_s"] * fpt / peak["bfloat16"]["best_flops_per_s"]
            m["mfu_vs_nominal"] = m["tokens_per_s"] * fpt / nominal if nominal else None
        res["configs"][name] = r
        _write_partial(a, res)
    c = res["configs"]
    if "16k" in c and "16k-eager" in c and c["16k"]["compiled"] and not c["16k-eager"]["compiled"]:
        res["compiled_vs_eager"] = c["16k"]["stats_only"]["tokens_per_s"] / c["16k-eager"]["stats_only"]["tokens_per_s"]
    head = c.get("16k", next(iter(c.values())))
    nominal_mfu = head["stats_only"]["mfu_vs_nominal"]
    res["targets"] = [{"target": ">= 50% MFU on an H100, Gemma-2-2B-sized, 16k latents, statistics only",
                       "status": ("met" if nominal_mfu >= 0.5 else "missed") if nominal_mfu is not None
                       else f"not run on an H100 (device: {res['device']}, scale {a.scale})"}]
    return res


def _write_partial(a: argparse.Namespace, res: dict) -> None:
    Path(a.json).write_text(portable(json.dumps({**res, "finished": False}, indent=2, default=float)))


def fmt_gpu(res: dict) -> str:
    d = res["model"]
    lines = [f"GPU-sized benchmark on {res['device']} ({res['scale']} scale): Gemma-2-shaped model, "
             f"{d['num_hidden_layers']} layers, d_model {d['hidden_size']}, random weights and random-token "
             f"documents; random JumpReLU SAEs; the worker's blocks, prefetch, batches in flight and partials; "
             f"measured bf16 matmul peak {res['matmul']['bfloat16']['best_flops_per_s'] / 1e12:,.1f} TFLOP/s"]
    for name, r in res["configs"].items():
        lines.append(f"{name}: {r['saes']} SAE(s) x {r['d_sae']:,} latents ({r['sae_dtype']}) at {', '.join(r['hooks'])}; "
                     f"{r['docs']} docs in {r['units']} timed units + 1 warm-up; batches {r['batch_tokens']:,} tokens, "
                     f"{r['in_flight']} in flight; attention {r['attn_implementation']}, "
                     f"{'compiled' if r['compiled'] else 'eager'}; {r['flops_per_token']['total'] / 1e9:,.2f} GFLOP/token")
        for mode in ("stats_only", "rows"):
            m = r[mode]
            nominal = f", {100 * m['mfu_vs_nominal']:.1f}% of nominal" if m["mfu_vs_nominal"] else ""
            syncs = f", {m['syncs_per_block']:.1f} syncs/block" if m["syncs_per_block"] is not None else ""
            mem = f", peak {m['peak_gpu_mb']:,} MB" if m["peak_gpu_mb"] is not None else ""
            lines.append(f"  {mode:<10} {m['tokens']:>9,} tokens {m['seconds']:>7.2f}s {m['tokens_per_s']:>10,.0f} tok/s"
                         f"  MFU {100 * m['mfu_vs_measured_matmul']:.1f}% of measured{nominal}{mem}{syncs}; "
                         f"warm-up unit {m['warm_up_unit_s']:.1f}s")
    if res.get("compiled_vs_eager"):
        lines.append(f"compiled / eager (16k, statistics only): {res['compiled_vs_eager']:.2f}x")
    lines += [f"  [{t['status']}] {t['target']}" for t in res["targets"]]
    return "\n".join(lines)


# ---- command line ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    num = lambda s: int(s.replace("_", ""))  # noqa: E731
    p.add_argument("--model", default="gemma-3-270m", help="embedded short name or model dir (default gemma-3-270m)")
    p.add_argument("--sae", default=str(ROOT / "saeray" / "assets" / "saes" / "gemma-3-270m-res6"), help="sae-lens SAE directory")
    p.add_argument("--data", default=str(ROOT / "runs" / "corpus"), help="corpus (parquet with a text column)")
    p.add_argument("--docs", type=num, default=120, help="documents for saeray's paths (a random sample)")
    p.add_argument("--saelens-docs", type=num, default=40, help="documents for sae-lens (a prefix of saeray's)")
    p.add_argument("--notebook-docs", type=num, default=12, help="documents for the notebook loop (a prefix)")
    p.add_argument("--saelens-dtypes", default="float32,bfloat16")
    p.add_argument("--saelens-batch", type=int, default=32, help="windows per sae-lens forward pass")
    p.add_argument("--context", type=int, help="window size (default: the SAE's context_size)")
    p.add_argument("--rounds", type=num, default=2,
                   help="rounds over all paths, each path in a fresh process per round; the fastest counts")
    p.add_argument("--repeats", type=num, default=2,
                   help="timed passes per path and round over the same documents; the fastest counts")
    p.add_argument("--batch-tokens", type=lambda s: s if s == "auto" else num(s), default="auto",
                   help="saeray tokens.batch_tokens (default auto: 2048 on CPU, 16384 on a GPU)")
    p.add_argument("--dtype", default="bfloat16", help="saeray model dtype")
    p.add_argument("--sae-dtype", default="float32", help="saeray SAE dtype (saeray's default auto is float32 on CPU)")
    p.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    p.add_argument("--gemm-rows", type=int, default=4096, help="rows of the GEMMs timed for the matmul peak")
    p.add_argument("--flops-seconds", type=float, default=1.0, help="seconds per GEMM shape timed")
    p.add_argument("--skip-saelens", action="store_true")
    p.add_argument("--skip-ray", action="store_true")
    p.add_argument("--skip-profile", action="store_true")
    p.add_argument("--skip-aggregate", action="store_true", help="skip the aggregation timing (100M rows: ~7 min)")
    p.add_argument("--agg-rows", type=num, default=100_000_000)
    p.add_argument("--agg-dir", help="keep the synthetic run here, and reuse it when it exists")
    p.add_argument("--memory-growth", action="store_true", help="also run bench/memory_growth.py (minutes)")
    p.add_argument("--memory-small", type=num, default=10_000, help="tokens of memory_growth's small corpus")
    p.add_argument("--compile", action="store_true",
                   help="also the worker with model.compile: true (statistics only; its forward alone beside eager's)")
    p.add_argument("--baseline-src", help="an older saeray checkout: its worker path runs beside this one's")
    p.add_argument("--simulate", action="store_true",
                   help="a SIMULATED H100 fed by the real host pipeline: bench/simulate.py (its own options)")
    p.add_argument("--tiny", action="store_true", help="tiny random model and SAE built in-process (for tests)")
    p.add_argument("--gpu-sized", action="store_true", help="Gemma-2-2B-sized model + JumpReLU SAEs (--gpu-configs), random weights")
    p.add_argument("--scale", choices=["full", "toy"], default="full", help="with --gpu-sized: toy = the CPU test size")
    p.add_argument("--gpu-docs", type=num, default=512, help="documents in all (~1,100 tokens each at full size)")
    p.add_argument("--gpu-units", type=num, default=3, help="timed units (plus one warm-up unit)")
    p.add_argument("--gpu-configs", default=",".join(GPU_CONFIGS), help=f"of {', '.join(GPU_CONFIGS)}")
    p.add_argument("--gpu-last-values", action="store_true", help="keep last values (the Pile config does not)")
    p.add_argument("--gpu-batch-tokens", type=num, default=16384, help="jobs/configs/gemmascope-pile-rates.yaml's")
    p.add_argument("--gpu-sae-dtype", default="auto", help="saes[].dtype (saeray's default auto: tf32 on a GPU)")
    p.add_argument("--gpu-compile", choices=["auto", "true", "false"], default="auto", help="model.compile")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=str(ROOT / "bench" / "throughput.json"))
    p.add_argument("--step", help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if "--simulate" in args:
        import simulate

        simulate.main([x for x in args if x != "--simulate"])
        return
    a = parse_args(argv)
    os.environ.update(ENV)
    if a.step:
        result = STEPS[a.step](json.loads(Path(a.spec).read_text()))
        print(json.dumps(result, default=float))
        return
    work = Path(tempfile.mkdtemp(prefix="saeray-throughput-"))
    t0 = time.time()
    try:
        if a.gpu_sized:
            report = run_gpu_sized(a)
            text = fmt_gpu(report)
        else:
            report = run_cpu(a, work)
            text = fmt_table(report)
    finally:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    report["command"] = " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])
    report["total_s"] = round(time.time() - t0, 1)
    report["table"] = text
    print(text)
    text = json.dumps(report, indent=2, default=float)
    if a.baseline_src:
        text = text.replace(a.baseline_src.rstrip("/"), "$BASELINE")
    Path(a.json).write_text(portable(text))
    print(f"\nwrote {a.json} ({report['total_s']:.0f}s in all)")


def portable(text: str) -> str:
    """The report without this machine's paths: repo-relative, `~` for home, `$TMP` for the temp dir."""
    for path, name in ((f"{ROOT}/", ""), (tempfile.gettempdir(), "$TMP"), (str(Path.home()), "~")):
        text = text.replace(path, name)
    return text


if __name__ == "__main__":
    main()
