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

from . import storage

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

ACTIVATIONS_SCHEMA = pa.schema([
    ("sae", pa.string()), ("group", pa.string()), ("doc_id", pa.int64()), ("pos", pa.int32()),
    ("feature", pa.int32()), ("value", pa.float32()),
])

_MARKER_RE = re.compile(r"^completions/(\d+)\.json$")
_PART_RE = re.compile(r"^(activations|docs)/shard=(\d+)/([A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*)\.parquet$")
_SINGLE_RE = re.compile(r"^(stats|recon|examples|hist|lastvals)/(\d+)((?:\.[0-9a-f]+)?)\.parquet$")


class RunDirError(ValueError):
    """The run directory belongs to another run, or is not a saeray run directory."""


class OutputWriteError(OSError):
    """Writing a unit's output failed (disk full, permission, an object store's refusal) after the retries a
    transient error gets; the unit is not committed and nothing of it is visible to readers."""


class OutputNotShared(RuntimeError):
    """A worker cannot see or write the run directory its driver prepared (a node-local path on a multi-node
    cluster, or missing object-store credentials on a node)."""


SHARED_HINT = "output.dir must be a filesystem every node shares, or s3://..."


def _writing(where: str, fn: Any) -> Any:
    """fn() with transient errors retried (storage.retrying); a lasting failure names `where`."""
    try:
        return storage.retrying(f"writing {where}", fn)
    except OutputWriteError:
        raise
    except OSError as e:
        raise OutputWriteError(f"writing {where} failed: {type(e).__name__}: {e}") from e


