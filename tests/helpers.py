"""Test helpers: the tiny in-process parts from saeray.assets.tiny, plus config construction."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from saeray.assets.tiny import SPECIAL, WORDS, corpus, make_model, make_sae, make_tokenizer, write_dataset  # noqa: F401


def base_config(model: Path, saes: list[dict], data: Path, out: Path, **over: Any) -> dict:
    cfg = {
        "model": {"name": str(model), "dtype": "float32"},
        "saes": saes,
        "data": {"dataset": str(data), "text_column": "text"},
        "tokens": {"batch_tokens": 256},
        "output": {"dir": str(out)},
        "workers": 1,
    }
    for key, value in over.items():
        section, _, field = key.partition("__")
        if field:
            cfg.setdefault(section, {})[field] = value
        else:
            cfg[section] = value
    return cfg


def canonical_doc_ids(data: Path) -> list[int]:
    """doc_id of every row of a folder of Parquet files, in canonical order: file index << 32 | row in the file."""
    import pyarrow.parquet as pq

    files = sorted(p for p in Path(data).rglob("*.parquet"))
    return [(i << 32) | r for i, f in enumerate(files) for r in range(pq.ParquetFile(f).metadata.num_rows)]


def kill_worker_of(run_dir: Path, unit: str, killed: list[int], timeout_s: float = 300) -> None:
    """SIGKILL the first worker found holding `unit` (its attempt folder RUN/_tmp/<unit>-*), mid-unit;
    append its pid to `killed`. Meant for a thread beside a run."""
    import os
    import signal
    import time

    deadline = time.time() + timeout_s
    while time.time() < deadline and not killed:
        for pid_file in (Path(run_dir) / "_tmp").glob(f"{unit}-*/worker.pid"):
            try:
                pid = int(pid_file.read_text())
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except (OSError, ValueError):
                continue
            return
        time.sleep(0.005)


def reference_run(tiny: dict, root: Path, n_docs: int, n_units: int, seed: int) -> dict:
    """One file of `n_docs` documents of 40-80 words in `n_units` units (64-token batches: a unit takes a
    while), run in one process: {'raw': its config, 'ref': its run directory}."""
    from saeray.engine import config
    from saeray.executors import run

    data = write_dataset(root / "data", corpus(n_docs, seed=seed, min_words=40, max_words=80), n_files=1)
    raw = base_config(tiny["llama"], [{"name": "a", "path": str(tiny["sae_standard"])}], data, root / "ref",
                      tokens__batch_tokens=64, data__shards=n_units)
    run(config.from_dict(raw), executor="local")
    return {"raw": raw, "ref": root / "ref"}
