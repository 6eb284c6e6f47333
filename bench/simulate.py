"""A SIMULATED GPU: does a worker's CPU side keep an H100 busy? (bench/throughput.py --simulate)

    python bench/simulate.py                         # Gemma-2-2B to layer 12 + 16k SAE on a simulated H100 at 50% MFU
    python bench/simulate.py --files 4 --unit-mb 8 --json /tmp/sim-8mib.json   # several units: their boundaries
    python bench/simulate.py --baseline-src DIR      # also the code in DIR (a checkout of an older saeray) as is
    python bench/simulate.py --rows                  # also with activation rows written
    python bench/simulate.py --docs 400 --unit-mb 0.5  # a quick look (the CPU test's size)

Everything a worker does on the host runs for real, through `saeray run --local`'s own path: the
Pile-layout corpus (JSON lines in zstd frames) is read and decompressed, the real Gemma tokenizer
tokenizes real text (the stdlib corpus, saeray's embedded default), documents are windowed and
batched, statistics (and rows) are computed and written to Parquet, units are committed. What is
replaced is the model's forward pass and the SAE encoder: a stand-in that gives each batch the time
an H100 would need for it, FLOPs of the real configuration on the batch's padded shape / (peak x
assumed MFU), on a simulated device timeline that behaves like a CUDA stream: launching is
asynchronous, and the host blocks only where the real path syncs: at the start of each forward pass
(transformers checks the attention mask on the host: everything queued must finish) and for a batch's
active-entry counts (an event recorded after that batch's encoder: the batch alone). The
stand-in's SAE codes are drawn from a fixed table indexed by token id (L0 = density x d_sae), so the
statistics, row sorting and Parquet writes do real work of the real size. On a GPU the statistics are
device kernels; here they run on the host's cores while the simulated device runs, so their CPU cost
counts against the host (conservative).

Reported per configuration: the fraction of wall time the simulated device is busy (from the first
batch to the last unit committed), tokens/s, and the CPU cores the worker used (process CPU time /
wall time), split into the model's thread (launching + statistics, which a GPU would do on device)
and the other threads (reading, tokenizing, batching, writing). Writes bench/simulate.json.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}

H100_SXM_BF16_DENSE = 989.4e12
"""NVIDIA's H100 SXM dense bf16 tensor-core peak, FLOP/s."""

GEMMA2_2B = dict(hidden_size=2304, intermediate_size=9216, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                 sliding_window=4096)
"""google/gemma-2-2b's shapes; the stand-in runs its layers 0-12 (GemmaScope's layer-12 residual SAEs)."""


