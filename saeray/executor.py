"""Run a plan's shards: in process (debugging, tests) or on a pool of Ray actors.

The Ray layer only moves shard indices to actors; actors write their own files. A shard
whose actor dies (node loss, OOM kill, preemption) or hangs past `shard_timeout_s` is
handed to a fresh actor, up to MAX_SHARD_ATTEMPTS attempts; an exception inside a shard is
recorded and reported at the end, and other shards go on. What decides whether a shard is
done is its completion marker (see store.py), never the fate of the process that wrote it.
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
"""A shard whose worker dies or hangs is tried up to this many times in all."""


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
            _run_ray(manifest, str(rd.root), pending, result, prog, n_workers, cfg.shard_timeout_s)
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


class ShardClock:
    """When a running shard counts as hung: a fixed limit, or one learned from finished shards.

    Adaptive (limit None): 10x the slowest finished shard's seconds per document times the
    shard's documents, at least `floor_s`; no limit until a shard has finished.
    """

    FACTOR = 10.0

    def __init__(self, limit_s: float | None, docs: dict[int, int], floor_s: float = 600.0):
        self.limit_s, self.docs, self.floor_s = limit_s, docs, floor_s
        self.per_doc: float | None = None

    def finished(self, summary: dict[str, Any]) -> None:
        if summary.get("seconds") is not None and summary.get("docs"):
            rate = float(summary["seconds"]) / summary["docs"]
            self.per_doc = max(self.per_doc or 0.0, rate)

    def limit(self, shard: int) -> float | None:
        if self.limit_s is not None:
            return self.limit_s
        if self.per_doc is None:
            return None
        return max(self.floor_s, self.FACTOR * self.per_doc * max(1, self.docs.get(shard, 1)))


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _run_ray(manifest: dict, run_dir: str, pending: list[int], result: RunResult, prog: Progress,
             n_workers: int | str | None, shard_timeout_s: float | None = None,
             max_attempts: int = MAX_SHARD_ATTEMPTS) -> None:
    """Schedule shards onto a pool of actors until each is committed or has used up its attempts.

    An actor takes a shard only once it has started (model and SAEs loaded), so the shard
    timeout measures the shard alone. A shard whose actor dies (killed, OOM, node lost) or
    runs past its time limit goes to a fresh actor; an exception inside a shard is recorded.
    """
    import ray
    from ray.exceptions import RayError, RayTaskError

    from .worker import ShardWorker

    if not ray.is_initialized():
        # A local Ray starts without its dashboard (its processes take ~2% of a 2-core machine's
        # throughput, bench/throughput.py); SAERAY_RAY_DASHBOARD=1 keeps it. Joining a running
        # cluster (RAY_ADDRESS, `ray job submit`) starts nothing either way.
        ray.init(log_to_driver=True, runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}},
                 include_dashboard=os.environ.get("SAERAY_RAY_DASHBOARD") == "1")
    n, options = _resources(n_workers)
    n = min(n, len(pending))
    Actor = ray.remote(ShardWorker).options(max_restarts=0, max_task_retries=0, **options)
    rd = RunDir(run_dir)
    clock = ShardClock(shard_timeout_s, {s["index"]: s["end"] - s["start"] for s in manifest["plan"]["shards"]})

    starting: dict[Any, Any] = {}  # ready ref -> actor still loading its model
    start_failures = 0  # consecutive actors that died before they were ready
    last_start_error = ""

    def spawn() -> None:
        actor = Actor.remote(manifest, run_dir)
        starting[actor.__ray_ready__.remote()] = actor

    def retire(actor: Any) -> None:
        try:
            ray.kill(actor, no_restart=True)
        except RayError:  # already gone with its node
            pass

    def lost(shard: int, why: str) -> None:
        """The shard's attempt ended without a result: keep a commit it made, else retry or give up."""
        if shard in rd.committed():  # it got past its commit point before it was lost
            result.done[shard] = rd.completion(shard)
            prog.update(result.done[shard])
        elif attempts[shard] < max_attempts:
            log.warning("shard %d: %s (attempt %d/%d); retrying on a new worker", shard, why, attempts[shard], max_attempts)
            queue.appendleft(shard)
        else:
            result.errors[shard] = f"{why} on each of {attempts[shard]} attempts"
        spawn()

    for _ in range(n):
        spawn()
    idle: list[Any] = []
    queue = deque(pending)
    attempts: dict[int, int] = {}
    inflight: dict[Any, tuple[Any, int, float]] = {}  # task ref -> (actor, shard, started at)
    while queue or inflight:
        while queue and idle:
            actor, shard = idle.pop(), queue.popleft()
            attempts[shard] = attempts.get(shard, 0) + 1
            inflight[actor.process.remote(shard)] = (actor, shard, time.time())
        if queue and not (idle or inflight or starting):  # no worker could be started
            for shard in queue:
                result.errors[shard] = f"no worker could start ({start_failures} tried): {last_start_error}"
            break
        now = time.time()
        deadlines = [t0 + lim for _, s, t0 in inflight.values() if (lim := clock.limit(s)) is not None]
        wait = min([prog.every, *(d - now for d in deadlines)])
        ready, _ = ray.wait([*inflight, *starting], num_returns=1, timeout=max(0.05, wait))
        prog.update()
        for ref in ready:
            if ref in starting:
                actor = starting.pop(ref)
                try:
                    ray.get(ref)
                    idle.append(actor)
                    start_failures = 0
                except RayError as e:  # the constructor raised, or the actor's node went away
                    retire(actor)
                    start_failures += 1
                    last_start_error = _first_line(e)
                    log.error("a worker failed to start (%d in a row): %s", start_failures, last_start_error)
                    if start_failures < max_attempts:
                        spawn()
                continue
            actor, shard, _ = inflight.pop(ref)
            try:
                result.done[shard] = ray.get(ref)
                clock.finished(result.done[shard])
                prog.update(result.done[shard])
                idle.append(actor)
            except RayTaskError as e:  # the shard itself raised: record, keep the actor
                cause = e.cause if getattr(e, "cause", None) is not None else e
                if shard in rd.committed():
                    result.done[shard] = rd.completion(shard)
                else:
                    log.error("shard %d failed: %s", shard, cause)
                    result.errors[shard] = f"{type(cause).__name__}: {cause}"
                idle.append(actor)
            except RayError as e:  # the worker process or its node died
                retire(actor)
                lost(shard, f"worker died ({_first_line(e)})")
        now = time.time()
        for ref, (actor, shard, t0) in list(inflight.items()):
            lim = clock.limit(shard)
            if lim is not None and now - t0 > lim:
                del inflight[ref]
                retire(actor)
                lost(shard, f"timed out after {lim:,.0f}s (shard_timeout_s)")
    for actor in [*idle, *starting.values(), *(a for a, _, _ in inflight.values())]:
        retire(actor)


__all__ = ["run", "RunResult", "RunFailed", "prepare", "Prepared"]
