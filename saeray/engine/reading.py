"""A run's data: list the files (metadata only), check columns, plan units, read a unit's rows.

Planning reads what the store says about each file (size, etag or mtime), the Parquet footers,
and for JSON lines the first rows of the first file (column names and kept-column types): never
the corpus. Datasets are local paths, directories and globs, URLs (`s3://`, `gs://`, `https://`,
`hf://`, through fsspec), or hub ids, which resolve to `hf://` URLs and then take the same path.
"""

from __future__ import annotations

import base64
import logging
import os
from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from . import sources
from .config import DataConfig
from .sources import DataError
from .storage import FileInfo, is_remote, list_files
from .units import DEFAULT_UNIT_BYTES, DataPlan, PlanFile, Task, parquet_units, split_rows

log = logging.getLogger(__name__)

PLAN_ROWS = 50
"""JSON lines: rows of the first file read at planning (column names, kept-column types)."""
_TEXT_TYPES = (pa.types.is_string, pa.types.is_large_string, getattr(pa.types, "is_string_view", lambda t: False),
               pa.types.is_null)


def _is_path(spec: str) -> bool:
    return is_remote(spec) or spec.startswith("file://") or os.path.exists(os.path.expanduser(spec)) \
        or any(ch in spec for ch in "*?[") or spec.startswith((".", "/", "~"))


def _looks_local(spec: str) -> bool:
    """A spec no hub id can be: more than one '/' (hub ids are owner/name), a data file's extension, or '\\'."""
    return spec.count("/") > 1 or "\\" in spec or sources.format_of(spec) is not None


def _missing(spec: str) -> str:
    where = "" if os.path.isabs(os.path.expanduser(spec)) else \
        (f" (a relative path is read from the config file's folder, then from the current directory {os.getcwd()}; "
         "a hub id is owner/name)")
    return f"data.dataset: {spec} does not exist{where}"


def list_dataset(cfg: DataConfig) -> tuple[list[FileInfo], str]:
    """The dataset's data files with their sizes and versions, and their format."""
    if _is_path(cfg.dataset):
        try:
            files = list_files(cfg.dataset, lambda name: sources.format_of(name) is not None or cfg.format != "auto")
        except FileNotFoundError as e:
            there = is_remote(cfg.dataset) or os.path.lexists(os.path.expanduser(cfg.dataset))
            raise DataError(str(e) if there else _missing(cfg.dataset)) from None
    elif _looks_local(cfg.dataset):
        raise DataError(_missing(cfg.dataset))
    else:
        files = [_hub_file_info(u) for u in hub_files(cfg)]
    if not files:
        raise DataError(f"dataset {cfg.dataset!r} has no data files (.parquet, .jsonl, .json, .txt, optionally "
                        ".gz/.zst/.xz/.bz2)")
    fmt = cfg.format
    if fmt == "auto":
        formats = {sources.format_of(f.url) for f in files}
        if None in formats or len(formats) > 1:
            raise DataError(f"dataset {cfg.dataset!r}: cannot tell the format from the file names "
                            f"({sorted(str(f) for f in formats)}); set data.format to parquet, json or text")
        fmt = formats.pop()
    return files, fmt


def hub_files(cfg: DataConfig) -> list[str]:
    """A hub dataset's data files for the split, as URLs (hf://...) or local paths: metadata only."""
    import datasets

    try:
        builder = datasets.load_dataset_builder(cfg.dataset, cfg.subset)
    except Exception as e:
        raise DataError(f"cannot resolve hub dataset {cfg.dataset!r}: {e}. Without network access, "
                        "give local files (a directory or glob) or a URL in data.dataset") from None
    files = builder.config.data_files or {}
    if cfg.split not in files:
        raise DataError(f"hub dataset {cfg.dataset!r} has no split {cfg.split!r}: valid splits are {sorted(files)}")
    if builder.name not in ("parquet", "json", "text"):
        raise DataError(f"hub dataset {cfg.dataset!r} is built by {builder.name!r}; saeray reads parquet, json and "
                        "text data files")
    return sorted(str(p) for p in files[cfg.split])


def _hub_file_info(url: str) -> FileInfo:
    (info,) = list_files(url, lambda name: True)
    return info


# ---- checks and the plan -------------------------------------------------------------------


def _check_text_type(url: str, schema: pa.Schema, column: str) -> None:
    if column not in schema.names:
        raise DataError(f"column {column!r} is not in {url}: its columns are {schema.names}; "
                        "every data file needs the text column (set data.text_column)")
    t = schema.field(column).type
    if pa.types.is_dictionary(t):
        t = t.value_type
    if not any(ok(t) for ok in _TEXT_TYPES):
        raise DataError(f"{url}: data.text_column {column!r} has type {t}, not string: convert the column to "
                        "strings (invalid UTF-8 bytes are read as U+FFFD), or set data.text_column to a text column")


