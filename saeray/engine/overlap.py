"""Keep a run directory apart from the run's inputs.

saeray writes into a run directory, cleans what dead attempts left there, and deletes its
contents on `--overwrite`. A run directory that is, holds, or sits inside the dataset, the
model's folder or an SAE's folder would have its outputs read back as data on the next run,
or its inputs deleted. Such a run is refused before anything is written, locked or deleted.
Paths are compared after `~` expansion and symlink resolution on local disk, and as
`protocol://bucket/prefix` keys in object stores.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import PurePosixPath

from .config import RunConfig
from .saes import SHIPPED, SHIPPED_DIR

_PROTOCOL_ALIASES = {"s3a": "s3", "s3n": "s3", "gcs": "gs", "file": "local", "local": "local"}


@dataclass(frozen=True)
class Location:
    """Where a path lives: a filesystem kind ('local', 's3', 'gs', ...) and an absolute, normalized path."""

    fs: str
    path: str

    def relation(self, other: "Location") -> str | None:
        """'is' / 'inside' / 'contains': how self relates to other, None when they are apart."""
        if self.fs != other.fs:
            return None
        if self.path == other.path:
            return "is"
        a, b = PurePosixPath(self.path), PurePosixPath(other.path)
        if b in a.parents:
            return "inside"
        if a in b.parents:
            return "contains"
        return None


def location(spec: str, *, must_exist: bool = False) -> Location | None:
    """The location a path-like spec names; None for a name that is no path (a hub id, a short name).

    A glob names the folder above its first wildcard. With must_exist, a local path that does not
    exist is no location (hub ids look like relative paths)."""
    spec = str(spec)
    proto, sep, rest = spec.partition("://")
    if sep and proto.lower() not in ("file", "local"):
        key = "/" + "/".join(p for p in rest.split("/") if p)
        return Location(_PROTOCOL_ALIASES.get(proto.lower(), proto.lower()), _static_prefix(key))
    path = os.path.expanduser(rest if sep else spec)
    if any(ch in path for ch in "*?["):
        path = _static_prefix(path) or "."
    elif must_exist and not os.path.lexists(path):
        return None
    return Location("local", os.path.realpath(path))


def _static_prefix(path: str) -> str:
    """The part of a path before the first component with a wildcard."""
    if not glob.has_magic(path):
        return path.rstrip("/") or "/"
    parts = []
    for part in path.split("/"):
        if glob.has_magic(part):
            break
        parts.append(part)
    return "/".join(parts).rstrip("/") or "/"


def inputs(cfg: RunConfig) -> list[tuple[str, str, Location]]:
    """(what, spec, location) of every input a run reads from a path: the dataset, the model, the SAEs."""
    out = []
    data = location(cfg.data.dataset, must_exist=not _looks_like_path(cfg.data.dataset))
    if data is not None:
        out.append(("the dataset (data.dataset)", cfg.data.dataset, data))
    model = location(cfg.model.name, must_exist=True)
    if model is not None:
        out.append(("the model (model.name)", cfg.model.name, model))
    for sae in cfg.saes:
        if sae.path:
            loc = location(str(SHIPPED_DIR / sae.path[len(SHIPPED):]) if sae.path.startswith(SHIPPED) else sae.path)
            if loc is not None:
                out.append((f"SAE {sae.name!r} (saes[].path)", sae.path, loc))
    return out


def _looks_like_path(spec: str) -> bool:
    return "://" in spec or spec.startswith((".", "/", "~")) or glob.has_magic(spec)


def check_apart(cfg: RunConfig, out: str | None = None) -> None:
    """Raise OverlapError when the run directory is, holds, or is inside one of the run's inputs."""
    out = out if out is not None else cfg.output.dir
    where = location(out)
    if where is None:
        return
    for what, spec, loc in inputs(cfg):
        rel = where.relation(loc)
        if rel is None:
            continue
        name = PurePosixPath(loc.path).name or "run"
        why = {"is": f"is {what}",
               "inside": f"is inside {what} ({spec}), so the run's own files would be read as its input",
               "contains": f"contains {what} ({spec}), whose files --overwrite and the run's clean-up could remove"}[rel]
        raise OverlapError(f"output.dir {out} {why}: a run directory must be a folder of its own, apart from the "
                           f"data, model and SAEs it reads. Set output.dir (or --out) to a new folder, e.g. "
                           f"runs/{name}-run")


class OverlapError(ValueError):
    """The run directory and an input of the run share files."""
