"""Feature lists as users type them: `0,5,10`, `0-20`, `0-10,50-60`.

Ranges are inclusive at both ends (`0-20` is 21 features). The result is sorted and
de-duplicated, so overlapping ranges are allowed.
"""

from __future__ import annotations

import re
from typing import Any, Iterable

from .options import option

_ITEM = re.compile(r"^(\d+)(?:\s*-\s*(\d+))?$")


class FeatureListError(ValueError):
    """A feature list that cannot be parsed."""


def parse_features(spec: str | int | Iterable[str | int], *, n_features: int | None = None) -> list[int]:
    """Parse `0,5,10` / `0-20` / `0-10,50-60` (or an int, or several such strings) into sorted unique ints.

    `n_features` (the SAE width), when given, rejects indices >= it.
    """
    if isinstance(spec, bool):
        raise FeatureListError(f"feature list {spec!r} is not a list of feature indices")
    if isinstance(spec, int):
        items: list[str] = [str(spec)]
    elif isinstance(spec, str):
        items = spec.split(",")
    else:
        items = [part for s in spec for part in (s.split(",") if isinstance(s, str) else [str(s)])]
    out: set[int] = set()
    for raw in items:
        item = raw.strip()
        if not item:
            if len(items) == 1:
                raise FeatureListError("empty feature list: give indices like 0,5,10 or ranges like 0-20")
            raise FeatureListError(f"empty item in feature list {_show(items)}: remove the extra comma")
        if item.startswith("-") or re.match(r"^\d+\s*-\s*-", item):
            raise FeatureListError(f"negative feature index in {item!r}: feature indices start at 0")
        m = _ITEM.match(item)
        if not m:
            raise FeatureListError(f"cannot read {item!r} in feature list {_show(items)}: "
                                   "use indices and inclusive ranges, e.g. 0,5,10 or 0-10,50-60")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise FeatureListError(f"reversed range {item!r}: write it low-high, e.g. {hi}-{lo}")
        out.update(range(lo, hi + 1))
    if n_features is not None:
        bad = [f for f in out if f >= n_features]
        if bad:
            raise FeatureListError(f"feature {min(bad)} is out of range: the SAE has {n_features} features "
                                   f"(0-{n_features - 1})")
    return sorted(out)


def _show(items: list[str]) -> str:
    return repr(",".join(items))


FEATURES_HELP = "features: 0,5,10 | 0-20 | 0-10,50-60 (repeatable)"


def feature_lists(flag: str = "--feature") -> Any:
    """A required, repeatable `FLAG/-f LIST` option field; `parse_features` reads what it collects."""
    return option(help=FEATURES_HELP, flags=(flag, "-f"), metavar="LIST")