def batch_flops(width: int, rows: int, selected: int, layers: int = 13, d_sae: int = 16384,
                dims: dict = GEMMA2_2B) -> float:
    """FLOPs a GPU spends on a [rows, width] batch through `layers` Gemma-2-2B layers plus the SAE encoder on
    `selected` positions: 2 x in x out per weight for every position (padding included: the GPU computes it),
    and causal attention scores and values (4 x heads x head_dim per attended key; Gemma 2's sliding
    window is 4096, wider than any window here)."""
    d, i, h, kv, hd = (dims[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                         "num_key_value_heads", "head_dim"))
    per_token = 2 * (d * h * hd + 2 * d * kv * hd + h * hd * d + 3 * d * i)
    keys = min(width, dims["sliding_window"])
    attended = rows * (keys * (keys + 1) // 2 + (width - keys) * keys)
    return layers * (per_token * rows * width + 4 * h * hd * attended) + 2 * d * d_sae * selected


def cpu_now() -> tuple[float, float]:
    """(this process's CPU seconds, the calling thread's CPU seconds)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime, time.thread_time()


class Device:
    """The simulated device: a thread that runs queued work in order, as a CUDA stream does.

    Each launch is (modeled seconds, work): the modeled seconds are what an H100 would take for the
    batch's forward pass and encoder; the work is what the GPU would also do with the result (fold the
    batch's statistics, keep its entries), computed for real on this machine's CPU inside the modeled
    time. Should the work take longer than the modeled time, the excess is counted as `stretched`, not busy.
    """

    def __init__(self, flops_per_s: float):
        self.flops_per_s = flops_per_s
        self.busy = 0.0
        self.stretched = 0.0
        self.first: float | None = None
        self.first_cpu: tuple[float, float] | None = None
        self.cpu = 0.0
        """CPU seconds of the device thread's work (what a GPU would do on the device)."""
        self.batches = 0
        self.last_done = 0.0
        self.gaps: list[tuple[float, float]] = []
        """(seconds since the first launch, idle seconds) for each time the device waited for work."""
        self._queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._run, name="simulated-device", daemon=True).start()

    def launch(self, flops: float, work: Any) -> threading.Event:
        """Queue a batch; returns at once, with an event set when it is done."""
        done = threading.Event()
        if self.first_cpu is None:  # (process, model thread) CPU seconds when the first batch is launched
            self.first_cpu = cpu_now()
        self._queue.put((flops / self.flops_per_s, work, done))
        return done

    def wait_idle(self) -> None:
        """Block until everything queued is done (a host sync on the stream, such as transformers'
        host-side check of the attention mask at the start of a forward pass)."""
        self._queue.join()

    def _run(self) -> None:
        while True:
            t_idle = time.perf_counter()
            dt, work, done = self._queue.get()
            start = time.perf_counter()
            if self.first is None:
                self.first = start
            elif start - t_idle > 1e-4:
                self.gaps.append((round(start - self.first, 3), round(start - t_idle, 4)))
            c0 = time.thread_time()
            work()
            self.cpu += time.thread_time() - c0
            left = start + dt - time.perf_counter()
            if left > 0:
                time.sleep(left)
            else:
                self.stretched -= left
            self.busy += dt
            self.batches += 1
            self.last_done = time.perf_counter()
            done.set()
            self._queue.task_done()


def simulated_extractor(base: type, device: Device, d_sae: int, l0: int, seed: int = 0) -> type:
    """A subclass of saeray's Extractor whose batches go to the simulated device instead of the model and SAE."""
    import torch

    g = torch.Generator().manual_seed(seed)
    table = 65536
    feats = torch.sort(torch.randint(0, d_sae, (table, l0), generator=g), dim=1).values
    vals = torch.empty(table, l0).exponential_(generator=g).float()

    class SimulatedExtractor(base):
        """The model and SAE replaced by the simulated device; the rest of saeray's Extractor as it is."""

        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            if kwargs.get("ahead") is None:
                self.ahead = 2  # as on a GPU (saeray's default there); the CPU default would be 0

        def _codes(self, batch: Any, grp: str) -> tuple[Any, Any, Any]:
            """The stand-in's active entries for a group's positions: L0 latents per token from the table."""
            n = len(batch.sel_row[grp])
            code = batch.input_ids[torch.from_numpy(batch.sel_row[grp]), torch.from_numpy(batch.sel_col[grp])] % table
            return torch.arange(n).repeat_interleave(l0), feats[code].reshape(-1), vals[code].reshape(-1)

        def _flops(self, batch: Any) -> float:
            rows, width = batch.input_ids.shape
            selected = sum(len(r) for r in batch.sel_row.values()) * len(self.saes)
            return batch_flops(width, rows, selected, d_sae=d_sae)

        # the Extractor since the pipeline: launch (queue on the device), then wait for it (the sync)
        def _launch(self, batch: Any, block: Any) -> Any:
            from saeray.engine.extract import _InFlight  # only the code since the pipeline calls _launch

            item = _InFlight(batch, block)
            self.forward_tokens += batch.n_tokens

            def work() -> None:
                for key in self._keys(batch):
                    self._fold(item, key, *self._codes(batch, key[1]))

            # the forward pass starts with a host sync in transformers (its attention-mask check): modeled
            # as waiting for everything queued; the batch's own entries are then read by its event alone
            device.wait_idle()
            item.done = device.launch(self._flops(batch), work)
            return item

        def _finish(self, item: Any) -> None:
            item.done.wait()
            item.block.left -= 1

        def _finished(self) -> list:
            """A finished block's per-document counts and row sorting are device kernels on a GPU: the
            simulated device runs them (for real, on this CPU; their time is stretch, not modeled); the host
            waits for them only when it needs the rows (the rows' copy to the host)."""
            out = []
            while self._blocks and self._blocks[0].left == 0:
                b = self._blocks.popleft()
                holder: dict = {}

                def work(b: Any = b, holder: dict = holder) -> None:
                    holder["rows"] = (self._collect(b) if hasattr(b, "counted")  # (the code before issue 16: 3 args)
                                      else self._collect(b.found, b.keep_rows, b.doc_ids))

                done = device.launch(0.0, work)
                if b.keep_rows:
                    done.wait()
                out.append((b.docs, holder["rows"] if b.keep_rows else {}))
            return out

        def drain(self) -> list:
            out = super().drain()
            device.wait_idle()  # the unit's statistics are read next: on a GPU their copy to the host syncs
            return out

        # the Extractor before it (bench --baseline-src): one call per batch, launch and wait together
        def _run_batch(self, batch: Any, found: dict) -> None:
            import numpy as np

            self.forward_tokens += batch.n_tokens

            def work() -> None:
                for h in self.saes:
                    for grp in self.groups:
                        if not len(batch.sel_row.get(grp, ())):
                            continue
                        r, f, v = self._codes(batch, grp)
                        doc = torch.from_numpy(batch.sel_doc[grp])[r]
                        pos = torch.from_numpy(batch.sel_pos[grp].astype(np.int64))[r]
                        self.stats[(h.name, grp)].add(len(batch.sel_row[grp]), f, v, doc, pos)
                        found[(h.name, grp)].append((doc, pos, f, v))

            device.launch(self._flops(batch), work).wait()

    return SimulatedExtractor


