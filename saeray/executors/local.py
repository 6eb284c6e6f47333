"""The local executor: every unit in this process, one after another, in canonical order (debugging, tests,
a laptop). The next line unit is read and decompressed on a thread while this one runs."""

from __future__ import annotations

import logging
from typing import Any, Iterable, Iterator

from ..engine import sources
from ..engine.folder import OutputWriteError
from ..engine.pipeline import Prefetch
from ..engine.units import Task
from . import signals
from .base import Executor, Job, register
from .tasks import all_tasks

log = logging.getLogger(__name__)


@register
class LocalExecutor(Executor):
    name = "local"

    def execute(self, job: Job) -> None:
        from ..engine.worker import ShardWorker

        budget, markers = job.budget, job.markers
        worker: ShardWorker | None = None
        total = 0  # tokens of all earlier units (in order, so always known here)
        tasks: Iterable[tuple[Task, bytes | None]] = all_tasks(job.plan, set(markers))
        if budget is None and job.plan.streamed and job.cfg.worker.prefetch_blocks:
            # the next line unit is read and decompressed while this one runs (under a budget it may not be needed)
            tasks = Prefetch(tasks, 1, name="saeray-reader")
        # Without a budget the worker is told the next unit, and starts reading it while it finishes this one;
        # under one, the next unit may not be needed: it is not read before this one is counted.
        pairs = ((t, None) for t in tasks) if budget is not None else with_next(tasks)
        try:
            for (task, payload), ahead in pairs:
                then = (ahead[0].to_dict(), ahead[1]) if ahead and ahead[0].uid not in markers else None
                if task.uid in markers:
                    total += markers[task.uid].get("tokens", 0)
                else:
                    worker = worker or self._worker(job)
                    counted, ok = self._unit(job, worker, task, payload, then, total)
                    total += counted
                    if not ok and budget is not None:  # later units' share of the budget depends on this one's
                        break
                if budget is not None and total >= budget:  # stop before reading the next unit
                    break
        finally:
            if worker is not None:
                worker.close()
            if isinstance(tasks, Prefetch):
                tasks.close()

    @staticmethod
    def _worker(job: Job) -> Any:
        """The in-process worker, whose extractor reports each block's tokens to the progress line."""
        from ..engine.worker import ShardWorker
        from .actor import counting

        job.progress.set_phase("loading the model and SAEs")
        worker = ShardWorker(job.manifest, job.run_dir)
        job.progress.set_phase("processing the first unit")
        job.progress.working()
        live = {"uid": -1, "n": 0}

        def report(n: int) -> None:
            live["n"] += n
            job.progress.flight(live["uid"], live["n"])
            job.progress.update()

        worker.extractor_class = counting(type(worker).extractor_class, report)
        worker.live = live
        return worker

    @staticmethod
    def _unit(job: Job, worker: Any, task: Task, payload: bytes | None, then: tuple[dict, Any] | None,
              total: int) -> tuple[int, bool]:
        """Count (under a budget) and process one unit: (its tokens counted, whether it committed). An error is
        logged and recorded in the result, never raised: one bad unit must not stop the others."""
        n = 0
        try:
            prefix = None
            if job.budget is not None:
                prefix, n = total, worker.count(task.to_dict(), payload)
            worker.live.update(uid=task.uid, n=0)
            job.result.done[task.uid] = worker.process(task.to_dict(), payload, prefix, then)
            job.progress.update(job.result.done[task.uid])
            return n, True
        except Exception as e:
            if signals.pending() is not None:  # the stop surfaced as a library's error (e.g. pyarrow's, mid write)
                raise signals.Stopped(signals.pending()) from e
            if isinstance(e, (sources.DataError, OutputWriteError)):  # says what and where in a line
                log.error("unit %d failed: %s", task.uid, e)
            else:
                log.exception("unit %d failed", task.uid)
            job.result.errors[task.uid] = f"{type(e).__name__}: {e}"
            job.progress.in_flight.pop(task.uid, None)
            return n, False


def with_next(items: Iterable[Any]) -> Iterator[tuple[Any, Any]]:
    """(item, the item after it or None) for each item."""
    it = iter(items)
    cur = next(it, None)
    while cur is not None:
        nxt = next(it, None)
        yield cur, nxt
        cur = nxt
