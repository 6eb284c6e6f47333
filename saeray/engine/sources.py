"""Data files as work units: Parquet by row groups, JSON lines and text (plain, .gz, .zst, .xz, .bz2) as streams.

- Parquet is read by row ranges: its footer says how many rows each row group holds, so units
  are planned from footers alone and any worker reads its own unit directly.
- A compressed JSON lines file (the Pile's `train/00.jsonl.zst`: one zstd frame of several GB)
  cannot seek: one reader streams it once, from its first byte, and cuts it into units at line
  ends every `unit_bytes` uncompressed bytes (deterministic: the same data gives the same units).
  Its units go to any worker; the bytes read are the file's prefix up to the last unit needed.
  Plain JSON lines and text files are read the same way (one code path).

A document's `doc_id` is `file_index << 32 | row`: the file's index in the sorted file list and
the row's index within its file (JSON lines: blank lines are not rows; text: every line is a row).
It is known without counting the rows of earlier files and does not depend on unit size or worker
count. Errors name the file and the line (or compressed byte) where it broke.
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
import zlib
from dataclasses import dataclass
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from .storage import RawFile, is_transient, open_raw

EXTENSIONS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".ndjson": "json", ".txt": "text",
              ".text": "text"}
COMPRESSIONS = (".gz", ".zst", ".xz", ".bz2")
ROW_BITS = 32
"""doc_id = file_index << ROW_BITS | row within the file."""


class DataError(ValueError):
    """The dataset cannot be found, read, or lacks a requested column."""


def doc_id(file_index: int, row: int) -> int:
    return (file_index << ROW_BITS) | row


def split_doc_id(d: int) -> tuple[int, int]:
    """(file index, row within the file) of a doc_id."""
    return d >> ROW_BITS, d & ((1 << ROW_BITS) - 1)


def compression_of(name: str) -> str | None:
    n = name.lower()
    return next((c for c in COMPRESSIONS if n.endswith(c)), None)


def format_of(name: str) -> str | None:
    n = name.lower()
    c = compression_of(n)
    if c:
        n = n[: -len(c)]
    return EXTENSIONS.get(os.path.splitext(n)[1])


# ---- streams of decompressed bytes ---------------------------------------------------------


def decompressed(raw: RawFile, url: str, read_size: int = 1 << 18) -> Any:
    """A readable binary stream of the file's decompressed bytes (the file itself when not compressed)."""
    c = compression_of(url)
    if c is None:
        return raw
    if c == ".gz":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if c == ".xz":
        return lzma.LZMAFile(raw, mode="rb")
    if c == ".bz2":
        return bz2.BZ2File(raw, mode="rb")
    try:
        import zstandard
    except ImportError:  # a declared dependency; only a broken install lacks it
        raise DataError(f"{url}: reading .zst files needs the zstandard package (pip install zstandard)") from None
    return _ZstdStream(raw, zstandard, read_size)


class _ZstdStream:
    """zstd frames one after another, decompressed as read; a stream that ends inside a frame is an error
    (zstandard's own stream reader returns a truncated file's bytes as if it were whole)."""

    def __init__(self, raw: RawFile, zstandard: Any, read_size: int):
        self.raw, self.read_size = raw, read_size
        self.dctx = zstandard.ZstdDecompressor(max_window_size=1 << 31)  # the Pile's files use long windows
        self.error = zstandard.ZstdError
        self.obj = self.dctx.decompressobj()
        self.in_frame = False
        self.buf = bytearray()
        self.done = False

    def read(self, n: int) -> bytes:
        while len(self.buf) < n and not self.done:
            data = self.raw.read(self.read_size)
            if not data:
                if self.in_frame:
                    raise self.error("the file ends inside a zstd frame")
                self.done = True
                break
            while data:
                if self.obj.eof:
                    self.obj = self.dctx.decompressobj()
                self.in_frame = True
                self.buf += self.obj.decompress(data)
                data = self.obj.unused_data if self.obj.eof else b""
                if self.obj.eof:
                    self.in_frame = False
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out


