"""Top and interval examples against a brute-force search over the raw activation rows."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import polars as pl
import pytest
from helpers import base_config

from saeray.analysis.top import interval_examples, load_tokenizer, top_examples
from saeray.engine import config
from saeray.executors import run

FEATURES = list(range(96))  # the whole SAE: 22 alive features, some in every document, some dead


@pytest.fixture(scope="module")
def run_dir(tiny, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("top") / "run"
    cfg = base_config(tiny["llama"], [{"name": "a", "path": str(tiny["sae_standard"])}], tiny["data"], out,
                      data__shards=4)
    run(config.from_dict(cfg), executor="local")
    return out


@pytest.fixture(scope="module")
def raw(run_dir: Path) -> tuple[dict[int, list[tuple]], dict[int, list[int]]]:
    """Activation rows grouped by feature, and token ids by doc_id, as plain python."""
    rows = defaultdict(list)
    for row in pl.read_parquet(str(run_dir / "activations" / "**" / "*.parquet")).rows():
        rows[row[4]].append(row)
    docs = pl.read_parquet(str(run_dir / "docs" / "**" / "*.parquet"))
    return rows, dict(zip(docs["doc_id"].to_list(), docs["token_ids"].to_list()))


def brute_top(rows: dict[int, list[tuple]], feature: int, k: int) -> list[tuple[int, float, int]]:
    """(doc_id, max value, pos of the max, smallest on ties) of the top k documents, by plain loops."""
    best: dict[int, tuple[float, int]] = {}
    for sae, group, doc, pos, f, v in rows[feature]:
        if doc not in best or v > best[doc][0] or (v == best[doc][0] and pos < best[doc][1]):
            best[doc] = (v, pos)
    ranked = sorted(best.items(), key=lambda item: (-item[1][0], item[0]))[:k]
    return [(doc, v, pos) for doc, (v, pos) in ranked]


def test_top_examples_equal_brute_force(run_dir, raw):
    rows, tokens = raw
    before, after = 3, 2
    got = top_examples(run_dir, FEATURES, k=5, window=(before, after))
    values = defaultdict(dict)
    for _, _, doc, pos, f, v in (r for rs in rows.values() for r in rs):
        values[(f, doc)][pos] = v
    clipped_left = clipped_right = 0
    for f in FEATURES:
        want = brute_top(rows, f, 5)
        mine = got.filter(pl.col("feature") == f)
        assert mine["rank"].to_list() == list(range(1, len(want) + 1))
        assert list(zip(mine["doc_id"], mine["value"], mine["pos"])) == want
        for ex in mine.iter_rows(named=True):
            ids, pos = tokens[ex["doc_id"]], ex["pos"]
            lo, hi = max(0, pos - before), min(len(ids), pos + after + 1)
            assert ex["n_tokens"] == len(ids) and ex["window_start"] == lo
            assert ex["token_ids"] == ids[lo:hi]
            assert ex["acts"] == pytest.approx([values[(f, ex["doc_id"])].get(p, 0.0) for p in range(lo, hi)])
            assert ex["acts"][pos - lo] == pytest.approx(ex["value"])
            clipped_left += pos - before < 0
            clipped_right += pos + after + 1 > len(ids)
    assert clipped_left and clipped_right, "the window clipping at both document edges should be exercised"


def test_windows_whole_document_and_special_tokens(tiny, run_dir, raw):
    _, tokens = raw
    tok = load_tokenizer(run_dir)
    special = set(tok.all_special_ids)
    got = top_examples(run_dir, FEATURES, k=20, window=(1000, 1000), tokenizer=tok)
    assert got.height > len(FEATURES)
    for ex in got.iter_rows(named=True):
        assert ex["window_start"] == 0 and ex["token_ids"] == tokens[ex["doc_id"]]
        assert ex["token_ids"][ex["pos"]] not in special
        assert ex["tokens"] == [tok.decode([t]) for t in ex["token_ids"]]
    # documents with special tokens are among the examples, so the check above means something
    assert any(special & set(ids) for ids in got["token_ids"])


def test_top_examples_filters_and_errors(run_dir, raw):
    f = max(FEATURES, key=lambda f: len(brute_top(raw[0], f, 10**9)))
    assert top_examples(run_dir, [f], sae="a", group="all", k=2).height == 2
    assert top_examples(run_dir, [3], group="none").height == 0
    with pytest.raises(ValueError, match="SAE 'b' is not in run"):
        top_examples(run_dir, [3], sae="b")
    with pytest.raises(ValueError, match="k must be"):
        top_examples(run_dir, [3], k=0)
    with pytest.raises(ValueError, match="window"):
        top_examples(run_dir, [3], window=(-1, 2))


def test_interval_examples(run_dir, raw):
    rows, _ = raw
    bins, per_bin = 4, 2
    got = interval_examples(run_dir, FEATURES, bins=bins, per_bin=per_bin, seed=1)
    assert got.equals(interval_examples(run_dir, FEATURES, bins=bins, per_bin=per_bin, seed=1))
    # a feature's sample does not depend on which other features are asked for
    f0 = got["feature"][-1]
    assert got.filter(pl.col("feature") == f0).equals(interval_examples(run_dir, [f0], bins=bins, per_bin=per_bin,
                                                                        seed=1))
    other_seed = interval_examples(run_dir, FEATURES, bins=bins, per_bin=per_bin, seed=2)
    assert not got["doc_id"].equals(other_seed["doc_id"])
    assert got["feature"].n_unique() == 22
    for f in FEATURES:
        docs = {doc: v for doc, v, _ in brute_top(rows, f, 10**9) if v > 0}
        mine = got.filter(pl.col("feature") == f)
        if not docs:
            assert mine.height == 0
            continue
        # each sampled document's maximum lies in its interval's value range, and intervals go up with bin
        assert (mine["value"] == pl.Series([docs[d] for d in mine["doc_id"]], dtype=pl.Float32)).all()
        assert ((mine["bin_lo"] < mine["value"]) & (mine["value"] <= mine["bin_hi"])).all()
        assert mine.group_by("bin").len()["len"].max() <= per_bin
        ranges = mine.select("bin", "bin_lo", "bin_hi").unique().sort("bin")
        assert (ranges["bin_lo"][1:].to_numpy() >= ranges["bin_hi"][:-1].to_numpy()).all()
        # the largest sampled maximum lies in the highest interval sampled (intervals ascend in value)
        assert mine["bin"].max() == mine.filter(pl.col("value") == mine["value"].max())["bin"][0]


def test_feature_order_layout(tiny, run_dir, tmp_path, monkeypatch):
    """output.row_order feature: the document-order run's rows, top and interval examples exactly; every row
    group sorted by (feature, doc_id, pos) and spanning few features, so a one-feature scan skips most of them."""
    import numpy as np
    import pyarrow.parquet as pq
    from polars.testing import assert_frame_equal

    from saeray.engine import writing

    # small enough that the tiny run's units flush several times and cut many row groups
    monkeypatch.setattr(writing.FeatureOrder, "FLUSH_ROWS", 2048)
    monkeypatch.setattr(writing.FeatureOrder, "ROW_GROUP_ROWS", 128)
    out = tmp_path / "by_feature"
    cfg = base_config(tiny["llama"], [{"name": "a", "path": str(tiny["sae_standard"])}], tiny["data"], out,
                      data__shards=4, output__row_order="feature")
    run(config.from_dict(cfg), executor="local")
    keys = ["sae", "group", "doc_id", "pos", "feature"]
    mine, ref = (pl.read_parquet(str(r / "activations" / "**" / "*.parquet")) for r in (out, run_dir))
    assert_frame_equal(mine.sort(keys), ref.sort(keys))
    spans = []
    for f in sorted((out / "activations").rglob("*.parquet")):
        pf = pq.ParquetFile(f)
        for i in range(pf.num_row_groups):
            g = pl.from_arrow(pf.read_row_group(i))
            assert g.equals(g.sort("sae", "group", "feature", "doc_id", "pos")), (f, i)
            st = pf.metadata.row_group(i).column(pf.schema_arrow.get_field_index("feature")).statistics
            spans.append((st.min, st.max))
    assert len(spans) > 3 * 4, "several flushes and row groups per unit"
    busiest = ref["feature"].mode()[0]
    holding = sum(lo <= busiest <= hi for lo, hi in spans)
    assert holding < len(spans) / 2, (holding, len(spans))  # statistics exclude most row groups for one feature
    width = np.mean([hi - lo + 1 for lo, hi in spans])
    assert width < ref["feature"].n_unique() / 2
    assert_frame_equal(top_examples(out, FEATURES, k=5, source="rows"), top_examples(run_dir, FEATURES, k=5, source="rows"))
    assert_frame_equal(interval_examples(out, FEATURES, bins=4, per_bin=2, seed=1, source="rows"),
                       interval_examples(run_dir, FEATURES, bins=4, per_bin=2, seed=1, source="rows"))


@pytest.mark.parametrize("blocks", ["in order", "reversed", "interleaved"])
def test_feature_order_sort(blocks):
    """FeatureOrder's rows are numpy's lexsort by (sae, group, feature, doc_id, pos) of the rows it was given,
    however the blocks arrive (blocks whose documents interleave take the full sort)."""
    import numpy as np

    from saeray.engine.writing import FeatureOrder

    rng = np.random.default_rng(len(blocks))
    parts, first = [], 0
    for _ in range(5):
        key = np.unique(rng.integers(0, 40 * 30 * 64, 500))  # distinct (doc, pos, feature), in that order
        r = {"doc_id": first + key // (30 * 64), "pos": (key // 64 % 30).astype(np.int32),
             "feature": (key % 64).astype(np.int32), "value": rng.random(len(key), dtype=np.float32)}
        parts.append(r)
        first += 40 if blocks != "interleaved" else 15
    if blocks == "reversed":
        parts = parts[::-1]
    order = FeatureOrder()
    for r in parts:
        assert order.add({("b", "g"): r, ("a", "g"): {c: v[::2] for c, v in r.items()}}) is None
    got = pl.from_arrow(order.take()())
    every = pl.concat([pl.DataFrame({"sae": sae, "group": "g", **{c: v[::step] for c, v in r.items()}})
                       for sae, step in (("b", 1), ("a", 2)) for r in parts])
    at = np.lexsort([every[c].to_numpy() for c in ("pos", "doc_id", "feature", "group", "sae")])
    assert got.equals(every[at])
