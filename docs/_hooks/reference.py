"""mkdocs hook: pages that are generated from the code, so they cannot drift from it.

- `<!-- generated: config-reference -->` becomes the configuration reference: every section and key of
  `saeray.engine.config.RunConfig`, walked through its dataclasses, with each key's type, default and the
  docstring written under the field in saeray/engine/config.py.
- `<!-- generated: command-reference -->` becomes each `saeray` command's `--help`, from the parser the
  command line itself builds (`saeray.cli.build_parser`).
- `<!-- generated: definitions MODULE -->` becomes a table of MODULE's `DEFINITIONS` (the definitions an
  analysis writes into its outputs' metadata), and `<!-- generated: presets MODULE -->` one of its `PRESETS`.

`python docs/_hooks/reference.py config|commands` prints either one (what the page will hold).
"""

from __future__ import annotations

import ast
import dataclasses
import html
import importlib
import inspect
import os
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

ROOT = Path(__file__).resolve().parents[2]
CONFIG_MARK = "<!-- generated: config-reference -->"
COMMANDS_MARK = "<!-- generated: command-reference -->"
HELP_COLUMNS = "100"
"""Terminal width the `--help` texts are formatted for (argparse wraps to $COLUMNS)."""


def _import_saeray() -> None:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))


# ---- the configuration reference ---------------------------------------------------------------------


def field_docs(cls: type) -> dict[str, str]:
    """{field: docstring} from the string literal written right under each field of a dataclass."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for stmt, nxt in zip(body, body[1:]):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[stmt.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


def type_text(tp: Any) -> str:
    """A field's type as a config author reads it: YAML words, literal choices in code spans."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return " or ".join(f"`{a}`" for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join(type_text(a) for a in args)
    if origin is tuple:
        return f"list of {type_text(args[0])}"
    if origin is dict:
        return f"mapping of name to {type_text(args[1])}"
    if tp is type(None):
        return "`null`"
    if dataclasses.is_dataclass(tp):
        return f"section `{tp.__name__}`"
    return {str: "string", int: "integer", float: "number", bool: "boolean"}.get(tp, getattr(tp, "__name__", str(tp)))


def default_text(f: dataclasses.Field) -> str:
    """A field's default as YAML, or 'required'."""
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
        if dataclasses.is_dataclass(value):
            return "(the section's defaults)"
    else:
        return "**required**"
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, (tuple, list)):
        return "`[]`" if not value else f"`{list(value)}`"
    if isinstance(value, dict):
        return "`{}`" if not value else f"`{value}`"
    return f"`{value}`"


def _one_line(text: str) -> str:
    """One table cell: whitespace folded, pipes escaped, and `<`, `>`, `&` outside code spans written as entities
    (so `d_<metric>` shows as text, not as an HTML tag)."""
    parts = " ".join(text.split()).replace("|", "\\|").split("`")
    return "`".join(html.escape(p, quote=False) if i % 2 == 0 else p for i, p in enumerate(parts))


