"""Text sources beside the stdlib for the corpus, read from Debian packages.

Only the maintainer command that makes the shipped corpus file (`python -m saeray.assets.corpus
--build-data`, see corpus.py) reads them; users get the corpus from that file. Each source reads
files that one Debian package installs and yields documents `{text, kind, source, module, name}`:

    apt-get install -y python3.11-doc manpages fortunes

- `documentation`: Python's own documentation (tutorial, HOWTOs, FAQ, library and language
  reference, what's new), from the reStructuredText sources that python3.11-doc ships;
  PSF License Version 2.
- `manual`: the Linux man-pages project's pages in package `manpages` (sections 1-8: files,
  devices, overviews, conventions), troff stripped to text; verbatim / BSD / GPL-style licences
  that allow redistribution.
- `quotation`: the BSD fortune collections in `fortunes` (quotations, jokes, verse, short
  dialogues, definitions), several fortunes to a document; BSD licence.
"""

from __future__ import annotations

import gzip
import re
import subprocess
from pathlib import Path
from typing import Iterator

PYDOC = Path("/usr/share/doc/python3.11/html/_sources")
FORTUNES = Path("/usr/share/games/fortunes")
PYDOC_PARTS = ("tutorial", "howto", "faq", "library", "reference", "whatsnew", "using", "extending")
CHUNK_CHARS = 3000
"""Long pages are cut at blank lines into documents of at most about this many characters."""

SOURCES = {
    "python-docs": {"package": "python3.11-doc", "kind": "documentation", "licence": "PSF-2.0",
                    "path": str(PYDOC)},
    "manpages": {"package": "manpages", "kind": "manual",
                 "licence": "Linux-man-pages-copyleft (verbatim), BSD, GPL-2+, Expat", "path": "/usr/share/man"},
    "fortunes": {"package": "fortunes", "kind": "quotation", "licence": "BSD-4-clause (fortune-mod)",
                 "path": str(FORTUNES)},
}
"""Where each source comes from; written into the corpus metadata with its version and size."""

INSTALL = "apt-get install -y python3.11-doc manpages fortunes"


class MissingSource(RuntimeError):
    """A package the corpus reads from is not installed."""


def package_version(package: str) -> str | None:
    """The installed Debian version of `package`, or None."""
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Status} ${Version}", package], capture_output=True,
                             text=True, check=False).stdout
    except FileNotFoundError:
        return None
    return out.split()[-1] if out.startswith("install ok installed") else None


def _package_files(package: str) -> list[Path]:
    out = subprocess.run(["dpkg-query", "-L", package], capture_output=True, text=True, check=False).stdout
    return sorted(Path(p) for p in out.splitlines() if p.strip())


def _require(source: str) -> None:
    info = SOURCES[source]
    if package_version(info["package"]) is None or not Path(info["path"]).exists():
        raise MissingSource(f"building the corpus from its sources reads {source} from the Debian package "
                            f"{info['package']}, which is not installed: run `{INSTALL}` (as root, after apt-get "
                            "update); `saeray corpus` needs none of them (it writes the corpus shipped with saeray)")


def chunks(text: str, limit: int = CHUNK_CHARS) -> list[str]:
    """Cut text at blank lines into pieces of at most ~limit characters (a longer paragraph stays whole)."""
    out, cur = [], ""
    for para in re.split(r"\n\s*\n", text):
        para = para.strip("\n")
        if not para.strip():
            continue
        if cur and len(cur) + len(para) + 2 > limit:
            out.append(cur)
            cur = ""
        cur = f"{cur}\n\n{para}" if cur else para
    if cur:
        out.append(cur)
    return out


_ROLE = re.compile(r":[\w:.+-]+:`~?!?([^`<]*?)(?:\s*<[^>]*>)?`")
_DIRECTIVE = re.compile(r"^\.\. (index|_[^:]*|highlight|module|currentmodule|sectionauthor|moduleauthor|versionadded|"
                        r"versionchanged|deprecated|testsetup|testcleanup|toctree|seealso|include|only|tabularcolumns|"
                        r"impl-detail|audit-event|availability|program|option|cmdoption|envvar|describe|data|"
                        r"function|method|class|exception|attribute|decorator|opcode|pdbcommand|productionlist)\b.*$")


def rst_to_text(src: str) -> str:
    """Python's reST sources as plain text: roles unwrapped, markup-only lines dropped."""
    lines = []
    for line in src.splitlines():
        if re.fullmatch(r"\s*([=\-~^\"'*#+`.:])\1{3,}\s*", line) or _DIRECTIVE.match(line.strip()):
            continue
        if line.startswith(".. ") and "::" not in line:  # comments and labels
            continue
        line = _ROLE.sub(r"\1", line)
        line = re.sub(r"``([^`]+)``", r"\1", line)
        line = re.sub(r"\*\*([^*]+)\*\*|\*([^*\s][^*]*)\*", lambda m: m.group(1) or m.group(2), line)
        lines.append(line.rstrip())
    return "\n".join(lines)


