"""Row-indexed reading of small local corpora, for `saeray train-sae` and the SAE benches.

Rows are numbered in the dataset's canonical order (files sorted, rows in file order), which
needs every file's row count: fine for a training corpus, never used by `saeray run` (which
plans work units from metadata alone: reading.py, sources.py, units.py).
"""

from __future__ import annotations

import base64
import bisect
import functools
import glob as globlib
import json
import logging
import os
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from .config import DataConfig

log = logging.getLogger(__name__)

_EXTENSIONS = {
    ".parquet": "parquet", ".jsonl": "json", ".json": "json", ".ndjson": "json", ".txt": "text", ".text": "text",
}
_COMPRESSIONS = (".gz", ".zst", ".bz2", ".xz")


from .sources import DataError  # noqa: E402  (one error type for every reader)


@dataclass(frozen=True)
class SourceFile:
    path: str
    n_rows: int
    offset: int
    """doc_id of the file's first row."""


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
    """Rows used by the run (after the token budget)."""
    last_doc_tokens: int | None = None
    """Under a token budget: tokens kept of the last document (it may be cut)."""
    keep_schema: str = ""
    """Arrow schema (IPC, base64) of the kept columns, so every shard's docs agree."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DataPlan":
        return cls(format=d["format"], files=tuple(SourceFile(**f) for f in d["files"]),
                   shards=tuple(Shard(**s) for s in d["shards"]), n_rows=d["n_rows"],
                   last_doc_tokens=d.get("last_doc_tokens"), keep_schema=d.get("keep_schema", ""))

    @functools.cached_property
    def _offsets(self) -> list[int]:
        return [f.offset for f in self.files]

    def file_of(self, doc_id: int) -> str:
        """Path of the data file that holds row `doc_id`."""
        return self.files[max(bisect.bisect_right(self._offsets, doc_id) - 1, 0)].path

    def keep_arrow_schema(self) -> pa.Schema:
        if not self.keep_schema:
            return pa.schema([])
        return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(self.keep_schema)))


def _format_of(path: str) -> str | None:
    p = path.lower()
    for c in _COMPRESSIONS:
        if p.endswith(c):
            p = p[: -len(c)]
    return _EXTENSIONS.get(os.path.splitext(p)[1])


def _is_local(spec: str) -> bool:
    return "://" not in spec and (os.path.exists(spec) or any(ch in spec for ch in "*?[") or spec.startswith((".", "/", "~")))


def list_local_files(spec: str, fmt: str) -> tuple[list[str], str]:
    spec = os.path.expanduser(spec)
    if os.path.isdir(spec):
        paths = sorted(os.path.join(root, f) for root, _, files in os.walk(spec) for f in files
                       if _format_of(f) and not f.startswith((".", "_")))
    elif any(ch in spec for ch in "*?["):
        paths = sorted(p for p in globlib.glob(spec, recursive=True) if os.path.isfile(p))
    elif os.path.isfile(spec):
        paths = [spec]
    else:
        raise DataError(f"dataset {spec!r} does not exist: give a hub id, a directory, a file, or a glob")
    if fmt != "auto":
        return paths, fmt
    formats = {_format_of(p) for p in paths}
    if None in formats or len(formats) > 1:
        raise DataError(f"dataset {spec!r}: cannot tell the format from the file names "
                        f"({sorted(str(f) for f in formats)}); set data.format to parquet, json or text")
    return paths, formats.pop() if formats else "parquet"


def list_hub_files(cfg: DataConfig) -> tuple[list[str], str]:
    """Resolve a hub dataset to its data files for the split (metadata only, needs the hub)."""
    import datasets

    try:
        builder = datasets.load_dataset_builder(cfg.dataset, cfg.subset)
    except Exception as e:
        raise DataError(f"cannot resolve hub dataset {cfg.dataset!r}: {e}. Without network access, "
                        "give local files (a directory or glob) in data.dataset") from None
    files = builder.config.data_files or {}
    if cfg.split not in files:
        raise DataError(f"hub dataset {cfg.dataset!r} has no split {cfg.split!r}: valid splits are {sorted(files)}")
    fmt = {"parquet": "parquet", "json": "json", "text": "text"}.get(builder.name)
    if fmt is None:
        raise DataError(f"hub dataset {cfg.dataset!r} is built by {builder.name!r}; saeray reads parquet, json and text data files")
    return sorted(str(p) for p in files[cfg.split]), fmt


def _open(path: str, mode: str = "rb", compression: str | None = "infer") -> Any:
    return fsspec.open(path, mode, compression=compression)


def count_rows(path: str, fmt: str, text_column: str | None = None) -> int:
    """Rows of one data file. With `text_column`, also check that the column holds text (or null) in
    every row: parquet from the schema, JSON by parsing every line, so bad data is refused before any
    shard runs. Text files hold text by construction (invalid UTF-8 becomes U+FFFD)."""
    if fmt == "parquet":
        with _open(path, compression=None) as f:
            pf = pq.ParquetFile(f)
            if text_column is not None:
                _check_text_type(path, pf.schema_arrow, text_column)
            return pf.metadata.num_rows
    n = 0
    with _open(path) as f:
        for i, line in enumerate(f, 1):
            if fmt == "text":
                n += 1
            elif line.strip():
                n += 1
                if text_column is not None:
                    _check_json_text(path, i, line, text_column)
    return n


_TEXT_TYPES = (pa.types.is_string, pa.types.is_large_string, getattr(pa.types, "is_string_view", lambda t: False),
               pa.types.is_null)


def _check_text_type(path: str, schema: pa.Schema, column: str) -> None:
    if column not in schema.names:
        raise DataError(f"column {column!r} is not in {path}: its columns are {schema.names}; "
                        "every data file needs the text column (set data.text_column)")
    t = schema.field(column).type
    if pa.types.is_dictionary(t):
        t = t.value_type
    if not any(ok(t) for ok in _TEXT_TYPES):
        raise DataError(f"{path}: data.text_column {column!r} has type {t}, not string: convert the column to "
                        "strings (invalid UTF-8 bytes are read as U+FFFD), or set data.text_column to a text column")


def _json_line(line: bytes) -> Any:
    """One JSON line; invalid UTF-8 inside strings is read as U+FFFD, as in text files."""
    return json.loads(line.decode("utf-8-sig", errors="replace"))


def _check_json_text(path: str, lineno: int, line: bytes, column: str) -> None:
    try:
        rec = _json_line(line)
    except ValueError as e:
        raise DataError(f"{path} line {lineno} is not valid JSON ({e}): fix or remove that line") from None
    if not isinstance(rec, dict):
        raise DataError(f"{path} line {lineno} is a JSON {type(rec).__name__}, not an object with a {column!r} field")
    value = rec.get(column)
    if value is not None and not isinstance(value, str):
        raise DataError(f"{path} line {lineno}: data.text_column {column!r} holds {type(value).__name__} "
                        f"{json.dumps(value)[:40]}, not a string: write it as a string, or set data.text_column "
                        "to a text field")


def plan(cfg: DataConfig) -> DataPlan:
    """List the dataset's files, count their rows, and cut the rows into shards."""
    if _is_local(cfg.dataset):
        paths, fmt = list_local_files(cfg.dataset, cfg.format)
    else:
        paths, fmt = list_hub_files(cfg)
    if not paths:
        raise DataError(f"dataset {cfg.dataset!r} has no data files")
    files, offset = [], 0
    for p in paths:
        n = count_rows(p, fmt, cfg.text_column)
        files.append(SourceFile(path=p, n_rows=n, offset=offset))
        offset += n
    if offset == 0:
        raise DataError(f"dataset {cfg.dataset!r} has no rows ({len(paths)} files, all empty)")
    check_columns(files[0].path, fmt, [cfg.text_column, *([cfg.image_column] if cfg.image_column else []),
                                       *cfg.keep_columns])
    if cfg.image_column and fmt == "parquet":
        for f in files:
            _check_image_type(f.path, cfg.image_column)
    keep = _keep_schema(files[0].path, fmt, list(cfg.keep_columns))
    return DataPlan(format=fmt, files=tuple(files), shards=make_shards(files, offset, cfg.shards), n_rows=offset,
                    keep_schema=base64.b64encode(keep.serialize().to_pybytes()).decode())


