"""The actor pool's decisions, apart from Ray: which unit a free worker takes next, when a unit counts as
hung, what happens to a unit whose worker died. `Schedule` holds every unit's state; the pool (ray_pool.py)
asks it and carries out the answer with Ray calls, so these rules are tested without a cluster.

A unit moves new -> (counting -> counted ->) processing -> done, or to failed or beyond (past the token
budget). Without a budget a free worker processes the earliest new unit. Under one it processes a counted
unit whose prefix (tokens of every earlier unit) is known and inside the budget, its own counted units first
(their documents are in its memory); else it counts the earliest new unit, holding at most HELD_UNITS
counted units unless the new unit is earlier than every undecided one (which keeps the frontier moving).
"""

from __future__ import annotations

import heapq
import logging
from dataclasses import dataclass
from typing import Any

from ..engine.units import Ledger, Task
from .base import RunResult

log = logging.getLogger(__name__)

HELD_UNITS = 2
"""Counted units a worker may hold (their documents in memory) before it must process one."""

CLOSED = ("done", "failed", "beyond")


@dataclass
class UnitState:
    task: Task
    payload: Any = None
    """ObjectRef of the unit's bytes (line files), None for Parquet units."""
    status: str = "new"
    """new | counting | counted | processing | done | failed | beyond"""
    tokens: int | None = None
    holder: Any = None
    """The worker holding the unit's tokenized documents (after count)."""
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


class Schedule:
    """Every unit's state, the queue of new units and the token ledger; decides each worker's next call."""

    def __init__(self, result: RunResult, ledger: Ledger | None, clock: UnitClock, max_attempts: int):
        self.result, self.ledger, self.clock, self.max_attempts = result, ledger, clock, max_attempts
        self.budget = ledger.max_tokens if ledger is not None else None
        self.units: dict[int, UnitState] = {}
        self.queue: list[int] = []  # heap of the uids of new units
        self.counted: dict[int, UnitState] = {}
        self.open: set[int] = set()  # uids not yet done, failed or beyond

    # ---- states ---------------------------------------------------------------------------------
    def add(self, task: Task, payload: Any = None) -> UnitState:
        st = UnitState(task, payload)
        self.units[task.uid] = st
        self.set(st, "new")
        return st

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
        if status in CLOSED:
            self.open.discard(uid)
            st.payload, st.holder = None, None
        else:
            self.open.add(uid)

    def earliest_new(self) -> UnitState | None:
        while self.queue and self.units[self.queue[0]].status != "new":
            heapq.heappop(self.queue)
        return self.units[self.queue[0]] if self.queue else None

    def unfinished(self) -> list[UnitState]:
        return [self.units[u] for u in self.open]

    def waiting(self) -> int:
        """Units read and not yet running: what the reads ahead are counted against."""
        return sum(1 for u in self.open if self.units[u].status in ("new", "counting", "counted"))

    def enough_read(self) -> bool:
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

    # ---- decisions ------------------------------------------------------------------------------
    def next_call(self, worker: Any) -> tuple[str, UnitState, int | None] | None:
        """What a free worker does next: ("process" | "count", unit, prefix), or None (nothing for it now)."""
        new = self.earliest_new()
        if self.ledger is None:
            return ("process", new, None) if new else None
        while new is not None and self.ledger.beyond(new.task.uid):  # read before the budget's end was known
            self.beyond(new)
            new = self.earliest_new()
        counted = sorted(self.counted.values(), key=lambda s: s.task.uid)
        for mine in (True, False):  # its own counted units first (documents in memory), then orphans
            for s in counted:
                if s.status == "counted" and ((s.holder == worker) if mine else s.holder is None):
                    p = self._decided(s)
                    if p is not None:
                        return "process", s, p
        if new is None:
            return None
        undecided = [s.task.uid for s in self.counted.values()]
        held = sum(1 for s in self.counted.values() if s.holder == worker)
        if held < HELD_UNITS or all(new.task.uid < u for u in undecided):
            return "count", new, None
        return None

    def started(self, st: UnitState, kind: str) -> None:
        """A worker was given the unit (next_call's answer)."""
        st.attempts += 1
        self.set(st, "counting" if kind == "count" else "processing")

    def _decided(self, st: UnitState) -> int | None:
        """The unit's prefix if known and inside the budget; marks it beyond when past it."""
        p = self.ledger.prefix(st.task.uid)
        if p is not None and p >= self.budget:
            self.beyond(st)
            return None
        return p

    def beyond(self, st: UnitState) -> None:
        if st.tokens is not None or st.payload is not None:  # work done in vain: read or counted
            self.result.beyond_budget += 1
        self.set(st, "beyond")

    def close_beyond(self) -> None:
        """At the end: open units the budget ends before are beyond, not failed."""
        for u in list(self.open):
            if self.ledger is not None and self.ledger.beyond(u):
                self.beyond(self.units[u])

    # ---- outcomes -------------------------------------------------------------------------------
    def counted_by(self, st: UnitState, worker: Any, tokens: int) -> None:
        st.tokens, st.holder = tokens, worker
        self.set(st, "counted")
        self.ledger.counted(st.task.uid, tokens)

    def finish(self, st: UnitState, summary: dict[str, Any]) -> None:
        self.set(st, "done")
        self.result.done[st.task.uid] = summary
        self.clock.finished(summary)

    def fail(self, st: UnitState, error: str) -> None:
        self.set(st, "failed")
        self.result.errors[st.task.uid] = error

    def fail_undecided(self, why: str) -> None:
        """Units not yet running whose share of the budget can no longer be known fail (the caller stops
        reading)."""
        for u in list(self.open):
            s = self.units[u]
            if s.status in ("new", "counted"):
                self.fail(s, f"not processed: {why} (the budget's share of this unit is unknown)")

    def retry_or_fail(self, st: UnitState, why: str) -> bool:
        """The unit's call ended without a result (worker died or hung, nothing committed): back to the queue
        while attempts are left (True), else failed."""
        if st.attempts < self.max_attempts:
            log.warning("unit %d: %s (attempt %d/%d); retrying on a new worker", st.task.uid, why, st.attempts,
                        self.max_attempts)
            st.holder = None
            self.set(st, "counted" if st.tokens is not None else "new")
            return True
        self.fail(st, f"{why} on each of {st.attempts} attempts")
        return False

    def forget(self, worker: Any) -> None:
        """A dead worker's counted units keep their counts; any worker processes them now."""
        for s in self.counted.values():
            if s.holder == worker:
                s.holder = None
