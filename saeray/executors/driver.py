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
is its completion marker (see engine/store.py), never the fate of the process that wrote it.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from dataclasses import replace
from typing import Callable

from ..engine import merged
from ..engine.config import RunConfig
from ..engine.overlap import check_apart
from ..engine.plan import Prepared, prepare
from ..engine.storage import READ
from ..engine.worker import describe_notes
from ..engine.store import COMPLETE, RunDir, RunDirError
from .base import Job, Progress, RunFailed, RunResult, executor_named
from .lock import DriverLock

log = logging.getLogger(__name__)

MAX_SHARD_ATTEMPTS = 3
"""A unit whose worker dies or hangs is tried up to this many times in all."""


def run(cfg: RunConfig, *, out: str | None = None, overwrite: bool = False, workers: int | str | None = None,
        executor: str = "ray", progress_every: float = 10.0,
        progress_sink: Callable[[str], None] | None = None) -> RunResult:
    """Extract a run: plan, prepare the run directory, process missing units, report.

    executor: "ray" (actor pool; starts Ray in-process unless connected) or "local" (see base.EXECUTORS).
    Raises RunFailed after all units were tried if any failed.
    """
    if out is not None:
        cfg = replace(cfg, output=replace(cfg.output, dir=out))
    chosen = executor_named(executor)
    t_start, b_start = time.time(), READ.bytes
    check_apart(cfg)  # before anything is written, locked or deleted
    rd = RunDir(cfg.output.dir)
    rd.refuse_foreign()
    with DriverLock(rd):  # a second driver on this run directory refuses here, before it plans or cleans
        job = _prepare(cfg, rd, overwrite, workers, progress_every, progress_sink, t_start, b_start)
        t0 = time.time()
        chosen.execute(job)
        return _report(job, rd, t_start, t0, b_start if chosen.name == "local" else None)


def _prepare(cfg: RunConfig, rd: RunDir, overwrite: bool, workers: int | str | None, progress_every: float,
             progress_sink: Callable[[str], None] | None, t_start: float, b_start: int) -> Job:
    """Plan (reusing the manifest's plan when resuming), prepare the run directory, and list what is left."""
    sink = progress_sink or log.info
    first = _first_load(cfg)
    if first:
        sink(first)
    old = rd.manifest_if_any()
    if old is not None and "unit_bytes" not in old.get("plan", {}) and not overwrite:
        raise RunDirError(f"{rd.root} was written by an older saeray (shards of canonical row ranges, doc_id = row "
                          "index): its outputs stay readable by stats/top/diff, but it cannot be extended. Use "
                          "another --out, or --overwrite to replace it")
    prepared = prepare(cfg, reuse=None if overwrite else old)
    rd.prepare(prepared.manifest(), overwrite, prepared.redo_files)
    markers = rd.completions()
    plan = prepared.plan
    known = len(plan.units) if not plan.streamed else None
    if markers:
        log.info("%s: %d units already committed; processing the missing ones", rd.root, len(markers))
    result = RunResult(str(rd.root), prepared.fingerprint, known or 0, sorted(markers),
                       plan_bytes=READ.bytes - b_start, plan_seconds=time.time() - t_start)
    result.bytes_read = result.plan_bytes
    prog = Progress(None if known is None else known - len(markers), progress_every, progress_sink,
                    cfg.data.max_tokens)
    prog.base_tokens = sum(m.get("tokens", 0) for m in markers.values())
    prog.started = t_start
    return Job(rd.read_manifest(), str(rd.root), plan, cfg, markers, result, prog,
               workers if workers is not None else cfg.workers, MAX_SHARD_ATTEMPTS)


def _first_load(cfg: RunConfig) -> str | None:
    """What to expect when an embedded model is used here for the first time (it is dequantized once, in this
    process, before anything else is said), else None."""
    from ..engine import embedded

    name = cfg.model.name
    if name not in embedded.MODELS or (embedded.cache_root() / "models" / name / "config.json").is_file():
        return None
    return (f"loading {name}: its first use here dequantizes it into {embedded.cache_root() / 'models' / name} "
            f"({DEQUANTIZE_NOTE}); later runs load that copy in seconds")


DEQUANTIZE_NOTE = "about a minute on 2 CPU cores for gemma-3-270m"
"""How long the one-time dequantization takes (gemma-3-270m on this project's 2-core test machine: 67 s)."""


def _report(job: Job, rd: RunDir, t_start: float, t0: float, b_start: int | None) -> RunResult:
    """Fill in the totals, clean the staging area, and raise RunFailed if the run stopped or units failed.

    b_start: READ.bytes at the start, when every read happened in this process (the local executor)."""
    result, prog = job.result, job.progress
    if b_start is not None:
        result.bytes_read = READ.bytes - b_start
    if job.plan.streamed or job.budget is not None:
        result.n_shards = len(result.done) + len(result.skipped) + len(result.errors)
    prog.close()
    result.seconds = time.time() - t0
    result.first_unit_seconds = prog.first_unit_at - t_start if prog.first_unit_at else None
    rd.clean_tmp()
    for line in describe_notes([*job.markers.values(), *result.done.values()]):
        log.warning("%s: %s", rd.root, line)
    if result.stopped:
        done = len(result.done) + len(result.skipped)
        raise RunFailed(f"stopped: {result.stopped} (committed units: {done}; rerun the same command to go on)")
    if not result.errors and (result.done or not rd.exists(COMPLETE)):  # a rerun with nothing to do writes nothing
        _record_complete(rd, job)
    merged.merge_run(rd)  # the committed units, failed ones aside: a rerun merges what it adds
    if result.errors:
        lines = "\n".join(f"  unit {i}: {e}" for i, e in sorted(result.errors.items()))
        raise RunFailed(f"{len(result.errors)} of {result.n_shards} units failed (the other units are committed; "
                        f"rerun the same command to retry only these):\n{lines}")
    return result


def _record_complete(rd: RunDir, job: Job) -> None:
    """complete.json: every unit of the plan (or of the budget) is committed; readers trust it over counting."""
    markers = rd.completions()
    rd.write_json(COMPLETE, {"units": len(markers), "tokens": sum(m.get("tokens", 0) for m in markers.values()),
                             "budget": job.budget, "fingerprint": job.manifest["fingerprint"],
                             "at": dt.datetime.now(dt.timezone.utc).isoformat()})


__all__ = ["run", "RunResult", "RunFailed", "prepare", "Prepared", "Progress", "MAX_SHARD_ATTEMPTS"]
