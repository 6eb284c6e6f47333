"""The run-level tables: the units' row-free partials merged into one set per run (RUN/merged/), so a reader of F
features reads O(F) of them whatever the corpus size, and the units' copies can go (output.unit_partials: drop).

Each kind is merged exactly as the readers merge the units' partials, so reading the merged tables gives what
reading every unit gives (saeray/engine/partials.py defines the partials):

* stats: per (sae, group, feature) one STATS_SCHEMA row: counts and sums added, m2 and doc_m2 by Chan's formula,
  max the largest (ties: smaller max_doc_id, then max_pos);
* examples: per (sae, group, feature) the top_k documents by (value desc, doc_id), and per (sae, group, feature,
  bin) the samples_per_bin smallest (draw, doc_id). The top k of a union is the top k of its parts' top k, so
  merged tables merged again with more units equal one merge of all the units;
* hist: counts added per (sae, group, feature, bin);
* lastvals: every unit's rows (one per document and latent active at its last position);
* windows: the token ids pos - radius .. pos + radius (clipped to the document) of every kept example, as each
  document's disjoint spans (their union: a token once, however many examples' windows hold it), read from the
  units' docs, so the examples need no docs (none when output.docs is none).

Files are sorted by (sae, group, feature) (windows by doc_id, start) in row groups of ROW_GROUP_ROWS rows: readers
skip the row groups a feature filter excludes by their statistics.

Commit: the files go to merged/<generation>/, then merged.json (the units merged with their attempts, the files)
is written in one atomic write, the commit point. A merge after more units committed merges the current tables
with those units' partials into a new generation; the generation it replaces stays for readers that opened it,
older ones are deleted. Units committed after the merge are read from their own files until the next merge.
"""

from __future__ import annotations

import io
import json
import logging
import re
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from .feature_stats import STATS_SCHEMA
from .partials import EXAMPLES_SCHEMA, HIST_SCHEMA, LAST_VALUES_SCHEMA, chan_m2
from .storage import polars_options
from .store import MERGED, MERGED_FOLDER, RunDir, RunDirError, parquet_bytes

log = logging.getLogger(__name__)

RECORD, FOLDER = MERGED, MERGED_FOLDER
MERGED_KINDS = ("stats", "examples", "hist", "lastvals")
"""Unit partials the merge replaces; output.unit_partials: drop deletes the units' copies once merged."""
ROW_GROUP_ROWS = 1 << 14
CHUNK_ROWS = 1 << 19
"""Input rows (examples with their contexts, lastvals) merged at a time: bounds the merge's memory."""
KEYS = ["sae", "group", "feature"]
_GEN = re.compile(r"^[0-9a-f]{8}$")
_NAME = re.compile(r"^merged/[0-9a-f]{8}/(stats|examples|hist|lastvals|windows)\.parquet$")
WINDOWS_SCHEMA = pa.schema([("doc_id", pa.int64()), ("start", pa.int32()), ("n_tokens", pa.int32()),
                            ("token_ids", pa.list_(pa.int32()))])
"""windows.parquet: the union of the merged examples' token windows, per document its disjoint spans (a window
pos - radius .. pos + radius of each kept example, clipped to the document; overlapping or adjacent windows joined),
sorted by (doc_id, start). A windows file with one row per (doc_id, pos) (a `pos` column) reads too, and the next
merge rewrites it as spans."""
WINDOW_KEYS = 1 << 18
"""Example positions whose windows are cut at a time while the spans are built: bounds the merge's memory."""


class StaleMerge(RunDirError):
    """The merged tables hold units that are no longer committed as they were."""


