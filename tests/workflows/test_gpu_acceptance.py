"""bench/gpu_acceptance.sh at toy scale on CPU: both steps run and write their JSON (a GPU machine runs it full size)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_acceptance_toy(tmp_path: Path) -> None:
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_acceptance.sh")], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "SCALE": "toy", "OUT": str(tmp_path), "PYTHON": sys.executable})
    assert done.returncode == 0, done.stderr[-3000:]
    check = json.loads((tmp_path / "gpu_check.json").read_text())
    assert check["ok"] and [r["family"] for r in check["families"]] == ["llama", "gemma3"]
    for row in check["families"]:
        assert row["eager"]["max_abs_diff"] <= check["atol"] and row["sae"]["active_cpu"] > 0
    gpu = json.loads((tmp_path / "throughput_gpu.json").read_text())
    assert gpu["scale"] == "toy" and list(gpu["configs"]) == ["16k-eager", "16k", "131k", "3x16k"]
    assert all(r["stats_only"]["tokens_per_s"] > 0 and r["compiled"] is False for r in gpu["configs"].values())
    assert "gpu_acceptance:" in done.stdout
