"""Work units: the data plan a run keeps in its manifest, the tasks workers get, and the token budget.

A unit is a run of consecutive rows of one file, about `data.unit_bytes` uncompressed bytes:
Parquet units are planned from footers (row groups merged up to the target); units of JSON lines
and text files are cut by their file's reader as it streams the file (`sources.line_units`). A
unit's id is `file_index * UNITS_PER_FILE + k` (k: its index within the file), so ids, like doc
ids, do not depend on worker count, and markers sort in canonical order.

The token budget (`data.max_tokens`) covers the leading documents in canonical order (files
sorted, rows in file order): their text tokens are summed in that order, and the document at
which the sum reaches the budget is cut so the total is exactly `max_tokens`; later documents
are not part of the run. Workers count each unit's tokens (`Ledger.counted`); a unit's share is
known once every earlier unit is counted: all of it, a cut (the unit that holds the boundary),
or nothing (units past it are never processed or committed).
"""

from __future__ import annotations

import base64
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa

UNITS_PER_FILE = 1_000_000
DEFAULT_UNIT_BYTES = 64 << 20
"""64 MiB of text ~ 16M tokens ~ 1 minute of one H100 on Gemma-2-2B to layer 12 at 50% MFU."""


def uid_of(file: int, k: int) -> int:
    """A unit's id: its file's index and its index k within the file (`split_uid` undoes it)."""
    return file * UNITS_PER_FILE + k


def split_uid(uid: int) -> tuple[int, int]:
    """(file index, k) of a unit id."""
    return divmod(uid, UNITS_PER_FILE)


@dataclass(frozen=True)
class PlanFile:
    url: str
    size: int
    version: str
    n_rows: int | None = None
    """Parquet: rows from the footer. Line files: unknown until read."""


@dataclass(frozen=True)
class Task:
    """One unit as a worker gets it. Line units carry their bytes beside (the reader's payload)."""
    uid: int
    file: int
    k: int
    row_start: int
    n_rows: int
    line_start: int = 1
    byte_start: int = 0
    n_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class DataPlan:
    """What a run reads: the files (as the store described them) and, for Parquet, the units."""
    format: str
    files: tuple[PlanFile, ...]
    unit_bytes: int
    units: tuple[Task, ...] = ()
    """Parquet: every unit, planned from footers. Line files: () (their readers cut them)."""
    keep_schema: str = ""
    """Arrow schema (IPC, base64) of the kept columns, so every unit's docs agree."""

    @property
    def streamed(self) -> bool:
        return self.format != "parquet"

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format, "files": [asdict(f) for f in self.files], "unit_bytes": self.unit_bytes,
                "units": [u.to_dict() for u in self.units], "keep_schema": self.keep_schema}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DataPlan":
        if "unit_bytes" not in d:
            raise ValueError("this run directory was written by an older saeray (shards of canonical row ranges); "
                             "its outputs stay readable, but to extend it rerun into a new --out")
        return cls(format=d["format"], files=tuple(PlanFile(**f) for f in d["files"]), unit_bytes=d["unit_bytes"],
                   units=tuple(Task(**u) for u in d["units"]), keep_schema=d["keep_schema"])

    def keep_arrow_schema(self) -> pa.Schema:
        if not self.keep_schema:
            return pa.schema([])
        return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(self.keep_schema)))


def parquet_units(file: int, group_rows: list[int], group_bytes: list[int], unit_bytes: int) -> list[Task]:
    """Consecutive row groups merged until a unit holds at least `unit_bytes` (uncompressed, per the footer);
    a row group larger than that is split into row ranges of about `unit_bytes`."""
    units: list[Task] = []
    start = rows = size = 0

    def close() -> None:
        nonlocal start, rows, size
        if rows:
            units.append(Task(uid_of(file, len(units)), file, len(units), start, rows))
        start, rows, size = start + rows, 0, 0

    for n, b in zip(group_rows, group_bytes):
        if b > unit_bytes and n > 1:  # one big row group: rows of about unit_bytes each
            close()
            pieces = min(n, -(-b // unit_bytes))
            for i in range(pieces):
                lo, hi = n * i // pieces, n * (i + 1) // pieces
                rows, size = hi - lo, 0
                close()
            continue
        rows += n
        size += b
        if size >= unit_bytes:
            close()
    close()
    return units


def split_rows(file: int, n_rows: int, pieces: int) -> list[Task]:
    """A file's rows in `pieces` near-equal units (data.shards on Parquet)."""
    pieces = max(1, min(pieces, n_rows))
    return [Task(uid_of(file, i), file, i, n_rows * i // pieces, n_rows * (i + 1) // pieces - n_rows * i // pieces)
            for i in range(pieces) if n_rows]


@dataclass
class Ledger:
    """Token counts of units in canonical order, and what share of the budget each unit gets.

    The frontier is the first unit not yet counted (or not yet known to exist); the tokens before
    every unit up to it are kept, so each question costs O(1) amortized, also over 10^5 units.
    """
    max_tokens: int
    n_files: int
    counts: dict[int, int] = field(default_factory=dict)
    """uid -> the unit's text tokens (all of its documents)."""
    units_in_file: dict[int, int] = field(default_factory=dict)
    """file -> how many units it has, once known (Parquet: from the plan; line files: at the reader's end)."""
    _before: dict[int, int] = field(default_factory=lambda: {0: 0})
    """uid -> tokens of every unit before it, for units up to the frontier."""
    _frontier: int = 0
    _total: int = 0
    _end: int | None = None
    """The uid of the unit that holds the budget's end, once found."""

    def counted(self, uid: int, tokens: int) -> None:
        self.counts[uid] = tokens
        self._advance()

    def file_complete(self, file: int, n_units: int) -> None:
        self.units_in_file[file] = n_units
        self._advance()

    def _advance(self) -> None:
        while self._end is None:
            uid = self._frontier
            file, k = split_uid(uid)
            if file >= self.n_files:
                return
            if self.units_in_file.get(file) == k:  # past the file's last unit: the next file starts
                nxt = uid_of(file + 1, 0)
                self._before[nxt] = self._total
                self._frontier = nxt
                continue
            c = self.counts.get(uid)
            if c is None:
                return
            if self._total + c >= self.max_tokens:
                self._end = uid
                return
            self._total += c
            self._frontier = uid + 1
            self._before[self._frontier] = self._total

    def prefix(self, uid: int) -> int | None:
        """Tokens of every unit before `uid` in canonical order; None while one of them is not counted.
        Past the budget's end it is at least max_tokens (the exact figure is not needed)."""
        if self._end is not None and uid > self._end:
            return self.max_tokens
        return self._before.get(uid)

    def beyond(self, uid: int) -> bool:
        """True once it is known that the budget ends before this unit."""
        return self._end is not None and uid > self._end

    def reached(self) -> bool:
        """The budget's end is found: some counted unit reaches it with every earlier unit counted."""
        return self._end is not None

    def counted_tokens(self) -> int:
        return sum(self.counts.values())
