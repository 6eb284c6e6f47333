"""What this process runs on and how it sizes itself: the device, torch and tokenizer threads, malloc arenas,
and peak memory."""

from __future__ import annotations

import ctypes
import os
import resource
from pathlib import Path
from typing import Callable

import torch


def pick_device() -> torch.device:
    """The GPU when there is one, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def free_device_bytes(device: torch.device, report: Callable[[torch.device], tuple[int, int, int]] | None = None
                      ) -> int:
    """Bytes a GPU can still give this process: the driver's free memory plus what PyTorch's caching allocator
    holds reserved but unallocated (the driver counts that as used; a later tensor takes it first). `report`:
    (driver free, reserved, allocated) of the device; None: torch.cuda's (`cuda_memory_report`)."""
    free, reserved, allocated = (report or cuda_memory_report)(device)
    return free + max(reserved - allocated, 0)


def cuda_memory_report(device: torch.device) -> tuple[int, int, int]:
    """(driver free bytes, bytes reserved by PyTorch's caching allocator, bytes allocated in tensors)."""
    return (torch.cuda.mem_get_info(device)[0], torch.cuda.memory_reserved(device),
            torch.cuda.memory_allocated(device))


def bound_malloc() -> None:
    """Keep glibc from fragmenting memory across threads' arenas (RSS would creep up shard after
    shard): at most 2 arenas. Tensor buffers come from the heap and are reused, never mmapped
    and unmapped per tensor: fresh pages fault on first touch, and on CPU those faults cost
    more than the elementwise ops that touch them (bench/throughput.py measured sys time at a
    third of the worker's CPU time). Batch shapes are bucketed, so the heap stops growing."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return
    m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8
    libc.mallopt(m_arena_max, 2)
    libc.mallopt(m_mmap_threshold, 1 << 30)
    libc.mallopt(m_trim_threshold, 1 << 30)


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM; ru_maxrss can carry a parent's peak across exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _assigned_cpus() -> float | None:
    """The CPUs Ray reserved for this actor, None outside a Ray actor."""
    try:
        import ray

        if ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE:
            return float(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))
    except ImportError:
        pass
    return None


def default_threads() -> int:
    """Torch threads: the CPUs Ray gave this actor (GPU actors: the node's CPUs per GPU), else all."""
    cpus = os.cpu_count() or 1
    assigned = _assigned_cpus()
    if assigned is not None:
        if torch.cuda.is_available():
            return max(1, cpus // max(1, torch.cuda.device_count()))
        return max(1, int(assigned))
    return cpus


def tokenizer_threads(setting: int | str, device: torch.device) -> int:
    """worker.tokenizer_threads resolved: auto is a GPU worker's CPUs but one (the model's thread keeps
    one), and 1 on CPU, where the model needs every core and tokenizing is <1% of its time."""
    if setting != "auto":
        return int(setting)
    if device.type != "cuda":
        return 1
    assigned = _assigned_cpus()
    cpus = assigned if assigned is not None else (os.cpu_count() or 1) / max(1, torch.cuda.device_count())
    return max(1, int(cpus) - 1)
