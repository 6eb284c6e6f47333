"""Shard planning and reading: stable doc ids, local formats, and the hub code path on local files."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from saeray.engine import data
from saeray.engine.config import DataConfig


def _rows(p: data.DataPlan, shard: data.Shard) -> list[tuple[int, str]]:
    return [(d, t) for d, t, _ in data.iter_rows(p, shard.start, shard.end, "text", ())]


@pytest.fixture
def parquet_dir(tmp_path):
    texts = [f"doc {i}" for i in range(23)]
    d = tmp_path / "pq"
    d.mkdir()
    for k, (a, b) in enumerate([(0, 10), (10, 10), (10, 17), (17, 23)]):  # one empty file
        pq.write_table(pa.table({"text": pa.array(texts[a:b], pa.string()), "y": list(range(a, b))}),
                       d / f"f{k}.parquet", row_group_size=3)
    return d, texts


@pytest.mark.parametrize("shards", [None, 1, 2, 5, 23, 100])
def test_doc_ids_are_canonical_for_any_shard_count(parquet_dir, shards):
    d, texts = parquet_dir
    p = data.plan(DataConfig(dataset=str(d), shards=shards))
    got = [r for s in p.shards for r in _rows(p, s)]
    assert got == list(enumerate(texts))
    assert len(p.shards) == (3 if shards is None else min(shards, 23))  # the empty file has no shard


def test_jsonl_gz_and_text(tmp_path):
    j = tmp_path / "j"
    j.mkdir()
    with gzip.open(j / "a.jsonl.gz", "wt") as f:
        for i in range(5):
            f.write(json.dumps({"text": f"row {i}", "label": i % 2}) + "\n\n")  # blank lines are skipped
    (j / "b.jsonl").write_text(json.dumps({"text": "last", "label": 1}) + "\n")
    p = data.plan(DataConfig(dataset=str(j), keep_columns=("label",), shards=4))
    assert p.format == "json" and p.n_rows == 6
    rows = [r for s in p.shards for r in data.iter_rows(p, s.start, s.end, "text", ("label",))]
    assert rows == [(i, f"row {i}", {"label": i % 2}) for i in range(5)] + [(5, "last", {"label": 1})]
    assert p.keep_arrow_schema().field("label").type == pa.int64()

    t = tmp_path / "t.txt"
    t.write_bytes(b"first line\r\nsecond\n\nfourth \xff bad utf8")
    p = data.plan(DataConfig(dataset=str(t)))
    assert [r[1] for r in data.iter_rows(p, 0, p.n_rows, "text", ())] == ["first line", "second", "", "fourth \ufffd bad utf8"]


def test_mixed_formats_and_missing_dataset(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "a.txt").write_text("x")
    (tmp_path / "m" / "b.jsonl").write_text('{"text": "y"}\n')
    with pytest.raises(data.DataError, match="set data.format"):
        data.plan(DataConfig(dataset=str(tmp_path / "m")))
    with pytest.raises(data.DataError, match="does not exist"):
        data.plan(DataConfig(dataset=str(tmp_path / "nothing")))


def test_hub_code_path_resolves_local_folder(parquet_dir):
    """`list_hub_files` goes through `datasets.load_dataset_builder`, which also accepts a local folder."""
    d, _ = parquet_dir
    files, fmt = data.list_hub_files(DataConfig(dataset=str(d)))
    assert fmt == "parquet" and [f.rsplit("/", 1)[-1] for f in files] == [f"f{k}.parquet" for k in range(4)]
    with pytest.raises(data.DataError, match="no split 'test'"):
        data.list_hub_files(DataConfig(dataset=str(d), split="test"))
