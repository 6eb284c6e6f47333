"""Interactive plotly figures for the HTML report (drawn in the page by the embedded plotly.js).

Plotly renders a subset of HTML in text and hover labels, so every string that comes from
data (categories, tokens, label values) is escaped with `html.escape` before it goes in.
Figures with many points use WebGL traces (`scattergl`).
"""

from __future__ import annotations

from html import escape

import numpy as np
import plotly.graph_objects as go
import polars as pl
from plotly.subplots import make_subplots

from ..analysis.diff import CLASSES, METRICS
from .data import Card, decade_limits, series
from .style import METRIC_LABELS, METRIC_TITLES, NEG_COLOR, PLOTLY_SYMBOLS, POS_COLOR, SEQUENTIAL, color

WEBGL_ABOVE = 5000
"""Scatter plots with more points than this use WebGL."""


def _style(fig: go.Figure, title: str, *, height: int = 420, **layout: object) -> go.Figure:
    base = dict(template="none", title={"text": title, "x": 0.01, "xanchor": "left"}, height=height,
                font={"family": "DejaVu Sans, Arial, sans-serif", "size": 13}, paper_bgcolor="white",
                plot_bgcolor="white", margin={"l": 70, "r": 30, "t": 70, "b": 60},
                legend={"bgcolor": "rgba(255,255,255,0.8)"})
    fig.update_layout(**{**base, **layout})
    fig.update_xaxes(showline=True, linecolor="#444", gridcolor="#e5e5e5", zeroline=False, ticks="outside")
    fig.update_yaxes(showline=True, linecolor="#444", gridcolor="#e5e5e5", zeroline=False, ticks="outside")
    return fig


