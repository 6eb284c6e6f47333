"""One driver per run directory: `driver.lock` in the run directory says who holds it.

A second `saeray run` on a run directory in use refuses with the holder's host, pid and start time;
a holder that died (SIGKILL, a lost head node) does not block a rerun.

- Local disk (and shared filesystems with working locks: NFS v4, Lustre, CephFS): an exclusive
  `flock` on `driver.lock`, held for the whole run. The kernel releases it when the process dies,
  however it dies, so a dead holder never blocks. The file is never deleted (a waiting opener could
  otherwise lock a deleted inode while a third driver creates a new file); its JSON body names the
  holder and is emptied on release.
- Object stores (no locks there): `driver.lock` is an object with the holder, rewritten every
  BEAT_S seconds. A driver takes it when there is none, when its heartbeat is older than STALE_S,
  or when it was written on this host by a process that is gone; it writes its own and reads it back
  after SETTLE_S to see it won (two drivers starting within a second of each other: one of them
  refuses). Deleted on release.
"""

from __future__ import annotations

import datetime as dt
import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from ..engine.store import LOCK, MANIFEST, RunDir, RunDirError, pid_alive

log = logging.getLogger(__name__)

BEAT_S = 30.0
"""Object stores: the holder rewrites the lock this often."""
STALE_S = 120.0
"""Object stores: a lock whose heartbeat is older than this was left by a driver that is gone."""
SETTLE_S = 1.0
"""Object stores: how long a driver waits before reading its lock back."""


class RunLocked(RunDirError):
    """Another live driver holds the run directory."""


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _age_s(stamp: str) -> float:
    return (dt.datetime.now(dt.timezone.utc) - dt.datetime.fromisoformat(stamp)).total_seconds()


def _refusal(rd: RunDir, holder: dict[str, Any]) -> RunLocked:
    return RunLocked(f"{rd.root} is in use by another saeray run (host {holder.get('host', '?')}, pid "
                     f"{holder.get('pid', '?')}, since {holder.get('since', '?')}): wait for it to end, or stop it "
                     f"(kill {holder.get('pid', 'PID')} on {holder.get('host', 'its host')}) and rerun; a holder that "
                     "died does not block a rerun")


class DriverLock:
    """Held by the driver from before the run directory is prepared until the run ends (a context manager)."""

    def __init__(self, rd: RunDir):
        self.rd = rd
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "since": _now(), "token": uuid.uuid4().hex}
        self._fd: int | None = None
        self._created = False
        self._beat: threading.Thread | None = None
        self._stop = threading.Event()

    def __enter__(self) -> "DriverLock":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    # ---- local ---------------------------------------------------------------------------------
    def _acquire_local(self) -> None:
        path = self.rd.root / LOCK
        self._created = not self.rd.root.exists()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunDirError(_uncreatable(self.rd.root, e)) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = json.loads(os.pread(fd, 1 << 16, 0) or b"{}")
            except ValueError:
                holder = {}
            os.close(fd)
            raise _refusal(self.rd, holder) from None
        except OSError as e:  # a filesystem without locks
            os.close(fd)
            raise RunDirError(f"cannot lock {path} ({e}): put output.dir on a filesystem with file locks, "
                              "or in an object store (s3://...)") from None
        body = json.dumps(self.me).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, body, 0)
        os.fsync(fd)
        self._fd = fd

    # ---- object stores -------------------------------------------------------------------------
    def _holder_remote(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.rd.read_bytes(LOCK)) if self.rd.exists(LOCK) else None
        except (OSError, ValueError):
            return None

    def _stale(self, holder: dict[str, Any]) -> bool:
        try:
            if _age_s(holder.get("heartbeat", holder["since"])) > STALE_S:
                return True
        except (KeyError, ValueError, TypeError):
            return True
        return holder.get("host") == self.me["host"] and not pid_alive(int(holder.get("pid", -1)))

    def _write_remote(self) -> None:
        self.rd.write_bytes(LOCK, json.dumps({**self.me, "heartbeat": _now()}).encode())

    def _acquire_remote(self) -> None:
        holder = self._holder_remote()
        if holder is not None and not self._stale(holder):
            raise _refusal(self.rd, holder)
        if holder is not None:
            log.warning("%s: taking over the run directory from a driver that is gone (host %s, pid %s, last "
                        "heartbeat %s)", self.rd.root, holder.get("host"), holder.get("pid"), holder.get("heartbeat"))
        self._write_remote()
        time.sleep(SETTLE_S)
        now = self._holder_remote()
        if now is None or now.get("token") != self.me["token"]:
            raise _refusal(self.rd, now or {})
        self._beat = threading.Thread(target=self._heartbeat, name="saeray-lock", daemon=True)
        self._beat.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(BEAT_S):
            try:
                held = self._holder_remote()
                if held is not None and held.get("token") != self.me["token"]:
                    log.error("%s: another driver took the run directory over (host %s, pid %s)", self.rd.root,
                              held.get("host"), held.get("pid"))
                    return
                self._write_remote()
            except Exception as e:  # noqa: BLE001 - a missed beat is retried; STALE_S allows several
                log.warning("%s: lock heartbeat failed: %s", self.rd.root, e)

    # ---- both ----------------------------------------------------------------------------------
    def acquire(self) -> None:
        if self.rd.remote:
            self._acquire_remote()
        else:
            self._acquire_local()

    def release(self) -> None:
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)
                if not self.rd.exists(MANIFEST):  # the run never began (a config or plan error): leave no trace
                    (self.rd.root / LOCK).unlink(missing_ok=True)
                    if self._created:
                        _rmdir_if_empty(self.rd.root)
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
                os.close(self._fd)
                self._fd = None
        if self._beat is not None:
            self._stop.set()
            self._beat.join(timeout=5)
            self._beat = None
            try:
                held = self._holder_remote()
                if held is not None and held.get("token") == self.me["token"]:
                    self.rd.fs.rm_file(self.rd._key(LOCK))  # one DELETE of the key
            except Exception as e:  # noqa: BLE001 - a lock left behind goes stale in STALE_S
                log.warning("%s: could not remove %s: %s", self.rd.root, LOCK, e)


def _uncreatable(root: Any, e: OSError) -> str:
    """Why the run directory `root` cannot be made or written, and what to do."""
    why = {errno.EACCES: "permission denied", errno.EPERM: "permission denied", errno.EROFS: "a read-only filesystem",
           errno.ENOTDIR: "a part of the path is a file, not a folder", errno.ENOSPC: "the disk is full"}
    reason = why.get(e.errno or 0, e.strerror or type(e).__name__)
    where = f" at {e.filename}" if getattr(e, "filename", None) and str(e.filename) != str(root) else ""
    return (f"cannot create the run directory {root}: {reason}{where}. Set output.dir (or --out) to a folder "
            "you can write")


def _rmdir_if_empty(path: Any) -> None:
    try:
        os.rmdir(path)
    except OSError:
        pass
