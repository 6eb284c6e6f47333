"""Faults on the way to a finished run: a node lost mid-shard, a driver killed mid-commit, a hung worker.

Every scenario ends by comparing the run with a one-process run of the same config (rows,
documents, statistics), checking that every shard is committed exactly once (one marker,
whose files are the only ones in place), and that nothing temporary is left.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import polars as pl
import psutil
import pytest
import yaml
from helpers import base_config, corpus, write_dataset

from saeray.analysis.stats import features, scan_activations, scan_docs
from saeray.engine import config
from saeray.engine.store import KINDS, RunDir
from saeray.executors import RunFailed, run

pytestmark = pytest.mark.slow

TESTS = Path(__file__).resolve().parents[1]
KEYS = ["sae", "group", "doc_id", "pos", "feature"]


def _raw(tiny, data: Path, out: Path | str, **over) -> dict:
    return base_config(tiny["llama"], [{"name": "a", "path": str(tiny["sae_standard"])}], data, out, **over)


def _slow_data(tmp_path: Path, n_units: int = 4) -> Path:
    """One file of 24 documents of 40-100 words per unit (data.shards = n_units gives units 0..n-1 of 24 rows):
    a unit takes a while with 64-token batches."""
    return write_dataset(tmp_path / "data", corpus(24 * n_units, seed=9, min_words=40, max_words=100), n_files=1)


def _rows(run_dir: Path | str) -> pl.DataFrame:
    return scan_activations(run_dir).collect().sort(KEYS)


def assert_same_run(got: Path | str, want: Path | str, atol: float = 0.0) -> int:
    """Same rows (values to atol), documents and statistics; returns the number of rows compared."""
    a, b = _rows(got), _rows(want)
    assert a.height == b.height > 0
    assert a.select(KEYS).equals(b.select(KEYS))
    np.testing.assert_allclose(a["value"].to_numpy(), b["value"].to_numpy(), rtol=0, atol=atol)
    da, db = scan_docs(got).collect().sort("doc_id"), scan_docs(want).collect().sort("doc_id")
    assert da.drop("positions").equals(db.drop("positions")) and da["doc_id"].is_unique().all()
    fa, fb = features(got).collect(), features(want).collect()
    for col in ("sae", "group", "feature", "n_tokens", "n_active", "n_docs_active"):
        assert fa[col].to_list() == fb[col].to_list(), col
    for col in ("mean", "std", "max"):
        np.testing.assert_allclose(fa[col].fill_null(np.nan).to_numpy(), fb[col].fill_null(np.nan).to_numpy(),
                                   rtol=1e-6, atol=max(atol, 1e-9), err_msg=col)
    return a.height


def assert_committed_once(run_dir: Path, n_shards: int) -> dict[int, dict]:
    """One marker per shard; in place are exactly the files the markers list; no temporary files."""
    rd = RunDir(run_dir)
    markers = rd.completions()
    assert sorted(markers) == list(range(n_shards))
    listed = {f for m in markers.values() for files in m["files"].values() for f in files}
    present = {str(p.relative_to(run_dir)) for kind in KINDS
               for p in (run_dir / kind).rglob("*") if p.is_file()}
    assert present == listed, (sorted(present - listed), sorted(listed - present))
    assert not (run_dir / "_tmp").exists()
    assert not [p for p in run_dir.rglob("*") if p.name.endswith(".tmp")]
    assert sum(m["docs"] for m in markers.values()) == scan_docs(run_dir).collect().height
    return markers


# ---- a node lost without grace in the middle of a shard (multi-node cluster, own process) ---------


@pytest.mark.timeout(420)
def test_node_lost_mid_shard_run_finishes_identical(tiny, tmp_path):
    data = _slow_data(tmp_path, n_units=6)
    ref = tmp_path / "ref"
    run(config.from_dict(_raw(tiny, data, ref, tokens__batch_tokens=64, data__shards=6)), executor="local")
    out = tmp_path / "run"
    raw = _raw(tiny, data, out, tokens__batch_tokens=64, workers="auto", data__shards=6)
    temp_dir = tempfile.mkdtemp(prefix="saeray-rc-", dir="/tmp")  # Ray's sockets need a short path
    spec = {"config": raw, "temp_dir": temp_dir, "nodes": 2, "victim_shard": 1,
            "pid_glob": str(out / "_tmp" / "00001-*" / "worker.pid")}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    log = tmp_path / "driver.log"
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, str(TESTS / "cluster_driver.py"), str(tmp_path / "spec.json"),
                               str(tmp_path / "result.json")], stdout=f, stderr=subprocess.STDOUT, timeout=400)
    assert (tmp_path / "result.json").is_file(), log.read_text()[-5000:]
    events = json.loads((tmp_path / "result.json").read_text())
    assert proc.returncode == 0 and "exception" not in events, events.get("exception") or log.read_text()[-5000:]
    print("cluster run:", json.dumps(events))
    assert len(events["removed"]) == 1 and "replacement_joined_after_s" in events, events
    assert events["done"] == list(range(6)) and not events["errors"], events
    assert events["victims_running"] == []  # the lost node's worker is gone
    markers = assert_committed_once(out, 6)
    victim = events["removed"][0]
    assert markers[1]["pid"] != victim["pid"] and markers[1]["attempt"] != victim["attempt"].split("-")[1]
    lost = next(name for name in ("node-0", "node-1") if victim["raylet"] == events["raylets"][name])
    assert events["shard_node"]["00001"] not in (lost, "unknown"), events["shard_node"]
    n = assert_same_run(out, ref, atol=1e-5)
    print(f"node lost mid-shard: {n} rows compared")


# ---- the driver killed at exact points of a commit, and at a random one --------------------------

KILL_AT_RENAME = r"""
import os, signal, sys
run_dir, nth = sys.argv[1], int(sys.argv[2])
seen = 0
def hook(event, args):
    # os.rename / os.replace raise this audit event before they act: die with nothing more done
    global seen
    if event == "os.rename" and str(args[1]).startswith(run_dir):
        seen += 1
        if seen == nth:
            os.kill(os.getpid(), signal.SIGKILL)
