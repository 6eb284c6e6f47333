"""The Ray actor around a ShardWorker, and what the driver hands it: credentials and a probe of the run directory.

An actor is created in two steps so the pool can tell a worker waiting for a node (not yet placed: no
node has the GPU and CPUs it asks for) from one loading its model: the constructor only keeps its
arguments, and `start()` does the work. `start()` first sets the credentials the driver forwarded, then
checks that the run directory the driver prepared is the one this node sees (a node-local `output.dir` on
a multi-node cluster fails here, before any unit is computed), then loads the model and SAEs.

Credentials travel as an argument of the actor's creation, never through Ray's `runtime_env`: Ray's
runtime-env agent writes a runtime_env's `env_vars`, values included, to `runtime_env_agent.log` on every
node. They are never written to the run directory, the manifest or saeray's logs (only their names).
"""

from __future__ import annotations

import os
import socket
from typing import Any, Callable


PROGRESS_GROUP = "progress"
"""The actor's concurrency group for `live()`: answered while `process` runs in the default group."""


def counting(base: type, report: Callable[[int], None]) -> type:
    """`base` (a worker's extractor class) reporting the tokens of each block it is given, for the progress line."""

    class Counting(base):  # type: ignore[misc, valid-type]
        def push(self, docs: list, *args: Any, **kwargs: Any) -> Any:
            report(sum(len(d.token_ids) for d in docs))
            return super().push(docs, *args, **kwargs)

    Counting.__name__ = Counting.__qualname__ = base.__name__
    return Counting


def make_worker_class() -> type:
    """RayWorker, built on first use (importing worker.py imports torch)."""
    import ray

    from ..engine.store import RunDir
    from ..engine.worker import ShardWorker

    class RayWorker(ShardWorker):
        def __init__(self, manifest: dict[str, Any], run_dir: str, probe: tuple[str, str], env: dict[str, str]):
            self._args, self._probe, self._env = (manifest, run_dir), probe, env  # placed: nothing loaded yet

        def start(self) -> dict[str, Any]:
            """Credentials, the run-directory check, then the model and SAEs; returns where it runs."""
            os.environ.update(self._env)
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # a bar forwarded line by line to the driver is noise
            RunDir(self._args[1]).check_probe(*self._probe)
            self._live = 0
            ShardWorker.__init__(self, *self._args)
            self.extractor_class = counting(type(self).extractor_class, self._add_live)
            return {"host": socket.gethostname(), "pid": os.getpid(), "env": sorted(self._env)}

        def _add_live(self, n: int) -> None:
            self._live += n

        def process(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
            self._live = 0
            try:
                return ShardWorker.process(self, *args, **kwargs)
            finally:
                self._live = 0

        @ray.method(concurrency_group=PROGRESS_GROUP)
        def live(self) -> int:
            """Tokens the model has been given so far in the unit being processed (0 between units)."""
            return getattr(self, "_live", 0)

    return RayWorker