def _corrupt(url: str, raw: RawFile, line: int, e: BaseException) -> DataError:
    return DataError(f"{url}: cannot decompress at compressed byte {raw.tell():,} (after line {line:,}): "
                     f"{type(e).__name__}: {e}. The file is truncated or corrupt: download it again")


def read_chunks(url: str, *, block_size: int = 4 << 20) -> Iterator[bytes]:
    """The decompressed bytes of a file in chunks of `block_size`, reading the stored bytes `block_size` at a
    time (so little is read past what is used); decompression errors name the file and byte."""
    with open_raw(url, block_size=block_size) as raw:
        stream = decompressed(raw, url, read_size=block_size)
        lines = 0
        while True:
            try:
                chunk = stream.read(block_size)
            except (OSError, EOFError, lzma.LZMAError, zlib.error, ValueError) as e:
                if isinstance(e, OSError) and not _is_format_error(e):
                    raise
                raise _corrupt(url, raw, lines, e) from None
            except Exception as e:
                if type(e).__name__ == "ZstdError":
                    raise _corrupt(url, raw, lines, e) from None
                raise
            if not chunk:
                return
            lines += chunk.count(b"\n")
            yield chunk


def _is_format_error(e: OSError) -> bool:
    return isinstance(e, gzip.BadGzipFile) or "compressed" in str(e).lower() or "not a gzip" in str(e).lower() \
        or "invalid data stream" in str(e).lower()


@dataclass(frozen=True)
class LineUnit:
    """A run of whole lines of one file: what a reader hands to a worker."""
    file: int
    k: int
    """The unit's index within its file."""
    row_start: int
    n_rows: int
    line_start: int
    """1-based line number of the unit's first line (for error messages)."""
    byte_start: int
    """Offset of the unit's first byte in the decompressed file."""
    n_bytes: int


def line_units(url: str, file_index: int, fmt: str, unit_bytes: int, *, block_size: int = 4 << 20
               ) -> Iterator[tuple[LineUnit, bytes]]:
    """Cut a line file into units: each ends at the first line end at or after `unit_bytes` bytes
    (the last one at the end of the file). Deterministic: it depends on the data and unit_bytes alone."""
    buf = bytearray()
    k = row = 0
    line = 1
    offset = 0
    scan_from = 0
    chunks = read_chunks(url, block_size=block_size)
    eof = False
    while True:
        cut = -1
        while cut < 0:
            if len(buf) >= unit_bytes:
                idx = buf.find(b"\n", max(unit_bytes - 1, scan_from))
                if idx >= 0:
                    cut = idx + 1
                    break
                scan_from = len(buf)
            if eof:
                cut = len(buf)
                break
            chunk = next(chunks, None)
            if chunk is None:
                eof = True
            else:
                buf += chunk
        if cut == 0:
            return
        data = bytes(buf[:cut])
        del buf[:cut]
        scan_from = 0
        n_rows = count_rows(data, fmt)
        yield LineUnit(file_index, k, row, n_rows, line, offset, len(data)), data
        k += 1
        row += n_rows
        line += data.count(b"\n")
        offset += len(data)


def _lines(data: bytes) -> list[bytes]:
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return lines


def count_rows(data: bytes, fmt: str) -> int:
    lines = _lines(data)
    return len(lines) if fmt == "text" else sum(1 for ln in lines if ln.strip())


try:
    import orjson as _orjson
except ImportError:  # a declared dependency; the stdlib parser gives the same values
    _orjson = None


def parse_json_line(line: bytes) -> Any:
    """One JSON line; invalid UTF-8 inside strings is read as U+FFFD, as in text files."""
    if _orjson is not None:
        try:
            return _orjson.loads(line)
        except _orjson.JSONDecodeError:
            pass  # invalid UTF-8 or a BOM: the forgiving path decides
    return json.loads(line.decode("utf-8-sig", errors="replace"))


def check_text(where: str, value: Any, column: str) -> None:
    if value is not None and not isinstance(value, str):
        raise DataError(f"{where}: data.text_column {column!r} holds {type(value).__name__} {json.dumps(value)[:40]}, "
                        "not a string: write it as a string, or set data.text_column to a text field")


