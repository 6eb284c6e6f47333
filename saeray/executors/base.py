"""What every executor shares: the job it is handed, the result it fills in, progress, and the registry.

An executor runs the missing units of a prepared run directory (`Job`) and records each unit's summary or
error in `job.result`; the driver (driver.py) plans, prepares and reports around it. A new executor is a
subclass of `Executor` with a `name`, registered with `@register` (see local.py and ray_pool.py).
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..engine.config import RunConfig
from ..engine.units import DataPlan
from .progress import Progress

log = logging.getLogger(__name__)


class RunFailed(RuntimeError):
    """Some units failed; the others are committed and a rerun retries only the failed ones."""


@dataclass
class RunResult:
    run_dir: str
    fingerprint: str
    n_shards: int
    """Units in the run (processed, already committed, and failed; not those past the budget)."""
    skipped: list[int]
    done: dict[int, dict[str, Any]] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)
    seconds: float = 0.0
    beyond_budget: int = 0
    """Units read or counted but past the token budget (never processed)."""
    plan_bytes: int = 0
    """Bytes of data files the driver read to plan (metadata: footers, the first rows of a JSON lines file)."""
    plan_seconds: float = 0.0
    bytes_read: int = 0
    """Bytes of data files read in all, planning included, as the storage layer counted them (Ray: readers and
    the workers' committed units; a killed attempt's reads are not counted)."""
    first_unit_seconds: float | None = None
    """From the start of `run` to the first unit committed."""
    stopped: str | None = None
    """Why the run stopped before its units were all tried (no worker could be placed; workers cannot see the
    run directory)."""

    @property
    def tokens(self) -> int:
        return sum(s["tokens"] for s in self.done.values())


@dataclass
class Job:
    """A prepared run directory's missing units, and where their outcomes go."""
    manifest: dict[str, Any]
    run_dir: str
    plan: DataPlan
    cfg: RunConfig
    markers: dict[int, dict[str, Any]]
    """uid -> completion marker of the units committed before this run."""
    result: RunResult
    progress: Progress
    workers: int | str | None
    """The run's `workers` (a count, or "auto"), after any --workers override."""
    max_attempts: int
    """A unit whose worker dies or hangs is tried up to this many times in all."""

    @property
    def budget(self) -> int | None:
        return self.cfg.data.max_tokens


class Executor:
    """Runs a job's units. Subclasses set `name` and implement `execute`; errors inside one unit are recorded
    in `job.result.errors` and the other units go on."""

    name: ClassVar[str] = ""

    def execute(self, job: Job) -> None:
        raise NotImplementedError


EXECUTORS: dict[str, type[Executor]] = {}
"""name -> executor class; `run(cfg, executor=name)` picks one."""

BUILT_IN = ("local", "ray_pool")
"""Modules of this package that register an executor (imported on first use: ray_pool's Ray import is lazy)."""


def register(cls: type[Executor]) -> type[Executor]:
    EXECUTORS[cls.name] = cls
    return cls


def executor_named(name: str) -> Executor:
    for module in BUILT_IN:  # importing them registers them
        importlib.import_module(f"{__package__}.{module}")

    if name not in EXECUTORS:
        raise ValueError(f"unknown executor {name!r}: use {' or '.join(repr(n) for n in sorted(EXECUTORS))}")
    return EXECUTORS[name]()
