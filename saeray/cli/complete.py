"""Partial runs say so: before a command reads run directories, each one whose units are not all committed
is named with what it holds (or, with `saeray --require-complete`, refused)."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

RUN_FIELDS = ("run", "run_a", "run_b", "base", "vlm_text", "vlm_image", "vs", "reference")
"""Option fields that name a run directory to read (synth's RUN may be a config file: only run directories
are checked)."""


def check_runs(ns: argparse.Namespace, require: bool) -> None:
    """Print a note per partial run among the command's run directories; raise ValueError if `require`."""
    from ..engine.run import open_run
    from ..engine.store import MANIFEST

    for field in RUN_FIELDS:
        value = getattr(ns, field, None)
        if not isinstance(value, str) or value.endswith((".yaml", ".yml")):
            continue
        try:
            run = open_run(value)
            if not run.exists(MANIFEST):
                continue  # the command says what is wrong with it
            line = run.completeness().describe()
        except (OSError, ValueError):
            continue
        if not line:
            continue
        if require:
            raise ValueError(f"{value} is a {line} (refused: --require-complete)")
        print(f"note: {value} is a {line}", file=sys.stderr)


def missing_folders(out: object) -> list[Path]:
    """The folders of a local --out path that do not exist yet, innermost first."""
    if not isinstance(out, str) or "://" in out:
        return []
    path = Path(out).expanduser()
    return [p for p in (path, *path.parents) if not p.exists()]


def remove_empty(folders: list[Path]) -> None:
    """Remove each of `folders` (innermost first) that holds folders only, no file at any depth."""
    for path in folders:
        if not path.is_dir() or path.is_symlink():
            continue
        if any(files for _, _, files in os.walk(path)):
            return
        for folder, _, _ in os.walk(path, topdown=False):
            with contextlib.suppress(OSError):
                os.rmdir(folder)
