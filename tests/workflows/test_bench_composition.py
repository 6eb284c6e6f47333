"""bench/bf16_composition.py at toy scale: it runs every setting and its comparisons hold consistent figures;
a setting that only changes the unit split changes no entry of the tiny float32 model beyond rounding."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_composition_bench_on_the_tiny_model(tmp_path: Path) -> None:
    out = tmp_path / "c.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "bf16_composition.py"), "--model", "tiny",
                           "--dtype", "float32", "--tokens", "3000", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["runs"]) == {"baseline", "unit_bytes 8000", "batch_tokens 16384", "torch threads 1",
                                   "Ray, 1 worker", "Ray, 2 workers"}
    assert report["runs"]["unit_bytes 8000"]["units"] > report["runs"]["baseline"]["units"] == 1
    for name, c in report["comparisons"].items():
        assert c["pairs_either"] > 1000 and 0 <= c["pairs_flipped"] <= c["pairs_either"], name
        assert c["features_n_active_changed"] <= c["features"] == 256, name
        assert c["value_rel_change_max"] < 1e-3, name  # float32: rounding, not different results
    assert "flipped pairs" in done.stdout
