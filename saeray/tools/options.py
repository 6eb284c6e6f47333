"""Options declared once: dataclass fields that carry their `--help` text.

The same field serves the Python API (`TrainOptions(d_sae=1024)`) and the command line
(`saeray train-sae --d-sae 1024`, whose parser saeray/cli/options.py builds from the fields),
so a default or a help text is written in one place only.
"""

from __future__ import annotations

from dataclasses import MISSING, field
from typing import Any


def option(default: Any = MISSING, help: str = "", **cli: Any) -> Any:
    """A dataclass field with its help; no default makes it required.

    `cli` holds what argparse needs beyond the field's name, type and default: `choices`,
    `metavar`, `flags` (the option strings, when not `--field-name`), `positional=True`, or
    `cli=False` for a field the command line does not offer.
    """
    if not help:
        raise TypeError("option() needs help: the text `--help` shows for it")
    if isinstance(default, list):  # a fresh list per instance; the parser gets a copy too
        return field(default_factory=lambda: list(default), metadata={"help": help, "cli": cli})
    return field(default=default, metadata={"help": help, "cli": cli})


def seed_option(what: str) -> Any:
    """The `seed` field the tools share: 0 unless given, `what` says what it seeds."""
    return option(0, f"seed of {what}: the same seed repeats the result")
