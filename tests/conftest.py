from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from helpers import canonical_doc_ids, corpus, make_model, make_sae, reference_run, write_dataset  # noqa: E402


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny Llama and Gemma3 models, SAEs of three architectures, and a 3-file dataset."""
    root = tmp_path_factory.mktemp("tiny")
    out = {
        "llama": make_model(root / "llama", "llama"),
        "gemma3": make_model(root / "gemma3", "gemma3", seed=1),
    }
    for arch, hook in [("standard", "blocks.1.hook_resid_post"), ("topk", "blocks.2.hook_resid_pre"),
                       ("jumprelu", "blocks.1.hook_resid_pre")]:
        out[f"sae_{arch}"] = make_sae(root / f"sae_{arch}", arch, 64, hook, seed=len(arch))
    out["sae_mlp"] = make_sae(root / "sae_mlp", "standard", 64, "blocks.2.hook_mlp_out", seed=7)
    docs = corpus(60, seed=5)
    out["docs"] = docs  # type: ignore[assignment]
    out["data"] = write_dataset(root / "data", docs, 3, {"label": [i % 3 == 0 for i in range(len(docs))],
                                                        "kind": ["code" if i % 2 else "prose" for i in range(len(docs))]})
    out["doc_ids"] = canonical_doc_ids(out["data"])  # type: ignore[assignment]  # file index << 32 | row
    return out


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the session (4 logical CPUs so 3 workers can run at once)."""
    import ray

    if ray.is_initialized():  # an earlier test (e.g. the demo) started its own: replace it
        ray.shutdown()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "RAY_AUTH_MODE": "disabled"}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def seven_units(tiny, tmp_path_factory) -> dict:
    """7 units of 16 documents and their reference: for tests that interrupt a run mid-way (signals, drivers,
    raylets)."""
    return reference_run(tiny, tmp_path_factory.mktemp("seven"), 112, 7, seed=9)
