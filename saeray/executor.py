"""Run a plan's shards: in process (debugging, tests) or on a pool of Ray actors.

The Ray layer only moves shard indices to actors; actors write their own files. A shard
whose actor dies (node loss, OOM kill, preemption) is handed to a fresh actor; an
exception inside a shard is recorded and reported at the end, and other shards go on.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from .config import RunConfig
from .plan import Prepared, prepare
from .store import RunDir

log = logging.getLogger(__name__)

MAX_SHARD_ATTEMPTS = 3
"""A shard whose worker dies is retried up to this many attempts in all."""


class RunFailed(RuntimeError):
    """Some shards failed; the others are committed and a rerun retries only the failed ones."""


@dataclass
class RunResult:
    run_dir: str
    fingerprint: str
    n_shards: int
    skipped: list[int]
    done: dict[int, dict[str, Any]] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def tokens(self) -> int:
        return sum(s["tokens"] for s in self.done.values())


class Progress:
    """Logs shards done, tokens, tokens/s and ETA at most every `every` seconds."""

    def __init__(self, total: int, every: float = 10.0, sink: Callable[[str], None] | None = None):
        self.total, self.every, self.sink = total, every, sink or log.info
        self.t0 = self.last = time.time()
        self.shards = self.tokens = 0

    def update(self, summary: dict[str, Any] | None = None, force: bool = False) -> None:
        if summary:
            self.shards += 1
            self.tokens += summary["tokens"]
        now = time.time()
        if not force and now - self.last < self.every and self.shards < self.total:
            return
        self.last = now
        el = max(now - self.t0, 1e-9)
        eta = el / self.shards * (self.total - self.shards) if self.shards else float("nan")
        self.sink(f"shards {self.shards}/{self.total} | {self.tokens:,} tokens | "
                  f"{self.tokens / el:,.0f} tok/s | elapsed {el:,.0f}s | ETA {eta:,.0f}s")


def run(cfg: RunConfig, *, out: str | None = None, overwrite: bool = False, workers: int | str | None = None,
        executor: str = "ray", progress_every: float = 10.0,
        progress_sink: Callable[[str], None] | None = None) -> RunResult:
    """Extract a run: plan, prepare the run directory, process missing shards, report.

    executor: "ray" (actor pool; starts Ray in-process unless connected) or "local".
    Raises RunFailed after all shards were tried if any failed.
    """
    if out is not None:
        from dataclasses import replace
        cfg = replace(cfg, output=replace(cfg.output, dir=out))
    prepared = prepare(cfg)
    rd = RunDir(cfg.output.dir)
    rd.prepare(prepared.manifest(), overwrite)
    manifest = rd.read_manifest()
    committed = rd.committed()
    n = len(prepared.plan.shards)
    pending = [i for i in range(n) if i not in committed]
    if committed:
        log.info("%s: %d of %d shards already committed; processing the %d missing", rd.root, len(committed), n, len(pending))
    result = RunResult(str(rd.root), prepared.fingerprint, n, sorted(committed))
    t0 = time.time()
    prog = Progress(len(pending), progress_every, progress_sink)
    if pending:
        n_workers = workers if workers is not None else cfg.workers
        if executor == "local":
            _run_local(manifest, str(rd.root), pending, result, prog)
        elif executor == "ray":
            _run_ray(manifest, str(rd.root), pending, result, prog, n_workers)
        else:
            raise ValueError(f"unknown executor {executor!r}: use 'ray' or 'local'")
    prog.update(force=True)
    result.seconds = time.time() - t0
    rd.clean_tmp()
    if result.errors:
        lines = "\n".join(f"  shard {i}: {e}" for i, e in sorted(result.errors.items()))
        raise RunFailed(f"{len(result.errors)} of {n} shards failed (the other shards are committed; "
                        f"rerun the same command to retry only these):\n{lines}")
    return result


def _run_local(manifest: dict, run_dir: str, pending: list[int], result: RunResult, prog: Progress) -> None:
    from .worker import ShardWorker

    worker = ShardWorker(manifest, run_dir)
    for i in pending:
        try:
            result.done[i] = worker.process(i)
            prog.update(result.done[i])
        except Exception as e:  # one bad shard must not stop the others
            log.exception("shard %d failed", i)
            result.errors[i] = f"{type(e).__name__}: {e}"


def _resources(n_workers: int | str | None) -> tuple[int, dict[str, Any]]:
    """(number of actors, actor resource options). Threads are sized inside each actor."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    gpus = int(sum(r.get("GPU", 0) for r in nodes))
    biggest = max([int(r.get("CPU", 0)) for r in nodes] or [1]) or 1
    total = int(sum(r.get("CPU", 0) for r in nodes)) or 1
    if n_workers in (None, "auto"):
        n = gpus if gpus else 1
        if not gpus:
            log.warning("no GPUs in the Ray cluster: running 1 CPU worker (GPU nodes that join later are not used)")
    else:
        n = int(n_workers)
    if gpus:
        return n, {"num_gpus": 1, "num_cpus": 1}
    # Whole CPUs per actor, never more than one node has; fractions when actors outnumber CPUs.
    per = min(biggest, total // n) if n <= total else total / n
    return n, {"num_cpus": per}


def _run_ray(manifest: dict, run_dir: str, pending: list[int], result: RunResult, prog: Progress,
             n_workers: int | str | None) -> None:
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    from .worker import ShardWorker

    if not ray.is_initialized():
        ray.init(log_to_driver=True, runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    n, options = _resources(n_workers)
    n = min(n, len(pending))
    Actor = ray.remote(ShardWorker).options(max_restarts=0, max_task_retries=0, **options)
    rd = RunDir(run_dir)

    def spawn() -> Any:
        return Actor.remote(manifest, run_dir)

    idle = [spawn() for _ in range(n)]
    queue = deque(pending)
    attempts: dict[int, int] = {}
    inflight: dict[Any, tuple[Any, int]] = {}
    while queue or inflight:
        while queue and idle:
            actor, shard = idle.pop(), queue.popleft()
            attempts[shard] = attempts.get(shard, 0) + 1
            inflight[actor.process.remote(shard)] = (actor, shard)
        ready, _ = ray.wait(list(inflight), num_returns=1, timeout=prog.every)
        prog.update()
        for ref in ready:
            actor, shard = inflight.pop(ref)
            try:
                result.done[shard] = ray.get(ref)
                prog.update(result.done[shard])
                idle.append(actor)
            except RayTaskError as e:  # the shard itself raised: record, keep the actor
                cause = e.cause if getattr(e, "cause", None) is not None else e
                log.error("shard %d failed: %s", shard, cause)
                result.errors[shard] = f"{type(cause).__name__}: {cause}"
                idle.append(actor)
            except RayActorError as e:  # the worker process or its node died
                ray.kill(actor, no_restart=True)
                if shard in rd.committed():  # it died after its commit point
                    result.done[shard] = rd.completion(shard)
                    prog.update(result.done[shard])
                elif attempts[shard] < MAX_SHARD_ATTEMPTS:
                    log.warning("worker died on shard %d (attempt %d/%d); retrying on a new worker: %s",
                                shard, attempts[shard], MAX_SHARD_ATTEMPTS, str(e).splitlines()[0])
                    queue.appendleft(shard)
                else:
                    result.errors[shard] = f"worker died {attempts[shard]} times: {str(e).splitlines()[0]}"
                idle.append(spawn())
    for actor in idle:
        ray.kill(actor, no_restart=True)


__all__ = ["run", "RunResult", "RunFailed", "prepare", "Prepared"]
