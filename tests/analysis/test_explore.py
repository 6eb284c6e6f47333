"""Workflow 4 exploration against plain-python computations over the raw rows (mode last)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import polars as pl
import pytest
from helpers import base_config

from saeray.analysis import explore
from saeray.engine import config
from saeray.executors import run

STRONG = 0.5


@pytest.fixture(scope="module")
def run_dir(tiny, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("explore") / "run"
    saes = [{"name": "a", "path": str(tiny["sae_standard"])}, {"name": "b", "path": str(tiny["sae_topk"])}]
    cfg = base_config(tiny["llama"], saes, tiny["data"], out, positions={"mode": "last"},
                      data__keep_columns=["kind"], data__shards=3)
    run(config.from_dict(cfg), executor="local")
    return out


@pytest.fixture(scope="module")
def plain(run_dir: Path) -> dict:
    """values[feature][doc] (SAE b, group last), category of each doc, and the doc ids, as plain python."""
    values: dict[int, dict[int, float]] = defaultdict(dict)
    for sae, group, doc, pos, f, v in pl.read_parquet(str(run_dir / "activations" / "**" / "*.parquet")).rows():
        if sae == "b":
            assert group == "last" and doc not in values[f]  # one position per document
            values[f][doc] = v
    docs = pl.read_parquet(str(run_dir / "docs" / "**" / "*.parquet"))
    return {"values": values, "category": dict(zip(docs["doc_id"], docs["kind"])), "docs": sorted(docs["doc_id"])}


def _strong(values: dict[int, dict[int, float]], f: int) -> set[int]:
    fmax = max(values[f].values())
    return {d for d, v in values[f].items() if v > 0 and v >= STRONG * fmax}


def test_target(run_dir):
    assert explore.target(run_dir, "b") == ("b", "last")
    with pytest.raises(ValueError, match="ambiguous.*a/last, b/last"):
        explore.target(run_dir)
    with pytest.raises(ValueError, match="matches"):
        explore.target(run_dir, "b", "all")


def test_strongest_frequent_selective(run_dir, plain):
    values = plain["values"]
    want = sorted(((f, max(d.values()), min(doc for doc, v in d.items() if v == max(d.values())), len(d))
                   for f, d in values.items()), key=lambda r: (-r[1], r[0]))[:7]
    assert explore.strongest(run_dir, n=7, sae="b").rows() == want
    freq = sorted(((f, len(d)) for f, d in values.items()), key=lambda r: (-r[1], r[0]))[:7]
    got = explore.most_frequent(run_dir, n=7, sae="b")
    assert list(zip(got["feature"], got["n_docs"])) == freq
    assert got["frac_docs"].to_list() == pytest.approx([n / len(plain["docs"]) for _, n in freq])
    sel = sorted(((f, len(_strong(values, f)), max(d.values())) for f, d in values.items()),
                 key=lambda r: (r[1], -r[2], r[0]))[:7]
    got = explore.most_selective(run_dir, n=7, strong_frac=STRONG, sae="b")
    assert list(zip(got["feature"], got["n_strong"], got["max"])) == sel


def test_category_specialists(run_dir, plain):
    values, category = plain["values"], plain["category"]
    got = explore.category_specialists(run_dir, "kind", n=5, strong_frac=STRONG, sae="b")
    assert set(got["category"]) == set(category.values())
    for cat in set(category.values()):
        inside = {d for d, c in category.items() if c == cat}
        outside = set(category) - inside
        scores = []
        for f in values:
            strong = _strong(values, f)
            scores.append((f, len(strong & inside) / len(inside) - len(strong & outside) / len(outside)))
        want = sorted(scores, key=lambda r: (-r[1], r[0]))[:5]
        mine = got.filter(pl.col("category") == cat)
        assert mine["feature"].to_list() == [f for f, _ in want]
        assert mine["score"].to_list() == pytest.approx([s for _, s in want])
    with pytest.raises(ValueError, match="no column 'topic'.*kind"):
        explore.category_specialists(run_dir, "topic", sae="b")


def test_coactivation_and_matrix(run_dir, plain):
    values, category = plain["values"], plain["category"]
    feats = sorted(values, key=lambda f: -len(values[f]))[:6] + [95]
    got = explore.coactivation(run_dir, feats, "kind", sae="b")
    fs = sorted(set(feats))
    assert got.height == len(set(category.values())) * len(fs) * (len(fs) - 1) // 2
    for cat, n_docs, a, b, n_both in got.rows():
        docs = {d for d, c in category.items() if c == cat}
        assert n_docs == len(docs)
        assert n_both == len(docs & set(values.get(a, {})) & set(values.get(b, {})))
    assert got["n_both"].sum() > 0
    overall = explore.coactivation(run_dir, feats, sae="b")
    assert overall.columns == ["n_docs", "feature_a", "feature_b", "n_both"]
    assert overall["n_both"].to_list() == got.group_by("feature_a", "feature_b").agg(pl.col("n_both").sum()).sort(
        "feature_a", "feature_b")["n_both"].to_list()

    m = explore.feature_by_doc_matrix(run_dir, feats, "kind", sae="b")
    assert m.columns == ["doc_id", "category", *map(str, feats)]
    assert m["doc_id"].to_list() == sorted(plain["docs"], key=lambda d: (category[d], d))
    for row in m.iter_rows(named=True):
        for f in feats:
            assert row[str(f)] == pytest.approx(values.get(f, {}).get(row["doc_id"], 0.0))


def test_explore_cli_writes_tables(run_dir, tmp_path):
    from saeray import cli

    code = cli.main(["explore", str(run_dir), "--category", "kind", "--features", "0-40", "--sae", "b",
                     "--out", str(tmp_path / "x")])
    assert code == 0
    for name in ("strongest", "most_frequent", "most_selective", "specialists", "coactivation", "feature_by_doc"):
        assert pl.read_parquet(tmp_path / "x" / f"{name}.parquet").height > 0
