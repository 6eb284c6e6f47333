"""Test helpers: the tiny in-process parts from saeray.tiny, plus config construction."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from saeray.tiny import SPECIAL, WORDS, corpus, make_model, make_sae, make_tokenizer, write_dataset  # noqa: F401


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
