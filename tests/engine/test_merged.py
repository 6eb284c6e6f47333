"""The run-level tables (saeray/engine/merged.py) give every analysis what the units' own partials give: top and
interval examples with their contexts and tokens, histograms, statistics, per-document moments and last values, on
1- and 7-unit runs and a statistics-only run; dropped unit partials are gone; a run merged part-way and then resumed
ends with the merged tables of an uninterrupted run."""

from __future__ import annotations

import shutil
from pathlib import Path

import polars as pl
import pytest
from helpers import base_config, corpus, write_dataset
from polars.testing import assert_frame_equal

from saeray.analysis.stats import committed_files, features, histograms, merged_doc_moments, scan_files
from saeray.analysis.top import interval_examples, top_examples
from saeray.engine import config, merged
from saeray.engine.store import RunDir
from saeray.engine.worker import ShardWorker
from saeray.executors import RunFailed, run

FEATURES = list(range(96))
RUNS = {"one": dict(data__shards=1), "seven": dict(data__shards=7),
        "stats": dict(data__shards=7, output__activations=False, output__docs="examples")}


def _config(tiny: dict, data: Path, out: Path, partials: str, **over) -> dict:
    return base_config(tiny["llama"], [{"name": "a", "path": str(tiny["sae_standard"])}], data, out,
                       tokens__batch_tokens=128, output__last_values=True, output__top_k=4,
                       output__samples_per_bin=2, output__context_radius=6, output__unit_partials=partials, **over)


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory) -> dict:
    """Per kind of run: the run with its unit partials dropped, and a copy read unit by unit (no merged tables)."""
    root = tmp_path_factory.mktemp("merged")
    data = write_dataset(root / "data", corpus(84, seed=5, min_words=20, max_words=60), n_files=1)
    out = {"data": data}
    for name, over in RUNS.items():
        run(config.from_dict(_config(tiny, data, root / name, "drop", **over)), executor="local")
        kept = root / f"{name}-units"
        run(config.from_dict(_config(tiny, data, kept, "keep", **over)), executor="local")
        (kept / merged.RECORD).unlink()
        shutil.rmtree(kept / merged.FOLDER)
        out[name] = (root / name, kept)
    return out


def _same_stats(a: pl.DataFrame, b: pl.DataFrame) -> None:
    assert_frame_equal(a, b, check_exact=False, rel_tol=1e-9, abs_tol=1e-12)


@pytest.mark.parametrize("name", list(RUNS))
def test_merged_tables_answer_as_the_units_do(runs, name):
    run_dir, units = runs[name]
    rd = RunDir(run_dir)
    rec = merged.record(rd, rd.completions())
    assert sorted(map(int, rec["units"])) == sorted(rd.committed()) == list(range(int(RUNS[name]["data__shards"])))
    assert set(rec["files"]) == {*merged.MERGED_KINDS, "windows"}
    for kind in merged.MERGED_KINDS:  # readers read the merged files only, and the units' own are gone
        assert committed_files(run_dir, kind) == merged.files(rd, rec, kind)
        listed = [f for m in rd.completions().values() for f in m["files"][kind]]
        assert listed and not any((run_dir / f).exists() for f in listed)
        assert all((units / f).exists() for f in listed)
    if name == "stats":  # the docs' windows were only for the merge: the merged windows answer alone
        docs = pl.read_parquet(run_dir / "docs" / "**" / "*.parquet")
        assert docs.height == 84 and docs["windows"].null_count() == docs["token_ids"].null_count() == 84
        assert pl.read_parquet(units / "docs" / "**" / "*.parquet")["windows"].null_count() < 84
    tables = _tables(run_dir)  # the examples' windows, each token once, so examples need no docs
    _windows_are_the_union(tables, radius=6)
    _same_stats(features(run_dir).collect(), features(units).collect())
    _same_stats(merged_doc_moments(run_dir), merged_doc_moments(units))
    assert_frame_equal(histograms(run_dir, FEATURES, sae="a", group="all"), histograms(units, FEATURES, sae="a", group="all"))
    last = lambda r: scan_files(committed_files(r, "lastvals")).collect().sort("sae", "group", "feature", "doc_id")  # noqa: E731
    assert last(run_dir).height and last(run_dir).equals(last(units))
    for window in ((6, 6), (2, 5)):
        got = top_examples(run_dir, FEATURES, k=4, window=window, source="partials")
        assert got.height > 40 and got.equals(top_examples(units, FEATURES, k=4, window=window, source="partials"))
        got = interval_examples(run_dir, FEATURES, per_bin=2, window=window, source="partials")
        assert got.height > 40 and got.equals(interval_examples(units, FEATURES, per_bin=2, window=window,
                                                                 source="partials"))
    if name != "stats":  # and what the activation rows give
        assert top_examples(run_dir, FEATURES, k=4, window=(3, 3)).equals(
            top_examples(run_dir, FEATURES, k=4, window=(3, 3), source="rows"))


