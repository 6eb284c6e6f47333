"""A local text corpus built from what every Python install has: the standard library.

Each top-level function or class of a stdlib module becomes a `code` document (its
source) and, if it has one, a `prose` document (its docstring); each module docstring is
a `prose` document too. Deterministic for a given Python version: modules in sorted
order, definitions in file order. Nothing is downloaded. Columns: text, kind
(prose | code), module, name.
"""

from __future__ import annotations

import ast
import logging
import os
import shutil
import sysconfig
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo",
              "__pycache__", "ensurepip", "tkinter", "pydoc_data", "config-3.11-x86_64-linux-gnu"}
MAX_CHARS = 200_000
"""Definitions longer than this are cut (a few generated tables in the stdlib are huge)."""


def stdlib_files() -> list[tuple[str, Path]]:
    """(dotted module name, path) of the stdlib's own .py files, sorted by name."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        for f in filenames:
            if f.endswith(".py") and not f.startswith(("test_", "_test")):
                rel = Path(dirpath, f).relative_to(root).with_suffix("")
                parts = [p for p in rel.parts if p != "__init__"]
                out.append((".".join(parts), Path(dirpath, f)))
    return sorted(out)


def documents() -> Iterator[dict[str, str]]:
    for module, path in stdlib_files():
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        doc = ast.get_docstring(tree)
        if doc and len(doc) > 40:
            yield {"text": doc[:MAX_CHARS], "kind": "prose", "module": module, "name": module}
        lines = source.splitlines(keepends=True)
        for node in tree.body:
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            start = min([d.lineno for d in node.decorator_list] + [node.lineno]) - 1
            code = "".join(lines[start:node.end_lineno])
            if len(code) > 80:
                yield {"text": code[:MAX_CHARS], "kind": "code", "module": module, "name": node.name}
            d = ast.get_docstring(node)
            if d and len(d) > 40:
                yield {"text": d[:MAX_CHARS], "kind": "prose", "module": module, "name": node.name}


def build(out: str | Path, *, n_files: int = 8, max_docs: int | None = None) -> Path:
    """Write the corpus as `n_files` parquet files under `out` (reused if already there)."""
    docs = list(documents())
    if max_docs is not None:
        docs = docs[:max_docs]
    if not docs:
        raise RuntimeError(f"no documents found under {sysconfig.get_paths()['stdlib']}")
    return _write(docs, out, n_files, ["text", "kind", "module", "name"])


CHAT_REQUESTS = {
    "explain": "What does `{name}` from the `{module}` module do?",
    "summarize": "Summarize this documentation in one sentence:\n\n{doc}",
    "example": "Write a short Python example that uses `{name}` from `{module}`.",
}
"""The user turns of the chat prompts; `kind` names the request."""


def chat_prompts(tokenizer: Any, n: int = 1000) -> list[dict[str, str]]:
    """`n` chat-formatted prompts about stdlib definitions, each ending with the assistant header.

    The text is the tokenizer's own chat template applied to one user turn with
    `add_generation_prompt=True`, so the assistant header is where the model starts to answer.
    Deterministic: every k-th documented definition, requests in turn.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template: use a chat model (e.g. smollm2-135m-instruct)")
    prose = [d for d in documents() if d["kind"] == "prose" and d["name"] != d["module"]]
    if not prose:
        raise RuntimeError(f"no documented definitions found under {sysconfig.get_paths()['stdlib']}")
    step = max(1, len(prose) // n)
    kinds = list(CHAT_REQUESTS)
    out = []
    for i, d in enumerate(prose[::step][:n]):
        kind = kinds[i % len(kinds)]
        request = CHAT_REQUESTS[kind].format(name=d["name"], module=d["module"], doc=d["text"][:600])
        text = tokenizer.apply_chat_template([{"role": "user", "content": request}], tokenize=False,
                                             add_generation_prompt=True)
        out.append({"text": text, "kind": kind, "module": d["module"], "name": d["name"]})
    return out


def build_chat(out: str | Path, model: str = "smollm2-135m-instruct", *, n: int = 1000, n_files: int = 4) -> Path:
    """Write `n` chat prompts (templated for `model`'s tokenizer) as parquet under `out`."""
    from transformers import AutoTokenizer

    from .models import resolve_source

    source, kwargs = resolve_source(model)
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    return _write(chat_prompts(tokenizer, n), out, n_files, ["text", "kind", "module", "name"])


def _write(docs: list[dict[str, str]], out: str | Path, n_files: int, columns: list[str]) -> Path:
    """Write rows as `n_files` parquet files under `out`, atomically; reuse a complete `out`."""
    out = Path(out)
    if (out / "_COMPLETE").is_file():
        return out
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    n = len(docs)
    schema = pa.schema([(c, pa.string()) for c in columns])
    for i in range(n_files):
        part = docs[n * i // n_files: n * (i + 1) // n_files]
        pq.write_table(pa.Table.from_pylist(part, schema=schema), tmp / f"part-{i:03d}.parquet")
    (tmp / "_COMPLETE").write_text(f"{n} documents\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    log.info("wrote %d documents to %s", n, out)
    return out