def _section_of(tp: Any) -> tuple[type | None, str]:
    """(the dataclass a field holds, how it holds it: '', '[]' for a list, '.<name>' for a mapping)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return tp, ""
    if origin is tuple and args and dataclasses.is_dataclass(args[0]):
        return args[0], "[]"
    if origin is dict and len(args) == 2 and dataclasses.is_dataclass(args[1]):
        return args[1], ".<name>"
    return None, ""


def config_reference() -> str:
    """Markdown for every key of a run config, section by section, in the order the dataclasses declare them."""
    _import_saeray()
    from saeray.engine import config

    out: list[str] = []

    def table(cls: type, prefix: str) -> list[tuple[str, type, str]]:
        """The key table of one section (prefix: its dotted key and a dot, '' at the top); its sub-sections."""
        hints = typing.get_type_hints(cls)
        docs = field_docs(cls)
        rows, nested = [], []
        for f in dataclasses.fields(cls):
            sub, how = _section_of(hints[f.name])
            doc = _one_line(docs.get(f.name, ""))
            if sub is not None:
                key = f"{prefix}{f.name}{how}"
                nested.append((key, sub, docs.get(f.name, "")))
                shape = "list of sections" if how == "[]" else "mapping of name to section" if how else "section"
                rows.append(f"| `{f.name}` | {shape} [`{key}`](#{_anchor(key)}) | {default_text(f)} | {doc} |")
            else:
                rows.append(f"| `{f.name}` | {type_text(hints[f.name])} | {default_text(f)} | {doc} |")
        out.extend(["| key | type | default | meaning |", "|---|---|---|---|", *rows, ""])
        return nested

    def section(cls: type, key: str, doc: str) -> None:
        out.append(f"## `{key}` {{#{_anchor(key)}}}\n")
        intro = doc or inspect.cleandoc(cls.__doc__ or "")
        if intro and not intro.startswith(f"{cls.__name__}("):  # (a dataclass's generated docstring)
            out.append(" ".join(intro.split()) + "\n")
        for sub_key, sub, sub_doc in table(cls, key + "."):
            section(sub, sub_key, sub_doc)

    out.append(f"## Top-level keys {{#{_anchor('top level')}}}\n")
    out.append("Keys at the top of the file; each section below is a mapping under its key.\n")
    for sub_key, sub, sub_doc in table(config.RunConfig, ""):
        section(sub, sub_key, sub_doc)
    return "\n".join(out)


def _anchor(key: str) -> str:
    return "cfg-" + "".join(c if c.isalnum() else "-" for c in key).strip("-")


# ---- the command reference -----------------------------------------------------------------------------


def command_reference() -> str:
    """Markdown: `saeray --help`, then each command's `--help`, in the order `saeray --help` lists them."""
    _import_saeray()
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = HELP_COLUMNS
    try:
        from saeray.cli import build_parser

        parser = build_parser()
        choices = parser._subparsers._group_actions[0].choices  # noqa: SLF001 (argparse keeps them here)
        parts = ["## `saeray`\n", "```text", parser.format_help().rstrip(), "```\n"]
        for name, sub in choices.items():
            parts += [f"## `saeray {name}`\n", "```text", sub.format_help().rstrip(), "```\n"]
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old
    return "\n".join(parts)


# ---- definitions written into outputs ------------------------------------------------------------------

GENERATED = re.compile(r"<!-- generated: (definitions|presets) ([\w.]+) -->")


def definitions_table(module: str, what: str = "definitions") -> str:
    """Markdown table of a module's DEFINITIONS ({name: text}) or PRESETS ({preset: {option: value}})."""
    _import_saeray()
    mod = importlib.import_module(module)
    if what == "definitions":
        rows = [f"| `{k}` | {_one_line(str(v))} |" for k, v in mod.DEFINITIONS.items()]
        return "\n".join(["| name | definition |", "|---|---|", *rows]) + "\n"
    presets = mod.PRESETS
    keys = list(dict.fromkeys(k for p in presets.values() for k in p))
    head = "| preset | " + " | ".join(f"`{k}`" for k in keys) + " |"
    rows = [f"| `{name}` | " + " | ".join("`null`" if p.get(k) is None else f"`{p.get(k)}`" for k in keys) + " |"
            for name, p in presets.items()]
    return "\n".join([head, "|---" * (len(keys) + 1) + "|", *rows]) + "\n"


# ---- the mkdocs hook ------------------------------------------------------------------------------------


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    if CONFIG_MARK in markdown:
        markdown = markdown.replace(CONFIG_MARK, config_reference())
    if COMMANDS_MARK in markdown:
        markdown = markdown.replace(COMMANDS_MARK, command_reference())
    return GENERATED.sub(lambda m: definitions_table(m.group(2), m.group(1)), markdown)


if __name__ == "__main__":
    which = sys.argv[1] if len(sys.argv) > 1 else "config"
    print(config_reference() if which == "config" else command_reference())