def _windows_are_the_union(tables: dict[str, pl.DataFrame], radius: int) -> None:
    """The merged windows are disjoint, non-adjacent spans per document whose token positions are exactly those of
    the merged examples' windows (pos +- radius, clipped), and whose tokens agree with every example's."""
    spans = tables["windows"]
    assert spans.columns == ["doc_id", "start", "n_tokens", "token_ids"]
    ordered = spans.sort("doc_id", "start")
    assert spans.equals(ordered)
    ends = (ordered["start"] + ordered["token_ids"].list.len()).to_list()
    for i in range(1, ordered.height):
        if ordered["doc_id"][i] == ordered["doc_id"][i - 1]:
            assert ordered["start"][i] > ends[i - 1]  # disjoint and not adjacent
    covered = {(d, s + i) for d, s, ids in spans.select("doc_id", "start", "token_ids").iter_rows()
               for i in range(len(ids))}
    n_tokens = dict(spans.select("doc_id", "n_tokens").iter_rows())
    wanted = {(d, q) for d, p in tables["examples"].select("doc_id", "pos").unique().iter_rows()
              for q in range(max(0, p - radius), min(n_tokens[d], p + radius + 1))}
    assert covered == wanted


def test_spans_and_span_windows_against_a_loop():
    """union_spans joins overlapping and adjacent token ranges into disjoint spans holding each token once, and
    span_windows cuts from them what cut_windows cuts from the ranges themselves, on random documents."""
    import random

    rnd = random.Random(3)
    docs = {d: [rnd.randrange(1000) for _ in range(rnd.randrange(1, 80))] for d in range(40)}
    rows, keys = [], []
    for d, ids in docs.items():
        for _ in range(rnd.randrange(0, 9)):
            p = rnd.randrange(len(ids))
            keys.append((d, p))
            a, b = max(0, p - 5), min(len(ids), p + 6)
            rows.append((d, len(ids), a, ids[a:b]))
    windows = pl.DataFrame(rows, schema=merged.SPAN, orient="row")
    spans = merged.union_spans(windows)
    covered = {}
    for d, n, s, ids in spans.iter_rows():
        for i, t in enumerate(ids):
            assert (d, s + i) not in covered
            covered[(d, s + i)] = t
    want = {(d, s + i): t for d, n, s, ids in rows for i, t in enumerate(ids)}
    assert covered == want and all(t == docs[d][q] for (d, q), t in covered.items())
    k = pl.DataFrame(sorted(set(keys)), schema={"doc_id": pl.Int64, "pos": pl.Int32}, orient="row").with_row_index("_i")
    for before, after in ((5, 5), (2, 3), (0, 0)):
        a = merged.span_windows(k, spans, before, after).sort("_i")
        b = merged.cut_windows(k, windows, before, after, on=["doc_id"]).sort("_i")
        assert a.height == k.height and a.equals(b)