def record(rd: RunDir, markers: dict[int, dict[str, Any]]) -> dict[str, Any] | None:
    """The run's merge record, None when it has none. Raises StaleMerge when a unit it holds is no longer committed
    by the same attempt (the merged tables then hold results the run no longer has)."""
    if not rd.exists(RECORD):
        return None
    rec = json.loads(rd.read_bytes(RECORD))
    names = [f for fs in rec.get("files", {}).values() for f in fs]
    bad = [f for f in names if not _NAME.match(f)] or ([] if _GEN.match(str(rec.get("generation"))) else ["generation"])
    if bad:
        raise RunDirError(f"{rd.uri(RECORD)} lists {bad[0]!r}, which is not a file of the merged tables: the run "
                          "directory was changed by something other than saeray")
    for u, attempt in rec["units"].items():
        m = markers.get(int(u))
        if m is None or m.get("attempt") != attempt:
            raise StaleMerge(f"{rd.uri(RECORD)} holds unit {u}, which is no longer committed as it was merged: "
                             f"delete {rd.uri(RECORD)} and {rd.uri(FOLDER)} to read the units' own partials"
                             + (" (its units' partials were dropped after merging: rerun with --overwrite)"
                                if rec.get("dropped") else ""))
    return rec


def covered(rec: dict[str, Any] | None, kind: str) -> set[int]:
    """The units whose `kind` partials the merged tables hold."""
    if rec is None or kind not in rec["files"]:
        return set()
    return {int(u) for u in rec["units"]}


def files(rd: RunDir, rec: dict[str, Any] | None, kind: str) -> list[str]:
    """Paths/URIs of the merged `kind` files (kind: a MERGED_KINDS kind or windows)."""
    return [rd.uri(f) for f in (rec or {"files": {}})["files"].get(kind, [])]


def merge_run(rd: RunDir) -> dict[str, Any] | None:
    """`merge` with the run's output.unit_partials (runs made before that setting keep their units' partials)."""
    out = rd.read_manifest()["config"]["output"]
    return merge(rd, drop=out.get("unit_partials", "keep") == "drop", strip_docs=not out.get("activations", True))


def merge(rd: RunDir, *, drop: bool, strip_docs: bool = False) -> dict[str, Any] | None:
    """Merge the partials of committed units not merged yet into a new generation; with `drop`, delete the merged
    units' own partials (MERGED_KINDS) afterwards, and with `strip_docs` too their docs' token ids (`_drop`).
    Returns the record (None for a run without committed units). Idempotent: with nothing new to merge it only
    finishes a drop."""
    manifest = rd.read_manifest()
    markers = rd.completions()
    if not markers:
        return None
    rec = record(rd, markers)
    done = {int(u) for u in rec["units"]} if rec else set()
    new = sorted(u for u in markers if u not in done)
    if new:
        t0 = time.monotonic()
        rec = _merge(rd, manifest, markers, rec, new)
        log.info("%s: merged the partials of %d units (%d new) in %.1fs", rd.root, len(rec["units"]), len(new),
                 time.monotonic() - t0)
    if drop and rec is not None:
        _drop(rd, markers, rec, strip_docs)
    return rec


def _merge(rd: RunDir, manifest: dict[str, Any], markers: dict[int, dict[str, Any]], rec: dict[str, Any] | None,
           new: list[int]) -> dict[str, Any]:
    out = manifest["config"]["output"]
    gen = uuid.uuid4().hex[:8]
    kinds = [k for k in MERGED_KINDS if all(k in markers[u].get("files", {}) for u in new)]
    written: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory(prefix="saeray-merge-") as tmp_dir:
        tmp = Path(tmp_dir)
        for kind in kinds:
            inputs = files(rd, rec, kind) + [f for u in new for f in rd.shard_files(u, kind, markers[u])]
            local = tmp / f"{kind}.parquet"
            if kind == "stats":
                _write(_merged_stats(inputs), local)
            elif kind == "hist":
                _write(_merged_hist(inputs), local)
            elif kind == "lastvals":
                _chunked(inputs, local, LAST_VALUES_SCHEMA, lambda df: df.sort([*KEYS, "doc_id"]))
            else:
                k, m = int(out.get("top_k", 0)), int(out.get("samples_per_bin", 0))
                picked = _chunked(inputs, local, EXAMPLES_SCHEMA, lambda df: _pick_examples(df, k, m), source=True)
                if out.get("docs", "all") != "none":
                    _write_windows(rd, rec, markers, new, picked, int(out.get("context_radius", 32)),
                                   tmp / "windows.parquet")
            rel = f"{FOLDER}/{gen}/{kind}.parquet"
            _put(rd, local, rel)
            written[kind] = [rel]
        if (tmp / "windows.parquet").is_file():
            rel = f"{FOLDER}/{gen}/windows.parquet"
            _put(rd, tmp / "windows.parquet", rel)
            written["windows"] = [rel]
    units = {str(u): markers[u].get("attempt") for u in sorted({*map(int, (rec or {"units": {}})["units"]), *new})}
    new_rec = {"version": 1, "generation": gen, "units": units, "files": written,
               **{k: (rec or {}).get(k, []) for k in ("dropped", "stripped")}}
    rd.write_json(RECORD, new_rec)
    _prune(rd, keep={gen, (rec or {}).get("generation")})
    return new_rec


