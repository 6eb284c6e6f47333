"""Readable log axes (labels at powers of ten only, in PNG and HTML figures), histogram bars that span their
log-spaced bins, and tokens drawn visibly in logit tables and labels."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from saeray.report import interactive as iv
from saeray.report.data import Card, decade_limits, token_label, visible_logits
from saeray.report.png import log_axis


def _labels(values_x: np.ndarray, values_y: np.ndarray) -> tuple[list[str], list[str], list[str], object]:
    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.scatter(values_x, values_y)
    log_axis(ax.xaxis, values_x)
    log_axis(ax.yaxis, values_y)
    fig.canvas.draw()
    lo, hi = ax.get_xlim()
    major = [t for t in ax.xaxis.get_major_ticks() if lo <= t.get_loc() <= hi and t.label1.get_text()]
    minor = [t.label1.get_text() for t in ax.xaxis.get_minor_ticks() if lo <= t.get_loc() <= hi]
    ylo, yhi = ax.get_ylim()
    ymajor = [t.label1.get_text() for t in ax.yaxis.get_major_ticks() if ylo <= t.get_loc() <= yhi]
    return [t.label1.get_text() for t in major], minor, ymajor, (fig, [t.label1 for t in major])


@pytest.mark.parametrize("lo, hi", [(0.4, 0.6), (1e-4, 5e-4), (2e-3, 0.9), (1e-9, 3.0)])
def test_png_log_axes_label_only_powers_of_ten(lo, hi):
    x = np.geomspace(lo, hi, 30)
    major, minor, ymajor, (fig, texts) = _labels(x, x[::-1] * 7)
    assert len(major) >= 2 and len(ymajor) >= 2, (major, ymajor)  # the range holds at least two labelled decades
    assert all(m == "" for m in minor), minor  # 2..9 x 10^k ticks unlabelled
    for label in major + ymajor:
        assert label.startswith("$\\mathdefault{10^{") or label in ("$\\mathdefault{1}$", "$\\mathdefault{10}$"), label
    boxes = [t.get_window_extent(fig.canvas.get_renderer()) for t in texts]  # no two labels overlap
    assert all(a.x1 < b.x0 for a, b in zip(boxes, boxes[1:]))


def test_decade_limits_widen_narrow_ranges_only():
    assert decade_limits(np.array([0.4, 0.6])) == (0.1, 1.0)
    assert decade_limits(np.array([1e-4, 5e-4])) == pytest.approx((1e-4, 1e-3))
    assert decade_limits(np.array([3.0])) == (1.0, 10.0)
    assert decade_limits(np.array([1e-3, 0.5])) is None  # 10^-3, 10^-2, 10^-1 inside already
    assert decade_limits(np.array([0.0, -1.0])) is None


def test_plotly_log_axes_label_decades_and_bars_span_their_bins():
    edges = np.geomspace(1e-3, 0.5, 21)
    counts = np.arange(1, 21)
    card = Card(sae="s", group="all", feature=1, run="r", why="t", stats={}, hist_edges=edges, hist_counts=counts)
    fig = iv.activation_histogram(card)
    bar = fig.data[0]
    np.testing.assert_allclose(bar.x, edges[:-1])  # left edges ...
    np.testing.assert_allclose(np.asarray(bar.x) + np.asarray(bar.width), edges[1:])  # ... + width = right edges
    assert bar.offset == 0 and fig.layout.bargap == 0
    for axis in (fig.layout.xaxis, fig.layout.yaxis):
        assert axis.type == "log" and axis.dtick == 1 and axis.minor.dtick == "D1"
    narrow = pl.DataFrame({"sae": "s", "group": "all", "feature": [0, 1, 2], "density": [0.4, 0.5, 0.6],
                           "mean": [0.02, 0.03, 0.04], "max": [1.0, 1.0, 1.0], "n_active": [4, 5, 6]})
    fig = iv.mean_vs_density(narrow)
    assert fig.layout.xaxis.dtick == 1 and tuple(fig.layout.xaxis.range) == (-1.0, 0.0)
    assert tuple(fig.layout.yaxis.range) == (-2.0, -1.0)


def test_tokens_drawn_visibly():
    assert token_label(" the") == "\u2423the"
    assert token_label("\n\n") == "\u23ce\u23ce" and token_label("\t") == "\u21e5"
    assert token_label(" ") == "\u2423" and token_label("") == "\u2205"
    assert token_label(None, 17) == "[17]"
    assert token_label("a\u200bb") == "a\\u200bb" and token_label("\x0c") == "\\x0c"
    assert token_label("日本") == "日本"


def test_logit_tables_leave_out_special_and_unused_tokens():
    rows = [("promoted", r, i, t) for r, (i, t) in enumerate([(7, "<unused122>"), (2, "<bos>"), (11, " x"),
                                                               (12, "y"), (13, "<|reserved_special_token_3|>")])]
    rows += [("suppressed", r, i, t) for r, (i, t) in enumerate([(20, "z"), (21, None), (1, "<eos>")])]
    frame = pl.DataFrame(rows, schema={"direction": pl.String, "rank": pl.Int32, "token_id": pl.Int32,
                                       "token": pl.String}, orient="row").with_columns(pl.lit(3, pl.Int32).alias("feature"))
    out = visible_logits(frame, hidden={1, 2}, k=8)
    promoted = out.filter(pl.col("direction") == "promoted").sort("rank")
    assert promoted["token"].to_list() == [" x", "y"] and promoted["rank"].to_list() == [0, 1]
    assert out.filter(pl.col("direction") == "suppressed")["token_id"].to_list() == [20, 21]
    assert visible_logits(frame, hidden=set(), k=1).height == 2
