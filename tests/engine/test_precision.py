"""The SAE encode's precision: how saes[].dtype resolves per device, what a run's fingerprint and units record, and
the refusal to mix precisions in one run (a CPU can show all of it; the TF32 products themselves need a GPU)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from helpers import base_config  # noqa: E402

from saeray.engine import config, saes
from saeray.engine.config import SAEConfig
from saeray.engine.plan import prepare
from saeray.executors import run

CPU, GPU = torch.device("cpu"), torch.device("cuda")


def test_dtype_resolves_per_device():
    """auto: tf32 on a GPU (float32 weights, TF32 products), float32 on a CPU; tf32 is float32 on a CPU; an explicit
    float32 or bfloat16 stays itself everywhere."""
    assert [saes.resolve_dtype(d, GPU) for d in ("auto", "tf32", "float32", "bfloat16")] == \
        ["tf32", "tf32", "float32", "bfloat16"]
    assert [saes.resolve_dtype(d, CPU) for d in ("auto", "tf32", "float32", "bfloat16")] == \
        ["float32", "float32", "float32", "bfloat16"]
    assert [saes.torch_dtype_of(r) for r in ("tf32", "float32", "bfloat16")] == ["float32", "float32", "bfloat16"]
    assert SAEConfig(name="s").dtype == "auto"


def test_tf32_products_only_inside_the_encode(tiny):
    """A loaded SAE says whether its encodes use TF32 (never on a CPU); the switch is on only while one runs and is
    put back as it was, whatever it was."""
    sae = saes.load(SAEConfig(name="s", path=str(tiny["sae_standard"]), dtype="tf32"), CPU)
    assert getattr(sae, saes.TF32_ATTR) is False and sae.dtype == torch.float32
    for before in (False, True):
        torch.backends.cuda.matmul.allow_tf32 = before
        with saes.tf32_matmuls(True):
            assert torch.backends.cuda.matmul.allow_tf32 is True
        assert torch.backends.cuda.matmul.allow_tf32 is before
        with saes.tf32_matmuls(False):
            assert torch.backends.cuda.matmul.allow_tf32 is before
    torch.backends.cuda.matmul.allow_tf32 = False


def _cfg(tiny, tmp_path, dtype):
    raw = base_config(tiny["llama"], [{"name": "s", "path": str(tiny["sae_standard"]), "dtype": dtype}],
                      tiny["data"], tmp_path / "run")
    return config.from_dict(raw)


def test_fingerprint_holds_the_cpu_resolution(tiny, tmp_path):
    """The fingerprint holds an SAE's precision as a CPU resolves it: auto, tf32 and float32 give one fingerprint
    (float32 was the default before auto, so those runs keep theirs), bfloat16 another."""
    fps = {d: prepare(_cfg(tiny, tmp_path, d)).fingerprint for d in ("auto", "tf32", "float32", "bfloat16")}
    assert fps["auto"] == fps["tf32"] == fps["float32"] != fps["bfloat16"]


@pytest.mark.slow
def test_a_worker_refuses_another_precision_than_the_runs(tiny, tmp_path):
    """Units record the precision their worker resolved. A run whose committed units say tf32 (a GPU's) is refused
    by a CPU worker, which would encode in float32, before it loads anything, with a message naming both; units
    recorded in float32 resume."""
    cfg = _cfg(tiny, tmp_path, "auto")
    first = run(cfg, executor="local")
    assert first.done
    root = tmp_path / "run"
    markers = sorted((root / "completions").glob("*.json"))
    assert all(json.loads(m.read_text())["sae_dtypes"] == {"s": "float32"} for m in markers)
    markers[-1].unlink()  # one unit to do again (and the merged tables, which held it, gone with it)
    (root / "merged.json").unlink()
    shutil.rmtree(root / "merged")
    marker = json.loads(markers[0].read_text())
    markers[0].write_text(json.dumps({**marker, "sae_dtypes": {"s": "tf32"}}))  # as a GPU worker records it
    with pytest.raises(Exception, match=r"SAE .s. tf32 in its units, float32 on this worker.s cpu") as refused:
        run(cfg, executor="local")
    assert isinstance(refused.value, saes.PrecisionError), type(refused.value)
    assert len(list((root / "completions").glob("*.json"))) == len(markers) - 1  # nothing was added
    markers[0].write_text(json.dumps(marker))
    again = run(cfg, executor="local")
    assert len(again.done) == 1
