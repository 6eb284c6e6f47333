"""The measured paths of bench/throughput.py, each run in its own process by `--step NAME`.

Every path reads the same documents (a parquet file with a `text` column), splits each
document into the same windows ([BOS] + up to context-1 tokens), and reports the
document tokens it processed, the seconds its processing loop took (model loading
excluded, tokenization included), the process CPU seconds of that loop, and its peak RSS.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

if not os.environ.get("SAERAY_BENCH_SRC"):  # a --baseline-src step imports the saeray it was pointed at
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TL_NAMES = {"gemma-3-270m": "google/gemma-3-270m", "smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}
"""Embedded short name -> the TransformerLens official name of the same architecture and weights."""

GEMMA2_2B = dict(vocab_size=256_000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                 num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
                 sliding_window=4096, max_position_embeddings=8192)
"""google/gemma-2-2b's shapes (its config.json); the GPU-sized mode hooks layer 12 with a 16k SAE, as GemmaScope does."""

GEMMA2_TOY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=64,
                  max_position_embeddings=512)
"""The same architecture at toy size: the CPU test of the GPU-sized mode."""


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: this program's own, not inherited across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Timer:
    """Wall and process CPU seconds of a block."""

    def __enter__(self) -> "Timer":
        self.t0, self.c0 = time.perf_counter(), cpu_seconds()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.seconds = time.perf_counter() - self.t0
        self.cpu = cpu_seconds() - self.c0


def best_of(spec: dict, *passes: Any) -> Any:
    """Run each of `passes` (each -> a result dict with `seconds`) spec["repeats"] times, taking
    turns; keep each one's fastest run (a dict, or a list of them for several passes).

    Other tenants of a shared machine only ever slow a pass down, and later passes see warm
    kernel and allocator caches as any long run does: the fastest pass is the path's own speed.
    Passes that are compared take turns, so a slow spell on the machine hits them alike.
    """
    runs: list[list[dict]] = [[] for _ in passes]
    for _ in range(max(1, int(spec.get("repeats", 1)))):
        for one_pass, results in zip(passes, runs):
            results.append(one_pass())
    best = [{**min(r, key=lambda x: x["seconds"]), "repeat_seconds": [round(x["seconds"], 3) for x in r]}
            for r in runs]
    return best[0] if len(passes) == 1 else best


def read_texts(data: str) -> list[str]:
    import pyarrow.parquet as pq

    return [str(t) for t in pq.read_table(data, columns=["text"]).column("text").to_pylist()]


def windows(ids: list[int], bos: int, context: int) -> list[list[int]]:
    """[BOS] + consecutive slices of context-1 tokens: saeray's windows in position mode `all`."""
    step = context - 1
    return [[bos] + ids[s:s + step] for s in range(0, len(ids), step)]


def load_hf(model_dir: str, dtype: str) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


def load_sae(path: str, dtype: str) -> Any:
    from sae_lens import SAE

    sae = SAE.load_from_disk(path, device="cpu", dtype=dtype)
    return sae.eval()


# ---- (a) the notebook loop ------------------------------------------------------------------


def notebook(spec: dict) -> dict:
    """One window per forward pass through the full model (LM head included), dense SAE codes
    to CPU numpy, statistics with numpy at the end: what a notebook does."""
    import torch

    model, tok = load_hf(spec["model_dir"], spec["dtype"])
    sae = load_sae(spec["sae"], "float32")
    layer, kind = spec["layer"], spec["kind"]
    if kind not in ("hook_resid_post", "hook_resid_pre"):
        raise ValueError(f"the notebook loop reads hidden_states: it supports hook_resid_post/pre, not {kind}")
    index = layer + 1 if kind == "hook_resid_post" else layer
    texts = read_texts(spec["data"])

    def one_pass() -> dict:
        dense, n_tokens = [], 0
        with Timer() as t, torch.no_grad():
            for text in texts:
                ids = tok(text, add_special_tokens=False)["input_ids"]
                n_tokens += len(ids)
                for w in windows(ids, tok.bos_token_id, spec["context"]):
                    out = model(torch.tensor([w]), output_hidden_states=True)
                    dense.append(sae.encode(out.hidden_states[index][0, 1:].to(sae.dtype)).cpu().numpy())
            acts = np.concatenate(dense)
            stats = {"density": (acts != 0).mean(0), "mean": acts.mean(0), "std": acts.std(0), "max": acts.max(0)}
        return {"tokens": n_tokens, "seconds": t.seconds, "cpu_seconds": t.cpu,
                "l0": float(stats["density"].sum()), "dtype": spec["dtype"], "sae_dtype": "float32"}

    return {**best_of(spec, one_pass), "peak_rss_mb": peak_rss_mb()}


