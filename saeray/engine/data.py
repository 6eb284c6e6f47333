"""Row-indexed reading of small local corpora, for `saeray train-sae` and the SAE benches.

Rows are numbered 0.. in the dataset's canonical order (files sorted, rows in file order), which
needs every file's row count: fine for a training corpus, never used by `saeray run` (which
plans work units from metadata alone and numbers documents `file << 32 | row`: reading.py,
sources.py, units.py). Files are listed and read through the same code as runs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterator

import pyarrow as pa

from . import reading, sources
from .config import DataConfig
from .sources import DataError
from .units import DataPlan as _RunPlan

__all__ = ["DataError", "DataPlan", "SourceFile", "Shard", "plan", "iter_rows", "list_hub_files"]

_STREAM_BYTES = 64 << 20


@dataclass(frozen=True)
class SourceFile:
    path: str
    n_rows: int
    offset: int
    """Row number of the file's first row."""


@dataclass(frozen=True)
class Shard:
    index: int
    start: int
    end: int
    """Rows [start, end) in canonical order."""


@dataclass(frozen=True)
class DataPlan:
    format: str
    files: tuple[SourceFile, ...]
    shards: tuple[Shard, ...]
    n_rows: int
    keep_schema: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def keep_arrow_schema(self) -> pa.Schema:
        return _RunPlan("", (), 1, keep_schema=self.keep_schema).keep_arrow_schema()


def list_hub_files(cfg: DataConfig) -> tuple[list[str], str]:
    """A hub dataset's data files for the split and their format (metadata only)."""
    files = reading.hub_files(cfg)
    formats = {sources.format_of(f) for f in files}
    return files, formats.pop() if len(formats) == 1 and None not in formats else "parquet"


def _count_rows(url: str, fmt: str) -> int:
    if fmt == "parquet":
        raw, pf = sources.parquet_file(url)
        with raw:
            return pf.metadata.num_rows
    return sum(u.n_rows for u, _ in sources.line_units(url, 0, fmt, _STREAM_BYTES))


def plan(cfg: DataConfig) -> DataPlan:
    """List the dataset's files (checked as a run checks them), count their rows, cut rows into shards."""
    infos, fmt = reading.list_dataset(cfg)
    checked = reading.plan(cfg, infos, fmt)
    files, offset = [], 0
    for f in infos:
        n = _count_rows(f.url, fmt)
        files.append(SourceFile(path=f.url, n_rows=n, offset=offset))
        offset += n
    if offset == 0:
        raise DataError(f"dataset {cfg.dataset!r} has no rows ({len(infos)} files, all empty)")
    return DataPlan(format=fmt, files=tuple(files), shards=make_shards(files, offset, cfg.shards), n_rows=offset,
                    keep_schema=checked.keep_schema)


def make_shards(files: list[SourceFile], n_rows: int, n_shards: int | None) -> tuple[Shard, ...]:
    if n_shards is None:
        ranges = [(f.offset, min(f.offset + f.n_rows, n_rows)) for f in files if f.offset < n_rows and f.n_rows]
    else:
        n = min(n_shards, n_rows)
        ranges = [(n_rows * i // n, n_rows * (i + 1) // n) for i in range(n)]
    return tuple(Shard(i, a, b) for i, (a, b) in enumerate(ranges))


def _file_rows(f: SourceFile, fmt: str, columns: list[str], text_column: str | None, skip: int, take: int
               ) -> Iterator[dict[str, Any]]:
    """Rows [skip, skip + take) of one file, as dicts restricted to `columns`."""
    if fmt == "parquet":
        for table in sources.parquet_rows(f.path, columns, skip, skip + take):
            yield from reading._pylist(table)
        return
    for unit, payload in sources.line_units(f.path, 0, fmt, _STREAM_BYTES):
        if unit.row_start + unit.n_rows <= skip:
            continue
        for row, rec in sources.unit_records(unit, payload, fmt, f.path, columns, text_column):
            if skip <= row < skip + take:
                yield rec
        if unit.row_start + unit.n_rows >= skip + take:
            return


def iter_rows(p: DataPlan, start: int, end: int, text_column: str, keep_columns: tuple[str, ...]
              ) -> Iterator[tuple[int, Any, dict[str, Any]]]:
    """(row number, text value, kept columns) for rows [start, end) in canonical order."""
    columns = [text_column, *keep_columns]
    text = None if p.format == "text" else text_column
    for f in p.files:
        lo, hi = max(start, f.offset), min(end, f.offset + f.n_rows)
        if lo >= hi:
            continue
        row = lo
        for rec in _file_rows(f, p.format, columns, text, lo - f.offset, hi - lo):
            yield row, rec.get(text_column), {c: rec.get(c) for c in keep_columns}
            row += 1