def json_record(url: str, lineno: int, line: bytes) -> dict[str, Any]:
    """One JSON lines row, or a one-line error naming the file and line."""
    try:
        rec = parse_json_line(line)
    except ValueError as e:
        raise DataError(f"{url} line {lineno:,} is not valid JSON ({e}): fix or remove that line") from None
    if not isinstance(rec, dict):
        raise DataError(f"{url} line {lineno:,} is a JSON {type(rec).__name__}, not an object with fields")
    return rec


def unit_records(unit: LineUnit, data: bytes, fmt: str, url: str, columns: list[str] | None,
                 text_column: str | None = None) -> Iterator[tuple[int, dict]]:
    """(row within the file, {column: value}) of each row of a line unit (columns None: every field);
    `text_column`'s values must be text."""
    row = unit.row_start
    for i, line in enumerate(_lines(data)):
        if fmt == "text":
            yield row, {"text": line.rstrip(b"\r").decode("utf-8", errors="replace")}
            row += 1
            continue
        if not line.strip():
            continue
        rec = json_record(url, unit.line_start + i, line)
        if text_column is not None:
            check_text(f"{url} line {unit.line_start + i:,}", rec.get(text_column), text_column)
        yield row, rec if columns is None else {c: rec.get(c) for c in columns}
        row += 1


def first_records(url: str, fmt: str, n: int, block_size: int = 16 << 10) -> list[dict[str, Any]]:
    """The first `n` rows of a line file (planning: column names and kept-column types), read a block at a time."""
    out: list[dict[str, Any]] = []
    for unit, data in line_units(url, 0, fmt, block_size, block_size=block_size):
        out += [rec for _, rec in unit_records(unit, data, fmt, url, None)]
        if len(out) >= n:
            break
    return out[:n]


# ---- Parquet -------------------------------------------------------------------------------


def parquet_file(url: str, block_size: int = 1 << 20) -> tuple[RawFile, pq.ParquetFile]:
    raw = open_raw(url, block_size=block_size)
    try:
        return raw, pq.ParquetFile(raw)
    except (pa.ArrowInvalid, OSError) as e:
        raw.close()
        raise DataError(f"{url} is not a readable Parquet file ({e}): download it again, or set data.format") from None


def parquet_rows(url: str, columns: list[str], row_start: int, row_end: int) -> Iterator[pa.Table]:
    """Rows [row_start, row_end) of one Parquet file, row group by row group (only those it needs)."""
    raw, pf = parquet_file(url, block_size=4 << 20)
    with raw:
        row = 0
        for g in range(pf.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if row + n <= row_start:
                row += n
                continue
            if row >= row_end:
                return
            try:
                table = pf.read_row_group(g, columns=columns)
            except (pa.ArrowException, OSError) as e:
                if is_transient(e):
                    raise
                raise DataError(f"{url}: row group {g} (rows {row:,} to {row + n - 1:,}) cannot be read "
                                f"({type(e).__name__}: {' '.join(str(e).split())}): the file is corrupt; write or "
                                "download it again, then rerun: only the units of this file are redone") from None
            lo, hi = max(0, row_start - row), min(n, row_end - row)
            yield table.slice(lo, hi - lo)
            row += n


def token_column_bounds(pf: pq.ParquetFile, column: str) -> tuple[int, int] | None:
    """(min, max) token id of a list column from the footer's statistics; None where a row group has none."""
    lo, hi = None, None
    md = pf.metadata
    for g in range(md.num_row_groups):
        rg = md.row_group(g)
        found = False
        for c in range(rg.num_columns):
            col = rg.column(c)
            if not col.path_in_schema.startswith(column + "."):
                continue
            found = True
            st = col.statistics
            if st is None or not st.has_min_max:
                return None
            lo = st.min if lo is None else min(lo, st.min)
            hi = st.max if hi is None else max(hi, st.max)
        if not found and rg.num_rows:
            return None
    return (lo, hi) if lo is not None else None


