"""Row-free partials (saeray/engine/partials.py): every partial-based result against the row-based computation on
the same run, and against plain loops over the raw rows; 1 vs 7 units; statistics-only runs."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from helpers import base_config

from saeray.analysis.significance import doc_moments, partial_doc_moments
from saeray.analysis.stats import features
from saeray.analysis.top import interval_examples, top_examples
from saeray.engine import config
from saeray.engine.config import ConfigError
from saeray.engine.partials import EDGES, draws, draws_np, value_bins, value_bins_np
from saeray.executors import run
from saeray.report.data import activation_histograms

FEATURES = list(range(96))
KEYS = ["sae", "group", "feature"]


def _run(tiny, out: Path, **over) -> Path:
    saes = [{"name": "a", "path": str(tiny["sae_standard"])}, {"name": "j", "path": str(tiny["sae_jumprelu"])}]
    output = over.pop("output", {})
    cfg = base_config(tiny["llama"], saes, tiny["data"], out, **over)
    cfg["output"].update(output)
    run(config.from_dict(cfg), executor="local")
    return out


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("partials")
    return {
        "rows": _run(tiny, root / "rows"),
        "rows7": _run(tiny, root / "rows7", data__shards=7),
        "stats": _run(tiny, root / "stats", output={"activations": False, "docs": "examples"}),
        "none": _run(tiny, root / "none", output={"activations": False, "docs": "none"}),
        "narrow": _run(tiny, root / "narrow", output={"activations": False, "docs": "examples", "top_k": 2,
                                                      "samples_per_bin": 1, "context_radius": 2}),
    }


@pytest.fixture(scope="module")
def raw(runs) -> pl.DataFrame:
    return pl.read_parquet(str(runs["rows"] / "activations" / "**" / "*.parquet"))


def test_draws_and_bins_equal_numpy():
    rng = np.random.default_rng(0)
    doc = np.concatenate([rng.integers(0, 2 ** 62, 5000), [0, 1, 2 ** 63 - 1, (7 << 32) | 5]])
    feat = np.concatenate([rng.integers(0, 131072, 5000), [0, 5, 131071, 3]])
    assert np.array_equal(draws(torch.from_numpy(doc), torch.from_numpy(feat)).numpy(), draws_np(doc, feat))
    assert (draws_np(doc, feat) >= 0).all() and len(np.unique(draws_np(doc, feat))) == len(doc)
    v = np.concatenate([rng.lognormal(-2, 3, 5000), EDGES, np.nextafter(EDGES, np.float32(np.inf)), [-1.0, 0.0, 1e9]])
    v = v.astype(np.float32)
    got = value_bins(torch.from_numpy(v), torch.from_numpy(EDGES)).numpy()
    assert np.array_equal(got, value_bins_np(v))
    # the definition, by a loop: bin 0 holds values <= 0, bin b the values in (EDGES[b-1], EDGES[b]]
    for x, b in zip(v[::97], got[::97]):
        assert b == sum(1 for e in EDGES if e < x)
    assert value_bins_np(np.float32([0.0, 1e-4, 1.0, 1e4, 2e4])).tolist() == [0, 1, 33, 65, 66]
    assert EDGES[33] == np.float32(1.0) and math.isclose(EDGES[34] / EDGES[33], 10 ** (1 / 8), rel_tol=1e-6)


def test_top_from_partials_equals_rows_and_brute_force(runs, raw):
    for k in (1, 5, 20):
        want = top_examples(runs["rows"], FEATURES, k=k, window=(4, 3), source="rows")
        got = top_examples(runs["rows"], FEATURES, k=k, window=(4, 3), source="partials")
        assert got.height >= 30 * min(k, 2) and got.equals(want)
    # the top documents by plain loops over the rows: highest document maximum first, ties to the smaller doc_id
    best: dict[tuple, dict[int, tuple[float, int]]] = defaultdict(dict)
    for sae, group, doc, pos, f, v in raw.rows():
        b = best[(sae, f)]
        if doc not in b or v > b[doc][0] or (v == b[doc][0] and pos < b[doc][1]):
            b[doc] = (v, pos)
    got = top_examples(runs["rows"], FEATURES, k=20, source="partials")
    for (sae, f), docs in best.items():
        ranked = sorted(docs.items(), key=lambda item: (-item[1][0], item[0]))[:20]
        mine = got.filter((pl.col("sae") == sae) & (pl.col("feature") == f))
        assert list(zip(mine["doc_id"], mine["value"], mine["pos"])) == [(d, v, p) for d, (v, p) in ranked]


def test_top_one_vs_seven_units(runs):
    one = top_examples(runs["rows"], FEATURES, k=20, source="partials")
    seven = top_examples(runs["rows7"], FEATURES, k=20, source="partials")
    # the same documents and positions; values differ by float noise only (other batch compositions)
    assert one.select(*KEYS, "rank", "doc_id", "pos", "token_ids").equals(seven.select(*KEYS, "rank", "doc_id", "pos", "token_ids"))
    assert np.allclose(one["value"].to_numpy(), seven["value"].to_numpy(), rtol=1e-5, atol=1e-6)
    assert np.allclose(np.concatenate(one["acts"].to_list()), np.concatenate(seven["acts"].to_list()), rtol=1e-5, atol=1e-6)


def test_intervals_from_partials_equal_rows_and_definition(runs, raw):
    for bins, per_bin in [(5, 3), (3, 5), (8, 1)]:
        want = interval_examples(runs["rows"], FEATURES, bins=bins, per_bin=per_bin, source="rows")
        got = interval_examples(runs["rows"], FEATURES, bins=bins, per_bin=per_bin, source="partials")
        assert got.height > 22 and got.equals(want)
    with pytest.raises(ValueError, match="keeps 5 per feature"):
        interval_examples(runs["rows"], FEATURES, per_bin=6, source="partials")
    with pytest.raises(ValueError, match="seed 0"):
        interval_examples(runs["rows"], FEATURES, seed=3, source="partials")
    assert interval_examples(runs["rows"], FEATURES, seed=3).height > 0  # another seed: from the rows
    # the definition by loops: a document's maximum's bin, the feature's occupied bins cut into `bins` runs
    bins, per_bin = 4, 2
    got = interval_examples(runs["rows"], FEATURES, bins=bins, per_bin=per_bin)
    dmax: dict[tuple, dict[int, float]] = defaultdict(dict)
    for sae, group, doc, pos, f, v in raw.rows():
        dmax[(sae, f)][doc] = max(v, dmax[(sae, f)].get(doc, -math.inf))
    for (sae, f), docs in dmax.items():
        docs = {d: v for d, v in docs.items() if v > 0}
        mine = got.filter((pl.col("sae") == sae) & (pl.col("feature") == f))
        if not docs:
            assert mine.height == 0
            continue
        b = {d: sum(1 for e in EDGES if e < np.float32(v)) for d, v in docs.items()}
        lo, hi = min(b.values()), max(b.values())
        span = hi - lo + 1
        for i in range(bins):
            members = [d for d in docs if (b[d] - lo) * bins // span == i]
            pick = sorted(members, key=lambda d: (int(draws_np(np.array([d]), np.array([f]))[0]), d))[:per_bin]
            sample = mine.filter(pl.col("bin") == i)
            assert sorted(sample["doc_id"].to_list()) == sorted(pick)
            for v, blo, bhi in zip(sample["value"], sample["bin_lo"], sample["bin_hi"]):
                assert blo < v <= bhi


def test_histograms_from_partials_equal_rows_and_numpy(runs, raw):
    for sae in ("a", "j"):
        want = activation_histograms(runs["rows"], FEATURES, sae=sae, group="all", source="rows")
        got = activation_histograms(runs["rows"], FEATURES, sae=sae, group="all", source="partials")
        assert len(got) >= 10 and got.keys() == want.keys()
        for f, (edges, counts) in got.items():
            assert np.array_equal(edges, want[f][0]) and np.array_equal(counts, want[f][1])
            v = raw.filter((pl.col("sae") == sae) & (pl.col("feature") == f) & (pl.col("value") > 0))["value"].to_numpy()
            assert counts.sum() == len(v)
            inner = (v > 1e-4) & (v <= 1e4)  # np.histogram's bins are [lo, hi): count (lo, hi] by hand
            for lo, hi, c in zip(edges[:-1], edges[1:], counts):
                assert c == ((v[inner] > np.float32(lo)) & (v[inner] <= np.float32(hi))).sum() or lo < 1e-4 or hi > 1e4


def test_doc_moments_from_partials_equal_rows(runs):
    for name in ("rows", "rows7"):
        want, n_want = doc_moments(runs[name])
        got, n_got = partial_doc_moments(runs[name])
        assert n_want.sort("group").equals(n_got.sort("group").cast({"n_docs": n_want["n_docs"].dtype}))
        both = got.join(want, on=KEYS, how="left", suffix="_rows").fill_null(0.0)
        assert both.height == 2 * 96 and (both["doc_mean"] > 0).sum() > 20
        assert np.allclose(both["doc_mean"], both["doc_mean_rows"], rtol=1e-12, atol=1e-15)
        assert np.allclose(both["doc_var"], both["doc_var_rows"], rtol=1e-9, atol=1e-15)
    one, seven = partial_doc_moments(runs["rows"])[0], partial_doc_moments(runs["rows7"])[0]
    assert np.allclose(one["doc_mean"], seven["doc_mean"], rtol=1e-5, atol=1e-8)


def test_statistics_only_runs(runs):
    rows = top_examples(runs["rows"], FEATURES, k=20, window=(6, 6))
    stats_only = top_examples(runs["stats"], FEATURES, k=20, window=(6, 6))
    assert stats_only.equals(rows)  # the same split of units: the same values, contexts and token ids
    assert interval_examples(runs["stats"], FEATURES).equals(interval_examples(runs["rows"], FEATURES))
    fs, fr = features(runs["stats"]).collect(), features(runs["rows"]).collect()
    for c, dt in fr.schema.items():  # counts exactly; float merges to Polars' (parallel) summation order
        if dt.is_float():
            assert np.allclose(fs[c].fill_null(np.nan), fr[c].fill_null(np.nan), rtol=1e-12, equal_nan=True), c
        else:
            assert fs[c].equals(fr[c]), c
    docs = pl.read_parquet(str(runs["stats"] / "docs" / "**" / "*.parquet"))
    assert docs["token_ids"].null_count() == docs.height and docs["windows"].null_count() < docs.height
    with pytest.raises(ValueError, match="window of"):
        top_examples(runs["stats"], [3], window=(40, 2))
    with pytest.raises(FileNotFoundError, match="output.docs: none"):
        top_examples(runs["none"], FEATURES, k=3)
    assert activation_histograms(runs["none"], FEATURES, sae="a", group="all").keys()

    assert not list((runs["stats"] / "activations").rglob("*.parquet"))
    # narrow contexts keep a fraction of the tokens: each kept window is the document's own tokens
    narrow = pl.read_parquet(str(runs["narrow"] / "docs" / "**" / "*.parquet"))
    full = dict(pl.read_parquet(str(runs["rows"] / "docs" / "**" / "*.parquet")).select("doc_id", "token_ids").rows())
    kept = 0
    for doc, windows in narrow.select("doc_id", "windows").rows():
        for w in windows or ():
            assert w["token_ids"] == full[doc][w["start"]:w["start"] + len(w["token_ids"])]
            kept += len(w["token_ids"])
    assert 0 < kept < 0.5 * sum(len(t) for t in full.values())
    assert top_examples(runs["narrow"], FEATURES, k=2, window=(2, 2)).equals(
        top_examples(runs["rows"], FEATURES, k=2, window=(2, 2)))


def test_config_errors(tiny, tmp_path):
    cfg = base_config(tiny["llama"], [{"name": "a", "path": str(tiny["sae_standard"])}], tiny["data"], tmp_path / "r")
    for bad, match in [({"top_k": -1}, "must be >= 0"), ({"docs": "some"}, "not one of"),
                       ({"top_k": 0, "samples_per_bin": 0, "docs": "examples"}, "no example")]:
        with pytest.raises(ConfigError, match=match):
            config.from_dict({**cfg, "output": {**cfg["output"], **bad}})


def test_an_open_run_reads_its_markers_and_tokenizer_once(runs, monkeypatch):
    """Analyses handed an open run (run.open_run) share its manifest, markers and tokenizer."""
    import transformers

    from saeray.analysis.diff import diff_runs
    from saeray.analysis.top import load_tokenizer
    from saeray.engine.run import open_run
    from saeray.engine.store import RunDir

    reads, loads = [], []
    completion, manifest = RunDir.completion, RunDir.read_manifest
    monkeypatch.setattr(RunDir, "completion", lambda self, i: reads.append(i) or completion(self, i))
    monkeypatch.setattr(RunDir, "read_manifest", lambda self: reads.append("manifest") or manifest(self))
    from_pretrained = transformers.AutoTokenizer.from_pretrained
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        lambda *a, **k: loads.append(a) or from_pretrained(*a, **k))
    run = open_run(runs["rows"])
    n_units = len(RunDir(runs["rows"]).committed())
    top_examples(run, FEATURES, k=3, tokenizer=load_tokenizer(run))
    interval_examples(run, FEATURES, tokenizer=load_tokenizer(run))
    activation_histograms(run, FEATURES, sae="a", group="all")
    assert diff_runs(run, run)["q"].null_count() == 0
    assert reads.count("manifest") == 1 and len([r for r in reads if r != "manifest"]) == n_units > 1
    assert len(loads) == 1


def test_unit_examples_compaction_keeps_the_same_examples(monkeypatch):
    """Blocks of random entries through UnitExamples, compacting the contexts after every block or never."""
    from saeray.engine.partials import UnitExamples

    def feed(compact_rows: int):
        monkeypatch.setattr(UnitExamples, "COMPACT_ROWS", compact_rows)
        g = torch.Generator().manual_seed(0)
        ex = UnitExamples(40, 3, 2, torch.device("cpu"), radius=2)
        for block in range(6):
            n_docs, length = 8, 12
            rank = torch.arange(n_docs * length) // length
            pos = torch.arange(n_docs * length) % length
            keep = torch.rand(len(rank), generator=g) < 0.5
            feat = torch.randint(0, 40, (len(rank),), generator=g)
            r, p, f = rank[keep], pos[keep], feat[keep]
            v = torch.rand(len(r), generator=g)
            key = r * 40 + f
            uniq, inv = torch.unique(key, return_inverse=True)
            pmax = torch.full((len(uniq),), -1.0).scatter_reduce(0, inv, v, "amax")
            ppos = torch.full((len(uniq),), 10 ** 6).scatter_reduce(0, inv, torch.where(v == pmax[inv], p, 10 ** 6), "amin")
            ex.add(uniq % 40, uniq // 40 + 100 * block, ppos, pmax, (inv, p, v))
        return ex

    compacted, whole = feed(0), feed(1 << 40)
    assert len(compacted.contexts) < 6 and len(whole.contexts) == 6  # compacted at least once
    assert len(compacted.contexts[0]) < sum(len(c) for c in whole.contexts)
    a, b = compacted.to_table("s", "g"), whole.to_table("s", "g")
    assert a.num_rows > 100 and a.equals(b)
