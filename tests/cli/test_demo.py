"""`saeray demo`: its outputs are real (recomputed from its own activation files)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from saeray.analysis.stats import features, scan_activations, scan_docs
from saeray.analysis.top import top_examples
from saeray.cli import demo


@pytest.fixture(autouse=True)
def _own_ray():
    """The demo starts Ray in this process; shut it down so later tests start their own."""
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()


def _check_run(run):
    rows = scan_activations(run).collect()
    docs = scan_docs(run).collect()
    from saeray.engine.store import RunDir

    counted = sum(int(v) for i in RunDir(run).committed() for v in RunDir(run).completion(i)["counted_tokens"].values())
    feats = features(run).collect().sort("feature")
    assert feats["n_tokens"].max() == counted
    # statistics recomputed from the activation rows
    by = rows.group_by("feature").agg(pl.len().alias("n"), pl.col("value").cast(pl.Float64).sum().alias("s"),
                                      pl.col("value").max().alias("mx"))
    joined = feats.join(by, on="feature", how="left").fill_null(0)
    np.testing.assert_array_equal(joined["n_active"].to_numpy(), joined["n"].to_numpy())
    np.testing.assert_allclose(joined["mean"].to_numpy(), joined["s"].to_numpy() / counted, rtol=1e-9, atol=1e-12)
    live = joined.filter(pl.col("n") > 0)
    np.testing.assert_array_equal(live["max"].to_numpy(), live["mx"].to_numpy())
    # top examples are the documents where the feature is highest
    f = int(live.sort("n", descending=True)["feature"][0])
    ex = top_examples(run, [f], k=3)
    best = (rows.filter(pl.col("feature") == f).group_by("doc_id").agg(pl.col("value").max())
            .sort(["value", "doc_id"], descending=[True, False]).head(3))
    assert ex["doc_id"].to_list() == best["doc_id"].to_list()
    assert docs.height > 0


WARNING = re.compile(r"\b\w*Warning\b|warnings\.warn|missing from font")
"""What a Python warning looks like in a log (UserWarning: ..., FutureWarning, matplotlib's glyph warnings)."""


def _demo_subprocess(out: Path, *extra: str) -> str:
    """`saeray demo` as a user runs it, in its own process (Ray workers' output included); its output."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.run([sys.executable, "-m", "saeray.cli", "demo", "--out", str(out), *extra], env=env,
                          capture_output=True, text=True, timeout=3600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    return log


def test_warning_pattern_sees_python_warnings():
    log = subprocess.run([sys.executable, "-c", "import warnings; warnings.warn('x')"], capture_output=True,
                         text=True).stderr
    assert WARNING.search(log) and not WARNING.search("== statistics (prose)\nfeature 12 #1 max 3.2")


def test_tiny_demo_prints_no_warnings(tmp_path):
    log = _demo_subprocess(tmp_path / "d", "--tiny")
    assert "== report" in log
    assert not WARNING.search(log), [line for line in log.splitlines() if WARNING.search(line)]


def test_tiny_demo_outputs_are_real(tmp_path, capsys):
    assert demo.main(tmp_path / "d", use_tiny=True) == 0
    out = capsys.readouterr().out
    assert "diff-prose-vs-code" in out
    for kind in ("prose", "code"):
        _check_run(tmp_path / "d" / f"run-{kind}")
    assert (tmp_path / "d" / "diff-prose-vs-code" / "diff.parquet").is_file()
    page = tmp_path / "d" / "report" / "index.html"
    assert page.is_file() and str(page) in out
    assert list((tmp_path / "d" / "report" / "figures").glob("*.png"))


def test_tiny_stats_only_demo_gives_top_diff_and_cards(tmp_path, capsys):
    """The demo's two conditions without activation rows (output.docs: examples): top, diff with significance and
    a report with feature cards come from the partials, and equal the row runs' beside them."""
    root = tmp_path / "d"
    assert demo.main(root, use_tiny=True) == 0
    capsys.readouterr()
    assert demo.main(root, use_tiny=True, stats_only=True) == 0
    out = capsys.readouterr().out
    assert re.search(r"on disk: run-prose-stats [\d.]+ MB, run-code-stats [\d.]+ MB; run-prose [\d.]+ MB", out)
    for kind in ("prose", "code"):
        assert not list((root / f"run-{kind}-stats" / "activations").rglob("*.parquet"))
        assert demo.disk_bytes(root / f"run-{kind}-stats") < demo.disk_bytes(root / f"run-{kind}")
    rows = pl.read_parquet(root / "diff-prose-vs-code" / "diff.parquet")
    stats_only = pl.read_parquet(root / "diff-prose-vs-code-stats" / "diff.parquet")
    assert stats_only["q"].null_count() == 0 and stats_only["p"].n_unique() > 50  # (the tiny model: no q < 0.05)
    for c in ("t", "p", "q", "class", "d_density"):
        a, b = rows[c].fill_null(np.nan), stats_only[c].fill_null(np.nan)
        assert a.equals(b) if c == "class" else np.allclose(a.to_numpy(), b.to_numpy(), rtol=1e-9, atol=1e-12, equal_nan=True)
    feats = list(range(40))
    assert top_examples(root / "run-code-stats", feats, k=5).equals(top_examples(root / "run-code", feats, k=5))
    page = (root / "report-stats" / "index.html").read_text()
    assert page.count('class="card"') >= 4 and page.count('class="ctx"') >= 4
    assert "no contexts" not in page


@pytest.mark.slow
@pytest.mark.skipif(not (demo.DEFAULT_SAE / "cfg.json").is_file(), reason="no shipped SAE in this checkout")
def test_embedded_demo_outputs_are_real_and_it_prints_no_warnings(tmp_path):
    log = _demo_subprocess(tmp_path / "d")
    assert not WARNING.search(log), [line for line in log.splitlines() if WARNING.search(line)]
    for kind in ("prose", "code"):
        _check_run(tmp_path / "d" / f"run-{kind}")
        manifest = (tmp_path / "d" / f"run-{kind}" / "manifest.json").read_text()
        assert "gemma-3-270m" in manifest


def test_outputs_of_an_earlier_demo_with_another_corpus_are_removed(tmp_path, monkeypatch):
    from saeray.assets import corpus

    (tmp_path / "run-prose").mkdir()
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a folder `saeray demo` made"):
        demo._clear_stale(tmp_path, use_tiny=True)  # no stamp: not the demo's folder, nothing is deleted
    assert (tmp_path / "run-prose").is_dir() and (tmp_path / "notes.txt").is_file()
    (tmp_path / "run-prose").rmdir()
    demo._clear_stale(tmp_path, use_tiny=True)  # stamps the folder as the demo's
    (tmp_path / "run-prose").mkdir()
    demo._clear_stale(tmp_path, use_tiny=True)  # same stamp: reused
    assert (tmp_path / "run-prose").is_dir()
    monkeypatch.setattr(corpus, "VERSION", corpus.VERSION + 1)
    demo._clear_stale(tmp_path, use_tiny=True)
    assert not (tmp_path / "run-prose").exists() and (tmp_path / "notes.txt").is_file()
