"""A run never costs its inputs: a run directory that is, holds or sits inside the dataset, the model or an
SAE is refused before anything is written, locked or deleted; --overwrite deletes only what a run directory
holds. Every refusal is one line on stderr that names the path and the fix, with no traceback."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
import yaml
from helpers import base_config

from saeray import cli
from saeray.engine import config
from saeray.engine.overlap import OverlapError, check_apart, location


def _tree(root: Path) -> dict[str, str]:
    """Every file under root (symlinks followed) with its content's hash."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _copy_data(tiny, tmp_path: Path) -> Path:
    data = tmp_path / "ds_copy"
    shutil.copytree(tiny["data"], data)
    return data


def _run(tmp_path: Path, raw: dict, capsys, *extra: str, local: bool = True) -> tuple[int, str]:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    code = cli.main(["run", str(path), *(["--local"] if local else []), *extra])
    return code, capsys.readouterr().err.strip()


def _raw(tiny, data: Path, out: Path, **over) -> dict:
    return base_config(tiny["llama"], [{"name": "a", "path": str(tiny["sae_standard"])}], data, out, **over)


def _refused(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for n in needles:
        assert n in err, err
    assert "--overwrite" not in err.split("Set output.dir")[-1], err  # never advises overwriting an input


@pytest.mark.parametrize("fmt", ["auto", "parquet"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_run_into_the_dataset_folder_is_refused(tiny, tmp_path, capsys, fmt, overwrite):
    data = _copy_data(tiny, tmp_path)
    before = _tree(data)
    extra = ["--overwrite"] if overwrite else []
    code, err = _run(tmp_path, _raw(tiny, data, data, data__format=fmt), capsys, *extra)
    _refused(code, err, str(data), "is the dataset (data.dataset)", "new folder")
    assert _tree(data) == before
    assert sorted(p.name for p in data.iterdir()) == sorted(before)  # no lock, manifest or folder left


def test_run_into_the_dataset_folder_is_refused_with_ray(tiny, tmp_path, capsys):
    data = _copy_data(tiny, tmp_path)
    before = _tree(data)
    code, err = _run(tmp_path, _raw(tiny, data, data), capsys, "--overwrite", local=False)
    _refused(code, err, "is the dataset")
    assert _tree(data) == before


def test_run_directory_inside_or_around_the_dataset_is_refused(tiny, tmp_path, capsys):
    data = _copy_data(tiny, tmp_path)
    before = _tree(data)
    code, err = _run(tmp_path, _raw(tiny, data, data / "run"), capsys)
    _refused(code, err, "is inside the dataset", "read as its input")
    assert _tree(data) == before and not (data / "run").exists()

    code, err = _run(tmp_path, _raw(tiny, data, tmp_path), capsys, "--overwrite")
    _refused(code, err, "contains the dataset")
    assert _tree(data) == before

    code, err = _run(tmp_path, _raw(tiny, str(data / "*.parquet"), data / "sub" / "run"), capsys)
    _refused(code, err, "is inside the dataset")  # a glob names the folder above its first wildcard
    assert _tree(data) == before and not (data / "sub").exists()


def test_symlinks_are_resolved(tiny, tmp_path, capsys):
    data = _copy_data(tiny, tmp_path)
    before = _tree(data)
    link = tmp_path / "looks-new"
    link.symlink_to(data, target_is_directory=True)
    code, err = _run(tmp_path, _raw(tiny, data, link), capsys, "--overwrite")
    _refused(code, err, "is the dataset")
    assert _tree(data) == before
    code, err = _run(tmp_path, _raw(tiny, link, data / "out"), capsys)
    _refused(code, err, "is inside the dataset")
    assert _tree(data) == before


def test_model_and_sae_folders_are_refused(tiny, tmp_path, capsys):
    data = _copy_data(tiny, tmp_path)
    for target, what in [(Path(tiny["sae_standard"]), "SAE 'a'"), (Path(tiny["llama"]) / "run", "the model")]:
        before = _tree(target.parent if target.name == "run" else target)
        code, err = _run(tmp_path, _raw(tiny, data, target), capsys, "--overwrite")
        _refused(code, err, what)
        assert _tree(target.parent if target.name == "run" else target) == before
        assert not (target / "manifest.json").exists()


def test_object_store_prefixes_overlap():
    raw = {"model": {"name": "hub-org/model"}, "saes": [{"name": "a", "release": "r", "id": "i"}],
           "data": {"dataset": "s3://bucket/pile/"}, "output": {"dir": "s3://bucket/pile"}}
    with pytest.raises(OverlapError, match="is the dataset"):
        check_apart(config.from_dict(raw))
    for out, rel in [("s3://bucket/pile/runs/a", "is inside"), ("s3a://bucket", "contains"),
                     ("s3://bucket//pile/x", "is inside")]:
        with pytest.raises(OverlapError, match=rel):
            check_apart(config.from_dict(raw), out)
    check_apart(config.from_dict(raw), "s3://bucket/pile-runs/a")  # a shared name prefix is not a folder
    check_apart(config.from_dict(raw), "gs://bucket/pile/a")  # another store
    hub = {**raw, "data": {"dataset": "monology/pile-uncopyrighted"}}
    check_apart(config.from_dict(hub), "monology")  # a hub id is not a local folder
    assert location("s3://b/data/*.jsonl.zst").path == "/b/data"


def test_overwrite_refuses_a_folder_that_is_not_a_run(tiny, tmp_path, capsys):
    data = _copy_data(tiny, tmp_path)
    other = tmp_path / "notes"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    (other / "docs").mkdir()
    (other / "docs" / "paper.md").write_text("my docs folder")
    before = _tree(other)
    for extra in ([], ["--overwrite"]):
        code, err = _run(tmp_path, _raw(tiny, data, other), capsys, *extra)
        _refused(code, err, "is not a saeray run directory", "docs, notes.txt", "new folder")
        assert _tree(other) == before and sorted(p.name for p in other.iterdir()) == ["docs", "notes.txt"]


def test_overwrite_deletes_only_what_the_run_holds(tiny, tmp_path, capsys):
    data = _copy_data(tiny, tmp_path)
    run = tmp_path / "run"
    assert _run(tmp_path, _raw(tiny, data, run, data__shards=2), capsys)[0] == 0
    units = sorted(p.name for p in (run / "completions").iterdir())
    (run / "my-notes.txt").write_text("kept")
    (run / "report").mkdir()
    (run / "report" / "index.html").write_text("<html/>")
    (run / "features.parquet").write_bytes(b"old run's table")
    code, err = _run(tmp_path, _raw(tiny, data, run, data__shards=2, tokens__context_size=16), capsys,
                     "--overwrite")
    assert code == 0, err
    assert (run / "my-notes.txt").read_text() == "kept"
    assert (run / "report" / "index.html").read_text() == "<html/>"
    assert not (run / "features.parquet").exists()  # the old run's statistics went with it
    assert '"context_size": 16' in (run / "manifest.json").read_text()
    assert sorted(p.name for p in (run / "completions").iterdir()) == units


def test_a_start_that_died_before_its_manifest_is_reused(tiny, tmp_path, capsys):
    data = _copy_data(tiny, tmp_path)
    run = tmp_path / "run"
    for sub in ("completions", "activations", "docs", "stats"):
        (run / sub).mkdir(parents=True)
    (run / "driver.lock").write_text("")
    code, err = _run(tmp_path, _raw(tiny, data, run), capsys)
    assert code == 0, err
    assert (run / "manifest.json").is_file()


def test_stats_on_a_dataset_folder_does_not_advise_writing_there(tiny, tmp_path, capsys):
    data = _copy_data(tiny, tmp_path)
    before = _tree(data)
    code = cli.main(["stats", str(data)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "not a saeray run directory" in err and "--out" in err, err
    assert f"--out {data}" not in err
    assert _tree(data) == before


def test_impossible_output_locations_are_one_line(tiny, tmp_path, capsys):
    data = _copy_data(tiny, tmp_path)
    afile = tmp_path / "a-file"
    afile.write_text("x")
    code, err = _run(tmp_path, _raw(tiny, data, afile / "run"), capsys)
    _refused(code, err, str(afile / "run"), "a part of the path is a file", "folder you can write")
    assert afile.read_text() == "x"
    code, err = _run(tmp_path, _raw(tiny, data, Path("/proc/saeray_run")), capsys)
    _refused(code, err, "/proc/saeray_run", "folder you can write")
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        code, err = _run(tmp_path, _raw(tiny, data, locked / "run"), capsys)
        _refused(code, err, "permission denied")


def test_demo_refuses_a_folder_it_did_not_make(tmp_path, capsys):
    mine = tmp_path / "project"
    (mine / "report").mkdir(parents=True)
    (mine / "report" / "draft.md").write_text("my report")
    (mine / "corpus").mkdir()
    (mine / "corpus" / "texts.txt").write_text("my corpus")
    before = _tree(mine)
    code = cli.main(["demo", "--tiny", "--out", str(mine)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "not a folder `saeray demo` made" in err and "--out" in err, err
    assert _tree(mine) == before


def test_damaged_sae_files_are_one_line_errors_naming_the_file(tiny, tmp_path, capsys):
    data = _copy_data(tiny, tmp_path)
    sae = tmp_path / "sae"
    shutil.copytree(tiny["sae_standard"], sae)
    weights = sae / "sae_weights.safetensors"
    good = weights.read_bytes()
    raw = base_config(tiny["llama"], [{"name": "a", "path": str(sae)}], data, tmp_path / "run")
    for cut in (len(good) // 2, 5, 100):
        weights.write_bytes(good[:cut])
        code, err = _run(tmp_path, raw, capsys)
        _refused(code, err, str(weights), "copy or download it again")
    weights.write_bytes(good)
    (sae / "cfg.json").write_text("{bad json")
    code, err = _run(tmp_path, raw, capsys)
    _refused(code, err, str(sae / "cfg.json"), "not valid JSON")
    assert not (tmp_path / "run").exists()


def test_a_context_longer_than_the_model_is_refused(tiny, tmp_path, capsys):
    from transformers import AutoConfig

    data = _copy_data(tiny, tmp_path)
    limit = AutoConfig.from_pretrained(tiny["llama"]).max_position_embeddings
    code, err = _run(tmp_path, _raw(tiny, data, tmp_path / "run", tokens__context_size=limit + 1), capsys)
    assert code == 2 and f"at most {limit:,}" in err and "tokens.context_size" in err, err
    assert not (tmp_path / "run").exists()
    assert _run(tmp_path, _raw(tiny, data, tmp_path / "run", tokens__context_size=limit), capsys)[0] == 0


def test_corpus_refuses_a_folder_holding_other_files(tmp_path, capsys):
    mine = tmp_path / "data"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    assert cli.main(["corpus", "--out", str(mine)]) == 2
    err = capsys.readouterr().err
    assert "not a saeray corpus" in err and "notes.txt" in err, err
    assert (mine / "notes.txt").read_text() == "mine" and sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


def test_a_key_given_twice_is_refused(tiny, tmp_path, capsys):
    data = _copy_data(tiny, tmp_path)
    text = yaml.safe_dump(_raw(tiny, data, tmp_path / "run")) + "workers: 2\n"
    (tmp_path / "cfg.yaml").write_text(text)
    assert cli.main(["run", str(tmp_path / "cfg.yaml"), "--local"]) == 2
    err = capsys.readouterr().err.strip()
    assert "key 'workers' is given twice" in err and "keep one of them" in err and "\n" not in err, err
    assert not (tmp_path / "run").exists()


def test_a_shipped_sae_folder_is_an_input_too(tmp_path):
    from saeray.engine.saes import SHIPPED_DIR

    raw = {"model": {"name": "hub-org/model"}, "data": {"dataset": str(tmp_path)},
           "saes": [{"name": "a", "path": "shipped:gemma-3-270m-res6", "hook": "blocks.6.hook_resid_post"}]}
    with pytest.raises(OverlapError, match="SAE 'a'"):
        check_apart(config.from_dict(raw), str(SHIPPED_DIR / "gemma-3-270m-res6" / "run"))
    check_apart(config.from_dict(raw), str(tmp_path.parent / "elsewhere"))
