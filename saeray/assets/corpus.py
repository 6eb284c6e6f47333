"""The local text corpus: the stdlib's code and docstrings, Python's documentation, manual
pages and quotation collections, shipped inside the package as one compressed file.

saeray/assets/data/corpus.jsonl.zst holds the corpus' documents, in corpus order, one JSON object a
line with the columns text, kind, source, module, name; saeray/assets/data/corpus.json beside it
records its sources, their versions and licences, the budgets, sizes per kind and source, and the
SHA-256 of the uncompressed lines. `build` writes that corpus as parquet files (what `saeray
corpus`, the demo and `train-sae` read): the same documents, order and split on any machine and any
Python, nothing installed beside saeray.

The maintainer command makes the file from its sources (a Python 3.11 install and three Debian
packages, see saeray/assets/textsources.py):

    python -m saeray.assets.corpus --build-data      # rewrite the shipped file from the sources
    python -m saeray.assets.corpus --check           # does a from-sources build equal the shipped file?

The recipe: each top-level function or class of a stdlib module becomes a `code` document (its
source) and, if it has one, a `docstring` document; module docstrings are `docstring` documents
too. Beside them (textsources.py): `documentation` (Python's tutorial, HOWTOs, reference), `manual`
(the Linux man-pages) and `quotation` (the BSD fortune collections). Each kind is capped at a
character budget (`BUDGETS`), chosen by a seeded shuffle, and the documents of all kinds are
shuffled together, so any prefix of the corpus (the training half, the held-out half) holds every
kind.
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import os
import random
import shutil
import sys
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
    """The stdlib's documents (kinds code and docstring), modules sorted, definitions in file order."""
    for module, path in stdlib_files():
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        doc = ast.get_docstring(tree)
        if doc and len(doc) > 40:
            yield {"text": doc[:MAX_CHARS], "kind": "docstring", "source": "stdlib", "module": module, "name": module}
        lines = source.splitlines(keepends=True)
        for node in tree.body:
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            start = min([d.lineno for d in node.decorator_list] + [node.lineno]) - 1
            code = "".join(lines[start:node.end_lineno])
            if len(code) > 80:
                yield {"text": code[:MAX_CHARS], "kind": "code", "source": "stdlib", "module": module, "name": node.name}
            d = ast.get_docstring(node)
            if d and len(d) > 40:
                yield {"text": d[:MAX_CHARS], "kind": "docstring", "source": "stdlib", "module": module, "name": node.name}


BUDGETS = {"code": 1_600_000, "docstring": None, "documentation": 2_000_000, "manual": 1_600_000,
           "quotation": None}
"""Characters per kind (None: all there is). About 2.2M Gemma tokens in all."""
PROSE_KINDS = ("docstring", "documentation", "manual", "quotation")
"""Kinds of natural-language text (the demo's `prose` condition); the rest is `code`."""
COLUMNS = ["text", "kind", "source", "module", "name"]
SEED = 0
VERSION = 2
"""Bumped whenever the corpus' recipe changes; a corpus directory of another version is rebuilt."""


def all_documents() -> dict[str, list[dict[str, str]]]:
    """Every available document of every source, by kind, in each source's own order."""
    from . import textsources

    by_kind: dict[str, list[dict[str, str]]] = {}
    for src in (documents, textsources.python_docs, textsources.manpages, textsources.fortunes):
        for d in src():
            by_kind.setdefault(d["kind"], []).append(d)
    return by_kind


def select(by_kind: dict[str, list[dict[str, str]]], budgets: dict[str, int | None] = BUDGETS,
           seed: int = SEED) -> list[dict[str, str]]:
    """Per kind, a seeded shuffle cut at the kind's character budget; then all kinds shuffled together."""
    rng = random.Random(seed)
    out = []
    for kind in sorted(by_kind):
        docs = list(by_kind[kind])
        rng.shuffle(docs)
        budget, used = budgets.get(kind), 0
        for d in docs:
            if budget is not None and used >= budget:
                break
            out.append(d)
            used += len(d["text"])
    rng.shuffle(out)
    return out


def sizes(docs: list[dict[str, str]]) -> dict[str, Any]:
    """Documents and characters per kind and per source."""
    out: dict[str, dict[str, dict[str, int]]] = {"by_kind": {}, "by_source": {}}
    for d in docs:
        for group, key in (("by_kind", d["kind"]), ("by_source", d["source"])):
            s = out[group].setdefault(key, {"documents": 0, "chars": 0})
            s["documents"] += 1
            s["chars"] += len(d["text"])
    return out


def metadata(docs: list[dict[str, str]], sources: dict[str, Any]) -> dict[str, Any]:
    """The corpus' description: recipe, sources (versions, licences), sizes per kind and source."""
    return {"version": VERSION, "documents": len(docs), "seed": SEED, "budgets_chars": BUDGETS, "sources": sources,
            **sizes(docs)}


def source_info() -> dict[str, Any]:
    """Each source of this machine: package, version, licence, path (what the shipped file records)."""
    from . import textsources

    sources = {"stdlib": {"kinds": ["code", "docstring"], "licence": "PSF-2.0",
                          "python": sys.version.split()[0]}}
    for name, info in textsources.SOURCES.items():
        sources[name] = {**info, "version": textsources.package_version(info["package"])}
    return sources


def from_sources() -> list[dict[str, str]]:
    """The corpus built from this machine's Python and Debian packages (textsources.MissingSource if absent)."""
    return select(all_documents())


DATA = Path(__file__).parent / "data" / "corpus.jsonl.zst"
"""The shipped corpus: one JSON object a line (COLUMNS), in corpus order, zstd-compressed."""
DATA_META = DATA.parent / "corpus.json"
"""Beside it: sources, versions, licences, sizes and the SHA-256 of the uncompressed lines."""