sys.addaudithook(hook)
from saeray.cli import main
sys.exit(main(sys.argv[3:]))
"""


def _killed_at_rename(cfg_path: Path, out: Path, nth: int, log: Path) -> None:
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-c", KILL_AT_RENAME, str(out), str(nth), "run", str(cfg_path), "--local"],
                              stdout=f, stderr=subprocess.STDOUT, timeout=300)
    assert proc.returncode == -signal.SIGKILL, log.read_text()[-3000:]


@pytest.mark.timeout(420)
def test_driver_killed_during_commits_rerun_completes_only_missing(tiny, tmp_path):
    data = write_dataset(tmp_path / "data", corpus(48, seed=4), n_files=1)
    out, ref = tmp_path / "run", tmp_path / "ref"
    raw = _raw(tiny, data, out, data__shards=4)  # units 0-3 of 12 rows, in one file
    run(config.from_dict({**raw, "output": {"dir": str(ref)}}), executor="local")
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    # Renames of a local run: the manifest (first run only), then per shard activations, docs, stats, examples,
    # hist, marker. Run 1 dies at rename 7: shard 0's files are all in place and its marker is written to a
    # temporary name, but the marker's rename (the commit point) never happens.
    _killed_at_rename(cfg_path, out, 7, tmp_path / "run1.log")
    assert RunDir(out).committed() == set()
    assert (out / "activations" / "shard=00000" / "part-0.parquet").is_file()  # visible to ls, not to readers
    assert list((out / "completions").glob(".00000.json.*.tmp"))
    with pytest.raises(FileNotFoundError, match="no committed shards"):
        features(out)
    # Run 2 dies at a random rename among the commits of shards 1-3 (seeded; SAERAY_FAULT_SEED to vary it).
    seed = int(os.environ.get("SAERAY_FAULT_SEED", "6"))
    nth = random.Random(seed).randint(7, 24)
    print(f"run 2 killed at rename {nth} (seed {seed})")
    _killed_at_rename(cfg_path, out, nth, tmp_path / "run2.log")
    want = {0} | {s for s in (1, 2, 3) if nth > 6 * (s + 1)}  # run 2 redoes shard 0 (renames 1-6)
    rd = RunDir(out)
    assert rd.committed() == want
    before = {i: (rd.uri(rd.marker_key(i)), Path(rd.marker(i)).read_bytes()) for i in want}
    # Readers see exactly the committed shards' documents.
    docs = scan_docs(out).collect()
    assert sorted(docs["doc_id"]) == [d for i in sorted(want) for d in range(12 * i, 12 * i + 12)]
    result = run(config.from_dict(raw), executor="local")
    assert result.skipped == sorted(want) and sorted(result.done) == sorted({0, 1, 2, 3} - want)
    assert all(Path(p).read_bytes() == b for p, b in before.values())  # committed shards untouched
    assert_committed_once(out, 4)
    n = assert_same_run(out, ref)
    print(f"driver killed at renames 5 and {nth}: {n} rows compared")


# ---- a hung worker: timed out, replaced, retried, then reported -----------------------------------


def _stop_attempts(out: Path, plan: dict[str, int], stopped: list[tuple[str, int]], done: threading.Event) -> None:
    """SIGSTOP the worker of the first `plan[shard]` attempts at each shard: a process that hangs."""
    seen: set[str] = set()
    while not done.is_set():
        for f in (out / "_tmp").glob("*/worker.pid"):
            attempt = f.parent.name
            shard = attempt.split("-")[0]
            if attempt in seen or shard not in plan:
                continue
            try:
                pid = int(f.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue
            seen.add(attempt)
            if sum(s == shard for s, _ in stopped) < plan[shard]:
                os.kill(pid, signal.SIGSTOP)
                stopped.append((shard, pid))
        time.sleep(0.01)


@pytest.mark.timeout(300)
def test_hung_worker_is_timed_out_replaced_and_retried(tiny, tmp_path, ray_session):
    # Shards that take a second or two: long enough for the watcher to catch every attempt in flight
    # (a shard of a few short documents can finish between two polls), well inside the limit.
    data = _slow_data(tmp_path, n_units=4)
    out, ref = tmp_path / "run", tmp_path / "ref"
    timeout_s = 10.0
    raw = _raw(tiny, data, out, shard_timeout_s=timeout_s, workers=2, tokens__batch_tokens=64, data__shards=4)
    run(config.from_dict({**raw, "output": {"dir": str(ref)}}), executor="local")
    stopped: list[tuple[str, int]] = []
    done = threading.Event()
    # Shard 1 hangs once (the retry works); shard 3 hangs on every attempt.
    watcher = threading.Thread(target=_stop_attempts, args=(out, {"00001": 1, "00003": 99}, stopped, done), daemon=True)
    watcher.start()
    t0 = time.time()
    try:
        with pytest.raises(RunFailed) as failed:
            run(config.from_dict(raw), executor="ray")
    finally:
        done.set()
        watcher.join()
        for _, pid in stopped:  # never leave a stopped process behind, whatever happened
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
    elapsed = time.time() - t0
    message = str(failed.value)
    assert "1 of 4 units failed" in message and f"unit 3: timed out after {timeout_s:.0f}s" in message, message
    assert "on each of 3 attempts" in message, message
    assert [s for s, _ in stopped].count("00003") == 3 and [s for s, _ in stopped].count("00001") == 1
    assert elapsed >= 3 * timeout_s
    time.sleep(1.0)
    alive = [pid for _, pid in stopped if psutil.pid_exists(pid)
             and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"hung workers not killed: {alive}"
    rd = RunDir(out)
    assert rd.committed() == {0, 1, 2}
    assert rd.completion(1)["pid"] != dict(stopped)["00001"]
    assert not (out / "_tmp").exists() and not (out / "activations" / "shard=00003").exists()
    # The rerun (nothing hangs now) does only shard 3; the run then equals the one-process run.
    result = run(config.from_dict(raw), executor="ray")
    assert result.skipped == [0, 1, 2] and sorted(result.done) == [3]
    assert_committed_once(out, 4)
    n = assert_same_run(out, ref, atol=1e-5)
    print(f"hung worker: run took {elapsed:.1f}s with a {timeout_s}s limit; {n} rows compared")
