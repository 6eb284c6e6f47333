"""A folder on local disk or in an object store, addressed by relative keys: the storage primitives a run
directory (store.RunDir) is built on. Writes are whole files at once, with transient errors retried."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from . import storage


class OutputWriteError(OSError):
    """Writing a unit's output failed (disk full, permission, an object store's refusal) after the retries a
    transient error gets; the unit is not committed and nothing of it is visible to readers."""


def writing(where: str, fn: Any) -> Any:
    """fn() with transient errors retried (storage.retrying); a lasting failure names `where`."""
    try:
        return storage.retrying(f"writing {where}", fn)
    except OutputWriteError:
        raise
    except OSError as e:
        raise OutputWriteError(f"writing {where} failed: {type(e).__name__}: {e}") from e


class Folder:
    """A local path or object-store URI (`s3://bucket/prefix`, any fsspec filesystem); every read, write, listing
    and deletion goes through its one fsspec filesystem, with no listing cache (other processes write here)."""

    def __init__(self, root: str | Path):
        s = str(root)
        if s.startswith("file://"):
            s = s[len("file://"):]
        self.remote = storage.is_remote(s)
        self.root: Path | str = s.rstrip("/") if self.remote else Path(s)
        self.fs, base = storage.filesystem(s)
        self._base = base.rstrip("/")

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
        writing(self.uri(rel), lambda: storage.write_atomic(self.fs, self._key(rel), data))

    def write_json(self, rel: str, obj: Any) -> None:
        """`obj` as an indented JSON file, written atomically (`write_bytes`)."""
        self.write_bytes(rel, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())

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
        writing(self.uri(rel), lambda: self.fs.put_file(str(local), self._key(rel)))