def log_axis(values: np.ndarray) -> dict:
    """A plotly log axis labelled only at powers of ten (10^k), the 2..9 x 10^k ticks drawn unlabelled; on data
    spanning less than two powers of ten the range widens to the enclosing ones (else no label would show)."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v) & (v > 0)]
    out: dict = {"type": "log", "exponentformat": "power", "dtick": 1,
                 "minor": {"ticks": "outside", "ticklen": 3, "dtick": "D1", "showgrid": False}}
    if v.size and np.log10(v.max() / v.min()) > 12:
        out["dtick"] = 2
    limits = decade_limits(v)
    if limits is not None:
        out["range"] = [float(np.log10(limits[0])), float(np.log10(limits[1]))]
    return out


def _f32(values: pl.Series) -> np.ndarray:
    """Plot coordinates as float32 (half the bytes in the page; hover shows 4 significant digits)."""
    return values.cast(pl.Float32).to_numpy()


def _marker(i: int, n_points: int) -> dict:
    big = n_points > WEBGL_ABOVE
    return {"color": color(i), "symbol": PLOTLY_SYMBOLS[i % len(PLOTLY_SYMBOLS)], "size": 4 if big else 6,
            "opacity": 0.5 if big else 0.75}


def _scatter(n_points: int) -> type:
    return go.Scattergl if n_points > WEBGL_ABOVE else go.Scatter


def _add_hist(fig: go.Figure, edges: np.ndarray, counts: np.ndarray, name: str, i: int, steps: bool, hover: str) -> None:
    """Binned counts as bars, or as a step outline when several series share the axes (bars would hide each other)."""
    if steps:
        x = np.concatenate([edges[:1], edges])
        y = np.concatenate([[0], counts, [0]])
        fig.add_scatter(x=x, y=y, mode="lines", line={"shape": "hv", "color": color(i), "width": 2,
                                                       "dash": ["solid", "dash", "dot", "dashdot"][i % 4]},
                        name=name, hovertemplate=hover + "<extra>" + name + "</extra>")
    else:
        fig.add_bar(x=(edges[:-1] + edges[1:]) / 2, y=counts, width=np.diff(edges), name=name,
                    marker={"color": color(i), "line": {"width": 0}}, hovertemplate=hover + "<extra>" + name + "</extra>")


def density_histogram(features: pl.DataFrame) -> go.Figure:
    """Histogram of log10 density of the alive features, one bar series per (sae, group)."""
    fig = go.Figure()
    alive = features.filter(pl.col("n_active") > 0)
    logd = np.log10(alive["density"].to_numpy()) if alive.height else np.array([0.0])
    edges = np.linspace(np.floor(logd.min() * 4) / 4, max(np.ceil(logd.max() * 4) / 4, np.floor(logd.min() * 4) / 4 + 0.25),
                        41)
    notes = []
    ps = series(features)
    for i, label, mine in ps:
        live = mine.filter(pl.col("n_active") > 0)
        counts, _ = np.histogram(np.log10(live["density"].to_numpy()), bins=edges)
        name = escape(label)
        _add_hist(fig, edges, counts, name, i, len(ps) > 1, "log10 density %{x:.2f}<br>%{y} features")
        notes.append(f"{name}: {live.height:,} alive, {mine.height - live.height:,} dead (not shown)")
    _style(fig, "Feature density<br><sup>" + "; ".join(notes) + "</sup>", barmode="overlay")
    fig.update_xaxes(title="log10 density (fraction of counted tokens where the feature is active)")
    fig.update_yaxes(title="features")
    return fig


def mean_vs_density(features: pl.DataFrame) -> go.Figure:
    """Mean activation against density (log-log), one marker series per (sae, group); hover: feature id."""
    fig = go.Figure()
    shown = features.filter((pl.col("density") > 0) & (pl.col("mean") > 0))
    kind = _scatter(shown.height)
    ps = series(features, shown)
    for i, label, mine in ps:
        name = escape(label)
        fig.add_trace(kind(x=_f32(mine["density"]), y=_f32(mine["mean"]), mode="markers", name=name,
                           customdata=np.stack([mine["feature"].to_numpy(), mine["max"].to_numpy()], axis=1)
                           .astype(np.float32), marker=_marker(i, shown.height),
                           hovertemplate="feature %{customdata[0]}<br>density %{x:.3g}<br>mean %{y:.3g}"
                                         "<br>max %{customdata[1]:.3g}<extra>" + name + "</extra>"))
    hidden = features.height - shown.height
    _style(fig, f"Mean activation vs density<br><sup>{shown.height:,} features; {hidden:,} dead or with mean <= 0 "
                "not shown (log axes)</sup>", height=480, showlegend=len(ps) > 1)
    fig.update_xaxes(title=METRIC_LABELS["density"], **log_axis(shown["density"].to_numpy()))
    fig.update_yaxes(title="mean per counted token (SAE units)", **log_axis(shown["mean"].to_numpy()))
    return fig


def activation_histogram(card: Card) -> go.Figure:
    """The card's feature: how many active tokens fall in each activation bin (log count axis)."""
    fig = go.Figure()
    e, c = card.hist_edges, card.hist_counts
    if e is not None:
        # log-spaced bins drawn as such: each bar spans its bin's edges (left edge + width, offset 0)
        fig.add_bar(x=e[:-1], y=c, width=np.diff(e), offset=0, marker={"color": color(0), "line": {"width": 0}},
                    customdata=e[1:], name="active tokens",
                    hovertemplate="activation %{x:.3g} to %{customdata:.3g}<br>%{y} tokens<extra></extra>")
    _style(fig, f"Feature {card.feature}: activation histogram", height=300,
           margin={"l": 60, "r": 20, "t": 50, "b": 50}, showlegend=False, bargap=0)
    fig.update_xaxes(title="activation (SAE units, log-spaced bins)",
                     **log_axis(np.array([]) if e is None else e))
    fig.update_yaxes(title="active tokens (log scale)",
                     **log_axis(np.array([]) if c is None else np.append(c, 0.5)))  # a bin of one token shows
    return fig


