"""Cluster operations a run must survive or stop cleanly on: the local raylet killed mid-run, a node that sees
another output directory, a node joining mid-run (workers: auto with max_workers), and credentials that exist
only in the driver's environment. Each scenario runs 3 times; where the run completes or is rerun, its rows are
compared with an uninterrupted one-process run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import yaml
from helpers import reference_run
from reference import assert_same_rows, read_rows

from saeray.analysis.stats import scan_activations
from saeray.engine import config
from saeray.engine.store import RunDir
from saeray.executors import run

pytestmark = pytest.mark.slow

TESTS = Path(__file__).resolve().parents[1]


def _wait_for_marker(out: Path, proc: subprocess.Popen, limit_s: float = 300) -> None:
    deadline = time.time() + limit_s
    while time.time() < deadline and not list((out / "completions").glob("*.json")) and proc.poll() is None:
        time.sleep(0.05)


def _raylets_under(pid: int) -> list[psutil.Process]:
    out = []
    for p in psutil.Process(pid).children(recursive=True):
        try:  # a short-lived child may exit between the listing and this look
            if p.name() == "raylet":
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


# ---- 1. the local node's raylet killed mid-run ------------------------------------------------


@pytest.mark.timeout(600)
@pytest.mark.parametrize("rep", range(3))
def test_raylet_killed_run_stops_within_timeout_and_rerun_completes(seven_units, tmp_path, rep):
    out = tmp_path / "run"
    timeout_s = 15
    raw = {**seven_units["raw"], "output": {"dir": str(out)}, "worker_start_timeout_s": timeout_s}
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    ray_tmp = tempfile.mkdtemp(prefix="saeray-rl-", dir="/tmp")  # its own Ray session (short path for sockets)
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    proc = subprocess.Popen([sys.executable, "-m", "saeray.cli", "run", str(cfg), "--workers", "1"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_marker(out, proc)
        raylets = _raylets_under(proc.pid)
        assert proc.poll() is None and len(raylets) == 1, "the run ended before its raylet could be killed"
        t_kill = time.time()
        # the raylet and what fate-shares with it: its workers (Ray's direct actor calls would let a surviving
        # worker finish the run without any raylet)
        for p in [*raylets[0].children(recursive=True), raylets[0]]:
            p.kill()
        stdout, stderr = proc.communicate(timeout=timeout_s + 120)
        took = time.time() - t_kill
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in psutil.process_iter(["cmdline"]):  # what Ray left of that session
            if any(ray_tmp in a for a in (p.info["cmdline"] or [])):
                p.kill()
    assert proc.returncode == 1, (proc.returncode, stdout[-3000:], stderr[-3000:])
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: stopped: no worker could be placed for ") and "rerun the same command" in last, \
        stderr[-3000:]
    assert took < timeout_s + 60, took
    assert "no worker running: 1 waiting" in stdout, stdout[-2000:]  # the progress line said so meanwhile
    committed = RunDir(out).committed()
    assert 1 <= len(committed) < 7
    again = run(config.from_dict(raw), executor="local")
    assert sorted(again.skipped) == sorted(committed) and len(again.done) == 7 - len(committed)
    assert_same_rows(read_rows(out), read_rows(seven_units["ref"]), atol=1e-5)
    print(f"rep {rep}: raylet killed after {len(committed)} units; exit 1 {took:.1f}s later: {last}")


# ---- clusters of `ray start` nodes (tests/private_cluster.py) -----------------------------------

from private_cluster import PrivateCluster, can_hide_directories, clean_env  # noqa: E402


def _driver(cfg: Path, address: str, env: dict[str, str], log: Path) -> subprocess.Popen:
    """`saeray run` joining the cluster at `address` (workers: auto)."""
    return subprocess.Popen([sys.executable, "-m", "saeray.cli", "run", str(cfg)],
                            env={**env, "RAY_ADDRESS": address, "RAY_AUTH_MODE": "disabled"},
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, text=True)


@pytest.mark.timeout(600)
@pytest.mark.skipif(not can_hide_directories(), reason="needs unshare -m (root) to give a node its own directory")
@pytest.mark.parametrize("rep", range(3))
def test_node_that_sees_another_output_dir_stops_the_run_before_any_unit(seven_units, tmp_path, rep):
    shared = tmp_path / "disk"  # what the driver's node has at this path; the second node sees an empty tmpfs
    out = shared / "run"
    raw = {**seven_units["raw"], "output": {"dir": str(out)}, "workers": "auto"}  # one worker per node
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    shared.mkdir()
    cluster = PrivateCluster()
    try:
        cluster.add_node()
        cluster.add_node(hidden=shared)
        log = tmp_path / "driver.log"
        proc = _driver(cfg, cluster.address, clean_env(), log)
        proc.wait(timeout=300)
    finally:
        cluster.stop()
    text = log.read_text()
    last = text.strip().splitlines()[-1]
    assert proc.returncode == 1, text[-3000:]
    assert last.startswith("error: stopped: the worker on ") and "does not see the run directory" in last, last
    assert last.count("output.dir must be a filesystem every node shares, or s3://...") == 1, last
    assert RunDir(out).committed() == set()  # stopped before any unit was computed
    assert "Traceback" not in text
    print(f"rep {rep}: {last}")


@pytest.fixture(scope="module")
def longer(tiny, tmp_path_factory) -> dict:
    """20 units: long enough for a node to join and load its model while the run goes on."""
    return reference_run(tiny, tmp_path_factory.mktemp("ops-long"), 800, 20, seed=11)


def _track(out: Path, proc: subprocess.Popen, cluster: PrivateCluster, by_node: dict) -> None:
    """Which node's raylet each marker's worker runs under (read as soon as the marker appears)."""
    while proc.poll() is None:
        for m in (out / "completions").glob("*.json"):
            if m.stem not in by_node:
                try:
                    by_node[m.stem] = cluster.node_of(json.loads(m.read_text())["pid"])
                except (OSError, ValueError):
                    continue
        time.sleep(0.005)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("rep", range(3))
def test_a_node_joining_mid_run_gets_workers(longer, tmp_path, rep):
    import threading

    out = tmp_path / "run"
    raw = {**longer["raw"], "output": {"dir": str(out)}, "workers": "auto", "max_workers": 2}
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    cluster = PrivateCluster()
    by_node: dict[str, int | None] = {}
    try:
        first = cluster.add_node()  # 1 logical GPU: one of the 2 workers asked for can start now
        log = tmp_path / "driver.log"
        proc = _driver(cfg, cluster.address, clean_env(), log)
        tracker = threading.Thread(target=_track, args=(out, proc, cluster, by_node))
        tracker.start()
        # mid-run: the driver has asked for 2 GPU workers, and the cluster has 1 GPU (a worker loading, the other
        # waiting for a node). A run of 20 short units is over before a node that joins after the first worker
        # started could load its model on these 2 CPU cores.
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and "asking for 2 GPU workers" not in log.read_text():
            time.sleep(0.05)
        assert proc.poll() is None, log.read_text()[-3000:]
        joined = cluster.add_node()
        proc.wait(timeout=400)
        tracker.join()
    finally:
        cluster.stop()
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    assert "asking for 2 GPU workers (1 GPUs alive now)" in text
    assert joined in by_node.values() and first in by_node.values(), (by_node, first, joined)
    assert_same_rows(read_rows(out), read_rows(longer["ref"]), atol=1e-5)
    n_joined = sum(v == joined for v in by_node.values())
    print(f"rep {rep}: the node that joined mid-run committed {n_joined} of 20 units")


SECRETS = {"HF_TOKEN": "hf_saeraytest" + "q7" * 12, "AWS_SECRET_ACCESS_KEY": "saeray-secret-" + "z9" * 10}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("rep", range(3))
def test_credentials_reach_workers_and_are_written_nowhere(seven_units, tmp_path, rep, monkeypatch):
    from s3_server import S3Server

    s3 = S3Server()
    bucket = s3.new_bucket()
    uri = f"s3://{bucket}/run"
    raw = {**seven_units["raw"], "output": {"dir": uri}, "workers": "auto"}
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    # the nodes start with no credentials and no endpoint: the workers can reach the bucket only with the driver's
    node_env = clean_env(drop_prefixes=("RAY_", "PYTEST_", "AWS_", "HF_TOKEN", "HUGGING_FACE"))
    cluster = PrivateCluster(env=node_env)
    try:
        cluster.add_node()
        cluster.add_node()
        driver_env = {**node_env, **s3.env(), **SECRETS}
        log = tmp_path / "driver.log"
        proc = _driver(cfg, cluster.address, driver_env, log)
        proc.wait(timeout=300)
        ray_logs = cluster.logs_text()
    finally:
        cluster.stop()
        objects = s3.keys(bucket)
        s3.stop()
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    markers = [json.loads(v) for k, v in objects.items() if k.startswith("run/completions/")]
    assert len(markers) == 7
    assert all({"HF_TOKEN", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"} <= set(m["credentials"]) for m in markers)
    assert "forwarding AWS_ACCESS_KEY_ID" in text
    for name, value in SECRETS.items():
        assert not any(value.encode() in v for v in objects.values()), f"{name} in an object of the run"
        assert value not in text, f"{name} in the driver's output"
        assert value not in ray_logs, f"{name} in Ray's logs"
    s3 = S3Server()  # a fresh server for reading back: the run's objects, put back as they were
    s3.client().create_bucket(Bucket=bucket)
    for k, v in objects.items():
        s3.client().put_object(Bucket=bucket, Key=k, Body=v)
    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    try:
        assert_same_rows(scan_activations(uri).collect(), read_rows(seven_units["ref"]), atol=1e-5)
    finally:
        s3.stop()
    print(f"rep {rep}: 7 units on 2 nodes without credentials of their own; secrets in no object, log line or "
          f"Ray log ({len(ray_logs):,} characters of Ray logs searched)")