# ---- (b) sae-lens HookedSAETransformer ------------------------------------------------------


def tl_model(spec: dict, dtype: str) -> tuple[Any, Any]:
    """(HookedSAETransformer, tokenizer) built from the local HF weights: no hub access."""
    import torch
    from sae_lens import HookedSAETransformer

    official = TL_NAMES.get(spec["model"])
    if official is None:
        raise ValueError(f"no TransformerLens name known for model {spec['model']!r}: "
                         f"TL paths run on {', '.join(TL_NAMES)} (use --skip-saelens for others)")
    hf, tok = load_hf(spec["model_dir"], "float32")
    tl = HookedSAETransformer.from_pretrained_no_processing(official, hf_model=hf, tokenizer=tok, device="cpu",
                                                            dtype=getattr(torch, dtype))
    del hf
    return tl.eval(), tok


def saelens(spec: dict) -> dict:
    """Batches of windows (document order, right-padded) through `run_with_cache_with_saes`,
    stopping after the hooked layer and caching only the SAE code; statistics on the device."""
    import torch

    dtype = spec["dtype"]
    tl, tok = tl_model(spec, dtype)
    sae = load_sae(spec["sae"], dtype)
    hook = spec["hook"]
    name = f"{hook}.hook_sae_acts_post"
    special = torch.tensor(sorted(set(tok.all_special_ids)))
    texts = read_texts(spec["data"])
    d_sae = int(sae.cfg.d_sae)

    def one_pass() -> dict:
        n_active = torch.zeros(d_sae, dtype=torch.int64)
        total = torch.zeros(d_sae, dtype=torch.float64)
        vmax = torch.full((d_sae,), float("-inf"))
        n_tokens = counted = 0
        pending: list[list[int]] = []

        def run(batch: list[list[int]]) -> None:
            nonlocal counted
            width = max(len(w) for w in batch)
            x = torch.full((len(batch), width), tok.pad_token_id, dtype=torch.long)
            for r, w in enumerate(batch):
                x[r, :len(w)] = torch.tensor(w)
            lengths = torch.tensor([len(w) for w in batch])
            keep = (torch.arange(width)[None, :] < lengths[:, None]) & ~torch.isin(x, special)
            _, cache = tl.run_with_cache_with_saes(x, saes=[sae], names_filter=[name], stop_at_layer=spec["layer"] + 1)
            acts = cache[name][keep].float()
            counted += int(keep.sum())
            n_active.add_((acts != 0).sum(0))
            total.add_(acts.double().sum(0))
            torch.maximum(vmax, acts.max(0).values, out=vmax)

        with Timer() as t, torch.no_grad():
            for text in texts:
                ids = tok(text, add_special_tokens=False)["input_ids"]
                n_tokens += len(ids)
                pending.extend(windows(ids, tok.bos_token_id, spec["context"]))
                while len(pending) >= spec["batch"]:
                    run(pending[:spec["batch"]])
                    del pending[:spec["batch"]]
            if pending:
                run(pending)
            stats = {"density": (n_active / counted).numpy(), "mean": (total / counted).numpy(), "max": vmax.numpy()}
        return {"tokens": n_tokens, "seconds": t.seconds, "cpu_seconds": t.cpu,
                "l0": float(stats["density"].sum()), "dtype": dtype, "sae_dtype": dtype}

    return {**best_of(spec, one_pass), "peak_rss_mb": peak_rss_mb()}


# ---- (c) saeray's worker path, no Ray --------------------------------------------------------


def saeray_config(spec: dict, out: str, activations: bool) -> dict:
    return {"model": {"name": spec["model_dir"], "dtype": spec["dtype"], "compile": spec.get("compile", "auto")},
            "saes": [{"name": "sae", "path": spec["sae"], "dtype": spec["sae_dtype"]}],
            "data": {"dataset": str(Path(spec["data"]).parent), "text_column": "text"},
            "tokens": {"batch_tokens": spec["batch_tokens"], "context_size": spec["context"]},
            "output": {"dir": out, "activations": activations}, "workers": 1}