# ---- one configuration, in its own process --------------------------------------------------------------


def step(spec: dict) -> dict:
    """Run `saeray run --local` on the corpus with the simulated device; figures from the device and the markers."""
    import yaml

    from saeray import executors
    from saeray.engine import config, worker

    dev = Device(spec["peak"] * spec["mfu"])
    global LAST_DEVICE
    LAST_DEVICE = dev
    sae_cfg = json.loads((Path(spec["sae"]) / "cfg.json").read_text())
    d_sae = int(sae_cfg["d_sae"])
    sim = simulated_extractor(worker.Extractor, dev, d_sae, spec["l0"])
    worker.Extractor = sim  # the code before worker.extractor_class existed looks the class up here
    if hasattr(worker.ShardWorker, "extractor_class"):
        worker.ShardWorker.extractor_class = sim
    raw = yaml.safe_load(Path(spec["config"]).read_text())
    if spec.get("prefetch") is not None:
        raw["worker"] = {"prefetch_blocks": spec["prefetch"]}
    shutil.rmtree(raw["output"]["dir"], ignore_errors=True)  # a fresh run: every unit processed here
    cfg = config.from_dict(raw)
    end = {}
    committed = worker.RunDir.commit

    def commit(self: Any, *a: Any, **k: Any) -> Any:  # the end of the last unit's commit ends the measured span
        out = committed(self, *a, **k)
        end["t"], end["cpu"] = time.perf_counter(), cpu_now()
        return out

    worker.RunDir.commit = commit
    worker.default_threads = lambda: 1  # torch's own threads would hide the model thread's CPU time
    t0 = time.perf_counter()
    result = executors.run(cfg, executor="local", overwrite=True)
    wall_all = time.perf_counter() - t0
    if result.errors:
        raise RuntimeError(f"units failed: {result.errors}")
    span = end["t"] - dev.first
    cpu, main_cpu = (b - a for a, b in zip(dev.first_cpu, end["cpu"]))
    host = cpu - dev.cpu
    markers = [json.loads(p.read_text()) for p in Path(cfg.output.dir, "completions").glob("*.json")]
    tokens = sum(m["tokens"] for m in markers)
    forward = sum(m["forward_tokens"] for m in markers)
    idle = sum(g for _, g in dev.gaps) + max(0.0, end["t"] - dev.last_done)  # waits for work, and the tail
    return {"tokens": tokens, "forward_tokens": forward, "rows": sum(m["rows"] for m in markers),
            "units": len(markers), "batches": dev.batches, "span_s": span, "modeled_busy_s": dev.busy,
            "stretched_s": dev.stretched, "idle_s": idle,
            "busy_fraction": (dev.busy + dev.stretched) / span, "idle_fraction": idle / span,
            "stretched_fraction": dev.stretched / span, "modeled_fraction": dev.busy / span,
            "tokens_per_s": tokens / span, "modeled_device_tokens_per_s": tokens / dev.busy,
            "input_wait_s": sum(m.get("input_wait_s", 0.0) for m in markers),
            "process_cpu_s": cpu, "model_thread_cpu_s": main_cpu, "device_work_cpu_s": dev.cpu,
            "wall_with_setup_s": wall_all,
            "cores_host": host / span, "cores_model_thread": main_cpu / span,
            "cores_other_threads": (host - main_cpu) / span, "cores_device_work": dev.cpu / span,
            "host_cpu_s_per_device_s": host / dev.busy,
            "peak_rss_mb": max(m["peak_rss_mb"] for m in markers), "saeray_module": worker.__file__,
            "idle_gaps_over_50ms": [g for g in dev.gaps if g[1] > 0.05],
            "unit_seconds": sorted(round(m["seconds"], 2) for m in markers)}


