"""SIGINT and SIGTERM stop a run cleanly: no unit is half visible (the marker is the commit point),
the run directory stays resumable, and the command exits 130 / 143. A second signal exits at once.

The CLI installs the handlers; Ray installs its own when it starts in this process, so the
executor calls `reinstall()` right after `ray.init()`. Inside Ray's calls (which check signals in
C) an exception must not be raised from the handler: the Ray loop runs `deferred()`, where the
handler only records the signal and the loop raises `Stopped` itself between calls (`check()`).
"""

from __future__ import annotations

import contextlib
import os
import signal
from typing import Any

_installed = False
_defer = False
_stopping: int | None = None


class Stopped(BaseException):
    """Raised in the main thread by SIGINT/SIGTERM (a BaseException: `except Exception` does not swallow it)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


def _handler(signum: int, frame: Any) -> None:
    global _stopping
    if _stopping is not None:  # a second signal: stop now, whatever is in flight
        os._exit(128 + signum)
    _stopping = signum
    if not _defer:
        raise Stopped(signum)


def pending() -> int | None:
    """The signal that asked this process to stop, if one came."""
    return _stopping


def check() -> None:
    """Raise `Stopped` if a signal came while raising was deferred."""
    if _stopping is not None:
        raise Stopped(_stopping)


@contextlib.contextmanager
def deferred() -> Any:
    """While inside, the handlers only record a signal; call `check()` between blocking calls."""
    global _defer
    old, _defer = _defer, True
    try:
        check()
        yield
    finally:
        _defer = old


def install() -> None:
    """Turn SIGINT and SIGTERM into `Stopped` in the main thread (once per process)."""
    global _installed
    _installed = True
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _handler)


def reinstall() -> None:
    """Put the handlers back if the CLI installed them (after a library, e.g. Ray, replaced them)."""
    if _installed:
        install()