def _put(rd: RunDir, local: Path, rel: str) -> None:
    if rd.remote:
        rd._upload(local, rel)
    else:
        dest = Path(rd.uri(rel))
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(local), dest)


def _write(table: pa.Table, path: Path) -> None:
    pq.write_table(table, path, compression="zstd", row_group_size=ROW_GROUP_ROWS)


def _scan(inputs: list[str], **kw: Any) -> pl.LazyFrame:
    return pl.scan_parquet(inputs, storage_options=polars_options(inputs[0]) if inputs else None, **kw)


def _merged_stats(inputs: list[str]) -> pa.Table:
    """One STATS_SCHEMA row per (sae, group, feature) of the units' rows (the module docstring says how)."""
    p = _scan(inputs).with_columns(
        (pl.col("sum") / pl.col("n_tokens")).fill_nan(0.0).alias("_m"),
        (pl.col("doc_sum") / pl.col("n_docs")).fill_nan(0.0).alias("_dm"))
    tot = p.group_by(KEYS).agg(
        pl.col("n_tokens").sum(), pl.col("n_active").sum(), pl.col("n_docs_active").sum(), pl.col("sum").sum(),
        pl.col("n_docs").sum(), pl.col("doc_sum").sum(),
    ).with_columns((pl.col("sum") / pl.col("n_tokens")).alias("_mean"),
                   (pl.col("doc_sum") / pl.col("n_docs")).fill_nan(0.0).alias("_dmean"))
    spread = p.join(tot.select(*KEYS, "_mean", "_dmean"), on=KEYS).group_by(KEYS).agg(
        chan_m2("m2", "n_tokens", "_m", "_mean").alias("m2"), chan_m2("doc_m2", "n_docs", "_dm", "_dmean").alias("doc_m2"))
    best = (p.filter(pl.col("max").is_not_null())
            .sort(["max", "max_doc_id", "max_pos"], descending=[True, False, False])
            .group_by(KEYS).first().select(*KEYS, "max", "max_doc_id", "max_pos"))
    merged = (tot.join(spread, on=KEYS).join(best, on=KEYS, how="left").sort(KEYS)
              .select(STATS_SCHEMA.names).collect())
    return merged.to_arrow().cast(STATS_SCHEMA)


def _merged_hist(inputs: list[str]) -> pa.Table:
    return (_scan(inputs).group_by([*KEYS, "bin"]).agg(pl.col("count").sum()).sort([*KEYS, "bin"])
            .select(HIST_SCHEMA.names).collect().to_arrow().cast(HIST_SCHEMA))


def _pick_examples(df: pl.DataFrame, k: int, m: int) -> pl.DataFrame:
    """The run's examples among candidates: per feature the top k, per (feature, bin) the m samples."""
    top = (df.filter(pl.col("kind") == "top")
           .sort([*KEYS, "value", "doc_id"], descending=[False, False, False, True, False])
           .group_by(KEYS, maintain_order=True).head(k))
    smp = (df.filter(pl.col("kind") == "sample").sort([*KEYS, "bin", "draw", "doc_id"])
           .group_by([*KEYS, "bin"], maintain_order=True).head(m))
    return pl.concat([top.select(df.columns), smp.select(df.columns)]).sort([*KEYS, "kind", "bin", "value", "doc_id"],
                                      descending=[False, False, False, True, False, True, False])