# ---- inputs -----------------------------------------------------------------------------------------------


def write_corpus(out: Path, data: Path, docs: int | None, n_files: int) -> dict:
    """The corpus as the Pile stores it: train/NN.jsonl.zst, each one zstd frame of {"text", "meta"} lines."""
    import polars as pl
    import zstandard

    if not data.exists():
        from saeray.assets import corpus

        print(f"{data} does not exist: building the stdlib corpus there", flush=True)
        corpus.build(data)
    frame = pl.read_parquet(sorted(data.glob("*.parquet")), columns=["text", "kind"])
    if docs:
        frame = frame.sample(n=min(docs, len(frame)), seed=0, shuffle=True)
    else:
        frame = frame.sample(fraction=1.0, seed=0, shuffle=True)
    texts, kinds = frame["text"].to_list(), frame["kind"].to_list()
    (out / "train").mkdir(parents=True)
    per = -(-len(texts) // n_files)
    size = 0
    for f in range(n_files):
        lines = [json.dumps({"text": t, "meta": {"pile_set_name": k}}) for t, k in
                 zip(texts[f * per:(f + 1) * per], kinds[f * per:(f + 1) * per])]
        blob = zstandard.ZstdCompressor(level=3).compress(("\n".join(lines) + "\n").encode())
        (out / "train" / f"{f:02d}.jsonl.zst").write_bytes(blob)
        size += len(blob)
    return {"docs": len(texts), "files": n_files, "chars": sum(map(len, texts)), "stored_bytes": size}


def write_sae(path: Path, d_in: int, d_sae: int, hook: str) -> None:
    """A 16k JumpReLU SAE's shape for the worker to load (the stand-in never runs its weights: zeros)."""
    import torch
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae, metadata=SAEMetadata(
        hook_name=hook, prepend_bos=True, context_size=1024, model_name="gemma-3-270m")))
    with torch.no_grad():
        for p in sae.parameters():
            p.zero_()
    sae.save_model(path)


