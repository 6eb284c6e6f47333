"""Never let a stranger run code: no pickled weights, no remote code unless asked, no path escapes,
and a cluster whose dashboard stays local behind token auth (see also tests/executors/test_cluster.py, whose
`ray job submit` test shows the Jobs API refusing requests without the token)."""

from __future__ import annotations

import ast
import json
import os
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from helpers import base_config, make_model

from saeray.engine import config, models, saes
from saeray.engine.config import ConfigError, ModelConfig, SAEConfig
from saeray.engine.store import RunDir, RunDirError
from saeray.executors import run

REPO = Path(__file__).resolve().parents[2]
CODE = sorted([*(REPO / "saeray").rglob("*.py"), *(REPO / "jobs").rglob("*.py")])


class _Payload:
    """Unpickling this runs a shell command that creates a file: the attack a pickle allows."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil_pickle(path: Path, marker: Path) -> None:
    with open(path, "wb") as f:
        pickle.dump({"weight": _Payload(marker)}, f)


@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("sec") / "model", "llama", n_layers=1)


# ---- weights --------------------------------------------------------------------------------------


def test_model_weights_only_from_safetensors(small_model, tmp_path):
    bad = tmp_path / "pickled-model"
    shutil.copytree(small_model, bad)
    (bad / "model.safetensors").unlink()
    _evil_pickle(bad / "pytorch_model.bin", tmp_path / "PWNED")
    with pytest.raises(OSError, match="model.safetensors"):
        models.load_model(ModelConfig(name=str(bad)), torch.device("cpu"))
    assert not (tmp_path / "PWNED").exists()
    model, _ = models.load_model(ModelConfig(name=str(small_model)), torch.device("cpu"))  # the safetensors one loads
    assert model.config.num_hidden_layers == 1


def test_sae_weights_only_from_safetensors(tiny, tmp_path):
    bad = tmp_path / "pickled-sae"
    bad.mkdir()
    shutil.copy(tiny["sae_standard"] / "cfg.json", bad / "cfg.json")
    _evil_pickle(bad / "sae_weights.pt", tmp_path / "PWNED")
    cfg = SAEConfig(name="s", path=str(bad))
    for call in (lambda: saes.describe(cfg), lambda: saes.load(cfg, torch.device("cpu"))):
        with pytest.raises(saes.SAEError, match="only safetensors weights are loaded"):
            call()
    assert not (tmp_path / "PWNED").exists()


def test_torch_load_refuses_code_by_default_and_in_our_code(tmp_path):
    # sae-lens' loaders for some hub releases call torch.load without weights_only: torch >= 2.6 makes
    # that weights-only, so a pickle that carries code is refused, as long as nobody forces it off.
    assert "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD" not in os.environ
    _evil_pickle(tmp_path / "w.pt", tmp_path / "PWNED")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        torch.load(tmp_path / "w.pt")
    assert not (tmp_path / "PWNED").exists()
    # Our own code: torch.load only with weights_only=True; no pickle-based loaders at all.
    for path in CODE:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
                assert kw.get("weights_only") == "True", f"{path}:{node.lineno} torch.load without weights_only=True"
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                assert not {"pickle", "dill", "joblib", "cloudpickle"} & {str(n).split(".")[0] for n in names}, \
                    f"{path}:{node.lineno} imports a pickle loader"


# ---- remote code -----------------------------------------------------------------------------------


def _model_with_remote_code(small_model: Path, tmp_path: Path) -> tuple[Path, Path]:
    d = tmp_path / "remote-code-model"
    shutil.copytree(small_model, d)
    ran = tmp_path / "REMOTE_CODE_RAN"
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "custom.CustomConfig", "AutoModelForCausalLM": "custom.CustomModel"}
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "custom.py").write_text(
        f"import pathlib\npathlib.Path({str(ran)!r}).touch()  # what a malicious repository would do\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class CustomConfig(LlamaConfig):\n    model_type = 'llama'\n"
        "class CustomModel(LlamaForCausalLM):\n    config_class = CustomConfig\n")
    return d, ran


def test_remote_code_runs_only_when_the_config_asks(small_model, tmp_path):
    d, ran = _model_with_remote_code(small_model, tmp_path)
    raw = {"model": {"name": str(d)}, "data": {"dataset": str(tmp_path)}}
    cfg = config.from_dict(raw)
    assert cfg.model.trust_remote_code is False  # off by default
    models.load_config(cfg.model)
    models.load_model(cfg.model, torch.device("cpu"))
    assert not ran.exists(), "the repository's code ran although the config did not ask for it"
    raw["model"]["trust_remote_code"] = True
    trusted = config.from_dict(raw).model
    assert type(models.load_config(trusted)).__name__ == "CustomConfig"  # the flag reaches transformers
    assert ran.exists()


def test_no_literal_trust_remote_code_true():
    for path in CODE:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.keyword) and node.arg == "trust_remote_code":
                assert ast.unparse(node.value) != "True", f"{path}:{node.value.lineno} hard-codes trust_remote_code=True"


# ---- paths -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../../etc", "a/b", ".hidden", "..", "x\\y", "nul\0byte", ""])
def test_names_that_could_become_paths_are_refused(tiny, tmp_path, name):
    raw = base_config(tiny["llama"], [{"name": name, "path": str(tiny["sae_standard"])}], tiny["data"], tmp_path / "r")
    with pytest.raises(ConfigError, match="plain name"):
        config.from_dict(raw)
    raw = base_config(tiny["llama"], [{"name": "a", "path": str(tiny["sae_standard"])}], tiny["data"], tmp_path / "r",
                      positions={"mode": "markers", "groups": {name: {"marker": "the"}}})
    with pytest.raises(ConfigError, match="plain name"):
        config.from_dict(raw)


LAYOUT = re.compile(r"^(manifest\.json|complete\.json|driver\.lock|completions/\d{5,}\.json|(stats|recon|examples|hist)/\d{5,}\.parquet|"
                    r"(activations|docs)/shard=\d{5,}/part-\d+\.parquet|merged\.json|"
                    r"merged/[0-9a-f]{8}/(stats|examples|hist|lastvals|windows)\.parquet)$")


def test_run_directory_holds_only_names_saeray_makes(tiny, tmp_path):
    """Names in the config (SAEs, groups) and the dataset never become paths: every file in a run
    directory is named from shard indexes only, and markers cannot point readers elsewhere."""
    saes_cfg = [{"name": "rés 6 ü+α  (x)", "path": str(tiny["sae_standard"])}]
    raw = base_config(tiny["llama"], saes_cfg, tiny["data"], tmp_path / "run", data__shards=2,
                      positions={"mode": "markers", "groups": {"pré fix*?": {"marker": "the"}}})
    run(config.from_dict(raw), executor="local")
    files = [str(p.relative_to(tmp_path / "run")) for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert files and all(LAYOUT.match(f) for f in files), [f for f in files if not LAYOUT.match(f)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # nothing written beside the run directory
    # A marker edited to list a file outside its shard is refused, not read.
    rd = RunDir(tmp_path / "run")
    marker = rd.completion(0)
    marker["files"]["docs"] = ["docs/shard=00000/../../../../etc/passwd"]
    Path(rd.marker(0)).write_text(json.dumps(marker))
    with pytest.raises(RunDirError, match="not a docs file of shard 0"):
        rd.shard_files(0, "docs")
    # So is a merge record edited to list a file outside the merged tables.
    from saeray.analysis.stats import committed_files
    from saeray.engine import merged

    record = json.loads((tmp_path / "run" / merged.RECORD).read_text())
    record["files"]["stats"] = ["merged/../../../../etc/passwd"]
    (tmp_path / "run" / merged.RECORD).write_text(json.dumps(record))
    with pytest.raises(RunDirError, match="not a file of the merged tables"):
        committed_files(tmp_path / "run", "stats")


# ---- cluster access ----------------------------------------------------------------------------------


def test_cluster_docs_keep_dashboard_local_and_token_out_of_runtime_env():
    cluster = yaml.safe_load((REPO / "cluster.yaml").read_text())
    starts = [c for c in cluster["head_start_ray_commands"] + cluster["worker_start_ray_commands"] if "ray start" in c]
    assert starts and all("RAY_AUTH_MODE=token ray start" in c for c in starts)
    readme = (REPO / "README.md").read_text()
    for text, where in [(readme, "README.md"), ((REPO / "cluster.yaml").read_text(), "cluster.yaml"),
                        ((REPO / "jobs" / "extract.py").read_text(), "jobs/extract.py")]:
        assert "0.0.0.0" not in text, f"{where} exposes something on 0.0.0.0"
    assert "ray dashboard cluster.yaml" in readme and "127.0.0.1" in readme
    # The token never travels in a runtime_env (it would show in the dashboard and job records).
    for path in CODE:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.keyword) and node.arg == "runtime_env":
                assert "AUTH_TOKEN" not in ast.unparse(node.value), f"{path}:{node.value.lineno} puts the token in a runtime_env"
