"""A run directory opened for reading (`open_run`): what analyses, reports and tools read a run through."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .store import COMPLETE, RunDir


@dataclass(frozen=True)
class Completeness:
    """How much of its run a run directory holds."""

    complete: bool
    units: int
    """Committed units."""
    planned: int | None
    """Units of the plan, where the plan lists them (Parquet); line files' units are known once read."""
    tokens: int
    """Text tokens of the committed units' documents."""
    budget: int | None
    """data.max_tokens."""

    def describe(self) -> str:
        """One line: what is committed and how to finish the run ('' for a complete run)."""
        if self.complete:
            return ""
        of_units = f" of {self.planned:,}" if self.planned is not None else ""
        tokens = (f"{self.tokens:,} of a {self.budget:,}-token budget" if self.budget is not None
                  else f"{self.tokens:,} tokens")
        return (f"partial run: {self.units:,}{of_units} units committed, {tokens}; its figures cover only these. "
                "Rerun `saeray run` with the same config to finish it")

    def meta(self) -> dict[str, Any]:
        """What output metadata records about the run's completeness."""
        return {"partial": not self.complete, **{k: v for k, v in asdict(self).items() if k != "complete"}}


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
            self._markers = self.read_markers(sorted(RunDir.committed(self)))
        return self._markers

    def committed(self) -> set[int]:
        return set(self.completions())

    def completion(self, shard: int) -> dict[str, Any]:
        return self.completions()[shard] if shard in self.completions() else RunDir.completion(self, shard)

    def completeness(self) -> Completeness:
        """Complete when the driver recorded that the run finished (complete.json), when every planned unit is
        committed, or when the committed units reach the token budget."""
        manifest = self.read_manifest()
        markers = self.completions()
        tokens = sum(int(m.get("tokens", 0)) for m in markers.values())
        budget = manifest.get("config", {}).get("data", {}).get("max_tokens")
        planned = manifest.get("n_units")
        complete = (self.exists(COMPLETE) or (planned is not None and len(markers) >= planned)
                    or (budget is not None and tokens >= budget))
        return Completeness(bool(complete), len(markers), planned, tokens, budget)

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