def worker(spec: dict) -> dict:
    """ShardWorker.process on every unit, as `saeray run --local` does; times the units only."""
    from saeray.engine import config
    from saeray.engine.plan import prepare
    from saeray.engine.store import RunDir
    from saeray.engine.worker import ShardWorker

    cfg = config.from_dict(saeray_config(spec, spec["out"], spec["activations"]))
    prepared = prepare(cfg)
    rd = RunDir(cfg.output.dir)
    rd.prepare(prepared.manifest(), True)
    with Timer() as start:
        w = ShardWorker(rd.read_manifest(), str(rd.root), threads=spec.get("threads"))

    def one_pass() -> dict:  # a later pass redoes every shard; its commit finds the shard done and drops it
        with Timer() as t:
            done = [w.process(t.to_dict()) for t in prepared.plan.units]
        return {"tokens": sum(s["tokens"] for s in done), "seconds": t.seconds, "cpu_seconds": t.cpu,
                "rows": sum(s["rows"] for s in done), "forward_tokens": sum(s["forward_tokens"] for s in done)}

    warmup = {"worker_start_s": start.seconds}
    if spec.get("compile") is True:  # the worker compiles at its start; the first pass may compile more shapes
        import torch._dynamo

        with Timer() as t:
            first = one_pass()
        warmup = {**warmup, "first_pass_s": t.seconds,
                  "first_pass_tokens_per_s": first["tokens"] / t.seconds,
                  "graphs_compiled": int(torch._dynamo.utils.counters["stats"]["unique_graphs"]),
                  "inductor_cache": os.environ.get("TORCHINDUCTOR_CACHE_DIR")}
    if spec.get("profile"):  # the model's forward alone takes turns with the worker's passes
        forward_pass, forward_profile = model_forward(w, spec)
        best, forward = best_of(spec, one_pass, forward_pass)
    else:
        best = best_of(spec, one_pass)
    out = {**best, **warmup, "compiled": bool(getattr(w.hooks, "compiled", False)), "peak_rss_mb": peak_rss_mb(),
           "batch_tokens": w.batch_tokens,
           "dtype": spec["dtype"], "sae_dtype": spec["sae_dtype"]}
    if spec.get("profile"):
        out["profile"] = profile_worker(w, prepared.plan.units, spec)
        out["model_only"] = {**forward, "profile": forward_profile()}
    return out


def model_forward(w: Any, spec: dict) -> tuple[Any, Any]:
    """(one timed pass, one profiled pass) of the hooked model's forward alone on the worker's own
    batches: no SAE, statistics or I/O.

    Its tokens/s bounds what any SAE pipeline on this model can reach with these ops; its profile
    (no shapes recorded: cheaper, and every matmul here is the model's) says where that time goes.
    """
    import torch
    from torch.profiler import ProfilerActivity, profile

    from saeray.engine.batching import blocks
    from saeray.engine.models import run_to_hooks

    docs = [w.tok.document(i, t, {}) for i, t in enumerate(read_texts(spec["data"]))]
    batches = [b for block in blocks(docs, w.block_tokens) for b in w.tok.batches(block, w.batch_tokens, w.device)]
    sites = list({h.site.name: h.site for h in w.handles}.values())
    tokens = sum(len(d.token_ids) for d in docs)

    forward = getattr(w, "hooks", None) or (lambda ids, mask: run_to_hooks(w.model, sites, ids, mask))

    def forward_all() -> None:
        for b in batches:  # the worker's own hooks where it keeps them (a second set would never fire)
            forward(b.input_ids, b.attention_mask)

    def one_pass() -> dict:
        with Timer() as t, torch.inference_mode():
            forward_all()
        return {"tokens": tokens, "seconds": t.seconds, "cpu_seconds": t.cpu}

    def profiled() -> dict:
        with Timer() as t, profile(activities=[ProfilerActivity.CPU]) as prof, torch.inference_mode():
            forward_all()
        kinds: dict[str, float] = {}
        for e in prof.key_averages():
            if e.self_cpu_time_total > 0:
                kind = op_kind(e.key, "saeray.model")
                kinds[kind] = kinds.get(kind, 0.0) + e.self_cpu_time_total / 1e6
        return {"seconds": t.seconds, "by_kind": _by_kind(kinds, t.seconds, "outside torch ops (Python, HF glue)")}

    return one_pass, profiled