def _check_token_type(url: str, schema: pa.Schema, column: str) -> None:
    if column not in schema.names:
        raise DataError(f"column {column!r} is not in {url}: its columns are {schema.names}; "
                        "set data.token_column to the column of token ids")
    t = schema.field(column).type
    ok = (pa.types.is_list(t) or pa.types.is_large_list(t)) and pa.types.is_integer(t.value_type)
    if not ok:
        raise DataError(f"{url}: data.token_column {column!r} has type {t}, not a list of integers: "
                        "give one list of token ids per row, or use data.text_column for text")


def check_token_ids(where: str, ids: Any, vocab_size: int | None) -> np.ndarray:
    """One document's token ids, checked (a list of ints inside the model's vocabulary) with numpy: this
    runs on every document of a pre-tokenized run."""
    arr = np.asarray(ids) if isinstance(ids, list) else None
    if arr is None or arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise DataError(f"{where}: data.token_column holds {type(ids).__name__} {str(ids)[:40]}, not a list of "
                        "integer token ids")
    if vocab_size is not None and arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
        bad = int(arr[(arr < 0) | (arr >= vocab_size)][0])
        raise DataError(f"{where}: token id {bad} is outside the model's vocabulary (0..{vocab_size - 1}): the "
                        "dataset was tokenized for another model")
    return arr


def _value_column(cfg: DataConfig) -> str:
    return cfg.token_column or cfg.text_column