def diff_scatter(diff: pl.DataFrame, label_a: str, label_b: str) -> go.Figure:
    """Per metric, B against A with the y = x line, one colour per (sae, group); buttons switch to log axes."""
    fig = make_subplots(rows=1, cols=3, subplot_titles=[METRIC_TITLES[m] for m in METRICS],
                        horizontal_spacing=0.08)
    hidden, positive = {}, []
    for j, m in enumerate(METRICS, start=1):
        xa, xb = pl.col(f"{m}_a").fill_null(0.0), pl.col(f"{m}_b").fill_null(0.0)
        shown = diff.filter((xa != 0) | (xb != 0))
        hidden[m] = diff.height - shown.height
        kind = _scatter(shown.height)
        for i, label, mine in series(diff, shown):
            name = escape(label)
            # many points: numeric customdata only (base64 in the page), class left to the tables
            big = shown.height > WEBGL_ABOVE
            custom = (mine["feature"].to_numpy()[:, None] if big
                      else np.stack([mine["feature"].to_numpy(), mine["class"].to_numpy()], axis=1))
            fig.add_trace(kind(
                x=_f32(mine.select(xa).to_series()), y=_f32(mine.select(xb).to_series()), mode="markers", name=name,
                legendgroup=name, showlegend=j == 1, customdata=custom, marker=_marker(i, shown.height),
                hovertemplate=f"feature %{{customdata[0]}} ({name})<br>{escape(label_a)}: %{{x:.4g}}"
                              f"<br>{escape(label_b)}: %{{y:.4g}}" + ("" if big else "<br>class %{customdata[1]}")
                              + "<extra></extra>"),
                row=1, col=j)
        vals = np.concatenate([shown.select(xa).to_series().to_numpy(), shown.select(xb).to_series().to_numpy()])
        pos = vals[vals > 0]
        positive.append(pos)
        lo, hi = (float(pos.min()), float(pos.max())) if pos.size else (1e-6, 1.0)
        fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", name="y = x", legendgroup="y=x",
                                 showlegend=j == 1, line={"color": "#444", "dash": "dash", "width": 1},
                                 hoverinfo="skip"), row=1, col=j)
        fig.update_xaxes(title=f"{escape(label_a)}: {METRIC_LABELS[m]}", row=1, col=j, title_font={"size": 11})
        fig.update_yaxes(title=f"{escape(label_b)}: {METRIC_LABELS[m]}", row=1, col=j, title_font={"size": 11})
    axes = [f"{a}axis{'' if j == 1 else j}" for j in range(1, 4) for a in "xy"]
    linear = {**{f"{ax}.type": "linear" for ax in axes}, **{f"{ax}.autorange": True for ax in axes},
              **{f"{ax}.dtick": None for ax in axes}, **{f"{ax}.minor.ticks": "" for ax in axes}}
    log: dict = {}
    for j, vals in enumerate(positive, start=1):  # labelled at powers of ten only, as the other log axes
        spec = log_axis(vals)
        for a in "xy":
            ax = f"{a}axis{'' if j == 1 else j}"
            log.update({f"{ax}.type": "log", f"{ax}.dtick": spec["dtick"], f"{ax}.exponentformat": "power",
                        f"{ax}.minor.ticks": "outside", f"{ax}.minor.dtick": "D1", f"{ax}.minor.ticklen": 3})
            log.update({f"{ax}.range": spec["range"], f"{ax}.autorange": False} if "range" in spec
                       else {f"{ax}.autorange": True})
    buttons = [{"label": "linear axes", "method": "relayout", "args": [linear]},
               {"label": "log axes", "method": "relayout", "args": [log]}]
    note = ", ".join(f"{METRIC_TITLES[m].lower()} {hidden[m]:,}" for m in METRICS)
    _style(fig, f"Run B against run A per feature<br><sup>features at 0 in both runs not shown ({note}); "
                "log axes also hide single zeros</sup>", height=480,
           updatemenus=[{"type": "buttons", "direction": "right", "x": 1.0, "xanchor": "right", "y": 1.2,
                         "yanchor": "bottom", "buttons": buttons, "showactive": True}],
           legend={"orientation": "h", "y": -0.22}, margin={"l": 70, "r": 30, "t": 110, "b": 90})
    return fig


