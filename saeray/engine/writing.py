"""A unit's output files, as a worker writes them into its attempt folder: the schemas of activation rows and
docs, the tables of a block, the windows of `output.docs: examples`, feature-ordered rows, and the partials."""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from .config import OutputConfig
from .contexts import Document
from .extract import Extractor, recon_table
from .feature_stats import STATS_SCHEMA
from .partials import last_values_table
from .store import ACTIVATIONS_SCHEMA

log = logging.getLogger(__name__)

POSITIONS_TYPE = pa.list_(pa.struct([("group", pa.string()), ("n", pa.int32()), ("last", pa.int32())]))
"""docs.positions: per position group, how many positions of the document count and the last one."""
WINDOWS_TYPE = pa.list_(pa.struct([("start", pa.int32()), ("token_ids", pa.list_(pa.int32()))]))
"""docs.windows (output.docs: examples): the document's token ids around its kept examples, as disjoint spans
(start, ids) in position order; token_ids is then null."""

Rows = dict[tuple[str, str], dict[str, np.ndarray]]
"""(sae, group) -> columns doc_id, pos, feature, value of a block's activation rows."""


def docs_schema(keep: pa.Schema) -> pa.Schema:
    """The docs table's schema, with the kept columns (`keep`, the plan's) last."""
    return pa.schema([("doc_id", pa.int64()), ("n_tokens", pa.int32()), ("token_ids", pa.list_(pa.int32())),
                      ("positions", POSITIONS_TYPE), ("windows", WINDOWS_TYPE), *keep])


def docs_table(block: list[Document], schema: pa.Schema, keep: pa.Schema, with_tokens: bool = True) -> pa.Table:
    """A block's rows of docs (`with_tokens` False: token_ids null); windows are filled later, if at all."""
    cols: dict[str, Any] = {
        "doc_id": pa.array([d.doc_id for d in block], pa.int64()),
        "n_tokens": pa.array([len(d.token_ids) for d in block], pa.int32()),
        "token_ids": (pa.array([d.token_ids for d in block], pa.list_(pa.int32())) if with_tokens
                      else pa.nulls(len(block), pa.list_(pa.int32()))),
        "positions": pa.array([[{"group": g, "n": len(p), "last": int(p[-1])} for g, p in d.groups.items() if len(p)]
                               for d in block], POSITIONS_TYPE),
        "windows": pa.nulls(len(block), WINDOWS_TYPE),
    }
    for f in keep:
        cols[f.name] = pa.array([d.extras.get(f.name) for d in block], f.type)
    return pa.table(cols, schema=schema)


def rows_table(rows: Rows) -> pa.Table:
    """A block's activation rows as one table (ACTIVATIONS_SCHEMA), (sae, group) by (sae, group)."""
    parts = []
    for (sae, group), r in rows.items():
        n = len(r["doc_id"])
        if n == 0:
            continue
        parts.append(pa.table({
            "sae": pa.repeat(pa.scalar(sae, pa.string()), n), "group": pa.repeat(pa.scalar(group, pa.string()), n),
            "doc_id": r["doc_id"], "pos": r["pos"], "feature": r["feature"], "value": r["value"],
        }, schema=ACTIVATIONS_SCHEMA))
    return pa.concat_tables(parts) if parts else ACTIVATIONS_SCHEMA.empty_table()


def with_windows(docs: pa.Table, token_ids: dict[int, np.ndarray], examples: Iterable[Any], radius: int) -> pa.Table:
    """`docs` with column windows: per document, the merged spans pos - radius .. pos + radius of its kept
    examples (every SAE's and group's), clipped to the document; documents without examples get none."""
    kept = [e.kept_positions() for e in examples]
    doc = np.concatenate([d for d, _ in kept]) if kept else np.empty(0, np.int64)
    pos = np.concatenate([p for _, p in kept]) if kept else np.empty(0, np.int64)
    # each (document, position) once (many features' examples share one), in (doc_id, pos) order
    pairs = np.unique(np.stack([doc.astype(np.int64), pos.astype(np.int64)], axis=1), axis=0)
    spans: dict[int, list[list[int]]] = {}
    for d, p in pairs.tolist():
        ids = token_ids.get(d)
        if ids is None:
            continue
        lo, hi = max(0, p - radius), min(len(ids), p + radius + 1)
        mine = spans.setdefault(d, [])
        if mine and lo <= mine[-1][1]:  # overlapping or touching the previous span: one span
            mine[-1][1] = max(mine[-1][1], hi)
        else:
            mine.append([lo, hi])
    windows = [[{"start": lo, "token_ids": token_ids[d][lo:hi]} for lo, hi in spans.get(d, [])] or None
               for d in docs.column("doc_id").to_pylist()]
    i = docs.schema.get_field_index("windows")
    return docs.set_column(i, docs.schema.field(i), pa.array(windows, WINDOWS_TYPE))


