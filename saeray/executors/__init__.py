"""Executors: who runs a plan's work units, in this process or on a pool of Ray actors.

`run(cfg)` (driver.py) plans, prepares the run directory and hands the missing units to an executor: `local`
(local.py, in this process) or `ray` (ray_pool.py, an actor pool whose decisions live in schedule.py).
base.py holds the interface a new executor implements.
"""

from .base import EXECUTORS, Executor, Job, Progress, RunFailed, RunResult
from .driver import run

__all__ = ["run", "RunResult", "RunFailed", "Progress", "Executor", "Job", "EXECUTORS"]
