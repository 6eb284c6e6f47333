"""The run directory: manifest, shard outputs, and the commit protocol.

A run directory is a local path or an object-store URI (`s3://bucket/prefix`, or any
fsspec filesystem: `gs://` with gcsfs, ...). A worker writes a shard's files into
a private attempt folder on its own disk first, then commits:

- local: the files are moved into place by rename (`activations/shard=00042/part-0.parquet`,
  `stats/00042.parquet`, ...), then the completion marker `completions/00042.json` is
  written to a temporary name and renamed into place;
- object store (no rename there): the files are uploaded under attempt-unique names
  (`activations/shard=00042/part-0.<attempt>.parquet`, `stats/00042.<attempt>.parquet`),
  then the marker is written in one request (an object appears whole or not at all).

Either way the marker is the commit point, and it lists the exact files of the attempt
that wrote it. Readers read only listed files; a shard without a marker does not exist.
Whatever a dead attempt left (temporary folders, files no marker lists) is ignored by
readers and deleted by the next `prepare` or at the end of a run.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .folder import Folder, OutputWriteError, writing
from .units import split_uid

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
TMP = "_tmp"
LOCK = "driver.lock"
"""Who drives the run (lock.py); not an output: emptiness checks and overwrites leave it alone."""
SINGLE_KINDS = ("stats", "recon", "examples", "hist", "lastvals")
"""Shard outputs of one file each: statistics, reconstruction partials, example documents, histograms, values at
the documents' last positions."""
KINDS = ("activations", "docs", *SINGLE_KINDS)
"""Shard outputs: activations and docs are folders of parquet parts, the SINGLE_KINDS one file each."""
FEATURES = "features.parquet"
"""Written by `saeray stats RUN`."""
LOGITS = "logits.parquet"
"""Written by `saeray logits RUN --save`."""
COMPLETE = "complete.json"
"""Written by the driver when a run ends with every unit of its plan (or budget) committed."""
MERGED, MERGED_FOLDER = "merged.json", "merged"
"""The run-level tables merged from the units' partials (saeray/engine/merged.py) and their record."""
OWN = (MANIFEST, "completions", *KINDS, TMP, FEATURES, LOGITS, COMPLETE, MERGED, MERGED_FOLDER)
"""Everything saeray puts at the top of a run directory (besides LOCK): all that --overwrite deletes."""

ACTIVATIONS_SCHEMA = pa.schema([
    ("sae", pa.string()), ("group", pa.string()), ("doc_id", pa.int64()), ("pos", pa.int32()),
    ("feature", pa.int32()), ("value", pa.float32()),
])

_MARKER_RE = re.compile(r"^completions/(\d+)\.json$")
_PART_RE = re.compile(r"^(activations|docs)/shard=(\d+)/([A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*)\.parquet$")
_SINGLE_RE = re.compile(r"^(stats|recon|examples|hist|lastvals)/(\d+)((?:\.[0-9a-f]+)?)\.parquet$")


class RunDirError(ValueError):
    """The run directory belongs to another run, or is not a saeray run directory."""


class OutputNotShared(RuntimeError):
    """A worker cannot see or write the run directory its driver prepared (a node-local path on a multi-node
    cluster, or missing object-store credentials on a node)."""


SHARED_HINT = "output.dir must be a filesystem every node shares, or s3://..."


