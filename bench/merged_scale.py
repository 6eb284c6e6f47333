"""Outputs at corpus scale: a statistics-only run of many units, before and after merging its partials.

    python bench/merged_scale.py --latents 16384             # 60 units of 65,536 tokens (minutes)
    python bench/merged_scale.py --latents 131072
    python bench/merged_scale.py --latents 131072 --tokens 524288 --values jumprelu --jobs 2 --block-tokens 65536 \
        --label 131072-jumprelu                              # units whose examples fill up (about an hour here)
    python bench/merged_scale.py --latents 1024 --units 4 --tokens 8192   # a quick check

Each unit is built by the engine's own accumulators, fed synthetic activations block by block as a worker feeds
them (FeatureStats for statistics, histograms and per-document moments, UnitExamples for top and sampled examples
with their contexts, last values per document), and committed with the files a statistics-only worker writes
(stats, hist, examples, lastvals, and docs with output.docs: examples windows). Synthetic activations: 32 latents
per token, drawn half uniformly and half skewed to low indices; values exponential from 0, or (--values jumprelu)
each latent's threshold (0.5 to 2.0) plus an exponential excess, as a JumpReLU SAE's; documents of 32-512 tokens.
Each unit has its own random stream, so --jobs (units built by that many processes) changes no unit.
Then, each in its own subprocess (peak RSS is per process):

    merge      merged.merge_run (output.unit_partials: drop): wall time, peak RSS
    top1       `top --feature F` for one feature: wall time, and the merged examples' row groups a filter on F keeps
    export     `saeray export neuronpedia` of every latent: wall time, peak RSS, bytes written (the model and SAE
               weights are the tests' tiny Llama, d_model 64 and a 405-token vocabulary, with an SAE of --latents
               random latents: the logits cost nothing here, the examples and statistics are the run's)
    sizes      the run directory by kind, before and after

Figures go to stdout and bench/merged_scale.json (one entry per --label, default --latents). A unit keeps, per
latent, its top_k documents and samples_per_bin documents per value bin; the merged tables keep the same for the
run. A real 64 MiB unit (~16M tokens) holds enough documents of nearly every latent to fill those, so its examples
are as large as the merged ones; a small synthetic unit fills few, so its examples are smaller and the ratio
merged / one unit printed here is larger than a real run's. 131,072 latents at 32 per token need ~500k tokens per
unit before most latents' lists fill (the jumprelu command above).
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

PER_TOKEN = 32
BLOCK_TOKENS = 8192


HOOK = "blocks.1.hook_resid_post"


def _weights(root: Path, d_sae: int) -> tuple[Path, Path, int]:
    """(model, SAE, vocabulary size): the tiny Llama of the tests and an SAE of `d_sae` random latents on it, for
    the export (its logits and decoder rows; the activations are synthetic, not this model's)."""
    from saeray.assets.tiny import make_model, make_sae

    model = make_model(root / "model", "llama")
    sae = make_sae(root / f"sae-{d_sae}", "standard", 64, HOOK, d_sae=d_sae)
    import json as _json

    return model, sae, int(_json.loads((model / "config.json").read_text())["vocab_size"])


def _manifest(root: Path, d_sae: int, model: Path, sae_path: Path, last_values: bool = True) -> dict:
    from saeray.engine import config

    cfg = config.from_dict({"model": {"name": str(model)}, "saes": [{"name": "res", "path": str(sae_path)}],
                            "data": {"dataset": "synthetic", "keep_columns": ["label"]},
                            "output": {"dir": str(root), "activations": False, "docs": "examples",
                                       "unit_partials": "drop", "last_values": last_values}})
    sae = {"name": "res", "hook": HOOK, "digest": "synthetic", "d_sae": d_sae}
    return {"saeray_version": "bench", "fingerprint": "synthetic0000000", "config": cfg.to_dict(),
            "resolved": {"prepend_bos": True, "context_size": 1024, "saes": [sae]},
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%S")}


def write_unit(rd, unit: int, tokens: int, d_sae: int, vocab: int, values: str = "exponential",
               block_tokens: int = BLOCK_TOKENS, last_values: bool = True) -> None:
    """Commit one unit built by the engine's accumulators from `tokens` synthetic tokens (its own random stream, its
    documents numbered unit << 32 | i as a run numbers a file's rows). `values`: exponential (from 0), or jumprelu
    (each latent's own threshold plus an exponential excess, as a JumpReLU SAE's activations)."""
    rng = np.random.default_rng([0, unit])
    first_doc = unit << 32
    import torch

    from saeray.engine.feature_stats import STATS_SCHEMA, FeatureStats
    from saeray.engine.partials import UnitExamples, last_values_table
    from saeray.engine.writing import POSITIONS_TYPE, docs_schema, with_windows

    out = rd.read_manifest()["config"]["output"]
    cpu = torch.device("cpu")
    st = FeatureStats(d_sae, cpu)
    ex = UnitExamples(d_sae, out["top_k"], out["samples_per_bin"], cpu, out["context_radius"])
    last, docs, token_ids = [], [], {}
    doc, done = first_doc, 0
    while done < tokens:
        lengths = rng.integers(32, 513, size=max(1, block_tokens // 272))
        tok = int(lengths.sum())
        doc_of = np.repeat(np.arange(doc, doc + len(lengths), dtype=np.int64), lengths)
        pos_of = np.arange(tok) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        half = PER_TOKEN // 2
        feats = np.concatenate([(d_sae * rng.random((tok, half)) ** 2), d_sae * rng.random((tok, half))], axis=1)
        feats = np.sort(feats.astype(np.int64), axis=1)  # each token's latents ascending, a repeat dropped
        keep = np.ones(feats.shape, dtype=bool)
        keep[:, 1:] = feats[:, 1:] != feats[:, :-1]
        t, f = np.nonzero(keep)[0], feats[keep]
        if values == "jumprelu":  # thresholds 0.5 .. 2.0 by latent, excess of mean 0.5 .. 1.5
            v = (0.5 + 0.25 * (f % 7) + rng.exponential(1.0, len(f)) * 0.5 * (1 + f % 3)).astype(np.float32)
        else:
            v = (rng.exponential(1.0, len(f)) * (1 + f % 5)).astype(np.float32)
        tf, tv, td, tp = (torch.from_numpy(x) for x in (f, v, doc_of[t], pos_of[t].astype(np.int64)))
        st.add(tok, tf, tv, td, tp)
        pf, pr, ppos, pmax, pair = st.add_docs(tf, td - doc, tp, tv, torch.from_numpy(lengths.astype(np.int64)),
                                               len(lengths))
        ex.add(pf, pr + doc, ppos, pmax, (pair, tp, tv))
        at = pos_of[t] == (lengths - 1)[doc_of[t] - doc]
        last.append((f[at].astype(np.int32), doc_of[t][at], v[at]))
        ids = rng.integers(5, vocab, size=tok, dtype=np.int32)
        for i, n in enumerate(lengths):
            token_ids[doc + i] = ids[int(lengths[:i].sum()):int(lengths[:i + 1].sum())]
        docs.append(pa.table({"doc_id": np.arange(doc, doc + len(lengths), dtype=np.int64),
                              "n_tokens": lengths.astype(np.int32), "label": rng.integers(0, 2, len(lengths)),
                              "positions": pa.array([[{"group": "all", "n": int(n), "last": int(n) - 1}]
                                                     for n in lengths], POSITIONS_TYPE)}))
        done += tok
        doc += len(lengths)
    tmp = rd.new_attempt(unit)
    schema = docs_schema(pa.schema([("label", pa.int64())]))
    table = pa.concat_tables(docs)
    table = table.append_column("token_ids", pa.nulls(table.num_rows, pa.list_(pa.int32())))
    table = table.append_column("windows", pa.nulls(table.num_rows, schema.field("windows").type))
    table = with_windows(table, token_ids, [ex], out["context_radius"])
    pq.write_table(table.select(schema.names).cast(schema), tmp / "docs" / "part-0.parquet", compression="zstd")
    pq.write_table(st.to_table("res", "all").cast(STATS_SCHEMA), tmp / "stats.parquet", compression="zstd")
    pq.write_table(st.hist_table("res", "all"), tmp / "hist.parquet", compression="zstd")
    pq.write_table(ex.to_table("res", "all"), tmp / "examples.parquet", compression="zstd", row_group_size=1 << 15)
    if last_values:
        pq.write_table(last_values_table(last, "res", "all"), tmp / "lastvals.parquet", compression="zstd")
    rd.commit(unit, tmp, {"shard": unit, "docs": doc - first_doc, "tokens": done, "fingerprint": "synthetic0000000"})


def build(root: Path, units: list[int], tokens: int, d_sae: int, vocab: int, values: str, block_tokens: int,
          last_values: bool = True) -> None:
    """Write `units` of the run at `root` (one process of --jobs)."""
    import torch

    from saeray.engine.store import RunDir

    torch.set_num_threads(1)
    rd = RunDir(root)
    for u in units:
        write_unit(rd, u, tokens, d_sae, vocab, values, block_tokens, last_values)


def sizes(root: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    for p in root.rglob("*"):
        if p.is_file():
            top = p.relative_to(root).parts[0]
            out[top] = out.get(top, 0) + p.stat().st_size
    return out


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def step(what: str, root: Path, feature: int) -> dict:
    from saeray.engine import merged
    from saeray.engine.store import RunDir

    rd = RunDir(root)
    t0 = time.perf_counter()
    if what == "merge":
        rec = merged.merge_run(rd)
        return {"seconds": round(time.perf_counter() - t0, 2), "peak_rss_mb": peak_rss_mb(),
                "units": len(rec["units"])}
    if what == "windows":  # the merge's windows step again, its source the current generation's windows
        import polars as pl

        rec = merged.record(rd, rd.completions())
        path = Path(merged.files(rd, rec, "windows")[0])
        before = path.stat().st_size
        examples = merged.files(rd, rec, "examples")
        picked = (pl.scan_parquet(examples).select("doc_id", "pos").unique().collect()
                  .with_columns(pl.lit(examples[0]).alias("_src")))
        radius = int(rd.read_manifest()["config"]["output"].get("context_radius", 32))
        fresh = path.with_name("windows.new.parquet")
        merged._write_windows(rd, rec, rd.completions(), [], picked, radius, fresh)
        seconds = time.perf_counter() - t0
        fresh.replace(path)
        return {"seconds": round(seconds, 1), "peak_rss_mb": peak_rss_mb(), "bytes_before": before,
                "bytes_after": path.stat().st_size, "spans": pq.read_metadata(path).num_rows}
    if what == "export":
        from saeray.report.export import neuronpedia

        dest = root.parent / "neuronpedia"
        shutil.rmtree(dest, ignore_errors=True)
        files = neuronpedia(root, dest)
        return {"seconds": round(time.perf_counter() - t0, 1), "peak_rss_mb": peak_rss_mb(), "batch_files": len(files),
                "bytes": sum(p.stat().st_size for p in dest.iterdir())}
    from saeray.analysis.top import top_examples

    got = top_examples(root, [feature], k=20, window=(32, 32), source="partials")
    seconds = time.perf_counter() - t0
    rec = merged.record(rd, rd.completions())
    meta = pq.read_metadata(merged.files(rd, rec, "examples")[0])
    col = meta.schema.to_arrow_schema().get_field_index("feature")
    hits = sum(1 for g in range(meta.num_row_groups)
               if meta.row_group(g).column(col).statistics.min <= feature <= meta.row_group(g).column(col).statistics.max)
    return {"seconds": round(seconds, 2), "peak_rss_mb": peak_rss_mb(), "examples": got.height,
            "row_groups_read": hits, "row_groups": meta.num_row_groups}


def _child(what: str, root: Path, feature: int) -> dict:
    done = subprocess.run([sys.executable, __file__, "--step", what, "--dir", str(root), "--feature", str(feature)],
                          capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--latents", type=int, default=16384)
    p.add_argument("--units", type=int, default=60)
    p.add_argument("--tokens", type=int, default=65536, help="tokens per unit")
    p.add_argument("--feature", type=int, default=None, help="the feature `top --feature` asks for (default d/2)")
    p.add_argument("--values", choices=("exponential", "jumprelu"), default="exponential",
                   help="synthetic activation values (see write_unit)")
    p.add_argument("--jobs", type=int, default=1, help="processes building the units")
    p.add_argument("--no-last-values", action="store_true",
                   help="output.last_values: false, as the Pile config sets (per-document rows that grow with the corpus)")
    p.add_argument("--block-tokens", type=int, default=BLOCK_TOKENS,
                   help="tokens per block fed to the accumulators (their results do not depend on it)")
    p.add_argument("--dir", type=Path, default=None)
    p.add_argument("--no-export", action="store_true", help="skip the Neuronpedia export of every latent")
    p.add_argument("--export-only", action="store_true", help="only the export, on the run kept in --dir")
    p.add_argument("--windows-only", action="store_true",
                   help="rewrite the kept run's merged windows with this checkout's merge (their previous version as "
                        "the source), then `top --feature` and the export again")
    p.add_argument("--step", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".json"))
    p.add_argument("--label", default=None, help="the figures' key in --out (default: --latents)")
    a = p.parse_args()
    if a.step:
        print(json.dumps(step(a.step, a.dir, a.feature)))
        return
    if a.windows_only:  # the windows as this checkout's merge writes them, on a run this bench built and kept
        root = a.dir / f"run-{a.latents}"
        saved = json.loads(a.out.read_text())
        key = a.label or str(a.latents)
        got = saved[key]
        got["windows_rewrite"] = _child("windows", root, 0)
        feature = a.feature if a.feature is not None else a.latents // 2
        got["top_feature"] = _child("top1", root, feature)
        got["export_neuronpedia"] = _child("export", root, feature)
        kinds = {p.stem: p.stat().st_size for p in (root / "merged").rglob("*.parquet")}
        got["merged_bytes_by_kind"] = kinds
        got["bytes_after"]["merged"] = sum(kinds.values())
        got["merged_bytes"] = sum(kinds.values())
        one = got["one_unit_examples_bytes"]
        got["merged_over_one_unit_examples"] = round(sum(kinds.values()) / one, 2)
        got["merged_examples_and_windows_over_one_unit_examples"] = round(
            (kinds.get("examples", 0) + kinds.get("windows", 0)) / one, 2)
        got["merged_without_lastvals_over_one_unit_examples"] = round(
            (sum(kinds.values()) - kinds.get("lastvals", 0)) / one, 2)
        print(json.dumps({k: got[k] for k in ("windows_rewrite", "top_feature", "export_neuronpedia",
                                              "merged_bytes_by_kind", "merged_over_one_unit_examples")}, indent=2))
        a.out.write_text(json.dumps(saved, indent=2) + "\n")
        return
    if a.export_only:  # the export again, on a run this bench built and kept (--dir), e.g. after changing the export
        root = a.dir / f"run-{a.latents}"
        saved = json.loads(a.out.read_text())
        key = a.label or str(a.latents)
        saved[key]["export_neuronpedia"] = _child("export", root, 0)
        print(json.dumps(saved[key]["export_neuronpedia"], indent=2))
        a.out.write_text(json.dumps(saved, indent=2) + "\n")
        return
    import torch

    from saeray.engine.store import RunDir

    torch.set_num_threads(2)
    root = (a.dir or Path(tempfile.mkdtemp(prefix="saeray-merged-"))) / f"run-{a.latents}"
    shutil.rmtree(root.parent / "neuronpedia", ignore_errors=True)
    shutil.rmtree(root, ignore_errors=True)
    model, sae, vocab = _weights(root.parent, a.latents)
    rd = RunDir(root)
    rd.prepare(_manifest(root, a.latents, model, sae, not a.no_last_values), overwrite=False)
    t0 = time.perf_counter()
    if a.jobs > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(a.jobs) as pool:
            for done in [pool.submit(build, root, list(range(j, a.units, a.jobs)), a.tokens, a.latents, vocab, a.values,
                                     a.block_tokens, not a.no_last_values) for j in range(a.jobs)]:
                done.result()
    else:
        build(root, list(range(a.units)), a.tokens, a.latents, vocab, a.values, a.block_tokens, not a.no_last_values)
    built = time.perf_counter() - t0
    before = sizes(root)
    one_unit = (root / "examples" / "00000.parquet").stat().st_size
    feature = a.feature if a.feature is not None else a.latents // 2
    merge = _child("merge", root, feature)
    after = sizes(root)
    top1 = _child("top1", root, feature)
    export = _child("export", root, feature) if not a.no_export else None
    merged_kinds = {p.stem: p.stat().st_size for p in (root / "merged").rglob("*.parquet")}
    tokens = a.units * a.tokens
    partial_kinds = ("stats", "hist", "examples", "lastvals")
    result = {
        "latents": a.latents, "units": a.units, "tokens_per_unit": a.tokens, "tokens": tokens, "values": a.values,
        "build_seconds": round(built, 1), "build_jobs": a.jobs, "block_tokens": a.block_tokens,
        "last_values": not a.no_last_values, "bytes_before": before, "bytes_after": after,
        "one_unit_examples_bytes": one_unit, "merged_bytes_by_kind": merged_kinds,
        "merged_examples_and_windows_over_one_unit_examples": round(
            (merged_kinds.get("examples", 0) + merged_kinds.get("windows", 0)) / one_unit, 2),
        "merged_over_one_unit_examples": round(after.get("merged", 0) / one_unit, 2),
        "unit_partials_before_bytes": sum(before.get(k, 0) for k in partial_kinds),
        "merge": merge, "top_feature": top1, "export_neuronpedia": export,
        "docs_bytes_per_1b_tokens": round(before.get("docs", 0) / tokens * 1e9),
        "docs_after_merge_bytes_per_1b_tokens": round(after.get("docs", 0) / tokens * 1e9),
        "growth_after_merge_bytes_per_1b_tokens": round((after.get("docs", 0) + after.get("completions", 0))
                                                        / tokens * 1e9),
        "merged_bytes": after.get("merged", 0),
        "lastvals_bytes_per_1b_tokens": round(before.get("lastvals", 0) / tokens * 1e9),
        "unit_partials_bytes_per_1b_tokens_without_merge": round(
            sum(before.get(k, 0) for k in partial_kinds) / tokens * 1e9),
        "note": "synthetic activations through the engine's accumulators (see the module docstring); this machine",
    }
    print(json.dumps(result, indent=2))
    saved = json.loads(a.out.read_text()) if a.out.is_file() else {}
    saved[a.label or str(a.latents)] = result
    a.out.write_text(json.dumps(saved, indent=2) + "\n")
    if a.dir is None:
        shutil.rmtree(root.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