def class_counts(diff: pl.DataFrame) -> go.Figure:
    """Features per class, one bar series per (sae, group)."""
    fig = go.Figure()
    for i, label, mine in series(diff):
        counts = dict(mine.group_by("class").len().iter_rows())
        name = escape(label)
        fig.add_bar(x=list(CLASSES), y=[counts.get(c, 0) for c in CLASSES], name=name, text=[counts.get(c, 0) for c in CLASSES],
                    textposition="outside", marker={"color": color(i)},
                    hovertemplate="%{x}: %{y} features<extra>" + name + "</extra>")
    _style(fig, "Features per class", barmode="group", height=380)
    fig.update_xaxes(title="class (thresholds in the diff's metadata)")
    fig.update_yaxes(title="features")
    return fig


def rho_histogram(diff: pl.DataFrame) -> go.Figure:
    """Histogram of rho = min(mean_A, mean_B) / max(mean_A, mean_B) over features alive in either run."""
    fig = go.Figure()
    edges = np.linspace(0, 1, 41)
    ps = series(diff)
    for i, label, mine in ps:
        counts, _ = np.histogram(mine["rho"].drop_nulls().drop_nans().to_numpy().clip(0, 1), bins=edges)
        _add_hist(fig, edges, counts, escape(label), i, len(ps) > 1, "rho %{x:.3f}<br>%{y} features")
    _style(fig, "Ratio of means rho = min(A, B) / max(A, B)", barmode="overlay", height=360)
    fig.update_xaxes(title="rho (1 = same mean in both runs; negative clipped to 0)", range=[0, 1])
    fig.update_yaxes(title="features")
    return fig


def separation_scores(scores: pl.DataFrame) -> go.Figure:
    """Distributions of AUROC, f_pos - f_neg and Cohen's d over the kept features."""
    cols = [("auroc", "AUROC"), ("f_diff", "f_pos - f_neg (firing fractions)"), ("cohens_d", "Cohen's d (pooled s.d.)")]
    fig = make_subplots(rows=1, cols=3, subplot_titles=[t for _, t in cols], horizontal_spacing=0.08)
    ps = series(scores)
    units = {"auroc": "AUROC (0.5 = no separation)", "f_diff": "difference of fractions", "cohens_d": "d (pooled s.d. units)"}
    for j, (c, title) in enumerate(cols, start=1):
        for i, label, mine in ps:
            v = mine[c].drop_nulls().drop_nans()
            name = escape(label)
            fig.add_trace(go.Histogram(x=v, nbinsx=40, name=name, legendgroup=name, showlegend=j == 1,
                                       marker={"color": color(i)}, opacity=0.75,
                                       hovertemplate=f"{title} %{{x}}<br>%{{y}} features<extra>{name}</extra>"),
                          row=1, col=j)
        fig.update_xaxes(title=units[c], row=1, col=j)
        fig.update_yaxes(title="features", row=1, col=j)
    _style(fig, "Separation scores of all kept features", barmode="overlay", height=400,
           showlegend=len(ps) > 1, margin={"l": 70, "r": 30, "t": 80, "b": 60})
    return fig


