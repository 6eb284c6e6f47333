"""Two drivers on one run directory: the second refuses with who holds it; a holder that was SIGKILLed does not
block the rerun, whose rows equal an uninterrupted run's (local disk and S3)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import base_config
from reference import assert_same_rows, read_rows
from s3_server import S3Server

from saeray.engine import config
from saeray.engine.store import LOCK, RunDir, RunDirError
from saeray.executors import lock, run
from saeray.executors.lock import DriverLock, RunLocked


def test_second_lock_refused_and_released(tmp_path):
    rd = RunDir(tmp_path / "run")
    with DriverLock(rd) as held:
        body = json.loads((tmp_path / "run" / LOCK).read_text())
        assert body["pid"] == os.getpid() and body["host"] == socket.gethostname()
        with pytest.raises(RunLocked) as refused:
            DriverLock(rd).acquire()  # another open file description: flock refuses it as it would another process
        msg = str(refused.value)
        assert f"pid {os.getpid()}" in msg and socket.gethostname() in msg and held.me["since"] in msg
    assert not (tmp_path / "run").exists()  # no manifest was written: the run never began, nothing is left
    DriverLock(rd).acquire()  # free again


def test_a_config_error_leaves_no_directory(tiny, tmp_path):
    raw = base_config(tiny["llama"], [{"name": "a", "path": str(tmp_path / "no-such-sae")}], tiny["data"],
                      tmp_path / "run")
    with pytest.raises((RunDirError, ValueError, FileNotFoundError)):
        run(config.from_dict(raw), executor="local")
    assert not (tmp_path / "run").exists()


def _start(cfg: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "saeray.cli", "run", str(cfg), "--local"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("rep", range(3))
def test_second_driver_refused_then_rerun_after_sigkill(seven_units, tmp_path, rep):
    out = tmp_path / "run"
    raw = {**seven_units["raw"], "output": {"dir": str(out)}}
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    first = _start(cfg)
    deadline = time.time() + 300
    while time.time() < deadline and not list((out / "completions").glob("*.json")) and first.poll() is None:
        time.sleep(0.05)
    # the holder stops (SIGSTOP) once it has committed a unit: it keeps its lock, and cannot finish the run while the
    # second driver starts up (a whole interpreter and torch), which on a loaded machine took longer than 6 units
    first.send_signal(signal.SIGSTOP)
    second = subprocess.run([sys.executable, "-m", "saeray.cli", "run", str(cfg), "--local"],
                            capture_output=True, text=True, timeout=300)
    still_running = first.poll() is None
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=60)
    assert still_running, "the first run ended before the second started: nothing was tested"
    err = second.stderr.strip().splitlines()
    assert second.returncode == 2 and len(err) == 1, second.stderr[-3000:]
    assert f"is in use by another saeray run (host {socket.gethostname()}, pid {first.pid}, since " in err[0], err
    rd = RunDir(out)
    committed = rd.committed()
    assert 1 <= len(committed) < 7
    # the holder was SIGKILLed: its lock is gone with it, and the rerun does only the missing units
    again = run(config.from_dict(raw), executor="local")
    assert sorted(again.skipped) == sorted(committed) and len(again.done) == 7 - len(committed)
    assert_same_rows(read_rows(out), read_rows(seven_units["ref"]), atol=1e-5)
    print(f"rep {rep}: second driver refused while the first held {len(committed)} units; rerun after SIGKILL "
          f"did {len(again.done)}")


@pytest.fixture(scope="module")
def s3():
    server = S3Server()
    yield server
    server.stop()


def test_object_store_lock(s3, monkeypatch):
    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(lock, "SETTLE_S", 0.05)
    bucket = s3.new_bucket()
    rd = RunDir(f"s3://{bucket}/run")
    with DriverLock(rd) as held:
        assert json.loads(s3.keys(bucket)["run/driver.lock"])["token"] == held.me["token"]
        with pytest.raises(RunLocked, match=f"pid {os.getpid()}"):
            DriverLock(RunDir(f"s3://{bucket}/run")).acquire()
    assert s3.keys(bucket) == {}  # released: deleted
    # a holder on this host whose process is gone, and one on another host whose heartbeat stopped: stale
    dead = subprocess.Popen(["true"])
    dead.wait()
    for holder in ({"host": socket.gethostname(), "pid": dead.pid, "since": lock._now(), "heartbeat": lock._now()},
                   {"host": "elsewhere", "pid": 1, "since": "2026-01-01T00:00:00+00:00",
                    "heartbeat": "2026-01-01T00:00:00+00:00"}):
        s3.client().put_object(Bucket=bucket, Key="run/driver.lock", Body=json.dumps(holder).encode())
        with DriverLock(rd):
            pass
    # another host's live heartbeat: refused
    s3.client().put_object(Bucket=bucket, Key="run/driver.lock", Body=json.dumps(
        {"host": "elsewhere", "pid": 1, "since": lock._now(), "heartbeat": lock._now()}).encode())
    with pytest.raises(RunLocked, match="host elsewhere, pid 1"):
        DriverLock(rd).acquire()
