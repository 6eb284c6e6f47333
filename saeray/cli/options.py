"""argparse parsers built from option dataclasses, whose fields are declared with `option`.

A command is a name, a line of help, the dataclasses whose fields are its options and the
function that runs it with one instance of each. A field becomes one argument:

    d_sae: int = option(4096, "latents (the SAE's width)")    ->  --d-sae D_SAE   (type int, default 4096)
    feature: list[str] = option(help=..., flags=("--feature", "-f"), metavar="LIST")
                                                              ->  --feature/-f LIST, required, repeatable

`int`, `float` and `str` (or `X | None`) convert the value, `bool` is a switch (`store_true`),
`list[str]` repeats (`append`); a field without a default is required; `choices`, `metavar`,
`flags` and `positional=True` pass through. A command's parser is filled on first use, so
`saeray --help` imports none of the modules (torch) that hold the options of `train-sae` or `synth`.
"""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, Field, dataclass, fields
from typing import Any

from ..tools.options import option

__all__ = ["Command", "LazyParser", "add_command", "add_options", "arguments", "option", "options_from"]


@dataclass(frozen=True)
class Command:
    """One `saeray` subcommand: `run(*instances)` gets one instance of each class `options` loads."""

    name: str
    help: str
    options: tuple[type | Callable[[], type], ...]
    """The option dataclasses, or functions that import and return one (options held by a module that
    imports torch), so declaring a command imports nothing heavy."""
    run: Callable[..., int]

    def option_classes(self) -> list[type]:
        return [o if isinstance(o, type) else o() for o in self.options]

    def invoke(self, ns: argparse.Namespace) -> int:
        """Run the command on a parsed namespace."""
        return self.run(*(options_from(cls, ns) for cls in self.option_classes()))


class LazyParser(argparse.ArgumentParser):
    """A subcommand's parser whose arguments are added when it first parses or prints help."""

    def __init__(self, *args: Any, populate: Callable[[argparse.ArgumentParser], None] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._populate = populate

    def ready(self) -> LazyParser:
        """Add the arguments now (once); returns the parser."""
        if self._populate is not None:
            populate, self._populate = self._populate, None
            populate(self)
        return self

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:  # type: ignore[override]
        return super(LazyParser, self.ready()).parse_known_args(args, namespace)

    def format_usage(self) -> str:
        return super(LazyParser, self.ready()).format_usage()

    def format_help(self) -> str:
        return super(LazyParser, self.ready()).format_help()


def add_command(sub: Any, cmd: Command) -> LazyParser:
    """Add `cmd` to a subparsers action made with `parser_class=LazyParser`."""

    def populate(parser: argparse.ArgumentParser) -> None:
        seen: dict[str, str] = {}
        for cls in cmd.option_classes():
            for f in _cli_fields(cls):
                if f.name in seen:
                    raise TypeError(f"saeray {cmd.name}: option {f.name!r} of {cls.__name__} is also in "
                                    f"{seen[f.name]}: rename one")
                seen[f.name] = cls.__name__
            add_options(parser, cls)

    return sub.add_parser(cmd.name, help=cmd.help, populate=populate)


def add_options(parser: argparse.ArgumentParser, cls: type) -> None:
    """One argument per command-line field of the dataclass `cls`, in field order."""
    for flags, kwargs in arguments(cls):
        parser.add_argument(*flags, **kwargs)


def arguments(cls: type) -> list[tuple[tuple[str, ...], dict[str, Any]]]:
    """(option strings, add_argument keywords) for each command-line field of `cls`."""
    hints = typing.get_type_hints(cls)
    return [_argument(f, hints[f.name], cls) for f in _cli_fields(cls)]


def options_from(cls: type, ns: argparse.Namespace) -> Any:
    """An instance of `cls` from the parsed values of its command-line fields (the rest keep their defaults)."""
    return cls(**{f.name: getattr(ns, f.name) for f in _cli_fields(cls)})


def _cli_fields(cls: type) -> list[Field]:
    return [f for f in fields(cls) if f.metadata.get("cli", {}).get("cli", True)]


def _argument(f: Field, tp: Any, cls: type) -> tuple[tuple[str, ...], dict[str, Any]]:
    meta = dict(f.metadata.get("cli", {}))
    if not f.metadata.get("help"):
        raise TypeError(f"{cls.__name__}.{f.name} has no help: declare it with option(..., help)")
    kwargs: dict[str, Any] = {"help": f.metadata["help"].replace("%", "%%")}
    meta.pop("cli", None)
    positional = meta.pop("positional", False)
    flags = tuple(meta.pop("flags", ())) or ((f.name,) if positional else (f"--{f.name.replace('_', '-')}",))
    if not positional:
        kwargs["dest"] = f.name
    kwargs.update(_conversion(tp, f"{cls.__name__}.{f.name}"))
    if kwargs.get("action") == "store_true" and f.default is not False:
        raise TypeError(f"{cls.__name__}.{f.name}: a switch (bool) must default to False")
    if f.default is not MISSING:
        kwargs["default"] = f.default
    elif f.default_factory is not MISSING:
        kwargs["default"] = f.default_factory()
    elif not positional:
        kwargs["required"] = True
    kwargs.update(meta)
    return flags, kwargs


def _conversion(tp: Any, where: str) -> dict[str, Any]:
    """argparse's `type` / `action` for a field annotation."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"{where}: cannot parse a {tp} from the command line")
        tp = args[0]
    if tp is bool:
        return {"action": "store_true"}
    if typing.get_origin(tp) is list:
        return {"action": "append", **_conversion(typing.get_args(tp)[0], where)}
    if tp is str:
        return {}
    if tp in (int, float):
        return {"type": tp}
    raise TypeError(f"{where}: cannot parse a {tp} from the command line (use int, float, str, bool or list[str])")
