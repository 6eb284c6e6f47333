"""Bad input gives a one-line error that names the problem and the fix, before any shard exists."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from helpers import base_config, make_sae

from saeray import cli
from saeray.engine import config


def _cli(tmp_path: Path, raw: dict, capsys, *extra: str) -> tuple[int, str]:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    code = cli.main(["run", str(path), "--local", *extra])
    err = capsys.readouterr().err.strip()
    return code, err


def _raw(tiny, tmp_path: Path, **over) -> dict:
    return base_config(tiny["llama"], [{"name": "a", "path": str(tiny["sae_standard"])}], tiny["data"],
                       tmp_path / "run", **over)


def _one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err, err
    for n in needles:
        assert n in err, err


def test_unknown_key(tiny, tmp_path, capsys):
    raw = _raw(tiny, tmp_path)
    raw["tokens"]["batch_tokns"] = 5
    _one_line_error(*_cli(tmp_path, raw, capsys), "unknown key tokens.batch_tokns", "batch_tokens")
    assert not (tmp_path / "run").exists()


def test_wrong_type_and_bad_choice(tiny, tmp_path, capsys):
    raw = _raw(tiny, tmp_path)
    raw["tokens"]["batch_tokens"] = "many"
    _one_line_error(*_cli(tmp_path, raw, capsys), "tokens.batch_tokens", "expected 'auto' | int")
    raw = _raw(tiny, tmp_path)
    raw["positions"] = {"mode": "first"}
    _one_line_error(*_cli(tmp_path, raw, capsys), "positions.mode", "'all', 'last', 'markers'")
    assert not (tmp_path / "run").exists()


def test_set_override(tiny, tmp_path, capsys):
    code, err = _cli(tmp_path, _raw(tiny, tmp_path), capsys, "--set", "tokens.batch_tokens=oops")
    _one_line_error(code, err, "tokens.batch_tokens")
    cfg = config.from_dict(config.apply_overrides(_raw(tiny, tmp_path), ["tokens.batch_tokens=512", "data.shards=2"]))
    assert cfg.tokens.batch_tokens == 512 and cfg.data.shards == 2
    assert cfg.tokens.batch_tokens_on("cpu") == cfg.tokens.batch_tokens_on("cuda") == 512


def test_batch_tokens_auto(tiny, tmp_path, capsys):
    """auto (the default) resolves per device: small CPU batches stay in cache, GPUs get large ones."""
    raw = _raw(tiny, tmp_path)
    raw["tokens"].pop("batch_tokens", None)
    tokens = config.from_dict(raw).tokens
    assert tokens.batch_tokens == "auto"
    assert (tokens.batch_tokens_on("cpu"), tokens.batch_tokens_on("cuda")) == (2048, 16384)
    raw["tokens"]["batch_tokens"] = 0
    _one_line_error(*_cli(tmp_path, raw, capsys), "tokens.batch_tokens must be 'auto' or >= 1, got 0")
    assert not (tmp_path / "run").exists()


def test_missing_column(tiny, tmp_path, capsys):
    raw = _raw(tiny, tmp_path, data__text_column="body")
    _one_line_error(*_cli(tmp_path, raw, capsys), "column 'body'", "text_column", "['text', 'label', 'kind']")
    assert not (tmp_path / "run").exists()


def test_unknown_hook(tiny, tmp_path, capsys):
    raw = _raw(tiny, tmp_path)
    raw["saes"][0]["hook"] = "blocks.40.hook_resid_post"
    _one_line_error(*_cli(tmp_path, raw, capsys), "blocks.40.hook_resid_post", "4 layers (0-3)")
    raw["saes"][0]["hook"] = "blocks.1.hook_resid_middle"
    _one_line_error(*_cli(tmp_path, raw, capsys), "valid hooks are", "hook_resid_pre")
    assert not (tmp_path / "run").exists()


def test_width_mismatch(tiny, tmp_path, capsys):
    sae = make_sae(tmp_path / "narrow", "standard", 32, "blocks.1.hook_resid_post")
    raw = base_config(tiny["llama"], [{"name": "n", "path": str(sae)}], tiny["data"], tmp_path / "run")
    _one_line_error(*_cli(tmp_path, raw, capsys), "d_in=32", "width 64")
    assert not (tmp_path / "run").exists()


def test_missing_sae_and_model(tiny, tmp_path, capsys):
    raw = base_config(tiny["llama"], [{"name": "n", "path": str(tmp_path / "nope")}], tiny["data"], tmp_path / "run")
    _one_line_error(*_cli(tmp_path, raw, capsys), "nope does not exist")
    raw = _raw(tiny, tmp_path)
    raw["model"]["name"] = str(tmp_path / "no-model")
    _one_line_error(*_cli(tmp_path, raw, capsys), "does not exist")


def test_empty_dataset(tiny, tmp_path, capsys):
    data = tmp_path / "empty"
    data.mkdir()
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), data / "a.parquet")
    raw = base_config(tiny["llama"], [{"name": "a", "path": str(tiny["sae_standard"])}], data, tmp_path / "run")
    _one_line_error(*_cli(tmp_path, raw, capsys), "has no rows")
    raw["data"]["dataset"] = str(tmp_path / "missing-dir")
    _one_line_error(*_cli(tmp_path, raw, capsys), "does not exist")
    assert not (tmp_path / "run").exists()


def test_other_fingerprint_refused_then_overwritten(tiny, tmp_path, capsys):
    raw = _raw(tiny, tmp_path, data__shards=2)
    code, _ = _cli(tmp_path, raw, capsys)
    assert code == 0
    before = sorted(p.name for p in (tmp_path / "run" / "completions").iterdir())
    raw2 = _raw(tiny, tmp_path, data__shards=2, tokens__context_size=16)
    _one_line_error(*_cli(tmp_path, raw2, capsys), "fingerprint", "--overwrite")
    assert sorted(p.name for p in (tmp_path / "run" / "completions").iterdir()) == before
    code, _ = _cli(tmp_path, raw2, capsys, "--overwrite")
    assert code == 0
    assert '"context_size": 16' in (tmp_path / "run" / "manifest.json").read_text()


def test_foreign_directory_refused(tiny, tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    _one_line_error(*_cli(tmp_path, _raw(tiny, tmp_path), capsys), "not a saeray run directory")
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"


def test_rerun_same_config_skips_everything(tiny, tmp_path, capsys):
    raw = _raw(tiny, tmp_path, data__shards=3)
    assert _cli(tmp_path, raw, capsys)[0] == 0
    marks = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run" / "completions").iterdir()}
    assert _cli(tmp_path, raw, capsys)[0] == 0
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run" / "completions").iterdir()} == marks
    # batch size does not change results, so it does not change the fingerprint
    assert _cli(tmp_path, raw, capsys, "--set", "tokens.batch_tokens=128")[0] == 0
