"""A write of a unit's output that fails (disk full on local disk, an object store's refusal) fails that unit
alone: the error names the path, nothing of the unit is visible to readers or left behind, a transient refusal
is retried, and the rerun's rows equal an uninterrupted run's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import yaml
from helpers import base_config, corpus, write_dataset
from reference import assert_same_rows, read_rows
from s3_server import S3Server, is_object_write

from saeray.analysis.stats import scan_activations, scan_docs
from saeray.engine import config
from saeray.engine.store import KINDS, RunDir
from saeray.executors import RunFailed, run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tiny, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("writes")
    data = write_dataset(root / "data", corpus(48, seed=4), n_files=1)
    raw = base_config(tiny["llama"], [{"name": "a", "path": str(tiny["sae_standard"])}], data, root / "ref",
                      data__shards=4)  # units 0-3 of 12 documents
    run(config.from_dict(raw), executor="local")
    return {"raw": raw, "ref": root / "ref"}


def _only_committed_visible(run_dir: str | Path, committed: set[int]) -> None:
    """Readers see the committed units' documents only; every output file in place is one a marker lists."""
    rd = RunDir(run_dir)
    assert rd.committed() == committed
    docs = scan_docs(run_dir).collect()
    assert sorted(docs["doc_id"].to_list()) == [d for u in sorted(committed) for d in range(12 * u, 12 * u + 12)]
    listed = {f for m in rd.completions().values() for fs in m["files"].values() for f in fs}
    present = {f for f in rd.list_files() if f.split("/", 1)[0] in KINDS}
    assert present == listed, sorted(present ^ listed)


FAIL_AT_RENAME = r"""
import errno, os, sys
target, failed = sys.argv[1], [False]
def hook(event, args):
    # os.rename / os.replace raise this audit event before they act; raising here makes the call fail
    if event == "os.rename" and target in str(args[1]) and not failed[0]:
        failed[0] = True
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(args[1]))
sys.addaudithook(hook)
from saeray.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.timeout(300)
@pytest.mark.parametrize("target", ["activations/shard=00001", "stats/00001.parquet", "completions/00001.json"],
                         ids=["activations", "stats", "marker"])
def test_disk_full_at_a_commit_fails_that_unit_only(data, tmp_path, target):
    out = tmp_path / "run"
    raw = {**data["raw"], "output": {"dir": str(out)}}
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    proc = subprocess.run([sys.executable, "-c", FAIL_AT_RENAME, target, "run", str(cfg), "--local"],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "1 of 4 units failed" in proc.stderr and "unit 1: OutputWriteError: writing " in proc.stderr
    assert f"{out}/{target}" in proc.stderr and "No space left on device" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr  # the cause in a line, where it happened and at the end
    _only_committed_visible(out, {0, 2, 3})
    assert not (out / "_tmp").exists() and not [p for p in out.rglob("*.tmp")]
    again = run(config.from_dict(raw), executor="local")
    assert sorted(again.skipped) == [0, 2, 3] and sorted(again.done) == [1]
    assert_same_rows(read_rows(out), read_rows(data["ref"]), atol=0)


@pytest.fixture(scope="module")
def s3():
    server = S3Server()
    yield server
    server.stop()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("target", ["activations/shard=00001/", "stats/00001.", "completions/00001.json"],
                         ids=["activations", "stats", "marker"])
def test_object_store_refusals(data, s3, monkeypatch, target):
    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    bucket = s3.new_bucket()
    uri = f"s3://{bucket}/run"
    raw = {**data["raw"], "output": {"dir": uri}}
    refused: list[str] = []

    def hook(environ: dict) -> object:
        path = environ["PATH_INFO"]
        if not is_object_write(environ):
            return None
        if path.startswith(f"/{bucket}/run/{target}"):  # unit 1: refused for good
            refused.append(path)
            return "403 Forbidden", "AccessDenied"
        if path.startswith(f"/{bucket}/run/stats/00002.") and not any("00002" in p for p in refused):
            refused.append(path)  # unit 2: a server hiccup, once: retried, and the unit commits
            return True
        return None

    s3.hook = hook
    try:
        with pytest.raises(RunFailed) as failed:
            run(config.from_dict(raw), executor="local")
    finally:
        s3.hook = None
    msg = str(failed.value)
    assert "1 of 4 units failed" in msg and f"unit 1: OutputWriteError: writing {uri}/{target}" in msg, msg
    assert any("00002" in p for p in refused) and any(target in p for p in refused)
    _only_committed_visible(uri, {0, 2, 3})
    again = run(config.from_dict(raw), executor="local")
    assert sorted(again.skipped) == [0, 2, 3] and sorted(again.done) == [1]
    assert_same_rows(scan_activations(uri).collect(), read_rows(data["ref"]), atol=0)
    assert pl.read_parquet(RunDir(uri).shard_files(1, "stats")).height > 0
