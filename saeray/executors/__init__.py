"""Executors: who runs a plan's work units, in this process or on a pool of Ray actors.

`run(cfg)` plans, prepares the run directory and hands the missing units to an executor; see
`driver` for the run, `local` and `ray_pool` for the two executors.
"""

from .driver import Progress, RunFailed, RunResult, run

__all__ = ["run", "RunResult", "RunFailed", "Progress"]
