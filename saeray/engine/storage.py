"""One storage layer for datasets and run directories: fsspec for local disk and object stores alike.

- `filesystem(url)`: the fsspec filesystem and path of a local path, `file://`, `s3://`, `gs://`,
  `https://` or `hf://` URL (listing caches off: other processes write run directories).
- `list_files(spec)`: the files a path, directory or glob names, with what the store says about
  each (size, and etag, checksum or mtime as its version): what planning reads, never the data.
- `open_raw(url)`: a binary file that counts the bytes it reads (`READ.bytes`, per process) and,
  on a transient error (connection reset, timeout, 5xx), reopens the file and seeks back to where
  it was, with exponential backoff: a decompressor reading from it never notices a dropped
  connection. Persistent errors (missing file, no permission) raise at once.
- `write_atomic(fs, path, data)`: a whole file appears at once or not at all (local: temporary
  name + rename, `write_local`; object stores: one PUT). `replacing(path)`: the same for a local
  file or folder that something else writes.
"""

from __future__ import annotations

import contextlib
import errno
import glob as globlib
import logging
import os
import random
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TypeVar

import fsspec

log = logging.getLogger(__name__)

FORWARDED = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT")
"""Variables of the driver's environment its workers get (besides every AWS_* variable, for s3:// data and runs)."""


def forwarded_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The credentials (and endpoints) in the driver's environment that its workers need."""
    environ = dict(os.environ if environ is None else environ)
    return {k: v for k, v in sorted(environ.items()) if k in FORWARDED or k.startswith("AWS_")}


T = TypeVar("T")

RETRIES = 6
"""Transient read errors are retried this many times per read (backoff 0.5 s, doubling, at most 15 s)."""