def _check_image_type(path: str, column: str) -> None:
    from .images import is_image_type

    with _open(path, compression=None) as f:
        schema = pq.ParquetFile(f).schema_arrow
    if column not in schema.names:
        raise DataError(f"column {column!r} is not in {path}: its columns are {schema.names}; every data file needs "
                        "the image column (set data.image_column)")
    t = schema.field(column).type
    if not is_image_type(t):
        raise DataError(f"{path}: data.image_column {column!r} has type {t}, not an image: give a column of HF Image "
                        "structs {bytes, path}, encoded bytes, or path strings")


def _keep_schema(path: str, fmt: str, columns: list[str]) -> pa.Schema:
    """Types of the kept columns: the parquet schema, or inferred from the first JSON rows."""
    if not columns:
        return pa.schema([])
    if fmt == "parquet":
        with _open(path, compression=None) as f:
            full = pq.ParquetFile(f).schema_arrow
        return pa.schema([full.field(c) for c in columns])
    rows = [r for _, r in zip(range(1000), _iter_file(path, fmt, columns, 0, 1 << 62))]
    fields = []
    for c in columns:
        t = pa.array([r.get(c) for r in rows]).type
        fields.append(pa.field(c, pa.string() if pa.types.is_null(t) else t))
    return pa.schema(fields)


