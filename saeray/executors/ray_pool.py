"""The Ray actor pool: workers (one per GPU, or CPU slots), a reader per line file being read, and the
loop that gives each free worker its next call.

Workers take a unit only once they have started (model and SAEs loaded), so the unit timeout
measures the unit alone. Calls: `process(task, payload, prefix)`; under a token budget first
`count(task, payload)`, then `process` once the ledger knows the tokens before the unit (the
counting worker keeps the unit's documents, so it usually processes it too). Readers send each
unit's bytes through the object store; the driver holds the reference until the unit commits, so a
unit retried on another worker needs no second read. At most `workers + 1` units wait read ahead.
"""

from __future__ import annotations

import heapq
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from ..engine.config import RunConfig
from ..engine.store import RunDir
from ..engine.units import UNITS_PER_FILE, DataPlan, Task
from . import signals
from .driver import Progress, RunResult, ledger_for, unit_stream

log = logging.getLogger(__name__)

HELD_UNITS = 2
"""Counted units a worker may hold (their documents in memory) before it must process one."""


@dataclass
class UnitState:
    task: Task
    payload: Any = None
    """ObjectRef of the unit's bytes (line files), None for Parquet units."""
    status: str = "new"
    """new | counting | counted | processing | done | failed | beyond"""
    tokens: int | None = None
    holder: Any = None
    """The actor holding the unit's tokenized documents (after count)."""
    attempts: int = 0


class UnitClock:
    """When a running unit counts as hung: a fixed limit, or one learned from finished units.

    Adaptive (limit None): 10x the slowest finished unit's seconds per document times the unit's
    documents, at least `floor_s`; no limit until a unit has finished.
    """

    FACTOR = 10.0

    def __init__(self, limit_s: float | None, floor_s: float = 600.0):
        self.limit_s, self.floor_s = limit_s, floor_s
        self.per_doc: float | None = None

    def finished(self, summary: dict[str, Any]) -> None:
        if summary.get("seconds") is not None and summary.get("docs"):
            self.per_doc = max(self.per_doc or 0.0, float(summary["seconds"]) / summary["docs"])

    def limit(self, docs: int) -> float | None:
        if self.limit_s is not None:
            return self.limit_s
        if self.per_doc is None:
            return None
        return max(self.floor_s, self.FACTOR * self.per_doc * max(1, docs))


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


GPU_WORKER_CPUS = 2
"""CPUs a GPU worker needs to keep an H100 busy on Gemma-2-2B: 0.4 CPU-seconds per GPU-second measured by
bench/simulate.py (reading, tokenizing, batching, writing), with headroom."""


def _resources(n_workers: int | str | None, cpus: float | str = "auto", max_workers: int | None = None
               ) -> tuple[int, dict[str, Any]]:
    """(number of actors, actor resource options). Threads are sized inside each actor.

    A GPU actor reserves `cpus` (worker.cpus) for its reading, tokenizing and batching threads; auto: the
    node's CPUs per GPU on the GPU node that has the fewest, so every GPU's actor can be placed.
    `workers: auto` with `max_workers`: that many GPU actors, whatever is alive now; those no node can take
    wait to be placed, which is the demand an autoscaler adds GPU nodes for."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    gpus = int(sum(r.get("GPU", 0) for r in nodes))
    biggest = max([int(r.get("CPU", 0)) for r in nodes] or [1]) or 1
    total = int(sum(r.get("CPU", 0) for r in nodes)) or 1
    scaling = n_workers in (None, "auto") and max_workers is not None
    if scaling:
        n = int(max_workers)  # type: ignore[arg-type]
        log.info("workers: auto, max_workers %d: asking for %d GPU workers (%d GPUs alive now)", n, n, gpus)
    elif n_workers in (None, "auto"):
        n = gpus if gpus else 1
        if not gpus:
            log.warning("no GPUs in the Ray cluster: running 1 CPU worker (GPU nodes that join later are not used; "
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


def _describe(options: dict[str, Any]) -> str:
    """Actor options as resources: '1 GPU, 2 CPU'."""
    parts = [f"{options['num_gpus']:g} GPU"] if options.get("num_gpus") else []
    return ", ".join([*parts, f"{options.get('num_cpus', 1):g} CPU"])


class Capacity:
    """The cluster's resources, free and total, asked at most every `every` seconds (for the progress line)."""

    def __init__(self, ray: Any, every: float = 10.0):
        self.ray, self.every, self.at, self.text = ray, every, 0.0, "unknown"

    def describe(self) -> str:
        now = time.time()
        if now - self.at >= self.every:
            self.at = now
            try:
                total, free = self.ray.cluster_resources(), self.ray.available_resources()
                self.text = ", ".join(f"{free.get(k, 0):g}/{total[k]:g} {k}" for k in ("GPU", "CPU") if k in total)
                self.text = self.text or "no GPU or CPU"
            except Exception as e:  # noqa: BLE001 - the cluster itself may be what went away
                self.text = f"unknown ({_first_line(e)})"
        return self.text