def child(spec: dict, work: Path, src: Path | None = None) -> dict:
    spec_file = work / f"spec-{time.time_ns()}.json"
    spec_file.write_text(json.dumps(spec))
    env = {**os.environ, **ENV}
    if src is not None:
        env["PYTHONPATH"] = f"{src}{os.pathsep}{env.get('PYTHONPATH', '')}"
        env["SAERAY_SIMULATE_SRC"] = str(src)
    done = subprocess.run([sys.executable, __file__, "--step", str(spec_file)], capture_output=True, text=True,
                          env=env, cwd=src or ROOT)
    if done.returncode:
        raise RuntimeError(f"simulated run failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(a: argparse.Namespace) -> dict:
    import yaml

    from saeray.engine import config as config_mod
    from saeray.engine import models

    work = Path(tempfile.mkdtemp(prefix="saeray-simulate-"))
    try:
        corpus = write_corpus(work / "pile", Path(a.data), a.docs, a.files)
        model_dir, _ = models.resolve_source(a.model)
        mcfg = models.load_config(config_mod.ModelConfig(name=model_dir))
        hook = f"blocks.{models.n_layers_of(mcfg) // 2}.hook_resid_post"  # any layer: the stand-in never runs it
        write_sae(work / "sae", models.d_model_of(mcfg), a.d_sae, hook)
        configs = {}
        for rows in ([False, True] if a.rows else [False]):
            tag = "rows" if rows else "stats"
            cfg = {"model": {"name": a.model, "dtype": "bfloat16"},
                   "saes": [{"name": "sae", "path": str(work / "sae")}],
                   "data": {"dataset": str(work / "pile"), "unit_bytes": int(a.unit_mb * (1 << 20))},
                   "tokens": {"context_size": 1024, "batch_tokens": a.batch_tokens},
                   "output": {"dir": str(work / f"run-{tag}"), "activations": rows}, "workers": 1}
            (work / f"{tag}.yaml").write_text(yaml.safe_dump(cfg))
            configs[tag] = str(work / f"{tag}.yaml")
        base = {"sae": str(work / "sae"), "peak": a.peak, "mfu": a.mfu, "l0": round(a.density * a.d_sae)}
        paths: list[tuple[str, dict, Path | None]] = []
        for tag, path in configs.items():
            if a.baseline_src:
                paths.append((f"{tag}: baseline code ({a.baseline_label})", {**base, "config": path},
                              Path(a.baseline_src)))
            paths.append((f"{tag}: serial (prefetch_blocks 0)", {**base, "config": path, "prefetch": 0}, None))
            paths.append((f"{tag}: prefetch (prefetch_blocks 2, default)", {**base, "config": path, "prefetch": 2}, None))
        results: dict[str, Any] = {}
        for r in range(a.rounds):  # every path once per round: a slow spell on the machine hits them alike
            for name, spec, src in paths:
                got = child(spec, work, src)
                prev = results.get(name)
                got["round_busy"] = (prev["round_busy"] if prev else []) + [round(got["busy_fraction"], 4)]
                if prev is None or got["busy_fraction"] > prev["busy_fraction"]:
                    results[name] = got
                else:
                    prev["round_busy"] = got["round_busy"]
                print(f"  [simulated H100] round {r + 1}/{a.rounds} {name}: busy {100 * got['busy_fraction']:.1f}% "
                      f"(idle {100 * got['idle_fraction']:.1f}%) "
                      f"{got['tokens_per_s']:,.0f} tok/s, {got['cores_host']:.2f} host cores", flush=True)
        report = {"SIMULATION": "the GPU is simulated: forward pass and SAE encoder replaced by a stand-in timed "
                                "as an H100 would be; all host work is real",
                  "device": {"peak_flops_per_s": a.peak, "assumed_mfu": a.mfu, "model": "Gemma-2-2B layers 0-12",
                             "d_sae": a.d_sae, "l0": base["l0"]},
                  "inputs": {**corpus, "tokenizer": a.model, "unit_bytes": int(a.unit_mb * (1 << 20)),
                             "batch_tokens": a.batch_tokens, "context_size": 1024, "rounds": a.rounds,
                             "host_cores": os.cpu_count()},
                  "paths": results}
        report["table"] = fmt(report)
        return report
    finally:
        shutil.rmtree(work, ignore_errors=True)


def fmt(report: dict) -> str:
    d, inp = report["device"], report["inputs"]
    lines = [f"SIMULATED GPU (not a real one): {d['model']} + a {d['d_sae']:,}-latent SAE (L0 {d['l0']}) on a simulated "
             f"H100 SXM at {100 * d['assumed_mfu']:.0f}% MFU of {d['peak_flops_per_s'] / 1e12:.1f} TFLOP/s; host work "
             f"real on {inp['host_cores']} cores: {inp['docs']:,} documents ({inp['chars'] / 1e6:.1f}M chars) in "
             f"{inp['files']} .jsonl.zst files, units of {inp['unit_bytes'] / (1 << 20):.1f} MiB, {inp['tokenizer']}'s "
             f"tokenizer, batches of {inp['batch_tokens']:,} tokens, context {inp['context_size']}",
             "",
             f"{'path':<46} {'busy':>6} {'idle':>6} {'stretch':>7} {'tok/s':>8} {'host cores':>10} {'model thr':>9} "
             f"{'others':>6} {'host/dev':>8} {'dev work':>8} {'RSS MB':>7}"]
    for name, r in report["paths"].items():
        lines.append(f"{name:<46} {100 * r['busy_fraction']:>5.1f}% {100 * r['idle_fraction']:>5.1f}% "
                     f"{100 * r['stretched_fraction']:>6.1f}% {r['tokens_per_s']:>8,.0f} {r['cores_host']:>10.2f} "
                     f"{r['cores_model_thread']:>9.2f} {r['cores_other_threads']:>6.2f} {r['host_cpu_s_per_device_s']:>8.2f} "
                     f"{r['cores_device_work']:>8.2f} {r['peak_rss_mb']:>7,.0f}")
    lines += [
        "busy: share of the wall time (first batch to last commit) the simulated device had work; idle: it waited",
        "for the host (between batches, and after the last); stretch: part of busy where the device's CPU stand-in",
        "for the GPU's own statistics kernels ran longer than the modeled H100 time (an artifact of simulating on",
        "this CPU; the rest of busy is modeled H100 time). host cores: host-side CPU time / wall time, split into the",
        "model thread (taking blocks, copies, launching, finishing blocks) and the others (reading, decompressing,",
        "tokenizing, batching, writing Parquet); host/dev: host CPU seconds per modeled device second = the cores a",
        "worker needs to keep the H100 fed; dev work: cores the stand-in's statistics took (a GPU's work)."]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gemma-3-270m", help="whose tokenizer reads the text (default: the Gemma tokenizer)")
    p.add_argument("--data", default=str(ROOT / "runs" / "corpus"), help="corpus of real text (parquet, text column)")
    p.add_argument("--docs", type=int, help="documents (default: all of the corpus)")
    p.add_argument("--files", type=int, default=1, help="files the corpus is split into (a unit never spans two)")
    p.add_argument("--unit-mb", type=float, default=64.0, help="data.unit_bytes in MiB (default 64, as saeray)")
    p.add_argument("--batch-tokens", type=int, default=16384, help="tokens.batch_tokens (a GPU's auto: 16384)")
    p.add_argument("--d-sae", type=int, default=16384)
    p.add_argument("--density", type=float, default=0.005, help="active fraction of latents per token (L0/d_sae)")
    p.add_argument("--peak", type=float, default=H100_SXM_BF16_DENSE)
    p.add_argument("--mfu", type=float, default=0.5)
    p.add_argument("--rows", action="store_true", help="also run with activation rows written")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--baseline-src", help="a checkout of an older saeray: run its code on the same inputs too")
    p.add_argument("--baseline-label", default="before the pipeline")
    p.add_argument("--json", default=str(ROOT / "bench" / "simulate.json"))
    p.add_argument("--step", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    os.environ.update(ENV)
    if a.step:
        print(json.dumps(step(json.loads(Path(a.step).read_text()))))
        return
    t0 = time.time()
    report = run(a)
    report["command"] = " ".join(["simulate.py", *(argv if argv is not None else sys.argv[1:])])
    report["total_s"] = round(time.time() - t0, 1)
    print(report["table"])
    text = json.dumps(report, indent=2)
    for path, name in (*(((a.baseline_src.rstrip("/"), "$BASELINE"),) if a.baseline_src else ()),
                       (f"{ROOT}/", ""), (tempfile.gettempdir(), "$TMP"), (str(Path.home()), "~")):
        text = text.replace(path, name)
    Path(a.json).write_text(text)
    print(f"\nwrote {a.json} ({report['total_s']:.0f}s in all)")


if __name__ == "__main__":
    if not os.environ.get("SAERAY_SIMULATE_SRC"):  # a baseline child imports the code it was pointed at
        sys.path.insert(0, str(ROOT))
    main()
