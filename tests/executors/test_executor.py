"""Ray executor: same results for any worker/shard count, and exactly-once under failures."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml
from helpers import base_config, corpus, kill_worker_of, write_dataset
from reference import assert_same_rows, read_rows

from saeray.analysis.stats import features
from saeray.engine import config
from saeray.executors import run

pytestmark = pytest.mark.slow


def _cfg(tiny, out: Path, data: Path | None = None, **over) -> config.RunConfig:
    saes = [{"name": "a", "path": str(tiny["sae_standard"])}, {"name": "m", "path": str(tiny["sae_mlp"])}]
    return config.from_dict(base_config(tiny["llama"], saes, data or tiny["data"], out, **over))


def _assert_same_stats(a: Path, b: Path) -> None:
    fa, fb = features(a).collect(), features(b).collect()
    assert fa.height == fb.height
    for col in ("n_tokens", "n_active", "n_docs_active", "feature"):
        assert fa[col].to_list() == fb[col].to_list(), col
    for col in ("mean", "std", "max", "density"):
        np.testing.assert_allclose(fa[col].fill_null(np.nan).to_numpy(), fb[col].fill_null(np.nan).to_numpy(),
                                   rtol=1e-5, atol=1e-6, err_msg=col)


def test_workers_and_shards_do_not_change_results(tiny, tmp_path, ray_session):
    ref = tmp_path / "ref"
    run(_cfg(tiny, ref, data__shards=1), executor="local")
    for workers, shards in [(1, 7), (2, 7), (3, 7), (3, 1)]:
        out = tmp_path / f"w{workers}s{shards}"
        result = run(_cfg(tiny, out, data__shards=shards), workers=workers, executor="ray")
        assert len(result.done) == max(shards, 3) and not result.errors  # a unit never spans the 3 files
        for sae in ("a", "m"):
            assert_same_rows(read_rows(out, sae), read_rows(ref, sae), atol=1e-5)
        _assert_same_stats(out, ref)
        assert not (out / "_tmp").exists()


def _slow_dataset(tmp_path: Path) -> Path:
    # one file cut into 7 units (data.shards: 7, ids 0-6) of enough tokens that a unit takes a noticeable time
    # with 64-token batches
    return write_dataset(tmp_path / "data", corpus(168, seed=9, min_words=40, max_words=100), n_files=1)


def test_killed_worker_is_replaced_and_rows_match(tiny, tmp_path, ray_session):
    data = _slow_dataset(tmp_path)
    ref = tmp_path / "ref"
    run(_cfg(tiny, ref, data, tokens__batch_tokens=64, data__shards=7), executor="local")
    out = tmp_path / "run"
    killed: list[int] = []

    t = threading.Thread(target=kill_worker_of, args=(out, "00003", killed, 120))  # unit 3, mid-unit
    t.start()
    result = run(_cfg(tiny, out, data, tokens__batch_tokens=64, data__shards=7), workers=2, executor="ray")
    t.join()
    assert killed, "the test never caught shard 3 in flight"
    assert not result.errors and len(result.done) == 7
    assert json.loads((out / "completions" / "00003.json").read_text())["pid"] != killed[0]
    assert_same_rows(read_rows(out), read_rows(ref), atol=1e-5)
    _assert_same_stats(out, ref)
    assert not (out / "_tmp").exists()
    assert sorted(p.name for p in (out / "activations").iterdir()) == [f"shard={i:05d}" for i in range(7)]


def test_killed_driver_rerun_does_only_missing_shards(tiny, tmp_path):
    data = _slow_dataset(tmp_path)
    out = tmp_path / "run"
    cfg_path = tmp_path / "cfg.yaml"
    raw = base_config(tiny["llama"], [{"name": "a", "path": str(tiny["sae_standard"])}], data, out,
                      tokens__batch_tokens=64, data__shards=7)
    cfg_path.write_text(yaml.safe_dump(raw))
    cmd = [sys.executable, "-m", "saeray.cli", "run", str(cfg_path), "--local"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and len(list((out / "completions").glob("*.json"))) < 2:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = {p.name: (p.stat().st_mtime_ns, p.read_text()) for p in (out / "completions").glob("*.json")}
    assert 2 <= len(before) < 7, before.keys()
    result = run(config.from_dict(raw), executor="local")
    assert sorted(result.skipped) == sorted(int(n.split(".")[0]) for n in before)
    assert len(result.done) == 7 - len(before)
    after = {p.name: (p.stat().st_mtime_ns, p.read_text()) for p in (out / "completions").glob("*.json")}
    assert all(after[k] == v for k, v in before.items())  # committed shards untouched
    assert not (out / "_tmp").exists()
    ref = tmp_path / "ref"
    run(config.from_dict({**raw, "output": {"dir": str(ref)}}), executor="local")
    assert_same_rows(read_rows(out), read_rows(ref), atol=0)
    _assert_same_stats(out, ref)


def test_error_in_one_shard_is_reported_and_others_commit(tiny, tmp_path, ray_session):
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = tmp_path / "data"
    data.mkdir()
    pq.write_table(pa.table({"text": ["good text one", "more good text"]}), data / "a.parquet")
    # b.parquet's footer is intact (planning reads it) but its pages are garbage: reading the shard fails.
    pq.write_table(pa.table({"text": ["unreadable text", "ok"]}), data / "b.parquet", compression="zstd")
    chunk = pq.ParquetFile(data / "b.parquet").metadata.row_group(0).column(0)
    raw = bytearray((data / "b.parquet").read_bytes())
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    raw[start:start + chunk.total_compressed_size] = b"\xff" * chunk.total_compressed_size
    (data / "b.parquet").write_bytes(bytes(raw))
    pq.write_table(pa.table({"text": ["fine again"]}), data / "c.parquet")
    out = tmp_path / "run"
    from saeray.executors import RunFailed

    with pytest.raises(RunFailed, match="unit 1000000: DataError: .*b.parquet: row group 0 .*Couldn't deserialize thrift"):
        run(_cfg(tiny, out, data), workers=2, executor="ray")
    assert sorted(p.stem for p in (out / "completions").glob("*.json")) == ["00000", "2000000"]
    assert not (out / "activations" / "shard=1000000").exists()
