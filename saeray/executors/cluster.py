"""What the pool asks of the Ray cluster: how many workers, what each reserves, and what is free now."""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

log = logging.getLogger(__name__)

GPU_WORKER_CPUS = 2
"""CPUs a GPU worker needs to keep an H100 busy on Gemma-2-2B: 0.4 CPU-seconds per GPU-second measured by
bench/simulate.py (reading, tokenizing, batching, writing), with headroom."""


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def worker_resources(nodes: list[dict[str, Any]], n_workers: int | str | None, cpus: float | str = "auto",
                     max_workers: int | None = None) -> tuple[int, dict[str, Any]]:
    """(number of actors, actor resource options) for the alive nodes' resources (`ray.nodes()[i]["Resources"]`).
    Threads are sized inside each actor.

    A GPU actor reserves `cpus` (worker.cpus) for its reading, tokenizing and batching threads; auto: the
    node's CPUs per GPU on the GPU node that has the fewest, so every GPU's actor can be placed.
    `workers: auto` with `max_workers`: that many GPU actors, whatever is alive now; those no node can take
    wait to be placed, which is the demand an autoscaler adds GPU nodes for."""
    gpus = int(sum(r.get("GPU", 0) for r in nodes))
    biggest = max([int(r.get("CPU", 0)) for r in nodes] or [1]) or 1
    total = int(sum(r.get("CPU", 0) for r in nodes)) or 1
    scaling = n_workers in (None, "auto") and max_workers is not None
    if scaling:
        n = int(max_workers)  # type: ignore[arg-type]
        log.info("workers: auto, max_workers %d: asking for %d GPU workers (%d GPUs alive now)", n, n, gpus)
    elif n_workers in (None, "auto"):
        n = gpus if gpus else 1
        if not gpus:  # the usual laptop or CPU machine: nothing to warn about
            log.debug("no GPUs in the Ray cluster: running 1 CPU worker (GPU nodes that join later are not used; "
                      "set max_workers to ask an autoscaler for GPU nodes)")
    else:
        n = int(n_workers)
    if gpus or scaling:
        if cpus == "auto":
            per_gpu = [int(r.get("CPU", 0)) // int(r["GPU"]) for r in nodes if r.get("GPU", 0) >= 1]
            cpus = max(1, min(per_gpu or [GPU_WORKER_CPUS]))
            if cpus < GPU_WORKER_CPUS:
                log.warning("GPU nodes have %d CPU(s) per GPU: a worker keeps an H100 fed on Gemma-2-2B with about "
                            "%d (0.4 CPU-s per GPU-s, bench/simulate.py), more on smaller models; the GPUs may wait "
                            "for their CPUs", cpus, GPU_WORKER_CPUS)
        return n, {"num_gpus": 1, "num_cpus": cpus}
    # Whole CPUs per actor, never more than one node has; fractions when actors outnumber CPUs.
    per = min(biggest, total // n) if n <= total else total / n
    return n, {"num_cpus": per}


def describe(options: dict[str, Any]) -> str:
    """Actor options as resources: '1 GPU, 2 CPU'."""
    parts = [f"{options['num_gpus']:g} GPU"] if options.get("num_gpus") else []
    return ", ".join([*parts, f"{options.get('num_cpus', 1):g} CPU"])


class Capacity:
    """The cluster's resources, free and total, asked at most every `every` seconds (for the progress line)."""

    def __init__(self, ray: Any, every: float = 10.0):
        self.ray, self.every, self.at, self.text = ray, every, 0.0, "unknown"
        self.free: dict[str, float] | None = None

    def describe(self) -> str:
        now = time.time()
        if now - self.at >= self.every:
            self.at = now
            try:
                total, free = self.ray.cluster_resources(), self.ray.available_resources()
                self.free = dict(free)
                self.text = ", ".join(f"{free.get(k, 0):g}/{total[k]:g} {k}" for k in ("GPU", "CPU") if k in total)
                self.text = self.text or "no GPU or CPU"
            except Exception as e:  # noqa: BLE001 - the cluster itself may be what went away
                self.text, self.free = f"unknown ({first_line(e)})", None
        return self.text

    def lacks(self, options: dict[str, Any]) -> bool:
        """Whether no node could take an actor with these options now, as far as the free resources (asked by
        `describe`) tell; True when they are unknown."""
        if self.free is None:
            return True
        return (self.free.get("GPU", 0) < (options.get("num_gpus") or 0)
                or self.free.get("CPU", 0) < (options.get("num_cpus") or 0))


def quiet_ray() -> None:
    """Before ray.init: no colour codes around the workers' forwarded lines unless both outputs are terminals
    (RAY_COLOR_PREFIX, if set, wins), and no notice that token authentication is on (it stays on: the local
    cluster's token is in ~/.ray/auth_token) unless --verbose."""
    if not (sys.stdout.isatty() and sys.stderr.isatty()):
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    if not log.isEnabledFor(logging.DEBUG):
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