def write_block(docs_writer: pq.ParquetWriter | None, act_writer: pq.ParquetWriter | None,
                docs_table: pa.Table | None, act_table: pa.Table | Callable[[], pa.Table] | None,
                row_group: int = 1 << 20) -> None:
    """Append a block's docs and activation rows (a table, or FeatureOrder's call that sorts the held rows)."""
    if docs_table is not None:
        docs_writer.write_table(docs_table)
    if callable(act_table):  # FeatureOrder's held rows, sorted here
        act_table = act_table()
    if act_writer is not None and act_table is not None and act_table.num_rows:
        act_writer.write_table(act_table, row_group_size=row_group)


class UnitFiles:
    """A unit's docs and activations files in its attempt folder, written block by block in a writer thread (at
    most one block waits on disk while the next one computes). output.docs other than all: the unit's docs are
    held and written by `finish`, once the examples (and so the windows) are known."""

    def __init__(self, tmp: Path, out: OutputConfig, schema: pa.Schema, keep: pa.Schema):
        self.out, self.schema, self.keep = out, schema, keep
        self.held: list[pa.Table] = []
        self.token_ids: dict[int, np.ndarray] = {}
        self.n_rows = 0
        self.order = FeatureOrder() if out.activations and out.row_order == "feature" else None
        self.row_group = FeatureOrder.ROW_GROUP_ROWS if self.order is not None else 1 << 20
        self.docs_writer = pq.ParquetWriter(tmp / "docs" / "part-0.parquet", schema, compression="zstd")
        self.act_writer = (pq.ParquetWriter(tmp / "activations" / "part-0.parquet", ACTIVATIONS_SCHEMA,
                                            compression="zstd") if out.activations else None)
        self.io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="saeray-writer")
        self.pending: list[Future] = []

    def write(self, block: list[Document], rows: Rows) -> None:
        """Queue a finished block's docs and rows for the writer thread, after the block queued before."""
        table: pa.Table | None = docs_table(block, self.schema, self.keep, with_tokens=self.out.docs == "all")
        if self.out.docs != "all":
            self.held.append(table)
            table = None
            if self.out.docs == "examples":
                self.token_ids.update((d.doc_id, d.token_ids) for d in block)
        act: pa.Table | Callable[[], pa.Table] | None = None
        if self.out.activations:  # feature order: the held rows' sort runs in the writer's thread, not the model's
            act = self.order.add(rows) if self.order is not None else rows_table(rows)
            self.n_rows += sum(len(r["doc_id"]) for r in rows.values())
        self._wait()
        self.pending.append(self.io.submit(write_block, self.docs_writer, self.act_writer, table, act, self.row_group))

    def finish(self, examples: Iterable[Any]) -> None:
        """Write what is queued or held: feature-ordered rows not out yet, and the held docs (with the windows
        of the unit's `examples` for output.docs: examples)."""
        self._wait()
        if self.order is not None and self.order.n:
            write_block(self.docs_writer, self.act_writer, None, self.order.take(), self.row_group)
        if self.held:
            docs = pa.concat_tables(self.held)
            if self.out.docs == "examples":
                docs = with_windows(docs, self.token_ids, examples, self.out.context_radius)
            self.docs_writer.write_table(docs)

    def close(self, failed: bool = False) -> None:
        """Stop the writer thread and close the files (after `finish`, or after a failure). After a failure
        the attempt folder is discarded, and a writer left mid row group (a signal, an error in a block) raises
        on close: that error is logged, never raised over the one that stopped the unit."""
        self.io.shutdown(wait=True)
        for w in (self.docs_writer, self.act_writer):
            if w is None:
                continue
            try:
                w.close()
            except Exception as e:
                if not failed:
                    raise
                log.debug("closing a writer of a failed unit: %s", e)

    def _wait(self) -> None:
        for f in self.pending:
            f.result()
        self.pending.clear()


