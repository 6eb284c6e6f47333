"""The run directory: manifest, shard outputs, and the commit protocol.

A shard's files are written under `RUN/_tmp/<shard>-<attempt>/`, moved into place by
rename, and the completion marker `completions/NNNNN.json` is written last (itself by
rename). A shard without a marker does not exist: readers list markers, and a rerun
deletes whatever an unfinished attempt left and does the shard again.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
TMP = "_tmp"

ACTIVATIONS_SCHEMA = pa.schema([
    ("sae", pa.string()), ("group", pa.string()), ("doc_id", pa.int64()), ("pos", pa.int32()),
    ("feature", pa.int32()), ("value", pa.float32()),
])


class RunDirError(ValueError):
    """The run directory belongs to another run, or is not a saeray run directory."""


def fingerprint(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def shard_name(index: int) -> str:
    return f"{index:05d}"


class RunDir:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    # ---- layout --------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    def marker(self, shard: int) -> Path:
        return self.root / "completions" / f"{shard_name(shard)}.json"

    def final_paths(self, shard: int) -> dict[str, Path]:
        s = shard_name(shard)
        return {"activations": self.root / "activations" / f"shard={s}",
                "docs": self.root / "docs" / f"shard={s}",
                "stats": self.root / "stats" / f"{s}.parquet",
                "recon": self.root / "recon" / f"{s}.parquet"}

    # ---- manifest ------------------------------------------------------------------
    def read_manifest(self) -> dict[str, Any]:
        if not self.manifest_path.is_file():
            raise RunDirError(f"{self.root} is not a saeray run directory (no {MANIFEST}): run `saeray run CONFIG --out {self.root}` first")
        return json.loads(self.manifest_path.read_text())

    def prepare(self, manifest: dict[str, Any], overwrite: bool) -> int:
        """Create or reopen the run directory for `manifest`; return the committed shard count.

        Refuses a directory that holds another run (another fingerprint) or foreign
        files, unless `overwrite`.
        """
        fp = manifest["fingerprint"]
        if self.root.exists() and any(self.root.iterdir()):
            if not self.manifest_path.is_file():
                if not overwrite:
                    raise RunDirError(f"{self.root} is not empty and is not a saeray run directory: "
                                      "choose another --out, or pass --overwrite to replace its contents")
                self._clear()
            else:
                old = json.loads(self.manifest_path.read_text())
                if old.get("fingerprint") != fp:
                    if not overwrite:
                        raise RunDirError(
                            f"{self.root} holds a run with fingerprint {old.get('fingerprint')}, this config has {fp} "
                            f"(model, SAEs, data or token settings differ): use another --out, or --overwrite to replace it")
                    self._clear()
        self.root.mkdir(parents=True, exist_ok=True)
        for sub in ("completions", "stats", "docs", "activations", "recon"):
            (self.root / sub).mkdir(exist_ok=True)
        if not self.manifest_path.is_file():
            manifest = {**manifest, "created_at": dt.datetime.now(dt.timezone.utc).isoformat()}
            write_json_atomic(self.manifest_path, manifest)
        self.clean_tmp()
        return len(self.committed())

    def _clear(self) -> None:
        log.warning("overwriting %s", self.root)
        for child in self.root.iterdir():
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()

    def clean_tmp(self) -> None:
        """Remove what dead attempts left: temp dirs and outputs of shards without a marker."""
        shutil.rmtree(self.root / TMP, ignore_errors=True)
        done = self.committed()
        for kind in ("activations", "docs"):
            for d in (self.root / kind).glob("shard=*"):
                if int(d.name.split("=")[1]) not in done:
                    shutil.rmtree(d, ignore_errors=True)
        for kind in ("stats", "recon"):
            for f in (self.root / kind).glob("*.parquet"):
                if f.stem.isdigit() and int(f.stem) not in done:
                    f.unlink(missing_ok=True)
        for f in (self.root / "completions").glob(".*.tmp"):
            f.unlink(missing_ok=True)

    # ---- shards ----------------------------------------------------------------------
    def committed(self) -> set[int]:
        d = self.root / "completions"
        return {int(p.stem) for p in d.glob("*.json") if p.stem.isdigit()} if d.is_dir() else set()

    def completion(self, shard: int) -> dict[str, Any]:
        return json.loads(self.marker(shard).read_text())

    def new_attempt(self, shard: int) -> Path:
        tmp = self.root / TMP / f"{shard_name(shard)}-{uuid.uuid4().hex[:8]}"
        (tmp / "activations").mkdir(parents=True)
        (tmp / "docs").mkdir()
        (tmp / "worker.pid").write_text(str(os.getpid()))
        return tmp

    def commit(self, shard: int, tmp: Path, summary: dict[str, Any]) -> None:
        """Move an attempt's files into place, then write the marker: the commit point."""
        if self.marker(shard).exists():
            log.warning("shard %d was already committed by another attempt; dropping this one", shard)
            shutil.rmtree(tmp, ignore_errors=True)
            return
        final = self.final_paths(shard)
        for kind in ("activations", "docs"):
            shutil.rmtree(final[kind], ignore_errors=True)
            if (tmp / kind).is_dir() and any((tmp / kind).iterdir()):
                os.replace(tmp / kind, final[kind])
        os.replace(tmp / "stats.parquet", final["stats"])
        if (tmp / "recon.parquet").is_file():
            os.replace(tmp / "recon.parquet", final["recon"])
        write_json_atomic(self.marker(shard), summary)
        shutil.rmtree(tmp, ignore_errors=True)


def write_table(path: Path, table: pa.Table) -> None:
    pq.write_table(table, path, compression="zstd")