def plan(cfg: DataConfig, files: list[FileInfo], fmt: str, vocab_size: int | None = None) -> DataPlan:
    """Check the columns and plan the units (Parquet: from footers; line files: their readers cut them)."""
    unit_bytes = cfg.unit_bytes or DEFAULT_UNIT_BYTES
    wanted = [_value_column(cfg), *([cfg.image_column] if cfg.image_column else []), *cfg.keep_columns]
    if fmt == "parquet":
        plan_files, units, keep = _plan_parquet(cfg, files, unit_bytes, wanted, vocab_size)
    else:
        if cfg.image_column:
            raise DataError("data.image_column needs Parquet files (images as HF Image structs, bytes or paths)")
        if fmt == "text" and cfg.token_column:
            raise DataError("data.token_column needs Parquet or JSON lines (text files hold one text per line)")
        if cfg.shards:  # about `shards` units: the stored sizes give the target (compressed files give more)
            unit_bytes = max(1, -(-sum(f.size for f in files) // cfg.shards))
        first, rows = _first_rows(cfg, files, fmt)
        names = ["text"] if fmt == "text" else sorted({k for r in rows for k in r})
        missing = [c for c in wanted if c not in names] if rows else []
        if missing:
            hint = " (text files have one column, `text`)" if fmt == "text" else ""
            raise DataError(f"column {missing[0]!r} is not in the dataset ({first}): columns are {names}{hint}; "
                            "set data.text_column / data.token_column / data.keep_columns to existing columns")
        if cfg.token_column and rows:
            check_token_ids(f"{first} line 1", rows[0].get(cfg.token_column), vocab_size)
        keep = _json_keep_schema(rows, list(cfg.keep_columns))
        plan_files, units = [PlanFile(f.url, f.size, f.version) for f in files], []
    return DataPlan(format=fmt, files=tuple(plan_files), unit_bytes=unit_bytes, units=tuple(units),
                    keep_schema=base64.b64encode(keep.serialize().to_pybytes()).decode())


def _first_rows(cfg: DataConfig, files: list[FileInfo], fmt: str) -> tuple[str, list[dict[str, Any]]]:
    """(file, its first PLAN_ROWS rows) of the first file that has rows (one file unless the first ones are
    empty); their text values must be text. A dataset whose files hold no row at all is refused."""
    for f in files:
        rows = sources.first_records(f.url, fmt, PLAN_ROWS)
        if rows:
            if fmt == "json" and not cfg.token_column:
                for i, r in enumerate(rows):
                    if cfg.text_column in r:
                        sources.check_text(f"{f.url} row {i}", r[cfg.text_column], cfg.text_column)
            return f.url, rows
    raise DataError(f"dataset {cfg.dataset!r} has no rows ({len(files)} files, all empty)")


def _plan_parquet(cfg: DataConfig, files: list[FileInfo], unit_bytes: int, wanted: list[str],
                  vocab_size: int | None) -> tuple[list[PlanFile], list[Task], pa.Schema]:
    footers = []
    for f in files:
        raw, pf = sources.parquet_file(f.url, block_size=256 << 10)
        with raw:
            schema = pf.schema_arrow
            missing = [c for c in wanted if c not in schema.names]
            if missing:
                raise DataError(f"column {missing[0]!r} is not in the dataset ({f.url}): columns are {schema.names}; "
                                "set data.text_column / data.token_column / data.image_column / data.keep_columns "
                                "to existing columns")
            if cfg.token_column:
                _check_token_type(f.url, schema, cfg.token_column)
                bounds = sources.token_column_bounds(pf, cfg.token_column)
                if bounds and vocab_size is not None and (bounds[0] < 0 or bounds[1] >= vocab_size):
                    bad = bounds[1] if bounds[1] >= vocab_size else bounds[0]
                    raise DataError(f"{f.url}: data.token_column {cfg.token_column!r} holds token id {bad}, outside "
                                    f"the model's vocabulary (0..{vocab_size - 1}): the dataset was tokenized for "
                                    "another model")
            else:
                _check_text_type(f.url, schema, cfg.text_column)
            if cfg.image_column:
                _check_image_type(f.url, schema, cfg.image_column)
            md = pf.metadata
            footers.append(([md.row_group(g).num_rows for g in range(md.num_row_groups)],
                            [md.row_group(g).total_byte_size for g in range(md.num_row_groups)], schema))
    total = sum(sum(r) for r, _, _ in footers)
    if total == 0:
        raise DataError(f"dataset {cfg.dataset!r} has no rows ({len(files)} files, all empty)")
    counts = [sum(r) for r, _, _ in footers]
    pieces = _apportion(counts, cfg.shards) if cfg.shards else None
    plan_files, units = [], []
    for i, (f, (rows, sizes, _)) in enumerate(zip(files, footers)):
        plan_files.append(PlanFile(f.url, f.size, f.version, counts[i]))
        units += split_rows(i, counts[i], pieces[i]) if pieces else parquet_units(i, rows, sizes, unit_bytes)
    schema = footers[0][2]
    return plan_files, units, pa.schema([schema.field(c) for c in cfg.keep_columns])


def _apportion(rows: list[int], n: int) -> list[int]:
    """Units per file for data.shards = n: in proportion to rows (largest remainders), at least one per
    non-empty file, at most one per row: exactly n units whenever n >= the non-empty files."""
    total = sum(rows)
    share = [r * n / total for r in rows]
    out = [min(r, max(1, int(s))) if r else 0 for r, s in zip(rows, share)]
    for i in sorted(range(len(rows)), key=lambda i: share[i] - int(share[i]), reverse=True):
        if sum(out) >= n:
            break
        if out[i] < rows[i]:
            out[i] += 1
    return out


def _check_image_type(url: str, schema: pa.Schema, column: str) -> None:
    from .images import is_image_type

    t = schema.field(column).type
    if not is_image_type(t):
        raise DataError(f"{url}: data.image_column {column!r} has type {t}, not an image: give a column of HF Image "
                        "structs {bytes, path}, encoded bytes, or path strings")


def _json_keep_schema(rows: list[dict[str, Any]], columns: list[str]) -> pa.Schema:
    fields = []
    for c in columns:
        t = pa.array([r.get(c) for r in rows]).type if rows else pa.null()
        fields.append(pa.field(c, pa.string() if pa.types.is_null(t) else t))
    return pa.schema(fields)


# ---- reading one unit ----------------------------------------------------------------------


def unit_rows(p: DataPlan, cfg: DataConfig, task: Task, payload: bytes | None, columns: list[str]
              ) -> Iterator[tuple[int, dict[str, Any]]]:
    """(doc_id, {column: value}) for each row of a unit, in file order."""
    url = p.files[task.file].url
    if p.format == "parquet":
        row = task.row_start
        for table in sources.parquet_rows(url, columns, task.row_start, task.row_start + task.n_rows):
            for rec in _pylist(table):
                yield sources.doc_id(task.file, row), rec
                row += 1
        return
    if payload is None:
        raise ValueError(f"unit {task.uid} of {url} has no payload: line units come from the file's reader")
    unit = sources.LineUnit(task.file, task.k, task.row_start, task.n_rows, task.line_start, task.byte_start,
                            task.n_bytes)
    text = None if cfg.token_column or p.format == "text" else cfg.text_column
    for row, rec in sources.unit_records(unit, payload, p.format, url, columns, text):
        yield sources.doc_id(task.file, row), rec


def _pylist(table: pa.Table) -> list[dict[str, Any]]:
    """Rows as dicts. String columns holding invalid UTF-8 are decoded with U+FFFD for each bad
    sequence (Python's 'replace'), as text and JSON files are, instead of failing the unit."""
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