def write_partials(ext: Extractor, tmp: Path) -> None:
    """The unit's partials, one file each in the attempt folder: stats and hist always; examples, lastvals and
    recon when the run keeps them."""
    stats = pa.concat_tables([st.to_table(sae, g) for (sae, g), st in ext.stats.items()])
    pq.write_table(stats.cast(STATS_SCHEMA), tmp / "stats.parquet", compression="zstd")
    hist = pa.concat_tables([st.hist_table(sae, g) for (sae, g), st in ext.stats.items()])
    pq.write_table(hist, tmp / "hist.parquet", compression="zstd")
    if ext.examples:
        examples = pa.concat_tables([e.to_table(sae, g) for (sae, g), e in ext.examples.items()])
        pq.write_table(examples, tmp / "examples.parquet", compression="zstd", row_group_size=1 << 15)
    if ext.last is not None:
        last = pa.concat_tables([last_values_table(parts, sae, g) for (sae, g), parts in ext.last.items()])
        pq.write_table(last, tmp / "lastvals.parquet", compression="zstd", row_group_size=1 << 20)
    if ext.recon:
        pq.write_table(recon_table(ext.recon), tmp / "recon.parquet", compression="zstd")


class FeatureOrder:
    """output.row_order: feature. Blocks' rows are held until FLUSH_ROWS, then go out sorted by (sae, group,
    feature, doc_id, pos) in row groups of ROW_GROUP_ROWS: each row group's `feature` statistics span about
    ROW_GROUP_ROWS / FLUSH_ROWS of the SAE's features, and Parquet readers (Polars' scan, pyarrow's filters)
    skip the row groups a feature filter excludes. Memory: FLUSH_ROWS x 20 bytes (160 MiB), and its sort."""

    FLUSH_ROWS = 1 << 23
    ROW_GROUP_ROWS = 1 << 16

    def __init__(self) -> None:
        self.parts: dict[tuple[str, str], list[dict[str, np.ndarray]]] = {}
        self.n = 0

    def add(self, rows: Rows) -> Callable[[], pa.Table] | None:
        """Hold a block's rows; once FLUSH_ROWS are held, `take()` (else None)."""
        for key, r in rows.items():
            if len(r["doc_id"]):
                self.parts.setdefault(key, []).append(r)
                self.n += len(r["doc_id"])
        return self.take() if self.n >= self.FLUSH_ROWS else None

    def take(self) -> Callable[[], pa.Table]:
        """A call that sorts the held rows by (sae, group, feature, doc_id, pos); they are no longer held."""
        parts, self.parts, self.n = self.parts, {}, 0

        def sort() -> pa.Table:
            merged = {}
            for key in sorted(parts):
                # each block's rows are in (doc_id, pos) order; blocks hold disjoint runs of documents
                ps = sorted(parts[key], key=lambda q: (q["doc_id"][0], q["pos"][0]))
                ordered = all((a["doc_id"][-1], a["pos"][-1]) <= (b["doc_id"][0], b["pos"][0]) for a, b in zip(ps, ps[1:]))
                r = {c: np.concatenate([q[c] for q in ps]) for c in ("doc_id", "pos", "feature", "value")}
                at = _feature_major(r, ordered)
                merged[key] = {c: v[at] for c, v in r.items()}
            return rows_table(merged)

        return sort


def _feature_major(r: dict[str, np.ndarray], ordered: bool) -> np.ndarray:
    """The permutation that sorts rows by (feature, doc_id, pos): a stable sort by feature, after stable sorts by pos
    and doc_id unless the rows are `ordered` by (doc_id, pos) already. torch's stable CPU sort: 0.25 s for 8M rows,
    against 3 s for numpy's three-key lexsort."""
    f = torch.from_numpy(r["feature"])
    if ordered:
        return torch.sort(f, stable=True).indices.numpy()
    at = torch.sort(torch.from_numpy(r["pos"]), stable=True).indices
    at = at[torch.sort(torch.from_numpy(r["doc_id"])[at], stable=True).indices]
    return at[torch.sort(f[at], stable=True).indices].numpy()
