"""PNG figures for papers and slides, drawn with matplotlib's object API (no pyplot, no display).

Each function writes one file (to a temporary name, then renamed) and returns its path.
Data strings are passed through `_text` so matplotlib's mathtext never parses them, and every figure is
drawn with a fallback chain of wide-coverage fonts (`fonts.py`): tokens in any script draw without warnings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatterSciNotation, LogLocator, MaxNLocator, NullFormatter

from ..analysis.diff import CLASSES, METRICS
from . import fonts
from .data import Card, decade_limits, pairs, series, token_label
from .style import (
    MARKERS,
    METRIC_LABELS,
    METRIC_TITLES,
    NEG_COLOR,
    POS_COLOR,
    SEQUENTIAL,
    SHORT_LABELS,
    color,
    pair_label,
)

DPI = 150


def _text(s: str, limit: int = 40) -> str:
    """Data text safe for matplotlib: '$' escaped (no mathtext), newlines and tabs visible, long strings cut."""
    s = s.replace("\n", "\u23ce").replace("\t", "\u21e5")
    s = s if len(s) <= limit else s[: limit - 1] + "\u2026"
    return fonts.drawable(s).replace("$", r"\$")


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=DPI, bbox_inches="tight", facecolor="white")
    tmp.replace(path)
    return path


def _axes(fig: Figure, *args: int, **kw: object) -> np.ndarray:
    axes = np.atleast_1d(fig.subplots(*args, **kw))
    for ax in axes.ravel():
        ax.grid(True, color="#e5e5e5", linewidth=0.6)
        ax.set_axisbelow(True)
        ax.spines[["top", "right"]].set_visible(False)
    return axes


def log_axis(axis: Any, values: np.ndarray | None = None) -> None:
    """A log-scaled x or y axis labelled only at powers of ten (10^k); the 2..9 x 10^k ticks drawn unlabelled.
    (matplotlib's default labels minor ticks on a narrow range, and 1-2-5 labels crowd: '0.00010.0002'.)"""
    axis.axes.set_xscale("log") if axis is axis.axes.xaxis else axis.axes.set_yscale("log")
    axis.set_major_locator(LogLocator(base=10, subs=(1.0,), numticks=8))
    axis.set_major_formatter(LogFormatterSciNotation(base=10, labelOnlyBase=True))
    axis.set_minor_locator(LogLocator(base=10, subs=np.arange(2, 10) / 1.0, numticks=12))
    axis.set_minor_formatter(NullFormatter())
    limits = decade_limits(values) if values is not None else None
    if limits is not None:
        (axis.axes.set_xlim if axis is axis.axes.xaxis else axis.axes.set_ylim)(*limits)


def _log_axes(ax: Any, x: np.ndarray | None = None, y: np.ndarray | None = None) -> None:
    """Log scale on both axes, labelled at powers of ten (`log_axis`)."""
    log_axis(ax.xaxis, x)
    log_axis(ax.yaxis, y)


def _step(ax: Any, values: np.ndarray, bins: np.ndarray, i: int, label: str) -> None:
    """Series i's histogram as a step outline in its colour and line style."""
    ax.hist(values, bins=bins, histtype="step", linewidth=1.8, color=color(i), linestyle=["-", "--", ":", "-."][i % 4],
            label=_text(label))


def _counts(fig: Figure, ax: Any, path: Path, **labels: Any) -> Path:
    """Finish and save a one-axes histogram of feature counts: labels, integer y ticks, legend."""
    ax.set(ylabel="features", **labels)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(frameon=False, fontsize=9)
    return _save(fig, path)


@fonts.wide
def density_histogram(features: pl.DataFrame, path: Path) -> Path:
    fig = Figure(figsize=(7, 4.2))
    ax = _axes(fig)[0]
    alive = features.filter(pl.col("n_active") > 0)
    logd = np.log10(alive["density"].to_numpy()) if alive.height else np.zeros(1)
    edges = np.linspace(logd.min() - 0.05, logd.max() + 0.05, 41)
    for i, label, mine in series(features):
        live = mine.filter(pl.col("n_active") > 0)
        _step(ax, np.log10(live["density"].to_numpy()), edges, i,
              f"{label}: {live.height:,} alive, {mine.height - live.height:,} dead")
    return _counts(fig, ax, path, title="Feature density (alive features)",
                   xlabel="log10 density (fraction of counted tokens active)")


@fonts.wide
def mean_vs_density(features: pl.DataFrame, path: Path) -> Path:
    fig = Figure(figsize=(7, 4.8))
    ax = _axes(fig)[0]
    shown = features.filter((pl.col("density") > 0) & (pl.col("mean") > 0))
    for i, label, mine in series(features, shown):
        ax.scatter(mine["density"], mine["mean"], s=12, alpha=0.7, color=color(i), marker=MARKERS[i % len(MARKERS)],
                   label=_text(label), linewidths=0)
    _log_axes(ax, shown["density"].to_numpy(), shown["mean"].to_numpy())
    ax.set(title="Mean activation vs density (log-log)", xlabel=METRIC_LABELS["density"], ylabel=METRIC_LABELS["mean"])
    ax.legend(frameon=False, fontsize=9)
    return _save(fig, path)


@fonts.wide
def feature_card(card: Card, path: Path) -> Path:
    """The feature's activation histogram and, when computed, its top promoted/suppressed tokens."""
    has_logits = card.logits is not None and card.logits.height > 0
    fig = Figure(figsize=(11 if has_logits else 6, 3.8))
    axes = _axes(fig, 1, 2 if has_logits else 1, gridspec_kw={"width_ratios": [1, 1]} if has_logits else None)
    ax = axes[0]
    if card.hist_edges is not None:
        e = card.hist_edges
        ax.bar(e[:-1], card.hist_counts, width=np.diff(e), align="edge", color=color(0))
        log_axis(ax.xaxis, e)
        log_axis(ax.yaxis, np.append(card.hist_counts, 0.5))  # 0.5: a bin of one token still shows
    else:
        ax.text(0.5, 0.5, "no histogram in this run", ha="center", va="center", transform=ax.transAxes, color="#555")
    ax.set(title=f"Feature {card.feature} ({_text(card.sae)}/{_text(card.group)}): activations",
           xlabel="activation (SAE units, log-spaced bins)", ylabel="active tokens (log scale)")
    if has_logits:
        ax = axes[1]
        lg = card.logits.sort("logit")
        labels = [_text(token_label(t, i), 20) for t, i in zip(lg["token"], lg["token_id"])]
        vals = lg["logit"].to_numpy()
        ax.barh(np.arange(len(vals)), vals, color=[POS_COLOR if v > 0 else NEG_COLOR for v in vals])
        ax.set_yticks(np.arange(len(vals)), labels, fontsize=8)
        ax.axvline(0, color="#444", linewidth=0.8)
        ax.set(title="Direct logit effect: promoted (orange) and suppressed (blue)",
               xlabel="logit per unit activation (before final-norm scaling)")
        ax.title.set_fontsize(10)
    fig.tight_layout()
    return _save(fig, path)


@fonts.wide
def diff_scatter(diff: pl.DataFrame, label_a: str, label_b: str, path: Path, *, log: bool) -> Path:
    fig = Figure(figsize=(15, 5))
    axes = _axes(fig, 1, 3)
    several = diff["sae"].n_unique() > 1
    for ax, m in zip(axes, METRICS):
        a, b = diff[f"{m}_a"].fill_null(0.0).to_numpy(), diff[f"{m}_b"].fill_null(0.0).to_numpy()
        keep = (a > 0) & (b > 0) if log else (a != 0) | (b != 0)
        for i, (sae, group) in enumerate(pairs(diff)):
            mine = ((diff["sae"] == sae) & (diff["group"] == group)).to_numpy() & keep
            ax.scatter(a[mine], b[mine], s=12, alpha=0.7, color=color(i), marker=MARKERS[i % len(MARKERS)],
                       label=_text(pair_label(sae, group, several)), linewidths=0)
        vals = np.concatenate([a[keep], b[keep]])
        lo, hi = (vals[vals > 0].min(), vals.max()) if (vals > 0).any() else (1e-6, 1.0)
        lo = lo if log else min(0.0, vals.min() if vals.size else 0.0)
        ax.plot([lo, hi], [lo, hi], "--", color="#444", linewidth=1, label="y = x")
        if log:
            _log_axes(ax, np.concatenate([a[keep], [lo, hi]]), np.concatenate([b[keep], [lo, hi]]))
        ax.set(title=f"{METRIC_TITLES[m]} ({int((~keep).sum()):,} features not shown)",
               xlabel=f"A: {SHORT_LABELS[m]}", ylabel=f"B: {SHORT_LABELS[m]}")
    axes[0].legend(frameon=False, fontsize=9)
    fig.suptitle(f"Run B ({_text(label_b, 50)}) against run A ({_text(label_a, 50)}) per feature, "
                 f"{'log' if log else 'linear'} axes"
                 + (" (zeros cannot be shown)" if log else " (features at 0 in both runs not shown)"))
    fig.tight_layout()
    return _save(fig, path)


@fonts.wide
def class_counts(diff: pl.DataFrame, path: Path) -> Path:
    fig = Figure(figsize=(8, 4.2))
    ax = _axes(fig)[0]
    ps = series(diff)
    width = 0.8 / max(len(ps), 1)
    x = np.arange(len(CLASSES))
    for i, label, mine in ps:
        counts = dict(mine.group_by("class").len().iter_rows())
        ys = [counts.get(c, 0) for c in CLASSES]
        bars = ax.bar(x + (i - (len(ps) - 1) / 2) * width, ys, width=width, color=color(i),
                      hatch=["", "//", "..", "xx"][i % 4], edgecolor="white", label=_text(label))
        ax.bar_label(bars, fontsize=8)
    ax.set_xticks(x, [c.replace("_", " ") for c in CLASSES])
    ax.set(title="Features per class", xlabel="class (thresholds in diff.json)", ylabel="features")
    ax.legend(frameon=False, fontsize=9)
    return _save(fig, path)


@fonts.wide
def rho_histogram(diff: pl.DataFrame, path: Path) -> Path:
    fig = Figure(figsize=(7, 4))
    ax = _axes(fig)[0]
    for i, label, mine in series(diff):
        rho = mine["rho"].drop_nulls().drop_nans()
        _step(ax, rho.to_numpy().clip(0, 1), np.linspace(0, 1, 41), i, label)
    return _counts(fig, ax, path, title="Ratio of means rho = min(A, B) / max(A, B)",
                   xlabel="rho (1 = same mean in both runs)", xlim=(0, 1))


@fonts.wide
def separation_scores(scores: pl.DataFrame, path: Path) -> Path:
    fig = Figure(figsize=(15, 4.2))
    axes = _axes(fig, 1, 3)
    for ax, (c, title) in zip(axes, [("auroc", "AUROC"), ("f_diff", "f_pos - f_neg"), ("cohens_d", "Cohen's d")]):
        for i, label, mine in series(scores):
            v = mine[c].drop_nulls().drop_nans()
            ax.hist(v.to_numpy(), bins=40, histtype="step", linewidth=1.8, color=color(i), label=_text(label))
        ax.set(title=f"{title} over kept features", xlabel=title, ylabel="features")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].legend(frameon=False, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


@fonts.wide
def separation_feature(values: pl.DataFrame, feature: int, pos_name: str, neg_name: str, path: Path) -> Path:
    v = values.filter(pl.col("feature") == feature)
    groups = [(v.filter(pl.col("y"))["value"].to_numpy(), pos_name, POS_COLOR),
              (v.filter(~pl.col("y"))["value"].to_numpy(), neg_name, NEG_COLOR)]
    fig = Figure(figsize=(11, 3.8))
    ax1, ax2 = _axes(fig, 1, 2, gridspec_kw={"width_ratios": [1, 2]})
    box = ax1.boxplot([g[0] for g in groups], patch_artist=True, widths=0.5, medianprops={"color": "black"})
    for patch, (_, _, c) in zip(box["boxes"], groups):
        patch.set(facecolor=c, alpha=0.5)
    ax1.set_xticks([1, 2], [_text(f"{n} (n={len(x):,})", 28) for x, n, _ in groups])
    ax1.set(title=f"Feature {feature}: box plot", ylabel="activation at last position (SAE units)")
    allv = np.concatenate([g[0] for g in groups])
    edges = np.linspace(allv.min(), allv.max() + 1e-9, 31) if allv.size else np.linspace(0, 1, 31)
    for (x, n, c), hatch in zip(groups, ("//", "")):
        ax2.hist(x, bins=edges, alpha=0.55, color=c, hatch=hatch, edgecolor="white", label=_text(n, 28))
    ax2.set(title=f"Feature {feature}: histogram", xlabel="activation at last position (SAE units)", ylabel="documents")
    ax2.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax2.legend(frameon=False, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


@fonts.wide
def heatmap(matrix: pl.DataFrame, features: list[int], category: str, stride: int, path: Path) -> Path:
    z = np.stack([matrix[str(f)].to_numpy() for f in features])
    cats = matrix["category"].cast(pl.String).fill_null("(none)").to_list()
    fig = Figure(figsize=(12, 1.5 + 0.28 * len(features)))
    ax = fig.subplots()
    im = ax.imshow(z, aspect="auto", cmap=SEQUENTIAL, interpolation="nearest")
    starts = [0] + [i for i in range(1, len(cats)) if cats[i] != cats[i - 1]]
    ends = starts[1:] + [len(cats)]
    for s in starts[1:]:
        ax.axvline(s - 0.5, color="#D55E00", linewidth=1.5)
    room = [int(130 * (e - s) / len(cats)) for s, e in zip(starts, ends)]  # ~130 characters across the axes
    ax.set_xticks([(s + e - 1) / 2 for s, e in zip(starts, ends)],
                  [_text(cats[s], min(r, 30)) if r >= 3 else "" for s, r in zip(starts, room)], fontsize=9)
    ax.set_yticks(np.arange(len(features)), [f"F{f}" for f in features], fontsize=8)
    ax.set(title=f"Features across documents by {_text(category)}", ylabel="feature",
           xlabel=f"documents, grouped by {_text(category)}" + (f" (every {stride}th shown)" if stride > 1 else ""))
    fig.colorbar(im, ax=ax, label="max activation in document")
    return _save(fig, path)
