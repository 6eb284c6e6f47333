"""The progress line of a run: tokens against the budget (or units against the unit count), tokens inside the
units in flight, tokens/s and an ETA once they can be measured, and what the run is doing while no unit has
finished (starting Ray, loading the model, the first unit).

A sink that rewrites one line (a terminal) gets a line every second; a plain sink (a log file, a pipe) gets a
line every `every` seconds and whenever the phase changes. Workers report the tokens of the unit they are
processing through `flight` (the Ray pool polls its actors; the local executor's worker calls back).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

log = logging.getLogger(__name__)

MIN_RATE_SECONDS = 2.0
"""Tokens/s and the ETA are shown once tokens have flowed for this long (before: `--`)."""


def duration(seconds: float) -> str:
    """45s, 3m05s, 1h02m."""
    s = int(round(max(0.0, seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Progress:
    """Counts what a run did and writes its progress line through `sink` (see the module docstring)."""

    def __init__(self, total: int | None, every: float = 10.0, sink: Callable[[str], None] | None = None,
                 budget: int | None = None):
        self.total, self.every, self.sink, self.budget = total, every, sink or log.info, budget
        self.t0 = self.last = time.time()
        self.shards = self.tokens = 0
        self.base_tokens = 0
        """Tokens of units committed before this run started (they count toward the budget)."""
        self.started = self.t0
        self.first_unit_at: float | None = None
        self.work_from: float | None = None
        """When the first unit started (after Ray started and the model loaded): rates count from here."""
        self.in_flight: dict[int, int] = {}
        """uid -> tokens of that unit the model has been given so far (units being processed)."""
        self.phase = ""
        """What the run is doing while nothing is counted yet ('starting Ray', 'loading the model ...'); the line
        shows it until the first tokens reach the model."""
        self.note = ""
        """Appended to the line while set (the pool: workers waiting to be placed for a while)."""
        self.closed = False
        """The run ended: the last line has the rate over the whole work and no ETA."""

    # ---- what the executors report ------------------------------------------------------------
    def set_phase(self, text: str) -> None:
        """Name what the run is doing now; a new phase is written at once."""
        if text != self.phase:
            self.phase = text
            self.update(force=True)

    def set_note(self, text: str) -> None:
        """Append `text` to the line while it is set; a note that appears is written at once."""
        shown, self.note = self.note, text
        if text and not shown:
            self.update(force=True)

    def working(self) -> None:
        """A unit started: tokens/s count from the first call."""
        self.work_from = self.work_from or time.time()

    def flight(self, uid: int, tokens: int) -> None:
        """`tokens` of unit `uid` have gone to the model so far."""
        self.working()
        self.in_flight[uid] = tokens

    def update(self, summary: dict[str, Any] | None = None, force: bool = False) -> None:
        if summary:
            self.first_unit_at = self.first_unit_at or time.time()
            self.working()
            self.shards += 1
            self.tokens += summary["tokens"]
            self.in_flight.pop(summary.get("shard", -1), None)
            self.phase = ""
        now = time.time()
        if not force and now - self.last < self.every:
            return
        self.last = now
        self.sink(self.line(now))

    def close(self) -> None:
        """Write the last line (the run's totals)."""
        self.closed, self.phase, self.note = True, "", ""
        self.update(force=True)

    # ---- the line -----------------------------------------------------------------------------
    def line(self, now: float | None = None) -> str:
        now = now or time.time()
        live = sum(self.in_flight.values())
        done = self.tokens + live
        rate = self.rate(now, done)
        if done == 0 and not self.shards and self.phase:  # nothing to count yet: say what is happening
            budget = f" (budget {self.budget:,} tokens)" if self.budget else ""
            return " | ".join([f"{self.phase}{budget}", f"elapsed {duration(now - self.started)}",
                               *([self.note] if self.note else [])])
        parts = []
        if self.budget:
            counted = min(self.base_tokens + done, self.budget)
            parts.append(f"{counted:,}/{self.budget:,} tokens ({counted / self.budget:.0%})")
            parts.append(f"units {self.shards} done" + (f", {len(self.in_flight)} running" if self.in_flight else ""))
        else:
            of = f"/{self.total}" if self.total else ""
            running = f" ({len(self.in_flight)} running)" if self.in_flight else ""
            parts.append(f"units {self.shards}{of}{running}")
            parts.append(f"{done:,} tokens")
        parts.append(f"{rate:,.0f} tok/s" if rate is not None else "-- tok/s")
        parts.append(f"elapsed {duration(now - self.started)}")
        if not self.closed:
            eta = self.eta(rate, live)
            parts.append(f"ETA {duration(eta)}" if eta is not None else "ETA --")
        if self.note:
            parts.append(self.note)
        return " | ".join(parts)

    def rate(self, now: float, done: int) -> float | None:
        """Tokens/s since the first unit started; None until it can be measured."""
        if self.work_from is None or done <= 0 or now <= self.work_from:
            return None
        if now - self.work_from < MIN_RATE_SECONDS and not self.closed:
            return None
        return done / (now - self.work_from)

    def eta(self, rate: float | None, live: int) -> float | None:
        """Seconds left: the budget's tokens left at `rate`, or (no budget) the units left at the tokens per
        finished unit; None while that cannot be known."""
        if not rate:
            return None
        if self.budget:
            return max(0, self.budget - self.base_tokens - self.tokens - live) / rate
        if self.total and self.shards:
            per_unit = self.tokens / self.shards
            return max(0.0, per_unit * (self.total - self.shards) - live) / rate
        return None
