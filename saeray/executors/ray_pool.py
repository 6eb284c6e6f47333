"""The Ray executor: a pool of worker actors (one per GPU, or CPU slots), a reader actor per line file being
read, and the loop that gives each free worker its next call.

Workers take a unit only once they have started (model and SAEs loaded), so the unit timeout
measures the unit alone. Calls: `process(task, payload, prefix)`; under a token budget first
`count(task, payload)`, then `process` once the ledger knows the tokens before the unit (the
counting worker keeps the unit's documents, so it usually processes it too). Readers send each
unit's bytes through the object store; the driver holds the reference until the unit commits, so a
unit retried on another worker needs no second read. At most `workers + 1` units wait read ahead.
Which unit goes where is decided by `schedule.Schedule`; this module only makes the Ray calls.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from ..engine.saes import PrecisionError
from ..engine.storage import forwarded_env
from ..engine.store import OutputNotShared, RunDir
from ..engine.units import Task, split_uid, uid_of
from . import signals
from .base import Executor, Job, register
from .cluster import Capacity, describe, first_line, quiet_ray, worker_resources
from .schedule import Schedule, UnitClock, UnitState
from .tasks import FileReader, ledger_for

log = logging.getLogger(__name__)

NOTE_AFTER_S = 30.0
"""Workers waiting this long (at most half of worker_start_timeout_s) to be placed, on a cluster that lacks what
they want, are named on the progress line."""


@register
class RayExecutor(Executor):
    """Starts Ray in this process unless it is connected to a cluster (RAY_ADDRESS, `ray job submit`)."""

    name = "ray"

    def execute(self, job: Job) -> None:
        import ray

        if not ray.is_initialized():
            job.progress.set_phase("starting Ray" + ("" if os.environ.get("RAY_ADDRESS") else " in this process"))
            quiet_ray()
            # A local Ray starts without its dashboard (its processes take ~2% of a 2-core machine's
            # throughput, bench/throughput.py); SAERAY_RAY_DASHBOARD=1 keeps it. Joining a running
            # cluster (RAY_ADDRESS, `ray job submit`) starts nothing either way.
            ray.init(log_to_driver=True, runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}},
                     include_dashboard=os.environ.get("SAERAY_RAY_DASHBOARD") == "1",
                     logging_level=logging.DEBUG if log.isEnabledFor(logging.DEBUG) else logging.WARNING)
            signals.reinstall()  # ray.init may set handlers of its own
        if not job.plan.streamed and not any(t.uid not in job.markers for t in job.plan.units):
            return
        Pool(job).run()


class Pool:
    """One run's actors, readers and in-flight calls; `run()` loops until every unit is done or failed."""

    def __init__(self, job: Job):
        import ray

        from .actor import PROGRESS_GROUP, make_worker_class

        self.ray, self.job, self.plan, self.result, self.prog = ray, job, job.plan, job.result, job.progress
        self.rd = RunDir(job.run_dir)
        ledger = ledger_for(job.plan, job.budget) if job.budget is not None else None
        if ledger:
            for uid, m in job.markers.items():
                ledger.counted(uid, m.get("tokens", 0))
        self.ledger = ledger
        self.schedule = Schedule(job.result, ledger, UnitClock(job.cfg.shard_timeout_s), job.max_attempts)
        for t in job.plan.units:
            if t.uid not in job.markers:
                self.schedule.add(t)
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        n, options = worker_resources(nodes, job.workers, job.cfg.worker.cpus, job.cfg.max_workers)
        if not job.plan.streamed:
            n = min(n, max(1, len(self.schedule.units)))
        self.n_workers, self.wanted = n, options
        # live() answers from its own concurrency group while a unit runs in the default one
        worker_class = ray.remote(concurrency_groups={PROGRESS_GROUP: 1})(make_worker_class())
        self.Actor = worker_class.options(max_restarts=0, max_task_retries=0, **options)
        self.env = forwarded_env()
        if self.env:
            log.info("forwarding %s from this environment to the workers", ", ".join(self.env))
        self.probe = self.rd.write_probe()  # each worker checks it sees this file before it loads anything
        self.Reader = ray.remote(FileReader).options(num_cpus=0, max_restarts=0)
        self.next_file = 0 if job.plan.streamed else len(job.plan.files)
        self.readers: dict[int, Any] = {}  # file -> reader actor
        self.reads: dict[Any, tuple[int, Any]] = {}  # meta ref -> (file, payload ref)
        self.read_units: dict[int, int] = {}  # file -> units its reader returned so far
        self.max_readers = 1 if job.budget is not None else max(1, min(4, n))
        self.stop_reading = False
        self.placing: dict[Any, Any] = {}  # __ray_ready__ ref -> actor: waiting for a node with its resources
        self.starting: dict[Any, Any] = {}  # start() ref -> actor: placed, loading the model and SAEs
        self.start_timeout = job.cfg.worker_start_timeout_s
        self.waiting_since: float | None = None
        """Since when no worker has been running or loading while some wait to be placed."""
        self.capacity = Capacity(ray)
        self.hosts: set[str] = set()
        self.idle: list[Any] = []
        self.inflight: dict[Any, tuple[Any, int, str, float]] = {}  # ref -> (actor, uid, call, started)
        self.start_failures = 0
        self.last_start_error = ""

    # ---- actors ------------------------------------------------------------------------------
    def spawn(self) -> None:
        actor = self.Actor.remote(self.job.manifest, self.job.run_dir, self.probe, self.env)
        self.placing[actor.__ray_ready__.remote()] = actor

    def retire(self, actor: Any) -> None:
        from ray.exceptions import RayError

        try:
            self.ray.kill(actor, no_restart=True)
        except RayError:  # already gone with its node
            pass

    # ---- reading -------------------------------------------------------------------------------
    def top_up_reads(self) -> None:
        if not self.plan.streamed or self.stop_reading:
            return
        while self.schedule.waiting() + len(self.reads) < self.n_workers + 1 and not self.schedule.enough_read():
            busy = {f for f, _ in self.reads.values()}
            free = [f for f in self.readers if f not in busy]
            if not free:
                if len(self.readers) >= self.max_readers or self.next_file >= len(self.plan.files):
                    return
                f = self.next_file
                self.next_file += 1
                skip = [u for u in self.job.markers if split_uid(u)[0] == f]
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
            uid = uid_of(f, self.read_units.get(f, 0))
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
        if task.uid not in self.job.markers:
            self.schedule.add(task, payload)

    def more_to_read(self) -> bool:
        return self.plan.streamed and not self.stop_reading and (bool(self.readers) or
                                                                 self.next_file < len(self.plan.files))

    # ---- dispatch and outcomes -----------------------------------------------------------------
    def dispatch(self) -> None:
        waiting = []
        while self.idle:
            actor = self.idle.pop()
            call = self.schedule.next_call(actor)
            if call is None:
                waiting.append(actor)
                continue
            kind, st, prefix = call
            self.schedule.started(st, kind)
            if kind == "count":
                ref = actor.count.remote(st.task.to_dict(), st.payload)
            else:
                ref = actor.process.remote(st.task.to_dict(), st.payload, prefix)
            self.inflight[ref] = (actor, st.task.uid, kind, time.time())
            self.prog.working()
        self.idle = waiting

    def fail_undecided(self, why: str) -> None:
        self.schedule.fail_undecided(why)
        self.end_reading()

    def lost(self, st: UnitState, kind: str, why: str) -> None:
        """The unit's call ended without a result: keep a commit it made, else retry or give up."""
        uid = st.task.uid
        if kind == "process" and uid in self.rd.committed():  # it got past its commit point before it was lost
            self.finish(st, self.rd.completion(uid))
        else:
            self.schedule.retry_or_fail(st, why)
        self.spawn()

    def finish(self, st: UnitState, summary: dict[str, Any]) -> None:
        self.schedule.finish(st, summary)
        self.result.bytes_read += summary.get("bytes_read", 0)
        self.prog.update(summary)

    def on_result(self, ref: Any) -> None:
        from ray.exceptions import RayError, RayTaskError

        actor, uid, kind, _ = self.inflight.pop(ref)
        self.prog.in_flight.pop(uid, None)
        st = self.schedule.units[uid]
        try:
            value = self.ray.get(ref)
        except RayTaskError as e:  # the unit itself raised: record, keep the actor
            cause = e.cause if getattr(e, "cause", None) is not None else e
            if uid in self.rd.committed():
                self.finish(st, self.rd.completion(uid))
            else:
                log.error("unit %d failed: %s", uid, cause)
                self.schedule.fail(st, f"{type(cause).__name__}: {cause}")
                if self.ledger is not None:
                    self.fail_undecided(f"unit {uid} failed")
            self.idle.append(actor)
            return
        except RayError as e:  # the worker process or its node died
            self.retire(actor)
            self.schedule.forget(actor)
            self.lost(st, kind, f"worker died ({first_line(e)})")
            return
        if kind == "count":
            self.schedule.counted_by(st, actor, int(value))
        else:
            self.finish(st, value)
        self.idle.append(actor)

    def check_timeouts(self) -> None:
        now = time.time()
        for ref, (actor, uid, kind, t0) in list(self.inflight.items()):
            lim = self.schedule.clock.limit(self.schedule.units[uid].task.n_rows) if kind == "process" else None
            if lim is not None and now - t0 > lim:
                del self.inflight[ref]
                self.prog.in_flight.pop(uid, None)
                self.retire(actor)
                self.schedule.forget(actor)
                self.lost(self.schedule.units[uid], kind, f"timed out after {lim:,.0f}s (shard_timeout_s)")

    # ---- starting workers ------------------------------------------------------------------------
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

        actor = self.starting.pop(ref)
        try:
            info = self.ray.get(ref)
        except RayTaskError as e:
            # no unit can commit, or none at this run's precision: stop now
            if isinstance(getattr(e, "cause", None), (OutputNotShared, PrecisionError)):
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
        self.last_start_error = first_line(e)
        log.error("a worker failed to start (%d in a row): %s", self.start_failures, self.last_start_error)
        if self.start_failures < self.job.max_attempts:
            self.spawn()

    def stalled(self) -> bool:
        """Workers wait to be placed and none runs or loads: after NOTE_AFTER_S, while the cluster lacks what they
        want, the progress line says what they want and what the cluster has; after worker_start_timeout_s the
        run stops (its committed units stay)."""
        if self.idle or self.inflight or self.starting or not self.placing:
            if self.waiting_since is not None:
                self.waiting_since, self.prog.note = None, ""
            return False
        now = time.time()
        self.waiting_since = self.waiting_since or now
        waited = now - self.waiting_since
        want, have = describe(self.wanted), self.capacity.describe()
        if waited >= min(NOTE_AFTER_S, self.start_timeout / 2) and self.capacity.lacks(self.wanted):
            self.prog.set_note(f"no worker running: {len(self.placing)} waiting {waited:,.0f}s to be placed, each "
                               f"wants {want}, the cluster has {have} (free/total); stopping after "
                               f"{self.start_timeout:,.0f}s (worker_start_timeout_s)")
        else:
            self.prog.set_note("")
        if waited < self.start_timeout:
            return False
        self.result.stopped = (f"no worker could be placed for {waited:,.0f}s (worker_start_timeout_s): each wants "
                               f"{want}, the cluster has {have} (free/total)")
        log.error("%s", self.result.stopped)
        return True

    def phase(self) -> str:
        """What the pool is doing while no unit has finished."""
        if self.prog.shards:
            return ""
        if self.inflight:
            return "processing the first unit" + ("s" if len(self.inflight) > 1 else "")
        if self.starting:
            n = len(self.starting)
            return f"loading the model and SAEs ({n} worker{'s' if n > 1 else ''})"
        if self.placing:
            n = len(self.placing)
            return f"starting {n} worker{'s' if n > 1 else ''} (Ray places {'them' if n > 1 else 'it'} on a node)"
        return self.prog.phase

    def poll_live(self) -> None:
        """Ask each worker processing a unit how many of its tokens the model has had (for the progress line);
        a worker that does not answer within a second is skipped."""
        from ray.exceptions import RayError

        procs = [(a, uid) for a, uid, kind, _ in self.inflight.values() if kind == "process"]
        if not procs:
            return
        refs = [a.live.remote() for a, _ in procs]
        ready, _ = self.ray.wait(refs, num_returns=len(refs), timeout=1.0)
        done = set(ready)
        for ref, (_, uid) in zip(refs, procs):
            if ref in done:
                try:
                    n = int(self.ray.get(ref))
                except RayError:
                    continue
                if any(u == uid for _, u, _, _ in self.inflight.values()):
                    self.prog.flight(uid, n)

    # ---- the loop ------------------------------------------------------------------------------
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
        while not self._settled():
            ready, _ = self.ray.wait([*self.inflight, *self.placing, *self.starting, *self.reads], num_returns=1,
                                     timeout=self._wait_s())
            if time.time() - self.prog.last >= self.prog.every:
                self.poll_live()
            self.prog.set_phase(self.phase())
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
        self.schedule.close_beyond()

    def _settled(self) -> bool:
        """Check for a stop signal, read and dispatch what can be; True once the loop should end (all done,
        stopped, or no worker left)."""
        while True:
            signals.check()
            if self.ledger is not None and self.ledger.reached() and self.plan.streamed and not self.stop_reading:
                self.end_reading()  # the budget's end is found: read nothing more
            self.top_up_reads()
            self.dispatch()
            if not self.schedule.unfinished() and not self.more_to_read():
                return True
            if self.result.stopped or self.stalled():
                return True
            if not (self.idle or self.inflight or self.starting or self.placing):  # no worker could be started
                for s in self.schedule.unfinished():
                    self.schedule.fail(s, f"no worker could start ({self.start_failures} tried): "
                                          f"{self.last_start_error}")
                return True
            if not (self.inflight or self.starting or self.reads) and self.schedule.unfinished() and self.idle:
                self.fail_undecided("the units before it could not be counted")  # say which units are stuck
                continue
            return False

    def _wait_s(self) -> float:
        """How long to wait for the next result: until the earliest unit deadline, at most 0.5 s
        (signals.check() often) and the progress interval."""
        now = time.time()
        clock, units = self.schedule.clock, self.schedule.units
        deadlines = [t0 + lim for _, uid, kind, t0 in self.inflight.values()
                     if kind == "process" and (lim := clock.limit(units[uid].task.n_rows)) is not None]
        return max(0.05, min([self.prog.every, 0.5, *(d - now for d in deadlines)]))
