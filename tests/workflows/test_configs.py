"""Every ready config in jobs/configs validates (keys, types, semantics)."""

from pathlib import Path

import pytest

from saeray.engine import config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "jobs" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_ready_config_is_valid(path):
    cfg = config.load(path)
    assert cfg.model.name and cfg.data.dataset
