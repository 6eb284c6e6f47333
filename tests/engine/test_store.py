"""Run directories written by other saeray versions are refused, not misread; local atomic writes."""

from __future__ import annotations

import json
import os

import pytest

from saeray.engine.storage import replacing, write_local
from saeray.engine.store import RunDir, RunDirError
from saeray.engine.units import DataPlan


def test_a_marker_without_its_file_list_is_refused(tmp_path):
    rd = RunDir(tmp_path / "run")
    rd.prepare({"fingerprint": "f" * 16}, overwrite=False)
    (tmp_path / "run" / "stats" / "00000.parquet").write_bytes(b"old layout")
    rd.write_json(rd.marker_key(0), {"shard": 0, "rows": 1})  # what saeray wrote before markers listed files
    with pytest.raises(RunDirError, match="lists no files.*another --out"):
        rd.shard_files(0, "stats")
    with pytest.raises(RunDirError, match="lists no files"):  # a resume refuses before it cleans anything
        rd.prepare({"fingerprint": "f" * 16}, overwrite=False)
    assert (tmp_path / "run" / "stats" / "00000.parquet").read_bytes() == b"old layout"


def test_a_run_of_another_saeray_version_is_refused_saying_so(tmp_path):
    import saeray

    RunDir(tmp_path / "run").prepare({"fingerprint": "a" * 16, "saeray_version": "0.1.0"}, overwrite=False)
    (tmp_path / "run" / "completions" / "00000.json").write_text("{}")  # a committed unit: something to lose
    with pytest.raises(RunDirError, match=r"written by saeray 0\.1\.0, whose fingerprints saeray .* does not reproduce"):
        RunDir(tmp_path / "run").prepare({"fingerprint": "b" * 16, "saeray_version": saeray.__version__},
                                         overwrite=False)
    with pytest.raises(RunDirError, match=r"model, SAEs, data files or token settings differ"):  # same version
        RunDir(tmp_path / "run").prepare({"fingerprint": "b" * 16, "saeray_version": "0.1.0"}, overwrite=False)


def test_a_plan_from_before_work_units_is_refused():
    with pytest.raises(ValueError, match="older saeray"):
        DataPlan.from_dict({"format": "parquet", "files": [], "units": []})


def test_write_local_replaces_the_whole_file(tmp_path):
    p = tmp_path / "a.json"
    write_local(p, b"one")
    write_local(p, json.dumps({"two": 2}).encode(), fsync=False)
    assert json.loads(p.read_text()) == {"two": 2}
    assert os.listdir(tmp_path) == ["a.json"]  # no temporary left


def test_replacing_leaves_nothing_when_the_writer_fails(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("old")
    with pytest.raises(RuntimeError):
        with replacing(p) as tmp:
            with open(tmp, "w") as f:
                f.write("half")
            raise RuntimeError("writer died")
    assert p.read_text() == "old"
    assert os.listdir(tmp_path) == ["a.txt"]


def test_replacing_a_folder_keeps_the_one_another_process_finished_first(tmp_path):
    target = tmp_path / "model"
    with replacing(target) as tmp:
        os.mkdir(tmp)
        (tmp_path / os.path.basename(tmp) / "w").write_text("mine")
        target.mkdir()  # another process finished first
        (target / "w").write_text("theirs")
    assert (target / "w").read_text() == "theirs"
    assert sorted(os.listdir(tmp_path)) == ["model"]


def test_a_run_without_committed_units_takes_the_new_manifest(tmp_path):
    """Nothing is lost when no unit was committed (e.g. every unit failed on a broken SAE that was then fixed)."""
    RunDir(tmp_path / "run").prepare({"fingerprint": "a" * 16}, overwrite=False)
    (tmp_path / "run" / "notes.txt").write_text("mine")
    assert RunDir(tmp_path / "run").prepare({"fingerprint": "b" * 16}, overwrite=False) == 0
    assert '"bbbbbbbbbbbbbbbb"' in (tmp_path / "run" / "manifest.json").read_text()
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"
