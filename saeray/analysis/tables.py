"""What the analyses' output tables share: the SAE check across runs, Neuronpedia links, Parquet with metadata."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl

from ..engine.run import open_run
from ..engine.storage import write_local
from ..engine.store import parquet_bytes


def check_same_saes(run_a: str | Path, run_b: str | Path) -> None:
    """Refuse to compare runs whose SAEs (names and weight/config digests) differ."""
    def saes(run: str | Path) -> dict[str, str]:
        return {s["name"]: s["digest"] for s in open_run(run).read_manifest()["resolved"]["saes"]}

    sa, sb = saes(run_a), saes(run_b)
    if sa != sb:
        diffs = [f"{n}: {sa.get(n, 'absent')[:12]} vs {sb.get(n, 'absent')[:12]}"
                 for n in sorted(set(sa) | set(sb)) if sa.get(n) != sb.get(n)]
        raise ValueError(f"runs {run_a} and {run_b} used different SAEs ({'; '.join(diffs)}; digests of config and "
                         "weights): features are only comparable under the same SAE. Extract both runs with the same "
                         "`saes:` entries")


def with_neuronpedia(frame: pl.DataFrame, run: str | Path) -> pl.DataFrame:
    """Add column `neuronpedia` (feature page URL) where the SAE config names a neuronpedia_id."""
    ids = {s["name"]: s.get("neuronpedia_id") for s in open_run(run).read_manifest()["resolved"]["saes"]}
    prefix = pl.DataFrame({"sae": list(ids), "_np": [f"https://www.neuronpedia.org/{v}/" if v else None
                                                    for v in ids.values()]}, schema={"sae": pl.String, "_np": pl.String})
    return (frame.join(prefix, on="sae", how="left")
            .with_columns((pl.col("_np") + pl.col("feature").cast(pl.String)).alias("neuronpedia")).drop("_np"))


def write_parquet_with_meta(frame: pl.DataFrame, path: Path, key: str, meta: dict[str, Any]) -> None:
    """Write local `path` atomically: `frame` with `meta` as JSON under Parquet key-value metadata `key`."""
    write_local(path, parquet_bytes(frame.to_arrow(), {key: meta}))
