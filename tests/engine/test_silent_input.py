"""Nothing about the input passes silently: null or missing texts and lone surrogates are counted in the
markers and warned about; symlinks in a dataset folder are followed, dangling ones refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import polars as pl
import yaml
from helpers import base_config
from transformers import AutoTokenizer

from saeray import cli


def _run(tmp_path: Path, raw: dict, capsys, *extra: str) -> tuple[int, str]:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    code = cli.main(["run", str(path), "--local", *extra])
    return code, capsys.readouterr().err


def _raw(tiny, data: Path, out: Path, **over) -> dict:
    return base_config(tiny["llama"], [{"name": "a", "path": str(tiny["sae_standard"])}], data, out, **over)


def _markers(run: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((run / "completions").glob("*.json"))]


def test_null_missing_and_surrogate_texts_are_counted(tiny, tmp_path, capsys, caplog):
    data = tmp_path / "data"
    data.mkdir()
    lines = ['{"text": "plain words here"}', '{"text": null}', '{"other": 1}',
             '{"text": "broken \\ud800 pair \\udfff end"}', '{"text": "fine \\ud83d\\ude00 emoji"}']
    (data / "a.jsonl").write_text("\n".join(lines) + "\n")
    run = tmp_path / "run"
    code, err = _run(tmp_path, _raw(tiny, data, run), capsys)
    assert code == 0 and "Traceback" not in err, err
    marks = _markers(run)
    assert sum(m.get("no_text", 0) for m in marks) == 2
    assert sum(m.get("surrogates_replaced", 0) for m in marks) == 1  # a valid pair is one emoji, not a surrogate
    assert "2 documents had no text" in caplog.text and "1 texts held lone UTF-16 surrogates" in caplog.text
    docs = pl.read_parquet(str(run / "docs" / "**" / "*.parquet")).sort("doc_id")
    assert docs["n_tokens"].to_list()[1:3] == [0, 0]
    tok = AutoTokenizer.from_pretrained(tiny["llama"])
    assert docs["token_ids"][3].to_list() == tok("broken \ufffd pair \ufffd end", add_special_tokens=False)["input_ids"]


def test_symlinks_in_a_dataset_folder(tiny, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(tiny["data"], elsewhere)
    shutil.copy(elsewhere / "part-0.parquet", data / "part-0.parquet")
    (data / "part-1.parquet").symlink_to(elsewhere / "part-1.parquet")  # a link to a file
    (data / "more").symlink_to(elsewhere, target_is_directory=True)  # a link to a folder
    run = tmp_path / "run"
    code, err = _run(tmp_path, _raw(tiny, data, run), capsys)
    assert code == 0, err
    plan = json.loads((run / "manifest.json").read_text())["plan"]
    names = [f["url"].removeprefix(str(data) + "/") for f in plan["files"]]
    assert names == ["more/part-0.parquet", "more/part-1.parquet", "more/part-2.parquet", "part-0.parquet",
                     "part-1.parquet"]

    (data / "part-9.parquet").symlink_to(tmp_path / "gone.parquet")
    code, err = _run(tmp_path, _raw(tiny, data, tmp_path / "run2"), capsys)
    assert code == 2 and "symlinks to files that do not exist" in err and "part-9.parquet" in err, err
    assert "\n" not in err.strip() and not (tmp_path / "run2").exists()
