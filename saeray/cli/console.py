"""What the commands write to the terminal besides their results: the live progress line, the quiet logging
setup, and the closing lines that say where the outputs are and what to run next."""

from __future__ import annotations

import logging
import os
import sys
from typing import Callable, TextIO

QUIET_LOGGERS = {"httpx": logging.WARNING, "urllib3": logging.WARNING, "filelock": logging.WARNING,
                 "datasets": logging.WARNING,
                 # the command prints what it wrote, with the link to open
                 "saeray.report.build": logging.WARNING}
"""Loggers held at a higher level unless --verbose."""


class LiveLine:
    """A progress sink that rewrites one line of a terminal (carriage return, erase to the end of the line).
    A log record written meanwhile first clears the line (`LiveLine.clear` as a logging filter), and the next
    update draws it again."""

    active: "LiveLine | None" = None

    def __init__(self, stream: TextIO):
        self.stream, self.shown = stream, False
        LiveLine.active = self

    def __call__(self, text: str) -> None:
        width = _columns()
        if len(text) > width - 1:
            text = text[: width - 2] + "…"
        self.stream.write("\r" + text + "\x1b[K")
        self.stream.flush()
        self.shown = True

    def clear(self) -> None:
        if self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.shown = False

    def done(self) -> None:
        """Keep the last line and move below it."""
        if self.shown:
            self.stream.write("\n")
            self.stream.flush()
            self.shown = False
        if LiveLine.active is self:
            LiveLine.active = None


def progress_sink() -> tuple[Callable[[str], None], float]:
    """(progress sink, seconds between lines): a live line every second on a terminal, else a plain line every
    PLAIN_EVERY_S seconds. End a live one with `end_progress`."""
    if sys.stdout.isatty():
        return LiveLine(sys.stdout), 1.0
    return plain_line, PLAIN_EVERY_S


PLAIN_EVERY_S = 10.0
"""Seconds between progress lines when stdout is not a terminal (a log file, a pipe)."""


def plain_line(text: str) -> None:
    print(text, flush=True)


def end_progress(sink: Callable[[str], None]) -> None:
    """Leave the live line (if `sink` is one) so that what follows starts on a line of its own."""
    if isinstance(sink, LiveLine):
        sink.done()


def _columns() -> int:
    try:
        return os.get_terminal_size().columns
    except OSError:
        return 160


def _clear_live(record: logging.LogRecord) -> bool:
    if LiveLine.active is not None:
        LiveLine.active.clear()
    return True


def setup_logging(verbose: bool) -> None:
    """One handler on the root logger (stderr), quiet third-party loggers, no progress bars of transformers and
    the hub when stderr is not a terminal (a log file would hold every redraw)."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(_clear_live)
    if not verbose:
        for name, level in QUIET_LOGGERS.items():
            logging.getLogger(name).setLevel(level)
    if not sys.stderr.isatty():
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read when huggingface_hub is imported
        os.environ.setdefault("TQDM_DISABLE", "1")  # any other bar (GGUF dequantization), read by each tqdm


def next_steps(*steps: tuple[str, str]) -> str:
    """The closing 'next:' lines: (command, what it gives), one a line."""
    width = max(len(c) for c, _ in steps)
    return "next:\n" + "\n".join(f"  {c.ljust(width)}   # {what}" for c, what in steps)


def after_run(run_dir: str) -> str:
    return next_steps((f"saeray stats {run_dir}", "per-feature statistics (stats.parquet)"),
                      (f"saeray top {run_dir} --feature F", "a feature's top contexts"),
                      (f"saeray report {run_dir} --out {run_dir}/report", "HTML dashboard and PNG figures"),
                      (f"saeray diff {run_dir} OTHER_RUN --out DIR", "what changes against a run of another condition"),
                      (f"saeray separate {run_dir} --label COLUMN --out DIR", "features that separate a label"),
                      (f"saeray export neuronpedia|delphi {run_dir} --out DIR", "files for other tools"))


def after_stats(run_dir: str) -> str:
    return next_steps((f"saeray top {run_dir} --feature F", "a feature's top contexts"),
                      (f"saeray report {run_dir} --out {run_dir}/report", "HTML dashboard and PNG figures"))


def after_analysis(out: str) -> str:
    """After diff / separate / transfer: the report that shows the tables."""
    return next_steps((f"saeray report RUN --vs RUN_B --out {out}/report", "a diff's HTML report"),
                      (f"saeray report RUN --separation {out} --out {out}/report", "a separation's HTML report"))
