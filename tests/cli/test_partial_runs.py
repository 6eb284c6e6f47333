"""Partial runs say so, failed commands leave no empty output folder, and out-of-range features are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from helpers import base_config

from saeray import cli


@pytest.fixture(scope="module")
def finished(tiny, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("partial")
    raw = base_config(tiny["llama"], [{"name": "a", "path": str(tiny["sae_standard"])}], tiny["data"], root / "run",
                      output__unit_partials="keep")
    (root / "cfg.yaml").write_text(yaml.safe_dump(raw))
    assert cli.main(["run", str(root / "cfg.yaml"), "--local"]) == 0
    return root / "run"


def _partial(finished: Path, tmp_path: Path) -> Path:
    """A copy of the finished run with its last unit uncommitted, as a run stopped before it would be (and so
    before its end merged the units' partials)."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (run / "complete.json").unlink()
    (run / "merged.json").unlink()
    shutil.rmtree(run / "merged")
    sorted((run / "completions").glob("*.json"))[-1].unlink()
    return run


def _meta(path: Path, key: str) -> dict:
    return json.loads(pq.read_schema(path).metadata[key.encode()])


def test_a_finished_run_is_complete(finished, capsys):
    assert json.loads((finished / "complete.json").read_text())["units"] == 3
    assert cli.main(["stats", str(finished)]) == 0
    assert "partial" not in capsys.readouterr().err
    assert _meta(finished / "features.parquet", "saeray.run")["partial"] is False


def test_a_partial_run_says_so(finished, tmp_path, capsys):
    run = _partial(finished, tmp_path)
    assert cli.main(["stats", str(run)]) == 0
    err = capsys.readouterr().err
    assert f"note: {run} is a partial run: 2 of 3 units committed" in err and "Rerun `saeray run`" in err, err
    meta = _meta(run / "features.parquet", "saeray.run")
    assert meta["partial"] is True and meta["units"] == 2 and meta["planned"] == 3

    assert cli.main(["diff", str(finished), str(run), "--out", str(tmp_path / "diff"), "--no-significance"]) == 0
    assert "partial run" in capsys.readouterr().err
    diff_meta = json.loads((tmp_path / "diff" / "diff.json").read_text())
    assert diff_meta["completeness_a"]["partial"] is False and diff_meta["completeness_b"]["partial"] is True

    assert cli.main(["--require-complete", "stats", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "partial run" in err and "--require-complete" in err, err
    assert cli.main(["--require-complete", "stats", str(finished)]) == 0


def test_failed_commands_leave_no_empty_output_folder(finished, tmp_path, capsys):
    out = tmp_path / "new" / "diff"
    assert cli.main(["diff", str(finished), str(tmp_path / "not-a-run"), "--out", str(out)]) == 2
    assert "not a saeray run directory" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    assert cli.main(["export", "neuronpedia", str(tmp_path / "not-a-run"), "--out", str(kept / "np")]) == 2
    assert kept.is_dir() and not (kept / "np").exists()  # only what the command made goes


def test_out_of_range_features_are_refused(finished, capsys):
    from safetensors import safe_open

    manifest = json.loads((finished / "manifest.json").read_text())
    with safe_open(manifest["config"]["saes"][0]["path"] + "/sae_weights.safetensors", "pt") as f:
        d_sae = f.get_tensor("W_enc").shape[1]  # the SAE's width, read from its weights
    assert cli.main(["top", str(finished), "--feature", "9999", "--no-decode"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"feature 9999 is out of range: SAE 'a' has {d_sae} (0-{d_sae - 1})" in err, err
    assert cli.main(["top", str(finished), "--feature", str(d_sae - 1), "--no-decode"]) == 0
