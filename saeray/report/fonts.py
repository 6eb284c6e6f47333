"""Fonts for PNG figures: token strings in any script, without matplotlib's missing-glyph warnings.

Figures are drawn with a fallback chain of the wide-coverage fonts that are installed (DejaVu
Sans, which matplotlib ships, then Noto: CJK and Hangul, Thai, Arabic, Devanagari, ...; the
set-up installs Debian's fonts-noto-core and fonts-noto-cjk). A character that no font of the
chain has (an emoji, a script with no font installed) is drawn as its UTF-8 bytes, `<f0 9f 98 80>`,
as the HTML report shows byte fragments.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Callable, TypeVar

import matplotlib

WIDE = ("DejaVu Sans", "Noto Sans", "Noto Sans CJK JP", "Noto Sans Thai", "Noto Sans Arabic", "Noto Sans Hebrew",
        "Noto Sans Devanagari", "Noto Sans Bengali", "Noto Sans Tamil", "Noto Sans Telugu", "Noto Sans Kannada",
        "Noto Sans Malayalam", "Noto Sans Gujarati", "Noto Sans Gurmukhi", "Noto Sans Sinhala", "Noto Sans Khmer",
        "Noto Sans Lao", "Noto Sans Myanmar", "Noto Sans Georgian", "Noto Sans Armenian", "Noto Sans Ethiopic",
        "Noto Sans Math", "Noto Sans Symbols", "Noto Sans Symbols 2")
"""Font families tried in this order for each character (those not installed are left out)."""

NOTO_DIRS = ("/usr/share/fonts/truetype/noto", "/usr/share/fonts/opentype/noto")
"""Where Debian's fonts-noto-core and fonts-noto-cjk put them."""

F = TypeVar("F", bound=Callable)


@functools.lru_cache(maxsize=1)
def families() -> tuple[str, ...]:
    """The installed families of WIDE, in order (DejaVu Sans always: matplotlib ships it)."""
    from matplotlib import font_manager

    installed = {f.name for f in font_manager.fontManager.ttflist}
    known = {f.fname for f in font_manager.fontManager.ttflist}
    for family in WIDE:  # fonts installed after matplotlib cached its font list
        if family in installed:
            continue
        stem = "NotoSansCJK" if family == "Noto Sans CJK JP" else family.replace(" ", "")
        for d in NOTO_DIRS:
            for path in sorted(Path(d).glob(f"{stem}-Regular.tt[fc]")):
                if str(path) not in known:
                    font_manager.fontManager.addfont(str(path))
                    installed.add(family)
    return tuple(f for f in WIDE if f in installed) or ("DejaVu Sans",)


@functools.lru_cache(maxsize=1)
def coverage() -> frozenset[int]:
    """Code points that some font of the chain can draw."""
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font

    points: set[int] = set()
    for family in families():
        path = font_manager.findfont(font_manager.FontProperties(family=family), fallback_to_default=False)
        points.update(FT2Font(path).get_charmap())
    return frozenset(points)


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def drawable(s: str) -> str:
    """`s` with every run of characters no font of the chain has replaced by its UTF-8 bytes in hex."""
    cov = coverage()
    out, missing = [], []
    for c in s:
        if ord(c) in cov and not _CONTROL.match(c):
            if missing:
                out.append("<" + " ".join(f"{b:02x}" for b in "".join(missing).encode("utf-8", "replace")) + ">")
                missing = []
            out.append(c)
        else:
            missing.append(c)
    if missing:
        out.append("<" + " ".join(f"{b:02x}" for b in "".join(missing).encode("utf-8", "replace")) + ">")
    return "".join(out)


def wide(fn: F) -> F:
    """Run a figure function with the fallback chain as the font family (Text objects take it when made)."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        with matplotlib.rc_context({"font.family": list(families())}):
            return fn(*args, **kwargs)
    return run  # type: ignore[return-value]
