"""The units a run hands out, in canonical order: Parquet units from the plan, line-file units as their
reader cuts them (one pass over each file; `FileReader` is the Ray actor that does it), and the token ledger a budget
needs."""

from __future__ import annotations

from typing import Any, Iterator

from ..engine import sources
from ..engine.storage import READ
from ..engine.units import DataPlan, Ledger, Task, uid_of


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


def ledger_for(plan: DataPlan, budget: int) -> Ledger:
    """A token ledger for `budget`; Parquet files' unit counts are known from the plan."""
    ledger = Ledger(budget, len(plan.files))
    if not plan.streamed:
        for f in range(len(plan.files)):
            ledger.file_complete(f, sum(1 for u in plan.units if u.file == f))
    return ledger


class FileReader:
    """Streams one line file and returns its units one by one (a Ray actor; no CPU reserved: it mostly waits)."""

    def __init__(self, plan: dict[str, Any], file: int, skip: list[int]):
        self.stream = unit_stream(DataPlan.from_dict(plan), file, set(skip))

    def next(self) -> tuple[dict[str, Any] | None, bytes | None]:
        """(the next unit's task with `read_bytes`: stored bytes read for it, its bytes); (None, None) at the end."""
        b0 = READ.bytes
        for task, data in self.stream:
            return {**task.to_dict(), "read_bytes": READ.bytes - b0}, data
        return None, None