def profile_worker(w: Any, units: Any, spec: dict) -> dict:
    """torch.profiler (CPU, no shapes recorded: cheap per op) over the shards again: where the
    worker's time goes, by op and by kind. Kinds come from the scopes saeray.engine.extract opens
    (saeray.model, saeray.sae, saeray.rows) and the op's name."""
    from torch.profiler import ProfilerActivity, profile

    with Timer() as t, profile(activities=[ProfilerActivity.CPU]) as prof:
        tokens = sum(w.process(t.to_dict())["tokens"] for t in units)
    ops, kinds = {}, {}
    for e in prof.events():
        if e.name.startswith("saeray.") or e.self_cpu_time_total <= 0:
            continue
        scope, up = None, e.cpu_parent
        while up is not None and scope is None:
            scope = up.name if up.name.startswith("saeray.") else None
            up = up.cpu_parent
        kind = op_kind(e.name, scope)
        kinds[kind] = kinds.get(kind, 0.0) + e.self_cpu_time_total / 1e6
        row = ops.setdefault(e.name, {"op": e.name, "self_s": 0.0, "calls": 0})
        row["self_s"] += e.self_cpu_time_total / 1e6
        row["calls"] += 1
    top = sorted(ops.values(), key=lambda r: -r["self_s"])[:spec.get("profile_top", 15)]
    for r in top:
        r["share"] = r["self_s"] / t.seconds
    return {"tokens": tokens, "seconds": t.seconds, "cpu_seconds": t.cpu, "top_ops": top,
            "by_kind": _by_kind(kinds, t.seconds, "outside torch ops (Python, tokenizer, parquet)")}


def _by_kind(kinds: dict[str, float], wall: float, outside: str) -> dict[str, dict[str, float]]:
    """Seconds per kind of op, plus the wall time no op accounts for, with shares of the wall, largest first."""
    kinds = {**kinds, outside: max(0.0, wall - sum(kinds.values()))}
    return {k: {"seconds": v, "share": v / wall} for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])}


_MATMUL = {"aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm"}
_ATTENTION = ("scaled_dot_product", "flash_attention", "_efficient_attention", "aten::_softmax")


def op_kind(name: str, scope: str | None) -> str:
    """Bucket a profiled op by the saeray scope it ran in and what it is."""
    if scope == "saeray.model":
        if name in _MATMUL:
            return "model matmuls"
        if any(a in name for a in _ATTENTION):
            return "attention (SDPA, softmax)"
        return "model's other ops (norms, GELU, rotary, casts, masks, ...)"
    if scope == "saeray.sae":
        return "SAE encoder matmul" if name in _MATMUL else "SAE sparsify + statistics (topk, nonzero, index, ...)"
    if scope == "saeray.rows":
        return "rows: per-document counts, sort, copies to numpy"
    return "torch ops outside the forward pass (tokenization, tables)"


# ---- the hardware's own limit -----------------------------------------------------------------