def _lines(docs: list[dict[str, str]]) -> bytes:
    return "".join(json.dumps({c: d[c] for c in COLUMNS}, ensure_ascii=False) + "\n" for d in docs).encode()


def write_data(docs: list[dict[str, str]], sources: dict[str, Any], data: Path = DATA) -> tuple[Path, Path]:
    """Write `docs` as the shipped corpus file and its metadata (the maintainer's --build-data)."""
    import zstandard

    raw = _lines(docs)
    meta = {**metadata(docs, sources), "sha256": hashlib.sha256(raw).hexdigest()}
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_bytes(zstandard.ZstdCompressor(level=19).compress(raw))
    meta_file = data.parent / "corpus.json"
    meta_file.write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    return data, meta_file


def shipped_metadata(data: Path = DATA) -> dict[str, Any]:
    """The shipped corpus' metadata (corpus.json)."""
    return json.loads((data.parent / "corpus.json").read_text())


def shipped(data: Path = DATA) -> list[dict[str, str]]:
    """The shipped corpus' documents, in corpus order (checked against the SHA-256 in corpus.json)."""
    import zstandard

    if not data.is_file():
        raise FileNotFoundError(f"the shipped corpus {data} is missing: reinstall saeray (a source checkout makes it "
                                "with `python -m saeray.assets.corpus --build-data`)")
    with data.open("rb") as f:
        raw = zstandard.ZstdDecompressor().stream_reader(f).read()
    want = shipped_metadata(data)["sha256"]
    if hashlib.sha256(raw).hexdigest() != want:
        raise ValueError(f"{data} does not match the SHA-256 in {data.parent / 'corpus.json'}: reinstall saeray")
    return [json.loads(line) for line in raw.decode().splitlines()]


def build(out: str | Path, *, n_files: int = 8, max_docs: int | None = None) -> Path:
    """Write the shipped corpus as `n_files` parquet files and _corpus.json under `out` (reused if already there)."""
    out = Path(out)
    meta_file = out / "_corpus.json"
    if (out / "_COMPLETE").is_file() and meta_file.is_file() and json.loads(meta_file.read_text()).get("version") == VERSION:
        return out
    if (out / "_COMPLETE").is_file():
        log.info("%s holds a corpus of another version: rebuilding it", out)
        (out / "_COMPLETE").unlink()
    docs, meta = shipped(), shipped_metadata()
    if max_docs is not None:
        docs = docs[:max_docs]
        meta = {**{k: v for k, v in meta.items() if k != "sha256"}, "documents": len(docs), **sizes(docs)}
    return _write(docs, out, n_files, COLUMNS, meta=meta)


def main(argv: list[str] | None = None) -> int:
    """The maintainer's command: rewrite the shipped corpus file from its sources, or check it against them."""
    import argparse

    from .textsources import MissingSource

    p = argparse.ArgumentParser(prog="python -m saeray.assets.corpus",
                                description="Make the shipped corpus file from its sources (a Python 3.11 install "
                                            "and the Debian packages python3.11-doc, manpages, fortunes).")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--build-data", action="store_true", help=f"rewrite {DATA.name} and corpus.json from the sources")
    g.add_argument("--check", action="store_true", help="build from the sources and compare with the shipped file")
    p.add_argument("--data", type=Path, default=DATA, help="where the corpus file goes (default: the package's)")
    a = p.parse_args(argv)
    try:
        docs = from_sources()
    except MissingSource as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.check:
        ship = shipped(a.data)
        same = ship == docs
        first = next((i for i, (x, y) in enumerate(zip(ship, docs)) if x != y), min(len(ship), len(docs)))
        print(f"from sources: {len(docs)} documents; shipped: {len(ship)}; " +
              ("identical" if same else f"they differ from document {first} on"))
        return 0 if same else 1
    data, meta = write_data(docs, source_info(), a.data)
    print(f"wrote {len(docs)} documents to {data} ({data.stat().st_size:,} bytes) and {meta}")
    return 0


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
    prose = [d for d in documents() if d["kind"] == "docstring" and d["name"] != d["module"]]
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

    from ..engine.models import resolve_source

    source, kwargs = resolve_source(model)
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    return _write(chat_prompts(tokenizer, n), out, n_files, ["text", "kind", "module", "name"])


def _corpus_file(name: str) -> bool:
    """A name `_write` puts in a corpus folder."""
    return name in ("_COMPLETE", "_corpus.json") or (name.startswith("part-") and name.endswith(".parquet"))


def _write(docs: list[dict[str, str]], out: str | Path, n_files: int, columns: list[str],
           meta: dict[str, Any] | None = None) -> Path:
    """Write rows as `n_files` parquet files under `out`, atomically; reuse a complete `out`."""
    out = Path(out)
    if (out / "_COMPLETE").is_file():
        return out
    foreign = sorted(p.name for p in out.iterdir() if not _corpus_file(p.name)) if out.is_dir() else []
    if foreign:
        raise ValueError(f"{out} holds files that are not a saeray corpus's ({', '.join(foreign[:3])}): the corpus is "
                         "written into a folder of its own, replacing what it holds. Choose another --out")
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    n = len(docs)
    schema = pa.schema([(c, pa.string()) for c in columns])
    for i in range(n_files):
        part = docs[n * i // n_files: n * (i + 1) // n_files]
        pq.write_table(pa.Table.from_pylist(part, schema=schema), tmp / f"part-{i:03d}.parquet")
    if meta is not None:
        (tmp / "_corpus.json").write_text(json.dumps(meta, indent=2))
    (tmp / "_COMPLETE").write_text(f"{n} documents\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    log.info("wrote %d documents to %s", n, out)
    return out


if __name__ == "__main__":
    sys.exit(main())
