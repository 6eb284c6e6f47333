"""A run directory opened for reading (`open_run`): what analyses, reports and tools read a run through."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .store import RunDir


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