def _feature_ranges(inputs: list[str]) -> list[tuple[int, int]]:
    """[a, b) feature ranges holding about CHUNK_ROWS input rows each (the inputs' rows spread evenly)."""
    stats = _scan(inputs).select(pl.len().alias("n"), pl.col("feature").max().alias("hi")).collect()
    rows, hi = int(stats["n"][0]), int(stats["hi"][0] if stats["hi"][0] is not None else -1) + 1
    if hi == 0:
        return []
    step = -(-hi // max(1, -(-rows // CHUNK_ROWS)))
    return [(a, min(hi, a + step)) for a in range(0, hi, step)]


def _chunked(inputs: list[str], path: Path, schema: pa.Schema, pick: Any, source: bool = False) -> pl.DataFrame | None:
    """Write `pick`(rows of each feature range) to `path` range by range; with `source`, return (doc_id, pos,
    _src: the input file) of the rows written."""
    kept = []
    with pq.ParquetWriter(path, schema, compression="zstd") as w:
        for a, b in _feature_ranges(inputs):
            lf = _scan(inputs, **({"include_file_paths": "_src"} if source else {}))
            df = pick(lf.filter(pl.col("feature").is_between(a, b, closed="left")).collect())
            if source:
                kept.append(df.select("doc_id", "pos", "_src"))
                df = df.drop("_src")
            w.write_table(df.select(schema.names).to_arrow().cast(schema), row_group_size=ROW_GROUP_ROWS)
    if not source:
        return None
    return pl.concat(kept) if kept else pl.DataFrame(schema={"doc_id": pl.Int64, "pos": pl.Int32, "_src": pl.String})


def _write_windows(rd: RunDir, rec: dict[str, Any] | None, markers: dict[int, dict[str, Any]], new: list[int],
                   picked: pl.DataFrame, radius: int, path: Path) -> None:
    """windows.parquet (WINDOWS_SCHEMA): the spans of the windows of each (doc_id, pos) the merged examples hold,
    from the previous generation's windows or the new units' docs (a document is in one unit, so in one source)."""
    need = picked.unique(["doc_id", "pos"]).select(pl.col("doc_id").cast(pl.Int64), pl.col("pos").cast(pl.Int32),
                                                   "_src")
    spans = []
    from_units = set()
    for u in new:
        mine = set(rd.shard_files(u, "examples", markers[u]))
        from_units |= mine
        want = need.filter(pl.col("_src").is_in(list(mine))).select("doc_id", "pos")
        if want.height:
            spans.append(union_spans(_unit_windows(rd.shard_files(u, "docs", markers[u]), want, radius)))
    prev = files(rd, rec, "windows")
    old = need.filter(~pl.col("_src").is_in(list(from_units))).select("doc_id", "pos").sort("doc_id", "pos")
    if prev and old.height:
        scan = _scan(prev)
        for part in _by_documents(old, WINDOW_KEYS):  # whole documents, about WINDOW_KEYS positions at a time
            got = stored_windows(scan, part, radius, radius)
            spans.append(union_spans(got.rename({"window_start": "start"}).select(*SPAN)))
    table = (pl.concat(spans) if spans else pl.from_arrow(WINDOWS_SCHEMA.empty_table())).sort("doc_id", "start")
    _write(table.select(WINDOWS_SCHEMA.names).to_arrow().cast(WINDOWS_SCHEMA), path)


def _by_documents(keys: pl.DataFrame, most: int) -> list[pl.DataFrame]:
    """`keys` (sorted by doc_id) cut into parts of about `most` rows that never split a document."""
    if keys.height <= most:
        return [keys]
    doc = keys["doc_id"].to_numpy()
    starts = np.flatnonzero(np.r_[True, doc[1:] != doc[:-1]])  # each document's first row
    cuts = [0]
    for s in starts.tolist():
        if s - cuts[-1] >= most:
            cuts.append(s)
    cuts.append(keys.height)
    return [keys.slice(a, b - a) for a, b in zip(cuts[:-1], cuts[1:])]


def union_spans(windows: pl.DataFrame) -> pl.DataFrame:
    """Token ranges of documents (doc_id, n_tokens, start, token_ids), possibly overlapping, as the disjoint spans
    that cover them (overlapping or adjacent ranges joined, each token once), sorted by (doc_id, start)."""
    w = (windows.select(pl.col(c).cast(t) for c, t in SPAN.items()).sort("doc_id", "start")
         .with_columns((pl.col("start") + pl.col("token_ids").list.len()).alias("_end")))
    w = w.with_columns(pl.col("_end").cum_max().shift(1).over("doc_id").alias("_cover"))
    w = w.with_columns((pl.col("_cover").is_null() | (pl.col("start") > pl.col("_cover"))).cum_sum().alias("_span"),
                       pl.col("token_ids").list.slice((pl.col("_cover") - pl.col("start")).clip(lower_bound=0)
                                                      .fill_null(0)).alias("_new"))
    return (w.group_by("_span", maintain_order=True)
            .agg(pl.col("doc_id").first(), pl.col("n_tokens").first(), pl.col("start").first(),
                 pl.col("_new").list.explode(keep_nulls=False, empty_as_null=False).alias("token_ids"))
            .select(pl.col(c).cast(t) for c, t in SPAN.items()))


SPAN = {"doc_id": pl.Int64, "n_tokens": pl.Int32, "start": pl.Int32, "token_ids": pl.List(pl.Int32)}


def doc_spans(docs: pl.LazyFrame, doc_ids: pl.Series) -> pl.DataFrame:
    """The token ids docs keep of the documents `doc_ids`, as spans (doc_id, n_tokens, start, token_ids): a
    document's whole ids from 0 (output.docs: all) or each of its windows (output.docs: examples); one span of null
    ids for a document kept without token ids."""
    have = [c for c in ("doc_id", "n_tokens", "token_ids", "windows") if c in docs.collect_schema().names()]
    got = docs.filter(pl.col("doc_id").is_in(doc_ids.unique().cast(pl.Int64).implode())).select(have).collect()
    parts = [got.filter(pl.col("token_ids").is_not_null() | pl.lit("windows" not in have))
             .select("doc_id", "n_tokens", pl.lit(0).alias("start"), "token_ids")]
    if "windows" in have:
        parts.append(got.filter(pl.col("token_ids").is_null()).explode("windows").select(
            "doc_id", "n_tokens", pl.col("windows").struct.field("start"), pl.col("windows").struct.field("token_ids")))
    return pl.concat([p.select(pl.col(c).cast(t) for c, t in SPAN.items()) for p in parts])


def cut_windows(keys: pl.DataFrame, spans: pl.DataFrame, before: int, after: int, on: list[str]) -> pl.DataFrame:
    """Per row of `keys` (doc_id, pos and other key columns) whose span (joined `on`) holds positions pos - before ..
    pos + after clipped to the document: the keys, n_tokens, window_start and the window's token_ids. Rows without
    such a span are absent."""
    return _cut(keys.join(spans, on=on), keys.columns, before, after)


def span_windows(keys: pl.DataFrame, spans: pl.DataFrame, before: int, after: int) -> pl.DataFrame:
    """`cut_windows` for disjoint spans (windows.parquet's): each key meets one span, its document's with the largest
    start <= pos (an as-of join), whatever the number of spans a document has."""
    joined = (keys.sort("doc_id", "pos")
              .join_asof(spans.select(pl.col(c).cast(t) for c, t in SPAN.items()).sort("doc_id", "start"),
                         left_on="pos", right_on="start", by="doc_id", strategy="backward", check_sortedness=False))
    return _cut(joined, keys.columns, before, after)


def stored_windows(scan: pl.LazyFrame, keys: pl.DataFrame, before: int, after: int) -> pl.DataFrame:
    """`cut_windows` of `keys` (doc_id Int64, pos Int32 and other key columns) from a windows.parquet scan, of
    either form: disjoint spans (an as-of join), or one row per (doc_id, pos) as generations merged before the
    spans hold them (a `pos` column: joined on it)."""
    got = scan.filter(pl.col("doc_id").is_in(keys["doc_id"].unique().implode()))
    if "pos" in got.collect_schema().names():
        exact = got.join(keys.lazy(), on=["doc_id", "pos"], how="semi").select(*SPAN, "pos").collect()
        return cut_windows(keys, exact, before, after, on=["doc_id", "pos"])
    return span_windows(keys, got.select(*SPAN).collect(), before, after)


def _cut(joined: pl.DataFrame, key_columns: list[str], before: int, after: int) -> pl.DataFrame:
    return (joined.with_columns((pl.col("pos") - before).clip(lower_bound=0).alias("window_start"),
                                pl.min_horizontal(pl.col("pos") + after + 1, pl.col("n_tokens")).alias("_end"))
            .filter(pl.col("token_ids").is_not_null() & (pl.col("start") <= pl.col("window_start"))
                    & (pl.col("_end") <= pl.col("start") + pl.col("token_ids").list.len()))
            .unique(key_columns, keep="first")
            .select(*key_columns, pl.col("n_tokens").cast(pl.Int32), pl.col("window_start").cast(pl.Int32),
                    pl.col("token_ids").list.slice(pl.col("window_start") - pl.col("start"),
                                                   pl.col("_end") - pl.col("window_start")).cast(pl.List(pl.Int32))))


def _unit_windows(docs_files: list[str], want: pl.DataFrame, radius: int) -> pl.DataFrame:
    """The window (doc_id, n_tokens, start, token_ids) of each (doc_id, pos) `want` asks for, from one unit's docs."""
    keys = want.select(pl.col("doc_id").cast(pl.Int64), pl.col("pos").cast(pl.Int32))
    got = cut_windows(keys, doc_spans(_scan(docs_files), keys["doc_id"]), radius, radius, on=["doc_id"])
    return got.rename({"window_start": "start"}).select(*SPAN)


def _prune(rd: RunDir, keep: set[str | None]) -> None:
    """Delete the generations other than `keep` (the current one and the one it replaced) and the one merged.json
    names now (a concurrent merge may have committed after this one)."""
    keep = {*keep, json.loads(rd.read_bytes(RECORD)).get("generation")}
    stale = [f for f in rd.list_files(FOLDER) if f.split("/")[1] not in keep]
    rd._delete(stale)
    if not rd.remote:
        for d in Path(rd.uri(FOLDER)).iterdir():
            if d.is_dir() and d.name not in keep:
                shutil.rmtree(d, ignore_errors=True)


def _drop(rd: RunDir, markers: dict[int, dict[str, Any]], rec: dict[str, Any], strip_docs: bool) -> None:
    """Delete the merged units' own copies of what the merged tables hold (merged.json lists them as dropped
    first); with `strip_docs` (statistics-only runs) also their docs' token ids and windows, which only the merge
    read: the merged windows hold the tokens the examples show. What a crash leaves undone, the next merge does."""
    units = sorted(int(u) for u in rec["units"])
    if set(rec.get("dropped", [])) != set(units):
        rec["dropped"] = units
        rd.write_json(RECORD, rec)  # first: _redo refuses to redo units whose partials may be gone
    kinds = [k for k in MERGED_KINDS if k in rec["files"]]
    present = {f for k in kinds for f in rd.list_files(k)}
    rd._delete([f for u in units for k in kinds for f in markers[u].get("files", {}).get(k, []) if f in present])
    if strip_docs and "windows" in rec["files"]:
        todo = sorted(set(units) - set(rec.get("stripped", [])))
        for u in todo:
            for rel in markers[u].get("files", {}).get("docs", []):
                _strip_tokens(rd, rel)
        if todo:
            rec["stripped"] = units
            rd.write_json(RECORD, rec)


def _strip_tokens(rd: RunDir, rel: str) -> None:
    """Rewrite a docs file (atomically, same name) with token_ids and windows null."""
    table = pq.read_table(io.BytesIO(rd.read_bytes(rel)))
    for name in ("token_ids", "windows"):
        i = table.schema.get_field_index(name)
        if i >= 0:
            table = table.set_column(i, table.schema.field(i), pa.nulls(table.num_rows, table.schema.field(i).type))
    rd.write_bytes(rel, parquet_bytes(table))