def test_window_keys_cut_at_document_boundaries():
    """The merge builds spans a few documents at a time: parts of about `most` keys, never splitting a document."""
    keys = pl.DataFrame({"doc_id": [1, 1, 1, 2, 2, 3, 4, 4, 4, 4], "pos": list(range(10))})
    parts = merged._by_documents(keys, 3)
    assert [p["doc_id"].to_list() for p in parts] == [[1, 1, 1], [2, 2, 3], [4, 4, 4, 4]]
    assert merged._by_documents(keys, 20) == [keys]


def test_merging_again_changes_nothing(runs):
    run_dir = runs["seven"][0]
    rd = RunDir(run_dir)
    before = merged.record(rd, rd.completions())
    assert merged.merge_run(rd) == before


def _tables(run_dir: Path) -> dict[str, pl.DataFrame]:
    rd = RunDir(run_dir)
    rec = merged.record(rd, rd.completions())
    return {k: pl.read_parquet(merged.files(rd, rec, k)) for k in rec["files"]}


def _per_position(run_dir: Path, radius: int) -> None:
    """Rewrite the current generation's windows as merges before spans wrote them: one row per (doc_id, pos)."""
    rd = RunDir(run_dir)
    rec = merged.record(rd, rd.completions())
    tables = _tables(run_dir)
    keys = tables["examples"].select(pl.col("doc_id").cast(pl.Int64), pl.col("pos").cast(pl.Int32)).unique()
    old = (merged.span_windows(keys, tables["windows"], radius, radius)
           .select("doc_id", "pos", "n_tokens", pl.col("window_start").alias("start"), "token_ids").sort("doc_id", "pos"))
    old.write_parquet(merged.files(rd, rec, "windows")[0])


@pytest.mark.parametrize("old_windows", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_merged_then_resumed_equals_uninterrupted(tiny, runs, tmp_path, monkeypatch, old_windows):
    """Units 2 and 5 fail in the first run, whose end merges (and drops) the other five; the rerun commits 2 and 5
    and merges them into those tables: the result is the uninterrupted run's. With old_windows the first merge's
    windows are rewritten one row per example position, as merges before spans wrote them: they read as they were,
    and the rerun's merge writes spans equal to the uninterrupted run's."""
    out = tmp_path / "run"
    raw = _config(tiny, runs["data"], out, "drop", data__shards=7)
    real = ShardWorker.process

    def failing(self, task, *args, **kw):
        if task["uid"] in (2, 5):
            raise RuntimeError("a failure for this test")
        return real(self, task, *args, **kw)

    monkeypatch.setattr(ShardWorker, "process", failing)
    with pytest.raises(RunFailed):
        run(config.from_dict(raw), executor="local")
    rd = RunDir(out)
    first = merged.record(rd, rd.completions())
    assert sorted(map(int, first["units"])) == [0, 1, 3, 4, 6] and first["dropped"] == [0, 1, 3, 4, 6]
    if old_windows:
        shown = top_examples(out, FEATURES, k=4, window=(6, 6), source="partials")
        _per_position(out, radius=6)
        assert "pos" in pl.read_parquet_schema(merged.files(rd, first, "windows")[0])
        assert top_examples(out, FEATURES, k=4, window=(6, 6), source="partials").equals(shown)
    monkeypatch.setattr(ShardWorker, "process", real)
    run(config.from_dict(raw), executor="local")
    want, got = _tables(runs["seven"][0]), _tables(out)
    assert set(got) == set(want)
    for kind in ("examples", "hist", "lastvals", "windows"):
        assert got[kind].equals(want[kind]), kind
    _same_stats(got["stats"], want["stats"])
    gens = {d.name for d in (out / merged.FOLDER).iterdir()}  # the current generation and the one it replaced
    assert gens == {first["generation"], merged.record(rd, rd.completions())["generation"]}