class ReadCounter:
    """Bytes read from data files by this process, and transient errors retried (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.bytes = 0
        self.retries = 0

    def add(self, n: int) -> None:
        with self._lock:
            self.bytes += n

    def retried(self) -> None:
        with self._lock:
            self.retries += 1

    def reset(self) -> None:
        with self._lock:
            self.bytes = self.retries = 0


READ = ReadCounter()


@dataclass(frozen=True)
class FileInfo:
    url: str
    """The file as fsspec opens it: a local path or a URL with its protocol."""
    size: int
    version: str
    """What the store says identifies this content: an etag, a checksum, or the mtime."""


def is_remote(spec: str) -> bool:
    """True for URLs of object stores and servers (s3://, gs://, https://, hf://); plain paths and file:// are local."""
    return "://" in spec and not spec.startswith("file://")


def filesystem(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) for a local path or URL."""
    if url.startswith("file://"):
        url = url[len("file://"):]
    if not is_remote(url):
        return fsspec.filesystem("file"), os.path.abspath(os.path.expanduser(url))
    try:
        return fsspec.core.url_to_fs(url, use_listings_cache=False, skip_instance_cache=True)
    except ImportError as e:
        proto = url.split("://", 1)[0]
        extra = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs"}.get(proto)
        hint = f" (pip install {extra})" if extra else ""
        raise OSError(f"cannot open {url}: {e}{hint}") from None


def _url(fs: Any, path: str, remote: bool) -> str:
    if not remote:
        return path
    proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return path if "://" in path else f"{proto}://{path}"


def _version(info: dict[str, Any]) -> str:
    for key in ("ETag", "etag", "md5Hash", "crc32c", "checksum", "sha256"):
        if info.get(key):
            return f"{key.lower()}:{str(info[key]).strip(chr(34))}"
    lfs = info.get("lfs")
    if isinstance(lfs, dict) and lfs.get("sha256"):  # hf://: large files carry their content hash
        return f"sha256:{lfs['sha256']}"
    for key in ("mtime", "LastModified", "last_modified", "updated"):
        if info.get(key) is not None:
            return f"mtime:{info[key]}"
    return ""


def list_files(spec: str, keep: Callable[[str], bool]) -> list[FileInfo]:
    """The files `spec` names (a file, a directory searched recursively, or a glob), sorted, that `keep`
    accepts by name, with their sizes and versions. Raises FileNotFoundError when nothing matches."""
    remote = is_remote(spec)
    fs, path = filesystem(spec)
    infos: dict[str, dict[str, Any]]
    if any(ch in path for ch in "*?["):
        if remote:
            infos = fs.glob(path, detail=True)
        else:
            infos = {p: fs.info(p) for p in globlib.glob(path, recursive=True)}
        infos = {p: i for p, i in infos.items() if i.get("type") == "file"}
    elif fs.isdir(path):
        infos = _walk_local(path) if not remote else \
            {p: i for p, i in fs.find(path, detail=True).items() if i.get("type", "file") == "file"}
        base = path.rstrip("/")
        infos = {p: i for p, i in infos.items()
                 if not any(part.startswith((".", "_")) for part in p[len(base):].split("/") if part)}
    elif fs.isfile(path):
        infos = {path: fs.info(path)}
    else:
        raise FileNotFoundError(f"dataset {spec!r} does not exist: give a hub id, a directory, a file, a glob, or a URL")
    out = [FileInfo(_url(fs, p, remote), int(i.get("size") or 0), _version(i))
           for p, i in sorted(infos.items()) if keep(p.rsplit("/", 1)[-1])]
    return out


def _walk_local(root: str) -> dict[str, dict[str, Any]]:
    """The files under a local folder, following symlinks to files and folders (each folder once); a dangling
    symlink is refused, since a file the dataset names would be silently missing."""
    out: dict[str, dict[str, Any]] = {}
    dangling: list[str] = []
    seen: set[str] = set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # a symlink loop, or two links to one folder
            dirs[:] = []
            continue
        seen.add(real)
        for name in (*files, *dirs):
            p = os.path.join(folder, name)
            if os.path.islink(p) and not os.path.exists(p):
                dangling.append(p)
            elif name in files and os.path.isfile(p):
                st = os.stat(p)  # the target's size and mtime, as fsspec's info gives for a plain file
                out[p] = {"name": p, "size": st.st_size, "type": "file", "mtime": st.st_mtime}
    dangling = [p for p in dangling if not any(part.startswith((".", "_"))
                                               for part in p[len(root.rstrip("/")):].split("/") if part)]
    if dangling:
        shown = ", ".join(dangling[:3]) + (f" and {len(dangling) - 3} more" if len(dangling) > 3 else "")
        raise FileNotFoundError(f"dataset {root!r} holds symlinks to files that do not exist: {shown}. Restore "
                                "their targets, or delete the links")
    return out


def is_transient(e: BaseException) -> bool:
    """A read error worth retrying: a dropped or refused connection, a timeout, a server-side (5xx) error."""
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(e, (ConnectionError, TimeoutError)):
        return True
    name = type(e).__name__.lower()
    if any(w in name for w in ("timeout", "connection", "disconnect", "payload", "incompleteread", "protocol")):
        return True
    text = str(e).lower()
    if any(w in text for w in ("503", "500", "502", "504", "slow down", "service unavailable", "reset by peer",
                               "timed out", "internal error", "bad gateway")):
        return True
    return isinstance(e, OSError) and e.errno in (errno.ECONNRESET, errno.ECONNREFUSED, errno.ETIMEDOUT, errno.EPIPE)


def retrying(what: str, fn: Callable[[], T], retries: int = RETRIES) -> T:
    """fn(), retried with backoff on transient errors; the last error (or a persistent one) is raised."""
    delay = 0.5
    for attempt in range(retries + 1):
        try:
            return fn()
        except Exception as e:
            if attempt == retries or not is_transient(e):
                raise
            READ.retried()
            log.warning("%s: %s: %s; retry %d/%d in %.1fs", what, type(e).__name__, str(e)[:200], attempt + 1,
                        retries, delay)
            time.sleep(delay * (1 + 0.1 * random.random()))
            delay = min(delay * 2, 15.0)
    raise AssertionError("unreachable")


class RawFile:
    """A binary, seekable file on any store that counts the bytes it reads and survives dropped connections."""

    def __init__(self, url: str, *, block_size: int = 4 << 20, retries: int = RETRIES):
        self.url, self.block_size, self.retries = url, block_size, retries
        self.fs, self.path = filesystem(url)
        self.remote = is_remote(url)
        self.pos = 0
        self._f: Any = None
        self.closed = False

    def _open(self) -> Any:
        if self._f is None:
            def opener() -> Any:
                if self.remote:
                    f = self.fs.open(self.path, "rb", block_size=self.block_size, cache_type="readahead")
                else:
                    f = open(self.path, "rb", buffering=0)
                if self.pos:
                    f.seek(self.pos)
                return f
            self._f = retrying(f"opening {self.url}", opener, self.retries)
        return self._f

    def _reopen_after(self, e: Exception) -> None:
        try:
            self._f.close()
        except Exception:
            pass
        self._f = None

    def read(self, n: int = -1) -> bytes:
        def once() -> bytes:
            f = self._open()
            try:
                return f.read(n)
            except Exception as e:
                self._reopen_after(e)
                raise
        data = retrying(f"reading {self.url} at byte {self.pos:,}", once, self.retries)
        self.pos += len(data)
        READ.add(len(data))
        return data

    def readinto(self, buf: Any) -> int:
        data = self.read(len(buf))
        buf[:len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == 1:
            offset += self.pos
        elif whence == 2:
            offset += self.size()
        self.pos = offset
        if self._f is not None:
            self._f.seek(offset)
        return offset

    def tell(self) -> int:
        return self.pos

    def size(self) -> int:
        return int(retrying(f"stat {self.url}", lambda: self.fs.info(self.path)["size"], self.retries))

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        self.closed = True

    def __enter__(self) -> "RawFile":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def open_raw(url: str, *, block_size: int = 4 << 20, retries: int = RETRIES) -> RawFile:
    return RawFile(url, block_size=block_size, retries=retries)


def polars_options(uri: str) -> dict[str, str] | None:
    """Polars storage options for an object-store URI: the endpoint of S3-compatible stores
    (AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3), plain http allowed when the endpoint says http://."""
    if not uri.startswith(("s3://", "s3a://")):
        return None
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not endpoint:
        return None
    return {"aws_endpoint_url": endpoint, "aws_allow_http": str(endpoint.startswith("http://")).lower()}


def write_atomic(fs: Any, path: str, data: bytes) -> None:
    """Write a whole file at once: `write_local` (temporary name + fsync + rename) on local disk, one PUT on an
    object store."""
    if "file" not in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        fs.pipe_file(path, data)
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    write_local(path, data)


def write_local(path: str | os.PathLike, data: bytes, *, fsync: bool = True) -> None:
    """A whole local file at once: written to a temporary name beside `path` (flushed to disk when `fsync`), then
    renamed over it, so a reader sees the old file or the new one, never part of it."""
    with replacing(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())


@contextlib.contextmanager
def replacing(path: str | os.PathLike) -> Iterator[str]:
    """A temporary name beside local `path` (`.<name>.<random>.tmp`) to write a file or a folder into; when the
    block ends it is renamed to `path` in one step, and removed if the block raised. A folder that another
    process put at `path` meanwhile (the rename fails: it is not empty) is kept and this one dropped."""
    path = os.fspath(path)
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        try:
            os.replace(tmp, path)
        except OSError:
            if not (os.path.isdir(tmp) and os.path.isdir(path)):
                raise
            log.info("%s was written by another process meanwhile: keeping it", path)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.lexists(tmp):
            os.remove(tmp)
