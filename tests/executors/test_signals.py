"""A run stopped by SIGTERM or SIGINT exits 143 / 130 without a traceback, leaves nothing half visible,
and its rerun ends with the rows of an uninterrupted run; a command whose extra is missing says which."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pyarrow as pa
import pytest
import yaml
from helpers import base_config, corpus, write_dataset
from reference import assert_same_rows, read_rows

from saeray import cli
from saeray.engine import config
from saeray.engine.store import RunDir
from saeray.engine.worker import ShardWorker
from saeray.engine.writing import UnitFiles
from saeray.executors import run, signals


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("rep", range(3))
@pytest.mark.parametrize("sig,where", [(signal.SIGTERM, ["--workers", "1"]), (signal.SIGINT, ["--local"])],
                         ids=["SIGTERM-ray", "SIGINT-local"])
def test_signal_mid_run_exits_cleanly_and_resumes(seven_units, tmp_path, sig, where, rep):
    out = tmp_path / "run"
    raw = {**seven_units["raw"], "output": {"dir": str(out)}}
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    proc = subprocess.Popen([sys.executable, "-m", "saeray.cli", "run", str(cfg), *where],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not list((out / "completions").glob("*.json")):
        time.sleep(0.05)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, (proc.returncode, stderr[-3000:])
    assert "Traceback" not in stderr and "Rerun the same command to resume" in stderr, stderr[-3000:]
    rd = RunDir(out)
    committed = rd.committed()
    assert 1 <= len(committed) < 7
    visible = {p.name.split("=")[1] for p in (out / "activations").iterdir()} if (out / "activations").exists() else set()
    assert {int(v) for v in visible} <= committed  # nothing of an unfinished unit is in place
    again = run(config.from_dict(raw), executor="local")
    assert sorted(again.skipped) == sorted(committed) and len(again.done) == 7 - len(committed)
    assert_same_rows(read_rows(out), read_rows(seven_units["ref"]), atol=1e-5)
    print(f"{signal.Signals(sig).name} {' '.join(where)} rep {rep}: exit {proc.returncode} after {len(committed)} "
          f"units; rerun did {len(again.done)}")


def test_an_error_raised_by_the_stop_is_the_stop(tiny, tmp_path, monkeypatch):
    """A stop can surface first as a library's error in the unit in flight (pyarrow raises OSError when a writer
    the stop left mid row group is closed): the run stops as stopped, and that unit is not reported as failed."""
    data = write_dataset(tmp_path / "data", corpus(24, seed=2), n_files=1)
    raw = base_config(tiny["llama"], [{"name": "a", "path": str(tiny["sae_standard"])}], data, tmp_path / "run",
                      data__shards=3)
    real = ShardWorker.process

    def process(self, task, *args, **kw):
        if task["uid"] == 1:  # as if SIGINT came while this unit wrote, and its write failed because of it
            monkeypatch.setattr(signals, "_stopping", signal.SIGINT)
            raise OSError("Only 2 out of 6 columns are initialized")
        return real(self, task, *args, **kw)

    monkeypatch.setattr(ShardWorker, "process", process)
    with pytest.raises(signals.Stopped) as stop:
        run(config.from_dict(raw), executor="local")
    assert stop.value.exit_status == 130 and isinstance(stop.value.__cause__, OSError)
    assert RunDir(tmp_path / "run").committed() == {0}


def test_closing_the_files_of_a_failed_unit_keeps_its_error(tmp_path):
    """After a unit failed, a writer that raises on close (pyarrow does when a failure left it mid row group) does
    not replace the unit's error; after a unit that finished, the same error is raised."""
    for d in ("docs", "activations"):
        (tmp_path / d).mkdir()
    out = config.OutputConfig(dir=str(tmp_path))

    class MidRowGroup:  # stands in for a pyarrow ParquetWriter left mid row group
        def close(self):
            raise OSError("Only 2 out of 6 columns are initialized")

    for failed in (True, False):
        files = UnitFiles(tmp_path, out, pa.schema([("doc_id", pa.int64())]), pa.schema([]))
        files.docs_writer.close()
        files.docs_writer = MidRowGroup()
        if failed:
            files.close(failed=True)
        else:
            with pytest.raises(OSError, match="columns are initialized"):
                files.close()


@pytest.mark.parametrize("module", ["plotly", "matplotlib"])
def test_missing_extra_is_one_line(monkeypatch, capsys, tmp_path, module):
    monkeypatch.setitem(sys.modules, module, None)  # as if the report/demo extra were not installed
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a))
    assert cli.main(["demo", "--tiny", "--out", str(tmp_path / "demo")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: saeray demo needs '{module}', from the demo extra: pip install 'saeray[demo]'"]
    assert not (tmp_path / "demo").exists()

