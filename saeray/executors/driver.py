"""Run a plan's work units: in process (debugging, tests) or on a pool of Ray actors.

Units go to workers as they free up. Parquet units are known from the plan; units of JSON lines
and text files come from one reader per file (a Ray actor, or a generator in process), which
streams the file once and hands each unit's bytes over through Ray's object store (text only:
activations never travel that way). Under a token budget each unit is first counted (its
worker tokenizes it and keeps the documents), and processed once every earlier unit is counted,
with the tokens before it (`units.Ledger`); units past the budget are never processed.

A unit whose actor dies (node loss, OOM kill, preemption) or hangs past `shard_timeout_s` is
handed to a fresh actor, up to MAX_SHARD_ATTEMPTS attempts; an exception inside a unit is
recorded and reported at the end, and other units go on. What decides whether a unit is done
is its completion marker (see store.py), never the fate of the process that wrote it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Iterator

from ..engine import sources
from ..engine.config import RunConfig
from ..engine.pipeline import Prefetch
from ..engine.plan import Prepared, prepare
from ..engine.storage import READ
from ..engine.store import OutputWriteError, RunDir, RunDirError
from ..engine.units import DataPlan, Ledger, Task, uid_of
from .lock import DriverLock

log = logging.getLogger(__name__)

MAX_SHARD_ATTEMPTS = 3
"""A unit whose worker dies or hangs is tried up to this many times in all."""


class RunFailed(RuntimeError):
    """Some units failed; the others are committed and a rerun retries only the failed ones."""


@dataclass
class RunResult:
    run_dir: str
    fingerprint: str
    n_shards: int
    """Units in the run (processed, already committed, and failed; not those past the budget)."""
    skipped: list[int]
    done: dict[int, dict[str, Any]] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)
    seconds: float = 0.0
    beyond_budget: int = 0
    """Units read or counted but past the token budget (never processed)."""
    plan_bytes: int = 0
    """Bytes of data files the driver read to plan (metadata: footers, the first rows of a JSON lines file)."""
    plan_seconds: float = 0.0
    bytes_read: int = 0
    """Bytes of data files read in all, planning included, as the storage layer counted them (Ray: readers and
    the workers' committed units; a killed attempt's reads are not counted)."""
    first_unit_seconds: float | None = None
    """From the start of `run` to the first unit committed."""
    stopped: str | None = None
    """Why the run stopped before its units were all tried (no worker could be placed; workers cannot see the
    run directory)."""

    @property
    def tokens(self) -> int:
        return sum(s["tokens"] for s in self.done.values())


class Progress:
    """Logs units done, tokens, tokens/s and an ETA (from the budget or the unit count) every `every` seconds."""

    def __init__(self, total: int | None, every: float = 10.0, sink: Callable[[str], None] | None = None,
                 budget: int | None = None):
        self.total, self.every, self.sink, self.budget = total, every, sink or log.info, budget
        self.t0 = self.last = time.time()
        self.shards = self.tokens = 0
        self.base_tokens = 0
        """Tokens of units committed before this run started (they count toward the budget)."""
        self.started = self.t0
        self.first_unit_at: float | None = None
        self.note = ""
        """Appended to the line while set (the pool: workers waiting to be placed)."""

    def update(self, summary: dict[str, Any] | None = None, force: bool = False) -> None:
        if summary:
            self.first_unit_at = self.first_unit_at or time.time()
            self.shards += 1
            self.tokens += summary["tokens"]
        now = time.time()
        if not force and now - self.last < self.every:
            return
        self.last = now
        el = max(now - self.t0, 1e-9)
        rate = self.tokens / el
        if self.budget:
            left = max(0, self.budget - self.base_tokens - self.tokens)
            eta = left / rate if rate else float("nan")
        elif self.total:
            eta = el / self.shards * (self.total - self.shards) if self.shards else float("nan")
        else:
            eta = float("nan")
        of = f"/{self.total}" if self.total else ""
        self.sink(f"units {self.shards}{of} | {self.tokens:,} tokens | {rate:,.0f} tok/s | elapsed {el:,.0f}s | "
                  f"ETA {eta:,.0f}s" + (f" | {self.note}" if self.note else ""))


def run(cfg: RunConfig, *, out: str | None = None, overwrite: bool = False, workers: int | str | None = None,
        executor: str = "ray", progress_every: float = 10.0,
        progress_sink: Callable[[str], None] | None = None) -> RunResult:
    """Extract a run: plan, prepare the run directory, process missing units, report.

    executor: "ray" (actor pool; starts Ray in-process unless connected) or "local".
    Raises RunFailed after all units were tried if any failed.
    """
    if out is not None:
        cfg = replace(cfg, output=replace(cfg.output, dir=out))
    if executor not in ("ray", "local"):
        raise ValueError(f"unknown executor {executor!r}: use 'ray' or 'local'")
    t_start, b_start = time.time(), READ.bytes
    rd = RunDir(cfg.output.dir)
    with DriverLock(rd):  # a second driver on this run directory refuses here, before it plans or cleans
        return _run(cfg, rd, overwrite, workers, executor, progress_every, progress_sink, t_start, b_start)


def _run(cfg: RunConfig, rd: RunDir, overwrite: bool, workers: int | str | None, executor: str,
         progress_every: float, progress_sink: Callable[[str], None] | None, t_start: float, b_start: int
         ) -> RunResult:
    old = rd.manifest_if_any()
    if old is not None and "unit_bytes" not in old.get("plan", {}) and not overwrite:
        raise RunDirError(f"{rd.root} was written by an older saeray (shards of canonical row ranges, doc_id = row "
                          "index): its outputs stay readable by stats/top/diff, but it cannot be extended. Use "
                          "another --out, or --overwrite to replace it")
    prepared = prepare(cfg, reuse=None if overwrite else old)
    rd.prepare(prepared.manifest(), overwrite)
    manifest = rd.read_manifest()
    markers = rd.completions()
    plan = prepared.plan
    known = len(plan.units) if not plan.streamed else None
    if markers:
        log.info("%s: %d units already committed; processing the missing ones", rd.root, len(markers))
    result = RunResult(str(rd.root), prepared.fingerprint, known or 0, sorted(markers),
                       plan_bytes=READ.bytes - b_start, plan_seconds=time.time() - t_start)
    result.bytes_read = result.plan_bytes
    t0 = time.time()
    prog = Progress(None if known is None else known - len(markers), progress_every, progress_sink,
                    cfg.data.max_tokens)
    prog.base_tokens = sum(m.get("tokens", 0) for m in markers.values())
    prog.started = t_start
    n_workers = workers if workers is not None else cfg.workers
    if executor == "local":
        _run_local(manifest, str(rd.root), plan, cfg, markers, result, prog)
        result.bytes_read = READ.bytes - b_start
    else:
        from .ray_pool import run_ray

        run_ray(manifest, str(rd.root), plan, cfg, markers, result, prog, n_workers, MAX_SHARD_ATTEMPTS)
    if plan.streamed or cfg.data.max_tokens is not None:
        result.n_shards = len(result.done) + len(result.skipped) + len(result.errors)
    prog.update(force=True)
    result.seconds = time.time() - t0
    result.first_unit_seconds = prog.first_unit_at - t_start if prog.first_unit_at else None
    rd.clean_tmp()
    if result.stopped:
        done = len(result.done) + len(result.skipped)
        raise RunFailed(f"stopped: {result.stopped} (committed units: {done}; rerun the same command to go on)")
    if result.errors:
        lines = "\n".join(f"  unit {i}: {e}" for i, e in sorted(result.errors.items()))
        raise RunFailed(f"{len(result.errors)} of {result.n_shards} units failed (the other units are committed; "
                        f"rerun the same command to retry only these):\n{lines}")
    return result


def unit_stream(plan: DataPlan, file: int, skip: set[int], block_size: int | None = None
                ) -> Iterator[tuple[Task, bytes | None]]:
    """The units of one line file as its reader cuts them; units in `skip` (committed) come without bytes."""
    url = plan.files[file].url
    block = block_size or reader_block_size(plan.unit_bytes)
    for unit, data in sources.line_units(url, file, plan.format, plan.unit_bytes, block_size=block):
        uid = uid_of(file, unit.k)
        task = Task(uid, file, unit.k, unit.row_start, unit.n_rows, unit.line_start, unit.byte_start, unit.n_bytes)
        yield task, (None if uid in skip else data)


def reader_block_size(unit_bytes: int) -> int:
    """Bytes per read from the store: a quarter of a unit, 16 KiB to 8 MiB (few requests, little read past the end)."""
    return int(min(8 << 20, max(16 << 10, unit_bytes // 4)))


def all_tasks(plan: DataPlan, skip: set[int]) -> Iterator[tuple[Task, bytes | None]]:
    """Every unit in canonical order (line files read here, one after another)."""
    if not plan.streamed:
        for t in plan.units:
            yield t, None
        return
    for f in range(len(plan.files)):
        yield from unit_stream(plan, f, skip)


def _run_local(manifest: dict, run_dir: str, plan: DataPlan, cfg: RunConfig, markers: dict[int, dict],
               result: RunResult, prog: Progress) -> None:
    from ..engine.worker import ShardWorker

    budget = cfg.data.max_tokens
    worker: ShardWorker | None = None
    total = 0  # tokens of all earlier units (in order, so always known here)
    tasks: Iterable[tuple[Task, bytes | None]] = all_tasks(plan, set(markers))
    if budget is None and plan.streamed and cfg.worker.prefetch_blocks:
        # the next line unit is read and decompressed while this one runs (under a budget it may not be needed)
        tasks = Prefetch(tasks, 1, name="saeray-reader")
    # Without a budget the worker is told the next unit, and starts reading it while it finishes this one;
    # under one, the next unit may not be needed: it is not read before this one is counted.
    pairs = ((t, None) for t in tasks) if budget is not None else _with_next(tasks)
    try:
        for (task, payload), ahead in pairs:
            then = (ahead[0].to_dict(), ahead[1]) if ahead and ahead[0].uid not in markers else None
            if task.uid in markers:
                total += markers[task.uid].get("tokens", 0)
            else:
                worker = worker or ShardWorker(manifest, run_dir)
                try:
                    prefix = None
                    if budget is not None:
                        prefix, n = total, worker.count(task.to_dict(), payload)
                        total += n
                    result.done[task.uid] = worker.process(task.to_dict(), payload, prefix, then)
                    prog.update(result.done[task.uid])
                except Exception as e:  # one bad unit must not stop the others
                    if isinstance(e, (sources.DataError, OutputWriteError)):  # says what and where in a line
                        log.error("unit %d failed: %s", task.uid, e)
                    else:
                        log.exception("unit %d failed", task.uid)
                    result.errors[task.uid] = f"{type(e).__name__}: {e}"
                    if budget is not None:  # later units' share of the budget depends on this one's tokens
                        break
            if budget is not None and total >= budget:  # stop before reading the next unit
                break
    finally:
        if worker is not None:
            worker.close()
        if isinstance(tasks, Prefetch):
            tasks.close()


def _with_next(items: Iterable[Any]) -> Iterator[tuple[Any, Any]]:
    """(item, the item after it or None) for each item."""
    it = iter(items)
    cur = next(it, None)
    while cur is not None:
        nxt = next(it, None)
        yield cur, nxt
        cur = nxt


def ledger_for(plan: DataPlan, budget: int) -> Ledger:
    ledger = Ledger(budget, len(plan.files))
    if not plan.streamed:
        for f in range(len(plan.files)):
            ledger.file_complete(f, sum(1 for u in plan.units if u.file == f))
    return ledger


__all__ = ["run", "RunResult", "RunFailed", "prepare", "Prepared", "Progress"]