class FileReader:
    """Streams one line file and returns its units one by one (a Ray actor; no CPU reserved: it mostly waits)."""

    def __init__(self, plan: dict[str, Any], file: int, skip: list[int]):
        self.stream = unit_stream(DataPlan.from_dict(plan), file, set(skip))

    def next(self) -> tuple[dict[str, Any] | None, bytes | None]:
        """(the next unit's task with `read_bytes`: stored bytes read for it, its bytes); (None, None) at the end."""
        from ..engine.storage import READ

        b0 = READ.bytes
        for task, data in self.stream:
            return {**task.to_dict(), "read_bytes": READ.bytes - b0}, data
        return None, None


class Pool:
    def __init__(self, manifest: dict, run_dir: str, plan: DataPlan, cfg: RunConfig, markers: dict[int, dict],
                 result: RunResult, prog: Progress, n_workers: int | str | None, max_attempts: int):
        import ray

        from ..engine.storage import forwarded_env
        from .actor import make_worker_class

        self.ray = ray
        self.manifest, self.run_dir, self.plan, self.result, self.prog = manifest, run_dir, plan, result, prog
        self.markers, self.max_attempts = markers, max_attempts
        self.rd = RunDir(run_dir)
        self.budget = cfg.data.max_tokens
        self.ledger = ledger_for(plan, self.budget) if self.budget is not None else None
        if self.ledger:
            for uid, m in markers.items():
                self.ledger.counted(uid, m.get("tokens", 0))
        self.units: dict[int, UnitState] = {}
        self.queue: list[int] = []  # heap of the uids of new units
        self.counted: dict[int, UnitState] = {}
        self.open: set[int] = set()  # uids not yet done, failed or beyond
        for t in plan.units:
            if t.uid not in markers:
                self.add(UnitState(t))
        n, options = _resources(n_workers, cfg.worker.cpus, cfg.max_workers)
        if not plan.streamed:
            n = min(n, max(1, len(self.units)))
        self.n_workers, self.wanted = n, options
        self.Actor = ray.remote(make_worker_class()).options(max_restarts=0, max_task_retries=0, **options)
        self.env = forwarded_env()
        if self.env:
            log.info("forwarding %s from this environment to the workers", ", ".join(self.env))
        self.probe = self.rd.write_probe()  # each worker checks it sees this file before it loads anything
        self.Reader = ray.remote(FileReader).options(num_cpus=0, max_restarts=0)
        self.clock = UnitClock(cfg.shard_timeout_s)
        self.next_file = 0 if plan.streamed else len(plan.files)
        self.readers: dict[int, Any] = {}  # file -> reader actor
        self.reads: dict[Any, tuple[int, Any]] = {}  # meta ref -> (file, payload ref)
        self.read_units: dict[int, int] = {}  # file -> units its reader returned so far
        self.max_readers = 1 if self.budget is not None else max(1, min(4, n))
        self.stop_reading = False
        self.placing: dict[Any, Any] = {}  # __ray_ready__ ref -> actor: waiting for a node with its resources
        self.starting: dict[Any, Any] = {}  # start() ref -> actor: placed, loading the model and SAEs
        self.start_timeout = cfg.worker_start_timeout_s
        self.waiting_since: float | None = None
        """Since when no worker has been running or loading while some wait to be placed."""
        self.capacity = Capacity(ray)
        self.hosts: set[str] = set()
        self.idle: list[Any] = []
        self.inflight: dict[Any, tuple[Any, int, str, float]] = {}  # ref -> (actor, uid, call, started)
        self.start_failures = 0
        self.last_start_error = ""

    # ---- unit states -------------------------------------------------------------------------
    def add(self, st: UnitState) -> None:
        self.units[st.task.uid] = st
        self.set(st, "new")

    def set(self, st: UnitState, status: str) -> None:
        """Move a unit to `status`, keeping the queue of new units, the counted units and the open set."""
        uid = st.task.uid
        st.status = status
        if status == "new":
            heapq.heappush(self.queue, uid)
        if status == "counted":
            self.counted[uid] = st
        else:
            self.counted.pop(uid, None)
        if status in ("done", "failed", "beyond"):
            self.open.discard(uid)
            st.payload, st.holder = None, None
        else:
            self.open.add(uid)

    def earliest_new(self) -> UnitState | None:
        while self.queue and self.units[self.queue[0]].status != "new":
            heapq.heappop(self.queue)
        return self.units[self.queue[0]] if self.queue else None

    # ---- actors ------------------------------------------------------------------------------
    def spawn(self) -> None:
        actor = self.Actor.remote(self.manifest, self.run_dir, self.probe, self.env)
        self.placing[actor.__ray_ready__.remote()] = actor

    def retire(self, actor: Any) -> None:
        from ray.exceptions import RayError

        try:
            self.ray.kill(actor, no_restart=True)
        except RayError:  # already gone with its node
            pass

    # ---- reading -------------------------------------------------------------------------------
    def _waiting(self) -> int:
        return sum(1 for u in self.open if self.units[u].status in ("new", "counting", "counted"))

    def _enough_read(self) -> bool:
        """Under a budget: the units read so far likely hold it (tokens per byte of the counted units)."""
        if self.ledger is None:
            return False
        if self.ledger.reached():
            return True
        counted = [(n, self.units[u].task.n_bytes) for u, n in self.ledger.counts.items() if u in self.units]
        if not counted or not sum(b for _, b in counted):
            return False
        per_byte = sum(n for n, _ in counted) / sum(b for _, b in counted)
        pending = sum(self.units[u].task.n_bytes for u in self.open if self.units[u].tokens is None)
        return self.ledger.counted_tokens() + pending * per_byte >= 1.05 * self.budget

    def top_up_reads(self) -> None:
        if not self.plan.streamed or self.stop_reading:
            return
        while self._waiting() + len(self.reads) < self.n_workers + 1 and not self._enough_read():
            busy = {f for f, _ in self.reads.values()}
            free = [f for f in self.readers if f not in busy]
            if not free:
                if len(self.readers) >= self.max_readers or self.next_file >= len(self.plan.files):
                    return
                f = self.next_file
                self.next_file += 1
                skip = [u for u in self.markers if u // UNITS_PER_FILE == f]
                self.readers[f] = self.Reader.remote(self.plan.to_dict(), f, skip)
                self.read_units[f] = 0
                free = [f]
            f = free[0]
            meta, payload = self.readers[f].next.options(num_returns=2).remote()
            self.reads[meta] = (f, payload)

    def end_reading(self) -> None:
        self.stop_reading = True
        for actor in self.readers.values():
            self.retire(actor)
        self.readers.clear()
        self.reads.clear()

    def on_read(self, ref: Any) -> None:
        from ray.exceptions import RayError

        f, payload = self.reads.pop(ref)
        try:
            meta = self.ray.get(ref)
        except RayError as e:
            cause = getattr(e, "cause", None) or e
            uid = f * UNITS_PER_FILE + self.read_units.get(f, 0)
            self.result.errors[uid] = f"reading {self.plan.files[f].url}: {type(cause).__name__}: {cause}"
            self.retire(self.readers.pop(f))
            if self.ledger is not None:  # later units' share of the budget cannot be known
                self.fail_undecided(f"reading stopped at {self.plan.files[f].url}")
            return
        if meta is None:  # the file is read to its end
            self.retire(self.readers.pop(f))
            if self.ledger is not None:
                self.ledger.file_complete(f, self.read_units[f])
            return
        self.read_units[f] += 1
        self.result.bytes_read += meta.pop("read_bytes", 0)
        task = Task(**meta)
        if task.uid not in self.markers:
            self.add(UnitState(task, payload))

    # ---- dispatch ------------------------------------------------------------------------------
    def _decided(self, st: UnitState) -> int | None:
        """The unit's prefix if known and inside the budget; marks it beyond when past it."""
        p = self.ledger.prefix(st.task.uid)
        if p is not None and p >= self.budget:
            self._beyond(st)
            return None
        return p

    def _beyond(self, st: UnitState) -> None:
        if st.tokens is not None or st.payload is not None:  # work done in vain: read or counted
            self.result.beyond_budget += 1
        self.set(st, "beyond")

    def next_call(self, actor: Any) -> tuple[str, UnitState, int | None] | None:
        """What a free worker does next: process the earliest new unit (no budget); under a budget,
        process a counted unit whose share is known (its own first), else count the earliest new unit."""
        new = self.earliest_new()
        if self.ledger is None:
            return ("process", new, None) if new else None
        while new is not None and self.ledger.beyond(new.task.uid):  # read before the budget's end was known
            self._beyond(new)
            new = self.earliest_new()
        counted = sorted(self.counted.values(), key=lambda s: s.task.uid)
        for mine in (True, False):  # its own counted units first (documents in memory), then orphans
            for s in counted:
                if s.status == "counted" and ((s.holder == actor) if mine else s.holder is None):
                    p = self._decided(s)
                    if p is not None:
                        return "process", s, p
        if new is None:
            return None
        undecided = [s.task.uid for s in self.counted.values()]
        held = sum(1 for s in self.counted.values() if s.holder == actor)
        if held < HELD_UNITS or all(new.task.uid < u for u in undecided):
            return "count", new, None
        return None

    def dispatch(self) -> None:
        waiting = []
        while self.idle:
            actor = self.idle.pop()
            call = self.next_call(actor)
            if call is None:
                waiting.append(actor)
                continue
            kind, st, prefix = call
            st.attempts += 1
            if kind == "count":
                self.set(st, "counting")
                ref = actor.count.remote(st.task.to_dict(), st.payload)
            else:
                self.set(st, "processing")
                ref = actor.process.remote(st.task.to_dict(), st.payload, prefix)
            self.inflight[ref] = (actor, st.task.uid, kind, time.time())
        self.idle = waiting

    # ---- results -------------------------------------------------------------------------------
    def fail_undecided(self, why: str) -> None:
        for u in list(self.open):
            s = self.units[u]
            if s.status in ("new", "counted"):
                self.set(s, "failed")
                self.result.errors[u] = f"not processed: {why} (the budget's share of this unit is unknown)"
        self.end_reading()

    def lost(self, st: UnitState, kind: str, why: str) -> None:
        """The unit's call ended without a result: keep a commit it made, else retry or give up."""
        uid = st.task.uid
        if kind == "process" and uid in self.rd.committed():  # it got past its commit point before it was lost
            self.finish(st, self.rd.completion(uid))
        elif st.attempts < self.max_attempts:
            log.warning("unit %d: %s (attempt %d/%d); retrying on a new worker", uid, why, st.attempts,
                        self.max_attempts)
            st.holder = None
            self.set(st, "counted" if st.tokens is not None else "new")
        else:
            self.set(st, "failed")
            self.result.errors[uid] = f"{why} on each of {st.attempts} attempts"
        self.spawn()

    def finish(self, st: UnitState, summary: dict[str, Any]) -> None:
        self.set(st, "done")
        self.result.bytes_read += summary.get("bytes_read", 0)
        self.result.done[st.task.uid] = summary
        self.clock.finished(summary)
        self.prog.update(summary)

    def on_placed(self, ref: Any) -> None:
        from ray.exceptions import RayError

        actor = self.placing.pop(ref)
        try:
            self.ray.get(ref)
            self.starting[actor.start.remote()] = actor
        except RayError as e:  # its node went away before it started
            self.start_failed(actor, e)

    def on_started(self, ref: Any) -> None:
        from ray.exceptions import RayError, RayTaskError

        from ..engine.store import OutputNotShared

        actor = self.starting.pop(ref)
        try:
            info = self.ray.get(ref)
        except RayTaskError as e:
            if isinstance(getattr(e, "cause", None), OutputNotShared):  # no unit can commit: stop now
                self.retire(actor)
                self.result.stopped = str(e.cause)
                return
            self.start_failed(actor, e)
            return
        except RayError as e:  # the actor's node went away while it loaded
            self.start_failed(actor, e)
            return
        self.idle.append(actor)
        self.start_failures = 0
        self.hosts.add(info["host"])
        running = len(self.idle) + len({id(a) for a, _, _, _ in self.inflight.values()})
        log.info("a worker started on %s, pid %d (%d running on %d hosts, %d loading, %d waiting for a node)",
                 info["host"], info["pid"], running, len(self.hosts), len(self.starting), len(self.placing))

    def start_failed(self, actor: Any, e: BaseException) -> None:
        """The worker raised while starting, or its node went away: retire it, try another up to max_attempts."""
        self.retire(actor)
        self.start_failures += 1
        self.last_start_error = _first_line(e)
        log.error("a worker failed to start (%d in a row): %s", self.start_failures, self.last_start_error)
        if self.start_failures < self.max_attempts:
            self.spawn()

    def on_result(self, ref: Any) -> None:
        from ray.exceptions import RayError, RayTaskError

        actor, uid, kind, _ = self.inflight.pop(ref)
        st = self.units[uid]
        try:
            value = self.ray.get(ref)
        except RayTaskError as e:  # the unit itself raised: record, keep the actor
            cause = e.cause if getattr(e, "cause", None) is not None else e
            if uid in self.rd.committed():
                self.finish(st, self.rd.completion(uid))
            else:
                log.error("unit %d failed: %s", uid, cause)
                self.set(st, "failed")
                self.result.errors[uid] = f"{type(cause).__name__}: {cause}"
                if self.ledger is not None:
                    self.fail_undecided(f"unit {uid} failed")
            self.idle.append(actor)
            return
        except RayError as e:  # the worker process or its node died
            self.retire(actor)
            self.forget(actor)
            self.lost(st, kind, f"worker died ({_first_line(e)})")
            return
        if kind == "count":
            st.tokens, st.holder = int(value), actor
            self.set(st, "counted")
            self.ledger.counted(uid, int(value))
        else:
            self.finish(st, value)
        self.idle.append(actor)

    def check_timeouts(self) -> None:
        now = time.time()
        for ref, (actor, uid, kind, t0) in list(self.inflight.items()):
            lim = self.clock.limit(self.units[uid].task.n_rows) if kind == "process" else None
            if lim is not None and now - t0 > lim:
                del self.inflight[ref]
                self.retire(actor)
                self.forget(actor)
                self.lost(self.units[uid], kind, f"timed out after {lim:,.0f}s (shard_timeout_s)")

    def stalled(self) -> bool:
        """Workers wait to be placed and none runs or loads: the progress line says what they want and what the
        cluster has; after worker_start_timeout_s the run stops (its committed units stay)."""
        if self.idle or self.inflight or self.starting or not self.placing:
            if self.waiting_since is not None:
                self.waiting_since, self.prog.note = None, ""
            return False
        now = time.time()
        self.waiting_since = self.waiting_since or now
        waited = now - self.waiting_since
        want, have = _describe(self.wanted), self.capacity.describe()
        self.prog.note = (f"no worker running: {len(self.placing)} waiting {waited:,.0f}s to be placed, each wants "
                          f"{want}, the cluster has {have} (free/total); stopping after {self.start_timeout:,.0f}s "
                          "(worker_start_timeout_s)")
        if waited < self.start_timeout:
            return False
        self.result.stopped = (f"no worker could be placed for {waited:,.0f}s (worker_start_timeout_s): each wants "
                               f"{want}, the cluster has {have} (free/total)")
        log.error("%s", self.result.stopped)
        return True

    # ---- the loop ------------------------------------------------------------------------------
    def more_to_read(self) -> bool:
        return self.plan.streamed and not self.stop_reading and (bool(self.readers) or
                                                                 self.next_file < len(self.plan.files))

    def unfinished(self) -> list[UnitState]:
        return [self.units[u] for u in self.open]

    def forget(self, actor: Any) -> None:
        """A dead worker's counted units keep their counts; any worker processes them now."""
        for s in self.counted.values():
            if s.holder == actor:
                s.holder = None

    def run(self) -> None:
        """Dispatch until every unit is done or failed; on SIGINT/SIGTERM (signals.Stopped) end every actor."""
        try:
            with signals.deferred():
                self._loop()
        finally:
            for actor in [*self.idle, *self.starting.values(), *self.placing.values(),
                          *(a for a, _, _, _ in self.inflight.values())]:
                self.retire(actor)
            self.end_reading()
            try:
                self.rd._delete([self.probe[0]])
            except OSError:  # clean_tmp removes it at the end of the run anyway
                pass

    def _loop(self) -> None:
        for _ in range(self.n_workers):
            self.spawn()
        while True:
            signals.check()
            if self.ledger is not None and self.ledger.reached() and self.plan.streamed and not self.stop_reading:
                self.end_reading()  # the budget's end is found: read nothing more
            self.top_up_reads()
            self.dispatch()
            if not self.unfinished() and not self.more_to_read():
                break
            if self.result.stopped or self.stalled():
                break
            if not (self.idle or self.inflight or self.starting or self.placing):  # no worker could be started
                for s in self.unfinished():
                    self.set(s, "failed")
                    self.result.errors[s.task.uid] = (f"no worker could start ({self.start_failures} tried): "
                                                      f"{self.last_start_error}")
                break
            if not (self.inflight or self.starting or self.reads):
                if self.unfinished() and self.idle:  # nothing can make progress: say which units are stuck
                    self.fail_undecided("the units before it could not be counted")
                    continue
            now = time.time()
            deadlines = [t0 + lim for _, uid, kind, t0 in self.inflight.values()
                         if kind == "process" and (lim := self.clock.limit(self.units[uid].task.n_rows)) is not None]
            wait = min([self.prog.every, 0.5, *(d - now for d in deadlines)])  # 0.5 s: signals.check() often
            ready, _ = self.ray.wait([*self.inflight, *self.placing, *self.starting, *self.reads], num_returns=1,
                                     timeout=max(0.05, wait))
            self.prog.update()
            for ref in ready:
                if ref in self.placing:
                    self.on_placed(ref)
                elif ref in self.starting:
                    self.on_started(ref)
                elif ref in self.reads:
                    self.on_read(ref)
                else:
                    self.on_result(ref)
            self.check_timeouts()
        for u in list(self.open):
            if self.ledger is not None and self.ledger.beyond(u):
                self._beyond(self.units[u])


def run_ray(manifest: dict, run_dir: str, plan: DataPlan, cfg: RunConfig, markers: dict[int, dict],
            result: RunResult, prog: Progress, n_workers: int | str | None, max_attempts: int) -> None:
    import ray

    if not ray.is_initialized():
        # A local Ray starts without its dashboard (its processes take ~2% of a 2-core machine's
        # throughput, bench/throughput.py); SAERAY_RAY_DASHBOARD=1 keeps it. Joining a running
        # cluster (RAY_ADDRESS, `ray job submit`) starts nothing either way.
        ray.init(log_to_driver=True, runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}},
                 include_dashboard=os.environ.get("SAERAY_RAY_DASHBOARD") == "1")
        signals.reinstall()  # ray.init may set handlers of its own
    if not plan.streamed and not any(t.uid not in markers for t in plan.units):
        return
    Pool(manifest, run_dir, plan, cfg, markers, result, prog, n_workers, max_attempts).run()