def separation_feature(values: pl.DataFrame, feature: int, pos_name: str, neg_name: str) -> go.Figure:
    """One feature: box plot and histogram of its value in the two groups of documents."""
    v = values.filter(pl.col("feature") == feature)
    fig = make_subplots(rows=1, cols=2, column_widths=[0.35, 0.65], subplot_titles=["Box plot", "Histogram"])
    lo, hi = (float(v["value"].min()), float(v["value"].max())) if v.height else (0.0, 1.0)
    bins = {"start": lo, "end": hi + (hi - lo or 1.0) * 1e-6, "size": (hi - lo or 1.0) / 30}  # both groups share bins
    for yv, name, c in ((True, pos_name, POS_COLOR), (False, neg_name, NEG_COLOR)):
        x = v.filter(pl.col("y") == yv)["value"]
        label = escape(f"{name} (n={x.len():,})")
        fig.add_trace(go.Box(y=x, name=label, marker={"color": c}, boxpoints="outliers", legendgroup=label,
                             showlegend=False), row=1, col=1)
        fig.add_trace(go.Histogram(x=x, name=label, marker={"color": c}, opacity=0.6, xbins=bins, legendgroup=label,
                                   hovertemplate="value %{x}<br>%{y} documents<extra>" + label + "</extra>"),
                      row=1, col=2)
    _style(fig, f"Feature {feature}: value at each document's last position, by group", barmode="overlay",
           height=340, margin={"l": 60, "r": 20, "t": 60, "b": 50})
    fig.update_yaxes(title="activation (SAE units)", row=1, col=1)
    fig.update_xaxes(title="activation (SAE units)", row=1, col=2)
    fig.update_yaxes(title="documents", row=1, col=2)
    return fig


def _fit(label: str, n_block: int, n_all: int, width_px: float = 1100, char_px: float = 7.5) -> str:
    """A category label cut to the width of its block of documents (about 1,100 px of plot width), escaped."""
    room = int(width_px * n_block / max(n_all, 1) / char_px)
    if len(label) <= room:
        return escape(label)
    return escape(label[: room - 1]) + "\u2026" if room >= 3 else ""


def heatmap(matrix: pl.DataFrame, features: list[int], category: str, stride: int) -> go.Figure:
    """Features x documents, documents grouped by category; lines between categories."""
    z = np.stack([matrix[str(f)].to_numpy() for f in features]) if features else np.zeros((0, matrix.height))
    cats = matrix["category"].cast(pl.String).fill_null("(none)").to_list()
    docs = matrix["doc_id"].to_numpy()
    custom = np.empty((len(features), len(docs), 2), dtype=object)
    custom[:, :, 0] = docs
    custom[:, :, 1] = [escape(c) for c in cats]
    fig = go.Figure(go.Heatmap(z=z, x=np.arange(len(docs)), y=[f"F{f}" for f in features], customdata=custom,
                               colorscale=SEQUENTIAL, colorbar={"title": {"text": "max activation<br>in document"}},
                               hovertemplate="doc %{customdata[0]} (%{customdata[1]})<br>feature %{y}: %{z:.3g}"
                                             "<extra></extra>"))
    starts = [0] + [i for i in range(1, len(cats)) if cats[i] != cats[i - 1]]
    ends = starts[1:] + [len(cats)]
    for s in starts[1:]:
        fig.add_vline(x=s - 0.5, line={"color": "#D55E00", "width": 2})
    fig.update_xaxes(tickvals=[(s + e - 1) / 2 for s, e in zip(starts, ends)],
                     ticktext=[_fit(cats[s], e - s, len(cats)) for s, e in zip(starts, ends)],
                     title=f"documents, grouped by {escape(category)}" + (f" (every {stride}th shown)" if stride > 1 else ""),
                     showgrid=False)
    sizes = "; ".join(f"{escape(cats[s][:40])} {e - s:,}" for s, e in list(zip(starts, ends))[:12])
    more = f"; {len(starts) - 12:,} more" if len(starts) > 12 else ""
    fig.update_yaxes(title="feature", autorange="reversed", showgrid=False, type="category")
    _style(fig, f"Features across documents by {escape(category)}<br><sup>documents per category: {sizes}{more}</sup>",
           height=max(320, 140 + 22 * len(features)))
    return fig