def fingerprint(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def write_json_atomic(path: Path | str, obj: Any) -> None:
    """A JSON file written at once (storage.write_atomic), on local disk or in an object store."""
    fs, key = storage.filesystem(str(path))
    storage.write_atomic(fs, key, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


def shard_name(index: int) -> str:
    return f"{index:05d}"


def is_remote(root: str | Path) -> bool:
    """True for object-store URIs (s3://, gs://, ...); plain paths and file:// are local."""
    return storage.is_remote(str(root))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunDir:
    """A run directory on local disk or in an object store; all paths inside are relative keys.

    Every read, write, listing and deletion goes through one fsspec filesystem (storage.py), local
    or remote alike. Only the commit differs: local disk renames a finished attempt into place;
    object stores, which cannot rename, take attempt-unique names (see the module docstring).
    """

    def __init__(self, root: str | Path):
        s = str(root)
        if s.startswith("file://"):
            s = s[len("file://"):]
        self.remote = is_remote(s)
        self.root: Path | str = s.rstrip("/") if self.remote else Path(s)
        try:  # no listing cache: markers are written by other processes
            self.fs, base = storage.filesystem(s)
        except (OSError, ImportError, ValueError) as e:
            hint = " (pip install 'saeray[s3]' for s3://)" if "s3" in str(e) and "s3fs" not in str(e) else ""
            raise RunDirError(f"cannot open run directory {s}: {e}{hint}") from None
        self._base = base.rstrip("/")

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    # ---- storage primitives on relative keys ----------------------------------------
    def uri(self, rel: str) -> str:
        """The path (local) or URI (remote) of `rel`, as Polars and pyarrow readers take it."""
        return f"{self.root}/{rel}" if self.remote else str(self.root / rel)

    def _key(self, rel: str) -> str:
        return f"{self._base}/{rel}" if rel else self._base

    def exists(self, rel: str) -> bool:
        return self.fs.isfile(self._key(rel))

    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self._key(rel))

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write a whole file atomically (storage.write_atomic: temporary name + rename, or one PUT)."""
        _writing(self.uri(rel), lambda: storage.write_atomic(self.fs, self._key(rel), data))

    def list_files(self, prefix: str = "") -> list[str]:
        """Relative keys of every file under `prefix` (recursive)."""
        key = self._key(prefix).rstrip("/")
        if not self.fs.isdir(key):
            return []
        skip = len(self._base) + 1
        return sorted(k[skip:] for k, info in self.fs.find(key, detail=True, withdirs=False).items()
                      if info.get("type") != "directory" and not k.endswith("/"))

    def _delete(self, rels: list[str]) -> None:
        if rels:
            self.fs.rm([self._key(r) for r in rels])

    def _upload(self, local: Path, rel: str) -> None:
        """One object, whole or not at all (large files: a multipart upload, visible once completed)."""
        _writing(self.uri(rel), lambda: self.fs.put_file(str(local), self._key(rel)))

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
            raise RunDirError(f"{self.root} is not a saeray run directory (no {MANIFEST}): run `saeray run CONFIG --out {self.root}` first")
        return json.loads(self.read_bytes(MANIFEST))

    def manifest_if_any(self) -> dict[str, Any] | None:
        """The manifest of an existing run directory, None when there is none (or it is unreadable)."""
        try:
            return json.loads(self.read_bytes(MANIFEST)) if self.exists(MANIFEST) else None
        except (OSError, ValueError):
            return None

    def _is_empty(self) -> bool:
        if not self.fs.isdir(self._base):
            return True
        return all(p.rstrip("/").rsplit("/", 1)[-1] == LOCK for p in self.fs.ls(self._base, detail=False))

    def prepare(self, manifest: dict[str, Any], overwrite: bool) -> int:
        """Create or reopen the run directory for `manifest`; return the committed shard count.

        Refuses a directory that holds another run (another fingerprint) or foreign
        files, unless `overwrite`.
        """
        fp = manifest["fingerprint"]
        if not self._is_empty():
            if not self.exists(MANIFEST):
                if not overwrite:
                    raise RunDirError(f"{self.root} is not empty and is not a saeray run directory: "
                                      "choose another --out, or pass --overwrite to replace its contents")
                self._clear()
            else:
                old = json.loads(self.read_bytes(MANIFEST))
                if old.get("fingerprint") != fp:
                    if not overwrite:
                        raise RunDirError(
                            f"{self.root} holds a run with fingerprint {old.get('fingerprint')}, this config has {fp} "
                            f"(model, SAEs, data or token settings differ): use another --out, or --overwrite to replace it")
                    self._clear()
        if not self.remote:
            self.root.mkdir(parents=True, exist_ok=True)
            for sub in ("completions", *KINDS):
                (self.root / sub).mkdir(exist_ok=True)
        if not self.exists(MANIFEST):
            manifest = {**manifest, "created_at": dt.datetime.now(dt.timezone.utc).isoformat()}
            self.write_bytes(MANIFEST, json.dumps(manifest, indent=2, sort_keys=True, default=str).encode())
        self.clean_tmp()
        return len(self.committed())

    def _clear(self) -> None:
        log.warning("overwriting %s", self.root)
        for child in self.fs.ls(self._base, detail=False):
            if child.rstrip("/").rsplit("/", 1)[-1] != LOCK:
                self.fs.rm(child, recursive=True)

    # ---- shards ----------------------------------------------------------------------
    def committed(self) -> set[int]:
        return {int(m.group(1)) for m in map(_MARKER_RE.match, self.list_files("completions")) if m}

    def completion(self, shard: int) -> dict[str, Any]:
        return json.loads(self.read_bytes(self.marker_key(shard)))

    def completions(self) -> dict[int, dict[str, Any]]:
        """Every committed shard's marker (read in parallel from object stores)."""
        shards = sorted(self.committed())
        with ThreadPoolExecutor(max_workers=16 if self.remote else 1) as pool:
            return dict(zip(shards, pool.map(self.completion, shards)))

    def shard_files(self, shard: int, kind: str, marker: dict[str, Any] | None = None) -> list[str]:
        """Paths/URIs of the `kind` files (store.KINDS) of a committed shard.

        Only the files its marker lists; a marker written before markers listed files falls
        back to the local layout. A listed name outside the shard's own files is refused, so
        a doctored marker cannot make readers open files outside the run directory.
        """
        marker = marker if marker is not None else self.completion(shard)
        files = marker.get("files")
        if files is None:
            if self.remote:
                raise RunDirError(f"{self.uri(self.marker_key(shard))} lists no files: it was not written by this saeray")
            p = self.final_paths(shard)[kind]
            return [str(f) for f in sorted(p.glob("*.parquet"))] if p.is_dir() else ([str(p)] if p.is_file() else [])
        out = []
        for rel in files.get(kind, []):
            if _shard_of(rel) != (kind, shard):
                raise RunDirError(f"{self.uri(self.marker_key(shard))} lists {rel!r}, which is not a {kind} file of shard "
                                  f"{shard}: the run directory was changed by something other than saeray")
            out.append(self.uri(rel))
        return out

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
        self.write_bytes(self.marker_key(shard), json.dumps(summary, indent=2, sort_keys=True, default=str).encode())
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
                _writing(str(final[kind]), lambda k=kind: os.replace(tmp / f"{k}.parquet", final[k]))
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
            if shard in markers:
                listed = markers[shard].get("files")
                if listed is None or rel in listed.get(kind, []):
                    continue
            stale.append(rel)
        for rel in stale:
            log.info("removing %s, left by an unfinished attempt", self.uri(rel))
        self._delete(stale)


class Run(RunDir):
    """A run directory opened for reading: its manifest, completion markers (with the file lists readers
    use), config and tokenizer are read once and kept, local and object-store runs alike. Analyses open a run
    once (`open_run`) and hand the handle down, so none re-reads markers or rebuilds a tokenizer on its own.
    For finished runs: markers committed after opening are not seen (open it again)."""

    def __init__(self, root: str | Path):
        super().__init__(root)
        self._manifest: dict[str, Any] | None = None
        self._markers: dict[int, dict[str, Any]] | None = None
        self._tokenizer: Any = None

    def __str__(self) -> str:
        return str(self.root)

    def __fspath__(self) -> str:
        return str(self.root)

    def __repr__(self) -> str:
        return f"Run({str(self.root)!r})"

    def read_manifest(self) -> dict[str, Any]:
        if self._manifest is None:
            self._manifest = super().read_manifest()
        return self._manifest

    def completions(self) -> dict[int, dict[str, Any]]:
        if self._markers is None:
            shards = sorted(RunDir.committed(self))
            with ThreadPoolExecutor(max_workers=16 if self.remote else 1) as pool:
                self._markers = dict(zip(shards, pool.map(lambda i: RunDir.completion(self, i), shards)))
        return self._markers

    def committed(self) -> set[int]:
        return set(self.completions())

    def completion(self, shard: int) -> dict[str, Any]:
        return self.completions()[shard] if shard in self.completions() else RunDir.completion(self, shard)

    @property
    def tokenizer(self) -> Any:
        """The tokenizer of the run's model (only the tokenizer, not the weights)."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            from .models import resolve_source

            model = self.read_manifest()["config"]["model"]
            source, kwargs = resolve_source(model["name"])
            self._tokenizer = AutoTokenizer.from_pretrained(
                source, revision=model.get("revision"), trust_remote_code=bool(model.get("trust_remote_code", False)),
                **kwargs)
        return self._tokenizer


def open_run(run: "str | Path | Run") -> Run:
    """`run` opened for reading (itself when it is open already)."""
    return run if isinstance(run, Run) else Run(run)


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
            if owner == host and not _pid_alive(int(pid)):
                shutil.rmtree(d, ignore_errors=True)
        except (OSError, ValueError):
            continue


def parquet_bytes(table: pa.Table) -> bytes:
    """A table as parquet file bytes (for RunDir.write_bytes)."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()