def python_docs() -> Iterator[dict[str, str]]:
    _require("python-docs")
    for part in PYDOC_PARTS:
        for path in sorted((PYDOC / part).rglob("*.rst.txt")):
            rel = str(path.relative_to(PYDOC)).removesuffix(".rst.txt")
            for i, text in enumerate(chunks(rst_to_text(path.read_text(encoding="utf-8", errors="replace")))):
                if len(text) > 200:
                    yield {"text": text, "kind": "documentation", "source": "python-docs", "module": rel,
                           "name": f"{rel}#{i}"}


_ESCAPES = {"em": "\u2014", "en": "\u2013", "aq": "'", "dq": '"', "bu": "\u2022", "co": "\u00a9", "lq": "\u201c",
            "rq": "\u201d", "oq": "\u2018", "cq": "\u2019", "rs": "\\", "mu": "\u00d7", "<=": "\u2264", ">=": "\u2265",
            "hy": "-", "ti": "~", "ha": "^", "dg": "\u2020", "sc": "\u00a7", "de": "\u00b0", "+-": "\u00b1"}
_ALTERNATING = {"B", "I", "BR", "RB", "IR", "RI", "BI", "IB", "SM", "SB"}


def _troff_inline(s: str) -> str:
    s = re.sub(r"\\\((..)", lambda m: _ESCAPES.get(m.group(1), ""), s)
    s = re.sub(r"\\\[([^\]]*)\]", lambda m: _ESCAPES.get(m.group(1), ""), s)
    s = re.sub(r"\\f(\(..|\[[^\]]*\]|.)", "", s)
    s = re.sub(r"\\\*(\(..|\[[^\]]*\]|.)", "", s)
    s = re.sub(r"\\s[+-]?\d", "", s)
    s = s.replace("\\-", "-").replace("\\e", "\\").replace("\\~", " ").replace("\\ ", " ").replace("\\0", " ")
    return re.sub(r"\\[&|^c%:]", "", s)


def troff_to_text(src: str) -> str:
    """A man page's troff source as plain text (headings, paragraphs, font changes dropped)."""
    out: list[str] = []
    table_format = False
    for line in src.splitlines():
        if line.startswith((".\\\"", "'\\\"", "\\\"")):
            continue
        if table_format:  # tbl's options and column formats end at the first line ending in "."
            table_format = not line.rstrip().endswith(".")
            continue
        if line.startswith(".TS"):
            table_format = True
            continue
        if line.strip() in ("T{", "T}", "_", "="):
            continue
        line = line.replace("T{", "").replace("T}", "")
        if line.startswith((".", "'")):
            parts = line[1:].strip().split(None, 1)
            if not parts:
                continue
            macro, rest = parts[0], (parts[1] if len(parts) > 1 else "")
            args = re.findall(r'"([^"]*)"|(\S+)', rest)
            words = [a or b for a, b in args]
            if macro in ("SH", "SS"):
                out += ["", _troff_inline(" ".join(words)).strip().capitalize() if macro == "SH" else
                        _troff_inline(" ".join(words)).strip(), ""]
            elif macro in _ALTERNATING:
                out.append(_troff_inline(("" if macro not in ("B", "I", "SM", "SB") else " ").join(words)))
            elif macro in ("PP", "LP", "P", "sp", "TP"):
                out.append("")
            elif macro in ("IP", "TQ") and words:
                out += ["", _troff_inline(words[0])]
            elif macro in ("UR", "MT") and words:
                out.append(words[0])
            continue
        out.append(_troff_inline(line))
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip()


def manpages() -> Iterator[dict[str, str]]:
    _require("manpages")
    pages = [p for p in _package_files("manpages") if p.suffix == ".gz" and re.fullmatch(r"man\d", p.parent.name)]
    for path in pages:
        src = gzip.decompress(path.read_bytes()).decode("utf-8", errors="replace")
        if src.lstrip().startswith(".so "):  # a link to another page
            continue
        page = path.name.removesuffix(".gz")
        for i, text in enumerate(chunks(troff_to_text(src))):
            if len(text) > 200:
                yield {"text": text, "kind": "manual", "source": "manpages", "module": page, "name": f"{page}#{i}"}


FORTUNES_SKIP = {"ascii-art", "art", "translate-me", "debian", "linuxcookie", "perl"}
"""Collections that are pictures, untranslated text or mostly shell and Perl snippets."""


def fortunes(per_doc_chars: int = 1200) -> Iterator[dict[str, str]]:
    _require("fortunes")
    for path in sorted(FORTUNES.iterdir()):
        if path.suffix or path.is_dir() or path.name in FORTUNES_SKIP:
            continue
        items = [t.strip("\n") for t in re.split(r"\n%\n", path.read_text(encoding="utf-8", errors="replace"))]
        for i, text in enumerate(chunks("\n\n".join(t for t in items if t.strip()), per_doc_chars)):
            yield {"text": text, "kind": "quotation", "source": "fortunes", "module": path.name,
                   "name": f"{path.name}#{i}"}