def make_shards(files: tuple[SourceFile, ...] | list[SourceFile], n_rows: int, n_shards: int | None) -> tuple[Shard, ...]:
    if n_shards is None:
        ranges = [(f.offset, min(f.offset + f.n_rows, n_rows)) for f in files if f.offset < n_rows and f.n_rows]
    else:
        n = min(n_shards, n_rows)
        ranges = [(n_rows * i // n, n_rows * (i + 1) // n) for i in range(n)]
    return tuple(Shard(i, a, b) for i, (a, b) in enumerate(ranges))


def with_budget(p: DataPlan, cfg: DataConfig, n_tokens: Callable[[Any], int], max_tokens: int) -> DataPlan:
    """Keep the rows, in canonical order, whose tokens fit in `max_tokens` (the last one is cut)."""
    total = 0
    for doc_id, text, _ in iter_rows(p, 0, p.n_rows, cfg.text_column, ()):
        k = n_tokens(text)
        if total + k >= max_tokens:
            n_rows = doc_id + 1
            return replace(p, n_rows=n_rows, last_doc_tokens=max_tokens - total,
                           shards=make_shards(p.files, n_rows, cfg.shards))
        total += k
    return p


def _schema_names(path: str, fmt: str) -> list[str] | None:
    if fmt == "parquet":
        with _open(path, compression=None) as f:
            return pq.ParquetFile(f).schema_arrow.names
    if fmt == "text":
        return ["text"]
    with _open(path) as f:
        for line in f:
            if line.strip():
                return list(_json_line(line))
    return None


def check_columns(path: str, fmt: str, columns: list[str]) -> None:
    names = _schema_names(path, fmt)
    if names is None:
        return
    missing = [c for c in columns if c not in names]
    if missing:
        hint = " (text files have one column, `text`)" if fmt == "text" else ""
        raise DataError(f"column {missing[0]!r} is not in the dataset ({path}): columns are {names}{hint}; "
                        "set data.text_column / data.image_column / data.keep_columns to existing columns")


def _iter_file(path: str, fmt: str, columns: list[str], skip: int, take: int) -> Iterator[dict[str, Any]]:
    """Rows [skip, skip + take) of one file, as dicts restricted to `columns`."""
    if take <= 0:
        return
    if fmt == "parquet":
        with _open(path, compression=None) as f:
            pf = pq.ParquetFile(f)
            row = 0
            for g in range(pf.num_row_groups):
                n = pf.metadata.row_group(g).num_rows
                if row + n <= skip:
                    row += n
                    continue
                table: pa.Table = pf.read_row_group(g, columns=columns)
                lo = max(0, skip - row)
                hi = min(n, skip + take - row)
                yield from _pylist(table.slice(lo, hi - lo))
                row += n
                if row >= skip + take:
                    return
        return
    with _open(path) as f:
        i = 0
        for line in f:
            if fmt == "json":
                if not line.strip():
                    continue
                if i >= skip:
                    rec = _json_line(line)
                    yield {c: rec.get(c) for c in columns}
            elif i >= skip:
                yield {"text": line.rstrip(b"\r\n").decode("utf-8", errors="replace")}
            i += 1
            if i >= skip + take:
                return


def _pylist(table: pa.Table) -> list[dict[str, Any]]:
    """Rows as dicts. String columns holding invalid UTF-8 are decoded with U+FFFD for each bad
    sequence (Python's 'replace'), as text and JSON files are, instead of failing the shard."""
    try:
        return table.to_pylist()
    except UnicodeDecodeError:
        pass
    cols: dict[str, list[Any]] = {}
    for name, col in zip(table.column_names, table.columns):
        if any(ok(col.type) for ok in _TEXT_TYPES[:3]):
            cols[name] = [None if v is None else v.decode("utf-8", errors="replace")
                          for v in col.cast(pa.large_binary()).to_pylist()]
        else:
            cols[name] = col.to_pylist()
    log.warning("a block of %d rows holds invalid UTF-8: read with U+FFFD in place of bad bytes", table.num_rows)
    return [dict(zip(cols, vals)) for vals in zip(*cols.values())]


def iter_rows(p: DataPlan, start: int, end: int, text_column: str, keep_columns: tuple[str, ...]
              ) -> Iterator[tuple[int, Any, dict[str, Any]]]:
    """(doc_id, text value, kept columns) for rows [start, end) in canonical order."""
    columns = [text_column, *keep_columns]
    for f in p.files:
        lo, hi = max(start, f.offset), min(end, f.offset + f.n_rows)
        if lo >= hi:
            continue
        doc_id = lo
        for rec in _iter_file(f.path, p.format, columns, lo - f.offset, hi - lo):
            yield doc_id, rec.get(text_column), {c: rec.get(c) for c in keep_columns}
            doc_id += 1