def fingerprint(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def shard_name(index: int) -> str:
    return f"{index:05d}"


class RunDir(Folder):
    """A run directory on local disk or in an object store; all paths inside are relative keys.

    Every read, write, listing and deletion goes through one fsspec filesystem (folder.Folder), local
    or remote alike. Only the commit differs: local disk renames a finished attempt into place;
    object stores, which cannot rename, take attempt-unique names (see the module docstring).
    """

    def __init__(self, root: str | Path):
        try:
            super().__init__(root)
        except (OSError, ImportError, ValueError) as e:
            hint = " (pip install 'saeray[s3]' for s3://)" if "s3" in str(e) and "s3fs" not in str(e) else ""
            raise RunDirError(f"cannot open run directory {root}: {e}{hint}") from None

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    # ---- is it the same directory on every node? -------------------------------------
    def write_probe(self) -> tuple[str, str]:
        """(key, token): a file the driver writes before workers start; each checks it sees it (check_probe)."""
        token = uuid.uuid4().hex
        rel = f"{TMP}/probe-{token}"
        self.write_bytes(rel, token.encode())
        return rel, token

    def check_probe(self, rel: str, token: str) -> None:
        """Raise OutputNotShared unless this process reads the driver's probe and can write beside it."""
        host = socket.gethostname()
        try:
            seen = self.read_bytes(rel).decode() if self.exists(rel) else None
        except (OSError, ValueError) as e:
            raise OutputNotShared(f"the worker on {host} cannot read the run directory {self.root} "
                                  f"({type(e).__name__}: {e}): {SHARED_HINT}") from None
        if seen != token:
            raise OutputNotShared(f"the worker on {host} does not see the run directory {self.root} that the driver "
                                  f"prepared (no {rel} there): {SHARED_HINT}")
        mine = f"{TMP}/write-{host}-{os.getpid()}-{token[:8]}"
        try:
            self.write_bytes(mine, b"")
            self._delete([mine])
        except OSError as e:
            raise OutputNotShared(f"the worker on {host} cannot write the run directory {self.root} ({e}): "
                                  f"{SHARED_HINT}") from None

    # ---- layout --------------------------------------------------------------------
    @staticmethod
    def marker_key(shard: int) -> str:
        return f"completions/{shard_name(shard)}.json"

    def marker(self, shard: int) -> Path | str:
        return self.root / self.marker_key(shard) if isinstance(self.root, Path) else self.uri(self.marker_key(shard))

    def final_paths(self, shard: int) -> dict[str, Path]:
        """Where a local commit moves a shard's outputs (object stores use attempt-unique names)."""
        if self.remote:
            raise RunDirError(f"{self.root} is in an object store: read a shard's files with shard_files()")
        s = shard_name(shard)
        return {"activations": self.root / "activations" / f"shard={s}",
                "docs": self.root / "docs" / f"shard={s}",
                **{kind: self.root / kind / f"{s}.parquet" for kind in SINGLE_KINDS}}

    # ---- manifest ------------------------------------------------------------------
    def read_manifest(self) -> dict[str, Any]:
        if not self.exists(MANIFEST):
            raise RunDirError(f"{self.root} is not a saeray run directory (no {MANIFEST}): give the folder that "
                              "`saeray run` wrote, the config's output.dir or its --out")
        return json.loads(self.read_bytes(MANIFEST))

    def manifest_if_any(self) -> dict[str, Any] | None:
        """The manifest of an existing run directory, None when there is none (or it is unreadable)."""
        try:
            return json.loads(self.read_bytes(MANIFEST)) if self.exists(MANIFEST) else None
        except (OSError, ValueError):
            return None

    def _foreign(self) -> list[str]:
        """Names at the top of the directory that a saeray run did not put there (empty when it is empty,
        a run directory, or what a start that died before writing its manifest left: empty saeray folders)."""
        if not self.fs.isdir(self._base):
            return []
        names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self._base, detail=False))
        if MANIFEST in names:
            return []
        return [n for n in names if n != LOCK and not (n in OWN and n != MANIFEST and not self.list_files(n))]

    def refuse_foreign(self) -> None:
        """Raise RunDirError when the directory holds files that are not a saeray run's: saeray writes runs only
        into a new or empty folder or a run directory, and --overwrite replaces only a run directory."""
        foreign = self._foreign()
        if foreign:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise RunDirError(f"{self.root} is not a saeray run directory and is not empty (it holds {shown}): "
                              "saeray writes a run only into a new or empty folder or a run directory it made, and "
                              "--overwrite replaces only a run directory. Set output.dir (or --out) to a new folder")

    def prepare(self, manifest: dict[str, Any], overwrite: bool, redo_files: tuple[int, ...] | None = None) -> int:
        """Create or reopen the run directory for `manifest`; return the committed shard count.

        Refuses a directory that holds files that are not a run's (even with `overwrite`). A directory that
        holds another run (another fingerprint) is refused unless `overwrite`, it has no committed unit yet
        (nothing to lose), or only data files changed (`redo_files`: their units are redone, see `_redo`).
        """
        fp = manifest["fingerprint"]
        self.refuse_foreign()
        old = self.manifest_if_any()
        replace_manifest = False
        if old is None and self.exists(MANIFEST):
            if not overwrite:
                raise RunDirError(f"{self.uri(MANIFEST)} is not readable JSON, so the run in {self.root} cannot be "
                                  "resumed: use another --out, or --overwrite to replace that run")
            self._clear()
        elif old is not None and old.get("fingerprint") != fp:
            if overwrite:
                self._clear()
            elif not self.committed():
                log.info("%s: replacing the manifest of a run that committed no unit", self.root)
                self._clear()
            elif redo_files is not None:
                self._redo(redo_files, manifest)
                replace_manifest = True
            else:
                was, now = old.get("saeray_version"), manifest.get("saeray_version")
                why = (f"it was written by saeray {was}, whose fingerprints saeray {now} does not reproduce; "
                       "its committed units still read with the analyses" if was is not None and was != now else
                       "model, SAEs, data files or token settings differ, and the committed units hold results of "
                       "the old ones")
                raise RunDirError(
                    f"{self.root} holds a run with fingerprint {old.get('fingerprint')}, this config has {fp} "
                    f"({why}): use another --out, or --overwrite to replace it")
        if not self.remote:
            self.root.mkdir(parents=True, exist_ok=True)
            for sub in ("completions", *KINDS):
                (self.root / sub).mkdir(exist_ok=True)
        if replace_manifest or not self.exists(MANIFEST):
            created = old.get("created_at") if replace_manifest and old else None
            manifest = {**manifest, "created_at": created or dt.datetime.now(dt.timezone.utc).isoformat()}
            self.write_json(MANIFEST, manifest)
        self.clean_tmp()
        return len(self.committed())

    def _redo(self, files: tuple[int, ...], manifest: dict[str, Any]) -> None:
        """Uncommit the units of data files whose identity changed: their markers go first (a unit without a
        marker does not exist; clean_tmp then removes its files), and the run-level tables derived from them."""
        redo = set(files)
        stale = sorted(u for u in self.committed() if split_uid(u)[0] in redo)
        urls = [f["url"] for f in manifest["plan"]["files"]]
        names = ", ".join(urls[i].rsplit("/", 1)[-1] for i in files[:5]) + (
            f" and {len(files) - 5} more" if len(files) > 5 else "")
        kept = len(self.committed()) - len(stale)
        log.warning("%s: data files changed since their units were committed: redoing the units of %s (%d committed "
                    "units), keeping the other %d committed units", self.root, names, len(stale), kept)
        merged = json.loads(self.read_bytes(MERGED)) if self.exists(MERGED) else None
        if merged is not None and set(merged.get("dropped", [])) & set(stale):
            raise RunDirError(
                f"{self.root}: data files changed ({names}), and the units read from them were merged into "
                f"{MERGED_FOLDER}/ with their own partials dropped (output.unit_partials: drop): the merged tables cannot "
                "be rebuilt without them. Rerun with --overwrite (or into another --out)")
        self._delete([n for n in (COMPLETE,) if self.exists(n)])  # first: the run is unfinished from here on
        self._delete([n for n in (MERGED,) if self.exists(n)])  # the merged tables hold the stale units
        self._delete(self.list_files(MERGED_FOLDER))
        self._delete([self.marker_key(u) for u in stale])
        self._delete([n for n in (FEATURES, LOGITS) if self.exists(n)])

    def _clear(self) -> None:
        """Delete the run this directory holds: saeray's own entries (OWN), the manifest last; nothing else."""
        log.warning("overwriting the run in %s", self.root)
        present = {p.rstrip("/").rsplit("/", 1)[-1]: p for p in self.fs.ls(self._base, detail=False)}
        for name in (*[n for n in OWN if n != MANIFEST], MANIFEST):
            if name in present:
                self.fs.rm(present[name], recursive=True)

    # ---- shards ----------------------------------------------------------------------
    def committed(self) -> set[int]:
        return {int(m.group(1)) for m in map(_MARKER_RE.match, self.list_files("completions")) if m}

    def completion(self, shard: int) -> dict[str, Any]:
        return json.loads(self.read_bytes(self.marker_key(shard)))

    def completions(self) -> dict[int, dict[str, Any]]:
        """Every committed shard's marker (read in parallel from object stores)."""
        return self.read_markers(sorted(self.committed()))

    def read_markers(self, shards: list[int]) -> dict[int, dict[str, Any]]:
        """The markers of `shards`, read from storage (in parallel from object stores), never from a cache."""
        with ThreadPoolExecutor(max_workers=16 if self.remote else 1) as pool:
            return dict(zip(shards, pool.map(lambda i: RunDir.completion(self, i), shards)))

    def shard_files(self, shard: int, kind: str, marker: dict[str, Any] | None = None) -> list[str]:
        """Paths/URIs of the `kind` files (store.KINDS) of a committed shard: only the files its marker lists.
        A listed name outside the shard's own files is refused, so a doctored marker cannot make readers open
        files outside the run directory.
        """
        out = []
        for rel in self._listed(shard, marker if marker is not None else self.completion(shard)).get(kind, []):
            if _shard_of(rel) != (kind, shard):
                raise RunDirError(f"{self.uri(self.marker_key(shard))} lists {rel!r}, which is not a {kind} file of shard "
                                  f"{shard}: the run directory was changed by something other than saeray")
            out.append(self.uri(rel))
        return out

    def _listed(self, shard: int, marker: dict[str, Any]) -> dict[str, list[str]]:
        """The files a shard's marker lists, by kind; a marker without them is refused (saeray writes them)."""
        files = marker.get("files")
        if not isinstance(files, dict):
            raise RunDirError(f"{self.uri(self.marker_key(shard))} lists no files: it was not written by this "
                              "version of saeray. Rerun into another --out (or --overwrite this one)")
        return files

    def new_attempt(self, shard: int) -> Path:
        """A private local folder for one attempt at `shard`, named `<shard>-<attempt id>`."""
        name = f"{shard_name(shard)}-{uuid.uuid4().hex[:8]}"
        if self.remote:
            staging = self.staging_dir()
            _remove_dead_attempts(staging)
            tmp = staging / name
        else:
            tmp = self.root / TMP / name
        (tmp / "activations").mkdir(parents=True)
        (tmp / "docs").mkdir()
        (tmp / "worker.pid").write_text(str(os.getpid()))
        (tmp / "worker.host").write_text(socket.gethostname())
        return tmp

    def staging_dir(self) -> Path:
        """Where workers of a remote run stage shard files on their own disk before upload."""
        key = hashlib.sha256(str(self.root).encode()).hexdigest()[:12]
        return Path(tempfile.gettempdir()) / "saeray-staging" / key

    def commit(self, shard: int, tmp: Path, summary: dict[str, Any]) -> None:
        """Put an attempt's files in place, then write the marker (the commit point).

        Adds `attempt` and `files` (the committed files, relative keys) to `summary`.
        """
        if self.exists(self.marker_key(shard)):
            log.warning("shard %d was already committed by another attempt; dropping this one", shard)
            shutil.rmtree(tmp, ignore_errors=True)
            return
        attempt = tmp.name.rsplit("-", 1)[-1]
        files = self._place_remote(shard, tmp, attempt) if self.remote else self._place_local(shard, tmp)
        summary.update(attempt=attempt, files=files)
        self.write_json(self.marker_key(shard), summary)
        shutil.rmtree(tmp, ignore_errors=True)

    def _place_local(self, shard: int, tmp: Path) -> dict[str, list[str]]:
        s = shard_name(shard)
        final = self.final_paths(shard)
        files: dict[str, list[str]] = {}
        for kind in ("activations", "docs"):
            names = sorted(p.name for p in (tmp / kind).glob("*.parquet"))
            if not names:
                continue
            shutil.rmtree(final[kind], ignore_errors=True)  # what an attempt that died mid-commit moved in
            try:
                os.replace(tmp / kind, final[kind])
            except OSError as e:  # a concurrent attempt (a worker thought dead) moved its complete folder in first
                if not final[kind].is_dir():
                    raise OutputWriteError(f"writing {final[kind]} failed: {type(e).__name__}: {e}") from e
                names = sorted(p.name for p in final[kind].glob("*.parquet"))
            files[kind] = [f"{kind}/shard={s}/{n}" for n in names]
        for kind in SINGLE_KINDS:
            if (tmp / f"{kind}.parquet").is_file():
                writing(str(final[kind]), lambda k=kind: os.replace(tmp / f"{k}.parquet", final[k]))
                files[kind] = [f"{kind}/{s}.parquet"]
        return files

    def _place_remote(self, shard: int, tmp: Path, attempt: str) -> dict[str, list[str]]:
        s = shard_name(shard)
        files: dict[str, list[str]] = {}
        for kind in ("activations", "docs"):
            for f in sorted((tmp / kind).glob("*.parquet")):
                rel = f"{kind}/shard={s}/{f.stem}.{attempt}.parquet"
                self._upload(f, rel)
                files.setdefault(kind, []).append(rel)
        for kind in SINGLE_KINDS:
            if (tmp / f"{kind}.parquet").is_file():
                rel = f"{kind}/{s}.{attempt}.parquet"
                self._upload(tmp / f"{kind}.parquet", rel)
                files[kind] = [rel]
        return files

    def clean_tmp(self) -> None:
        """Delete what dead attempts left: temp folders and temp markers, and shard files no marker lists.

        Only call this while no attempt is running (before and after a run).
        """
        markers = self.completions()
        if not self.remote:
            shutil.rmtree(self.root / TMP, ignore_errors=True)
            for kind in ("activations", "docs"):  # folders of shards without a marker, whatever they hold
                for d in (self.root / kind).glob("shard=*"):
                    idx = d.name.split("=", 1)[1]
                    if d.is_dir() and (not idx.isdigit() or int(idx) not in markers):
                        log.info("removing %s, left by an unfinished attempt", d)
                        shutil.rmtree(d, ignore_errors=True)
        stale = []
        for rel in self.list_files():
            if rel == MANIFEST or _MARKER_RE.match(rel):
                continue
            if rel.startswith(TMP + "/") or (rel.startswith("completions/") and rel.endswith(".tmp")):
                stale.append(rel)
                continue
            owner = _shard_of(rel)
            if owner is None:
                continue  # not a shard output (features.parquet, reports, someone's notes): not ours to delete
            kind, shard = owner
            if shard in markers and rel in self._listed(shard, markers[shard]).get(kind, []):
                continue
            stale.append(rel)
        for rel in stale:
            log.info("removing %s, left by an unfinished attempt", self.uri(rel))
        self._delete(stale)


def _shard_of(rel: str) -> tuple[str, int] | None:
    """(kind, shard) of a shard output's relative key, None for anything else."""
    m = _PART_RE.match(rel) or _SINGLE_RE.match(rel)
    if m is None or ".." in rel.split("/"):
        return None
    return m.group(1), int(m.group(2))


def _remove_dead_attempts(staging: Path) -> None:
    """Delete staging folders of this host whose worker process is gone (killed attempts)."""
    if not staging.is_dir():
        return
    host = socket.gethostname()
    for d in staging.iterdir():
        try:
            pid, owner = (d / "worker.pid").read_text(), (d / "worker.host").read_text()
            if owner == host and not pid_alive(int(pid)):
                shutil.rmtree(d, ignore_errors=True)
        except (OSError, ValueError):
            continue


def parquet_bytes(table: pa.Table, meta: dict[str, Any] | None = None) -> bytes:
    """A table as parquet file bytes (for RunDir.write_bytes, storage.write_local); `meta` {key: JSON-able value}
    goes into the file's key-value metadata as JSON."""
    if meta:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                               **{k: json.dumps(v, sort_keys=True) for k, v in meta.items()}})
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()
