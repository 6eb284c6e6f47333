"""A run stopped by SIGTERM or SIGINT exits 143 / 130 without a traceback, leaves nothing half visible,
and its rerun ends with the rows of an uninterrupted run; a command whose extra is missing says which."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from helpers import base_config, corpus, write_dataset
from reference import assert_same_rows, read_rows
from saeray import cli, config
from saeray.executor import run
from saeray.store import RunDir


@pytest.fixture(scope="module")
def slow(tiny, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("signals")
    data = write_dataset(root / "data", corpus(112, seed=9, min_words=40, max_words=80), n_files=1)
    raw = base_config(tiny["llama"], [{"name": "a", "path": str(tiny["sae_standard"])}], data, root / "ref",
                      tokens__batch_tokens=64, data__shards=7)
    run(config.from_dict(raw), executor="local")
    return {"raw": raw, "ref": root / "ref"}


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("rep", range(3))
@pytest.mark.parametrize("sig,where", [(signal.SIGTERM, ["--workers", "1"]), (signal.SIGINT, ["--local"])],
                         ids=["SIGTERM-ray", "SIGINT-local"])
def test_signal_mid_run_exits_cleanly_and_resumes(slow, tmp_path, sig, where, rep):
    out = tmp_path / "run"
    raw = {**slow["raw"], "output": {"dir": str(out)}}
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
    assert_same_rows(read_rows(out), read_rows(slow["ref"]), atol=1e-5)
    print(f"{signal.Signals(sig).name} {' '.join(where)} rep {rep}: exit {proc.returncode} after {len(committed)} "
          f"units; rerun did {len(again.done)}")


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


def test_missing_s3_extra_is_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "s3fs", None)  # as if the s3 extra were not installed
    assert cli.main(["stats", "s3://some-bucket/run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "s3fs" in err[0] and err[0].startswith("error: cannot open run directory s3://"), err
