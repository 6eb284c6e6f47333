"""`saeray stats`' summary: counts per threshold, and notes on what the columns mean and which thresholds the
run's token count cannot resolve."""

from __future__ import annotations

import polars as pl

from saeray.analysis.stats import summary, summary_notes


def _frame(n_tokens: int, n_active: list[int]) -> pl.DataFrame:
    return pl.DataFrame({"sae": "s", "group": "all", "n_tokens": n_tokens, "n_active": n_active,
                         "density": [a / n_tokens for a in n_active]})


def test_summary_counts_each_threshold():
    t = summary(_frame(10_000_000, [0, 0, 5, 1_000, 200_000, 2_000_000])).row(0, named=True)
    assert (t["tokens"], t["features"], t["alive"], t["dead"]) == (10_000_000, 6, 4, 2)
    assert (t["dense_gt_1pct"], t["ultra_dense_gt_10pct"], t["ultra_rare_lt_1e-6"]) == (2, 1, 1)


def test_notes_explain_the_columns_and_say_what_few_tokens_cannot_show():
    big = summary_notes(summary(_frame(10_000_000, [0, 5])))
    assert len(big) == 2 and all(c in " ".join(big) for c in summary(_frame(10, [1])).columns[2:])
    small = " ".join(summary_notes(summary(_frame(8_192, [0, 1, 3_000]))))
    assert "1e-6 needs more than 1,000,000 tokens" in small and "8,192 tokens" in small
    assert "100 tokens" not in small
    tiny = " ".join(summary_notes(summary(_frame(50, [0, 1]))))
    assert "dense_gt_1pct needs at least 100 tokens" in tiny
    assert len(summary_notes(summary(_frame(1_000_001, [1])))) == 2  # 1/1,000,001 < 1e-6: observable
