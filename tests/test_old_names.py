"""saeray 0.1.0's flat module names still import, for one release, as the very modules of the new layout."""
from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import saeray


@pytest.mark.parametrize("old", sorted(saeray.MOVED))
def test_an_old_name_is_the_new_module_with_a_warning(old):
    new = importlib.import_module(f"saeray.{saeray.MOVED[old]}")
    sys.modules.pop(f"saeray.{old}", None)
    with pytest.warns(DeprecationWarning, match=f"saeray.{old} moved to saeray.{saeray.MOVED[old]}"):
        module = importlib.import_module(f"saeray.{old}")
    assert module is new
    assert new.__spec__.name == f"saeray.{saeray.MOVED[old]}"  # the alias leaves the module's own spec alone


def test_old_from_imports_work_in_a_fresh_interpreter():
    code = ("import warnings; warnings.simplefilter('error', DeprecationWarning)\n"
            "try:\n    from saeray.executor import run\nexcept DeprecationWarning: pass\n"
            "else: raise SystemExit('no warning')\n"
            "warnings.simplefilter('ignore')\n"
            "from saeray.executor import run, RunFailed\nfrom saeray import stats, store\n"
            "import saeray.executors, saeray.analysis.stats, saeray.engine.store\n"
            "assert run is saeray.executors.run and stats is saeray.analysis.stats and store is saeray.engine.store\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_an_unknown_name_is_still_an_import_error():
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("saeray.no_such_module")


def test_python_m_with_an_old_name_says_where_the_module_went():
    proc = subprocess.run([sys.executable, "-m", "saeray.categories", "--help"], capture_output=True, text=True)
    assert proc.returncode != 0
    assert "run `python -m saeray.assets.categories` instead" in proc.stderr