def matmul_flops(spec: dict) -> dict:
    """Best FLOP/s over the model's own GEMM shapes (and a square one), per dtype, on this device."""
    import torch

    device = torch.device(spec.get("device", "cpu"))
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    out: dict[str, Any] = {"device": str(device), "threads": torch.get_num_threads()}
    for dtype in spec["dtypes"]:
        best, shapes = 0.0, []
        for m, k, n in [tuple(s) for s in spec["shapes"]]:
            a = torch.randn(m, k, dtype=getattr(torch, dtype), device=device)
            b = torch.randn(k, n, dtype=getattr(torch, dtype), device=device)
            for _ in range(2):
                a @ b
            _sync(device)
            reps, t0, c0 = 0, time.perf_counter(), cpu_seconds()
            while time.perf_counter() - t0 < spec["seconds"]:
                a @ b
                reps += 1
                if device.type == "cuda" and reps % 10 == 0:
                    _sync(device)
            _sync(device)
            el, ce = time.perf_counter() - t0, cpu_seconds() - c0
            flops = 2 * m * k * n * reps
            shapes.append({"m": m, "k": k, "n": n, "flops_per_s": flops / el, "flops_per_cpu_s": flops / max(ce, 1e-9)})
            best = max(best, flops / el)
        out[dtype] = {"best_flops_per_s": best, "best_flops_per_cpu_s": max(s["flops_per_cpu_s"] for s in shapes),
                      "shapes": shapes}
    return out


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def flops_per_token(model: Any, n_layers_run: int, window_lengths: list[int], d_in: int, d_sae: int,
                    lm_head: bool = False) -> dict:
    """Useful FLOPs per document token: 2 x (in x out) per Linear in the layers that run, attention
    scores and values (4 x heads x head_dim per attended key, causal, sliding windows capped), the
    SAE encoder (2 x d_in x d_sae); with `lm_head`, every layer and the unembedding too. Padding and
    BOS are overhead, not useful work: they are not counted."""
    from torch import nn

    from saeray.engine import models

    layers = models.decoder_layers(model)
    tc = models.text_config(model.config)
    n_run = len(layers) if lm_head else n_layers_run
    linear = sum(2 * m.in_features * m.out_features for layer in layers[:n_run] for m in layer.modules()
                 if isinstance(m, nn.Linear))
    heads = int(tc.num_attention_heads)
    head_dim = int(getattr(tc, "head_dim", None) or tc.hidden_size // heads)
    types = list(getattr(tc, "layer_types", None) or ["full_attention"] * len(layers))
    window = getattr(tc, "sliding_window", None)
    attn = 0
    for t in types[:n_run]:
        cap = window if (t == "sliding_attention" and window) else None
        keys = sum(_attended(n, cap) for n in window_lengths)
        attn += 4 * heads * head_dim * keys
    doc_tokens = sum(window_lengths) - len(window_lengths)  # BOS of each window is not a document token
    out = {"linear": linear, "attention": attn / max(doc_tokens, 1), "sae_encoder": 2 * d_in * d_sae}
    if lm_head:
        head = model.get_output_embeddings()
        out["lm_head"] = 2 * head.in_features * head.out_features
    out["total"] = sum(out.values())
    return out


def _attended(n: int, cap: int | None) -> int:
    """Keys attended by the n queries of a causal window (each sees min(i, cap) keys)."""
    if cap is None or cap >= n:
        return n * (n + 1) // 2
    return cap * (cap + 1) // 2 + (n - cap) * cap


def model_facts(spec: dict) -> dict:
    """FLOPs per token of saeray's work and of the notebook's, from the model built on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from saeray.engine import models

    cfg = AutoConfig.from_pretrained(spec["model_dir"])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    tok = AutoTokenizer.from_pretrained(spec["model_dir"])
    lengths = []
    for text in read_texts(spec["data"]):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        lengths += [len(w) for w in windows(ids, tok.bos_token_id, spec["context"])]
    site = models.parse_hook(spec["hook"], models.n_layers_of(cfg))
    n_run = site.layer if site.kind == "hook_resid_pre" else site.layer + 1
    d_in = models.d_model_of(cfg)
    shapes = sorted({(m.in_features, m.out_features) for layer in models.decoder_layers(model)[:n_run]
                     for m in layer.modules() if isinstance(m, torch.nn.Linear)} | {(d_in, spec["d_sae"])})
    return {"saeray": flops_per_token(model, n_run, lengths, d_in, spec["d_sae"]),
            "notebook": flops_per_token(model, n_run, lengths, d_in, spec["d_sae"], lm_head=True),
            "layers_run": n_run, "n_layers": models.n_layers_of(cfg), "windows": len(lengths),
            "mean_window": float(np.mean(lengths)), "gemm_shapes": [list(s) for s in shapes]}


# ---- GPU-sized mode -----------------------------------------------------------------------------


class _IdTokenizer:
    """What Tokenization needs of a tokenizer when documents arrive as token ids."""

    bos_token_id, pad_token_id, eos_token_id = 2, 0, 1
    all_special_ids = [0, 1, 2]


def gpu_sized(spec: dict) -> dict:
    """A Gemma-2-2B-shaped model with random weights (bf16, built on the device from its config) and random JumpReLU
    SAEs (spec["layers"], spec["d_sae"] latents each) through the worker's own pieces, configured as
    jobs/configs/gemmascope-pile-rates.yaml configures a run: 16,384-token batches of 1024-token contexts, blocks of
    BLOCK_BATCHES batches read, batched and pinned by a prefetch thread `worker.prefetch_blocks` ahead, the batches
    in flight that `in_flight` allows, the output section's defaults (top_k, samples per bin, contexts; last values
    as spec["last_values"]), one Extractor per unit and its partials written to Parquet at the unit's end. The first
    unit warms up (kernels, compiled graphs, allocator) and is not timed. Statistics only, as the job; then rows."""
    import tempfile
    import warnings

    import torch
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig
    from sae_lens.saes.sae import SAEMetadata
    from transformers import AutoModelForCausalLM, Gemma2Config

    from saeray.engine import models, saes
    from saeray.engine.batching import blocks
    from saeray.engine.config import OutputConfig, PositionsConfig, WorkerConfig
    from saeray.engine.contexts import Document, Tokenization
    from saeray.engine.extract import Extractor, SAEHandle, in_flight
    from saeray.engine.pipeline import Prefetch
    from saeray.engine.resources import bound_malloc
    from saeray.engine.truncated import forward_to_hooks, resolve_compile
    from saeray.engine.worker import BLOCK_BATCHES
    from saeray.engine.writing import write_partials

    bound_malloc()
    device = torch.device("cuda" if torch.cuda.is_available() and not spec.get("cpu") else "cpu")
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    full = spec["scale"] == "full"
    dims = GEMMA2_2B if full else GEMMA2_TOY
    dtype = getattr(torch, spec["dtype"])
    torch.manual_seed(0)
    cfg = Gemma2Config(**dims, bos_token_id=2, eos_token_id=1, pad_token_id=0)
    attn = models.auto_attention(cfg, device)  # as model.attn_implementation auto picks it (flex_attention on a GPU)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, **({"attn_implementation": attn} if attn else {}))
    model.eval().requires_grad_(False)
    d_in, d_sae = dims["hidden_size"], spec["d_sae"]
    precision = saes.resolve_dtype(spec["sae_dtype"], device)  # as a worker resolves saes[].dtype
    rng = np.random.default_rng(0)
    lengths = rng.integers(spec["context"] // 8, 2 * spec["context"], size=spec["docs"])
    tok = Tokenization(_IdTokenizer(), PositionsConfig(), prepend_bos=True, context_size=spec["context"],
                       exclude_special=True)
    docs = []
    for i, n in enumerate(lengths):
        ids = rng.integers(3, dims["vocab_size"], size=int(n)).astype(np.int32)
        docs.append(Document(i, ids, {}, tok.select(ids)))
    handles = []
    for layer in spec["layers"]:
        hook = f"blocks.{layer}.hook_resid_post"
        sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae, dtype=saes.torch_dtype_of(precision),
                                            device=str(device),
                                            metadata=SAEMetadata(hook_name=hook, prepend_bos=True,
                                                                 context_size=spec["context"])))
        sae.eval().requires_grad_(False)
        setattr(sae, saes.TF32_ATTR, precision == "tf32")
        site = models.parse_hook(hook, dims["num_hidden_layers"])
        _calibrate_jumprelu(sae, model, site, docs[:4], tok, device, spec["density"])
        handles.append(SAEHandle(f"l{layer}", sae, site, 0.0))
    out_cfg = OutputConfig(dir="unused", last_values=spec["last_values"])
    batch_tokens, block_tokens = spec["batch_tokens"], BLOCK_BATCHES * spec["batch_tokens"]
    compiled = resolve_compile(spec.get("compile", "auto"), device)
    t0 = time.perf_counter()
    hooks = forward_to_hooks(model, [h.site for h in handles], compile=compiled)  # as the worker: built once
    ahead = in_flight(batch_tokens, handles, device)
    pin = device.type == "cuda"
    units = np.array_split(np.arange(len(docs)), spec["units"] + 1)  # the first: warm-up
    tmp = Path(tempfile.mkdtemp(prefix="saeray-gpu-sized-"))
    out: dict[str, Any] = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                           "scale": spec["scale"], "model": dims, "hooks": [h.site.name for h in handles],
                           "d_sae": d_sae, "saes": len(handles), "dtype": spec["dtype"], "sae_dtype": precision,
                           "docs": len(docs), "units": spec["units"], "batch_tokens": batch_tokens,
                           "context": spec["context"], "in_flight": ahead, "last_values": spec["last_values"],
                           "attn_implementation": model.config._attn_implementation, "compiled": compiled}

    def one_unit(unit_docs: list, keep: bool, syncs: list) -> tuple[int, int, int]:
        """A unit as Worker._process runs it; (tokens, blocks, rows)."""
        def prepared():
            for block in blocks(unit_docs, block_tokens):
                yield block, tok.batches(block, batch_tokens, pin=pin)

        ext = Extractor(model, handles, tok, batch_tokens=batch_tokens, device=device, hooks=hooks, ahead=ahead,
                        top_k=out_cfg.top_k, per_bin=out_cfg.samples_per_bin, radius=out_cfg.context_radius,
                        last_values=out_cfg.last_values)
        n_blocks = n_rows = 0
        with Prefetch(prepared(), WorkerConfig().prefetch_blocks) as items, warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("warn")  # each synchronizing CUDA call warns: counted per block
            try:
                done = []
                for block, batches in items:
                    done += ext.push(block, keep, batches)
                    n_blocks += 1
                done += ext.drain()
                n_rows = sum(len(cols["doc_id"]) for _, rows in done for cols in rows.values())
            finally:
                if device.type == "cuda":
                    torch.cuda.set_sync_debug_mode(0)
            syncs.append(sum("synchroniz" in str(x.message) for x in w))
        write_partials(ext, tmp)
        return int(sum(len(d.token_ids) for d in unit_docs)), n_blocks, n_rows

    for mode, keep in (("stats_only", False), ("rows", True)):
        syncs: list[int] = []
        w0 = time.perf_counter()
        one_unit([docs[i] for i in units[0]], keep, [])
        warm = time.perf_counter() - w0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        n_tokens = n_blocks = n_rows = 0
        with Timer() as t:
            for u in units[1:]:
                got = one_unit([docs[i] for i in u], keep, syncs)
                n_tokens, n_blocks, n_rows = n_tokens + got[0], n_blocks + got[1], n_rows + got[2]
            _sync(device)
        out[mode] = {"tokens": n_tokens, "seconds": t.seconds, "tokens_per_s": n_tokens / t.seconds,
                     "blocks": n_blocks, "rows": n_rows, "warm_up_unit_s": round(warm, 2),
                     "syncs_per_block": (sum(syncs) / n_blocks if device.type == "cuda" else None),
                     "peak_gpu_mb": (round(torch.cuda.max_memory_allocated(device) / 2**20) if device.type == "cuda"
                                     else None)}
    out["build_s"] = round(time.perf_counter() - t0, 2)
    lengths_w = [n + 1 for _, _, n in tok.windows(docs)]
    deepest = max(h.site.layer for h in handles)
    fpt = flops_per_token(model, deepest + 1, lengths_w, d_in, d_sae)
    fpt["sae_encoder"] *= len(handles)
    fpt["total"] = fpt["linear"] + fpt["attention"] + fpt["sae_encoder"]
    out["flops_per_token"] = fpt
    return out


def _calibrate_jumprelu(sae: Any, model: Any, site: Any, docs: list, tok: Any, device: Any, density: float) -> None:
    """Random JumpReLU thresholds at each latent's (1 - density) quantile of real pre-activations,
    so codes are as sparse as a trained SAE's (GemmaScope 16k: L0 ~ 50-150 of 16,384)."""
    import torch

    from saeray.engine import models

    batch = tok.batches(docs, 4096, device)[0]
    hidden = models.run_to_hooks(model, [site], batch.input_ids, batch.attention_mask)[site.name]
    x = hidden[batch.attention_mask.bool()].to(sae.dtype)
    with torch.no_grad():
        pre = (sae.process_sae_in(x[:1024]) @ sae.W_enc + sae.b_enc).float()
        k = min(len(pre), max(1, int(round((1 - density) * len(pre)))))
        sae.threshold.copy_(pre.kthvalue(k, dim=0).values.clamp_min(1e-3).to(sae.dtype))
