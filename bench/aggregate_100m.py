"""Aggregation over ~100M activation rows: wall time and peak memory of the Polars readers.

    python bench/aggregate_100m.py                         # 100M rows (about 1 GB of parquet, minutes)
    python bench/aggregate_100m.py --rows 10_000_000       # 10M rows, a quick check
    python bench/aggregate_100m.py --dir /data/fake --keep # keep the fake run to re-measure later
    python bench/aggregate_100m.py --dir /data/fake --reuse

Writes a fake but valid run directory (manifest, completion markers, activations/docs/stats
parquet per shard) of synthetic rows: ~24 active features per token drawn from a skewed
distribution over d_sae features (low indices dense), documents of 32-512 tokens, rows
sorted by (doc_id, pos, feature) as a worker writes them. Generation goes shard by shard in
chunks of whole documents, so it needs bounded memory too. Then each measurement runs in
its own subprocess (peak RSS from resource.getrusage is per process):

    features           stats.features(run).collect()     (merge per-shard partials)
    top_partials       top.top_examples(run, 100 features, k=10, source="partials")
    interval_partials  top.interval_examples(run, 100 features, source="partials")
    diff_partials      diff.diff_runs(run, run, source="partials")   (Welch + BH from per-document moments)
    top, interval      the same from the activation rows (the reference path)
    by_feature         the run copied with its rows rewritten as output.row_order: feature writes them
                       (writing.FeatureOrder: runs of 8M rows sorted by feature, row groups of 64k rows)
    top_by_feature     top_examples(100 features, source="rows") on that copy
    top1, top1_by_feature  `top --feature F` (one feature, rows) on each layout
    diff               diff from the rows (pass --steps ...,diff: ~40 minutes at 100M rows)
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from saeray.engine.store import ACTIVATIONS_SCHEMA, RunDir, shard_name  # noqa: E402

PER_TOKEN = 24          # feature draws per token (duplicates removed: ~23.5 rows per token)
CHUNK_ROWS = 2_000_000  # rows generated and written at a time (one parquet row group per 1M rows)


def _const(value: str, n: int) -> pa.Array:
    return pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array([value])).cast(pa.string())


def _manifest(root: Path, n_shards: int) -> dict:
    from saeray.engine import config  # imports torch: only the generating process pays for it

    cfg = config.from_dict({"model": {"name": "synthetic"}, "saes": [{"name": "res", "path": "synthetic"}],
                            "data": {"dataset": "synthetic"}, "output": {"dir": str(root)}})
    sae = {"name": "res", "hook": "blocks.0.hook_resid_post", "digest": "synthetic", "neuronpedia_id": None}
    return {"saeray_version": "bench", "fingerprint": "synthetic0000000", "config": cfg.to_dict(),
            "resolved": {"prepend_bos": True, "context_size": 1024, "saes": [sae]}, "n_shards": n_shards, "created_at": time.strftime("%Y-%m-%dT%H:%M:%S")}


def write_shard(rd: RunDir, shard: int, n_rows: int, first_doc: int, d_sae: int, rng: np.random.Generator,
                top_k: int = 20, per_bin: int = 5, radius: int = 32) -> int:
    """Write one committed shard of about `n_rows` rows with the partials a worker writes (statistics,
    per-document moments, example documents with contexts, histograms: the engine's own accumulators, fed
    the synthetic rows chunk by chunk of whole documents); return the next doc_id."""
    import torch

    from saeray.engine.feature_stats import STATS_SCHEMA, FeatureStats
    from saeray.engine.partials import UnitExamples
    from saeray.engine.writing import POSITIONS_TYPE, WINDOWS_TYPE

    final = rd.final_paths(shard)
    for kind in ("activations", "docs"):
        final[kind].mkdir(parents=True, exist_ok=True)
    docs_schema = pa.schema([("doc_id", pa.int64()), ("n_tokens", pa.int32()), ("token_ids", pa.list_(pa.int32())),
                             ("positions", POSITIONS_TYPE), ("windows", WINDOWS_TYPE)])
    aw = pq.ParquetWriter(final["activations"] / "part-0.parquet", ACTIVATIONS_SCHEMA, compression="zstd")
    dw = pq.ParquetWriter(final["docs"] / "part-0.parquet", docs_schema, compression="zstd")
    cpu = torch.device("cpu")
    st = FeatureStats(d_sae, cpu)
    ex = UnitExamples(d_sae, top_k, per_bin, cpu, radius)
    written = n_tokens = 0
    doc = first_doc
    while written < n_rows:
        lengths = rng.integers(32, 513, size=max(1, (min(CHUNK_ROWS, n_rows - written) // PER_TOKEN) // 272))
        tok = int(lengths.sum())
        doc_of = np.repeat(np.arange(doc, doc + len(lengths), dtype=np.int64), lengths)
        starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
        pos_of = (np.arange(tok) - starts).astype(np.int32)
        feats = (d_sae * rng.random((tok, PER_TOKEN)) ** 2).astype(np.int64)
        key = np.unique(np.arange(tok, dtype=np.int64)[:, None] * d_sae + feats)  # sorted by (token, feature)
        t, f = key // d_sae, (key % d_sae).astype(np.int32)
        v = (rng.exponential(1.0, len(key)) * (1 + f % 5)).astype(np.float32)
        d, p = doc_of[t], pos_of[t]
        aw.write_table(pa.table({"sae": _const("res", len(key)), "group": _const("all", len(key)), "doc_id": d,
                                 "pos": p, "feature": f, "value": v}, schema=ACTIVATIONS_SCHEMA), row_group_size=1 << 20)
        ids = rng.integers(5, 50_000, size=tok, dtype=np.int32)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        dw.write_table(pa.table({"doc_id": np.arange(doc, doc + len(lengths), dtype=np.int64),
                                 "n_tokens": lengths.astype(np.int32),
                                 "token_ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(ids)),
                                 "positions": pa.array([[{"group": "all", "n": int(n), "last": int(n) - 1}]
                                                        for n in lengths], POSITIONS_TYPE),
                                 "windows": pa.nulls(len(lengths), WINDOWS_TYPE)},
                                schema=docs_schema))
        # the partials, as a worker computes them (every position counts: no special tokens here)
        tf, tv, td, tp = (torch.from_numpy(x) for x in (f.astype(np.int64), v, d, p.astype(np.int64)))
        st.add(tok, tf, tv, td, tp)
        rank = td - doc
        pf, pr, ppos, pmax, pair = st.add_docs(tf, rank, tp, tv, torch.from_numpy(lengths.astype(np.int64)), len(lengths))
        ex.add(pf, pr + doc, ppos, pmax, (pair, tp, tv))
        written += len(key)
        n_tokens += tok
        doc += len(lengths)
    aw.close()
    dw.close()
    pq.write_table(st.to_table("res", "all").cast(STATS_SCHEMA), final["stats"], compression="zstd")
    pq.write_table(st.hist_table("res", "all"), final["hist"], compression="zstd")
    pq.write_table(ex.to_table("res", "all"), final["examples"], compression="zstd", row_group_size=1 << 18)
    s = shard_name(shard)
    files = {"activations": [f"activations/shard={s}/part-0.parquet"], "docs": [f"docs/shard={s}/part-0.parquet"],
             **{k: [f"{k}/{s}.parquet"] for k in ("stats", "hist", "examples")}}
    rd.write_json(rd.marker_key(shard), {"shard": shard, "rows": written, "docs": doc - first_doc,
                                         "tokens": n_tokens, "fingerprint": "synthetic0000000", "files": files})
    return doc


def by_feature(root: Path) -> dict:
    """Copy the run to root.parent/by_feature with each unit's rows rewritten in feature order by the worker's own
    FeatureOrder and write_block, fed the document-order rows 1M at a time as a worker feeds it blocks."""
    from saeray.engine.writing import FeatureOrder, write_block

    dest = root.parent / "by_feature"
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(root, dest, ignore=shutil.ignore_patterns("activations"))
    rows = 0
    for src in sorted((root / "activations").rglob("*.parquet")):
        out = dest / src.relative_to(root)
        out.parent.mkdir(parents=True, exist_ok=True)
        writer = pq.ParquetWriter(out, ACTIVATIONS_SCHEMA, compression="zstd")
        order = FeatureOrder()
        for batch in pq.ParquetFile(src).iter_batches(batch_size=1 << 20):
            cols = {c: batch.column(c).to_numpy() for c in ("doc_id", "pos", "feature", "value")}
            rows += len(cols["doc_id"])
            full = order.add({("res", "all"): cols})
            if full is not None:
                write_block(None, writer, None, full, FeatureOrder.ROW_GROUP_ROWS)
        if order.n:
            write_block(None, writer, None, order.take(), FeatureOrder.ROW_GROUP_ROWS)
        writer.close()
    size = sum(p.stat().st_size for p in (dest / "activations").rglob("*.parquet"))
    return {"rows": rows, "activations_bytes": size}


def generate(root: Path, n_rows: int, n_shards: int, d_sae: int, seed: int) -> dict:
    rd = RunDir(root)
    rd.prepare(_manifest(root, n_shards), overwrite=True)
    rng = np.random.default_rng(seed)
    doc = 0
    for shard in range(n_shards):
        doc = write_shard(rd, shard, n_rows // n_shards, doc, d_sae, rng)
    rows = sum(json.loads(p.read_text())["rows"] for p in (root / "completions").glob("*.json"))
    size = sum(p.stat().st_size for p in root.rglob("*.parquet"))
    return {"rows": rows, "docs": doc, "bytes_on_disk": size}


def peak_rss_mb() -> dict:
    """Peak RSS of this process: VmHWM (Linux; this exec's own peak) and getrusage's ru_maxrss.

    On Linux ru_maxrss survives fork+exec, so a child reports at least its parent's RSS at
    the fork; VmHWM starts afresh with the new program, so it is the figure to read.
    """
    out = {"ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                out["peak_rss_mb"] = round(int(line.split()[1]) / 1024, 1)
    out.setdefault("peak_rss_mb", out["ru_maxrss_mb"])
    return out


def step(what: str, root: Path, a: argparse.Namespace) -> dict:
    """One measured step, run in its own process."""
    from saeray.analysis import stats, top

    features = np.linspace(0, a.d_sae - 1, a.features).astype(int).tolist()
    t0 = time.perf_counter()
    if what == "generate":
        result = generate(root, a.rows, a.shards, a.d_sae, a.seed)
    elif what == "baseline":
        result = {"out_rows": 0}  # imports only: what every step pays before reading anything
    elif what == "features":
        result = {"out_rows": stats.features(root).collect().height}
    elif what in ("top", "top_partials"):
        source = "rows" if what == "top" else "partials"
        result = {"out_rows": top.top_examples(root, features, k=a.k, source=source).height}
    elif what == "by_feature":
        result = by_feature(root)
    elif what in ("top_by_feature", "top1", "top1_by_feature"):
        where = root.parent / "by_feature" if what.endswith("by_feature") else root
        asked = features if what == "top_by_feature" else [features[len(features) // 2]]
        result = {"out_rows": top.top_examples(where, asked, k=a.k, source="rows").height}
    elif what in ("interval", "interval_partials"):
        source = "rows" if what == "interval" else "partials"
        result = {"out_rows": top.interval_examples(root, features, source=source).height}
    elif what in ("diff", "diff_partials"):  # the run against itself: two full inputs, Welch tests and BH included
        from saeray.analysis import diff

        source = "rows" if what == "diff" else "partials"
        result = {"out_rows": diff.diff_runs(root, root, source=source).height}
    else:
        raise ValueError(what)
    return {"step": what, "wall_s": round(time.perf_counter() - t0, 2), **result, **peak_rss_mb()}


def _child(args: list[str]) -> dict:
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(done.stderr)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_s"] = round(time.perf_counter() - t0, 2)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=lambda s: int(s.replace("_", "")), default=100_000_000, help="activation rows")
    p.add_argument("--shards", type=int, default=10)
    p.add_argument("--d-sae", type=int, default=16384)
    p.add_argument("--features", type=int, default=100, help="features asked of top_examples (spread over d_sae)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--dir", help="where the fake run goes (default: a temporary directory, deleted after)")
    p.add_argument("--keep", action="store_true", help="keep the fake run")
    p.add_argument("--reuse", action="store_true", help="measure an existing fake run in --dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", default="baseline,features,top_partials,interval_partials,diff_partials,top,interval,"
                                      "by_feature,top_by_feature,top1,top1_by_feature",
                   help="steps to measure (diff: the row-based per-document test, ~40 min at 100M rows)")
    p.add_argument("--step", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.step:
        print(json.dumps(step(a.step, Path(a.dir), a)))
        return
    root = Path(a.dir) if a.dir else Path(tempfile.mkdtemp(prefix="saeray-bench-")) / "run"
    passthrough = [f"--{k.replace('_', '-')}={v}" for k, v in vars(a).items()
                   if k in ("rows", "shards", "d_sae", "features", "k", "seed")]
    report: dict = {"config": {k: getattr(a, k) for k in ("rows", "shards", "d_sae", "features", "k", "seed")},
                    "dir": str(root)}
    try:
        steps = a.steps.split(",")
        for what in steps if a.reuse else ["generate", *steps]:
            report[what] = _child(["--dir", str(root), "--step", what, *passthrough])
            print(json.dumps(report[what]), flush=True)
    finally:
        if not a.dir and not a.keep:
            shutil.rmtree(root.parent, ignore_errors=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
