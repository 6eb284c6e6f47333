"""The self-contained HTML page: escaped tables and token contexts, plot slots, embedded plotly.js.

Nothing on the page is fetched: plotly.js (from the installed plotly package) is inlined once,
each figure's JSON sits in a `<script type="application/json">` block and is drawn by a
small script at the end. Every string from data is escaped with `html.escape`; JSON inside
`<script>` has `<`, `>` and `&` written as `\\u003c`, `\\u003e`, `\\u0026`, so corpus text can
never close the block. When all plots are drawn the script sets `data-plots-rendered` on
`<body>` (tests read it).
"""

from __future__ import annotations

import math
import re
from html import escape
from typing import Any, Iterable

import plotly.graph_objects as go
import polars as pl

CSS = """
body { font-family: "DejaVu Sans", Arial, sans-serif; margin: 0; color: #222; background: #fafafa; }
header { background: #1f3b57; color: white; padding: 14px 28px; }
header h1 { margin: 0 0 4px 0; font-size: 22px; }
header p { margin: 2px 0; font-size: 13px; opacity: 0.9; }
nav { position: sticky; top: 0; background: white; border-bottom: 1px solid #ddd; padding: 8px 28px; z-index: 10; }
nav a { margin-right: 18px; color: #0072B2; text-decoration: none; font-weight: bold; }
main { padding: 8px 28px 40px 28px; max-width: 1500px; }
section { margin-top: 26px; }
h2 { border-bottom: 2px solid #1f3b57; padding-bottom: 4px; }
.plot { background: white; border: 1px solid #ddd; margin: 12px 0; min-height: 200px; }
.note { color: #555; font-size: 13px; max-width: 1100px; }
table.data { border-collapse: collapse; font-size: 13px; margin: 8px 0 16px 0; background: white; }
table.data th, table.data td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
table.data th { background: #eef2f6; }
table.data td.s { text-align: left; }
.card { background: white; border: 1px solid #bbb; border-radius: 4px; padding: 10px 16px; margin: 16px 0; }
.card h3 { margin: 4px 0; }
.card .why { color: #555; font-size: 13px; }
.cardgrid { display: grid; grid-template-columns: minmax(300px, 1fr) minmax(300px, 1fr); gap: 12px; }
.ctx { font-family: "DejaVu Sans Mono", monospace; font-size: 13px; white-space: pre-wrap; word-break: break-all;
       border-bottom: 1px dotted #ddd; padding: 4px 0; }
.ctx .meta { color: #666; font-family: "DejaVu Sans", Arial, sans-serif; font-size: 12px; margin-right: 8px; }
.tok { border-radius: 2px; -webkit-print-color-adjust: exact; print-color-adjust: exact; }
.tok.max { outline: 2px solid #000; }
.tok .ws { color: #999; }
ul.files { columns: 3; font-size: 13px; }
.row { display: flex; flex-wrap: wrap; gap: 24px; align-items: flex-start; }
@media print { nav, .modebar { display: none !important; } .plot { break-inside: avoid; } }
"""

BOOT = """
(function () {
  var status = document.getElementById('saeray-status');
  var nodes = document.querySelectorAll('script[type="application/json"][data-plot]');
  var config = {responsive: true, displaylogo: false, toImageButtonOptions: {format: 'png', scale: 2}};
  var jobs = [];
  nodes.forEach(function (node) {
    var spec = JSON.parse(node.textContent);
    jobs.push(Plotly.newPlot(node.getAttribute('data-plot'), spec.data, spec.layout, config));
  });
  Promise.all(jobs).then(function () {
    document.body.setAttribute('data-plots-rendered', String(jobs.length));
    status.textContent = jobs.length + ' interactive plots drawn';
  }, function (err) {
    document.body.setAttribute('data-plot-error', String(err));
    status.textContent = 'a plot failed to draw: ' + err;
    throw err;
  });
})();
"""

_JSON_UNSAFE = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def script_json(text: str) -> str:
    """JSON text made safe inside <script>: no '<', '>' or '&' left (they only occur inside JSON strings)."""
    return re.sub("[<>&\u2028\u2029]", lambda m: _JSON_UNSAFE[m.group(0)], text)


def fmt(v: Any) -> str:
    """A table cell: thousands separators for ints, 4 significant digits for floats, '-' for null."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def link(url: str | None, text: str) -> str:
    """An <a> only for http(s) URLs (nothing else from data becomes a link)."""
    if not url or not url.startswith(("https://", "http://")):
        return escape(text)
    return f'<a href="{escape(url)}" target="_blank" rel="noopener noreferrer">{escape(text)}</a>'


def table(frame: pl.DataFrame, *, links: Iterable[str] = ("neuronpedia",), max_rows: int = 200) -> str:
    """An HTML table of `frame` (first max_rows rows); URL columns in `links` become links."""
    links = set(links)
    head = "".join(f"<th>{escape(c)}</th>" for c in frame.columns)
    rows = []
    for r in frame.head(max_rows).iter_rows():
        cells = []
        for c, v in zip(frame.columns, r):
            if c in links:
                cells.append(f'<td class="s">{link(v, "page") if v else "-"}</td>')
            else:
                cls = ' class="s"' if isinstance(v, str) else ""
                cells.append(f"<td{cls}>{escape(fmt(v))}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    more = f'<p class="note">first {max_rows:,} of {frame.height:,} rows</p>' if frame.height > max_rows else ""
    return f'<table class="data"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>{more}'


def _show_token(t: str) -> str:
    """Escaped token text; newlines and tabs shown as visible marks."""
    out = escape(t)
    return out.replace("\n", '<span class="ws">\u23ce</span>\n').replace("\t", '<span class="ws">\u21e5</span>')


def context(tokens: list[str], acts: list[float], mark: int, vmax: float) -> str:
    """Tokens with a background whose opacity is |activation| / vmax (orange positive, blue negative)."""
    spans = []
    for i, (t, a) in enumerate(zip(tokens, acts)):
        alpha = min(1.0, abs(a) / vmax) if vmax > 0 else 0.0
        rgb = "230,159,0" if a >= 0 else "0,114,178"
        style = f' style="background:rgba({rgb},{alpha:.2f})"' if alpha > 0 else ""
        cls = "tok max" if i == mark else "tok"
        spans.append(f'<span class="{cls}"{style} title="{escape(repr(t))}: {a:.4g}">{_show_token(t)}</span>')
    return "".join(spans)


class Page:
    """Collects sections and plots, then renders the single self-contained page."""

    def __init__(self, title: str, subtitle: list[str]):
        self.title, self.subtitle = title, subtitle
        self.sections: list[tuple[str, str, list[str]]] = []
        self.n_plots = 0

    def section(self, anchor: str, heading: str) -> list[str]:
        """A new section; append HTML fragments to the returned list."""
        parts: list[str] = []
        self.sections.append((anchor, heading, parts))
        return parts

    def plot(self, name: str, fig: go.Figure) -> str:
        """A plot slot: an empty div and its figure JSON (drawn by the boot script)."""
        self.n_plots += 1
        pid = f"plot-{name}"
        return (f'<div class="plot" id="{escape(pid)}"></div>\n'
                f'<script type="application/json" data-plot="{escape(pid)}">{script_json(fig.to_json())}</script>')

    def render(self, plotly_js: str) -> str:
        nav = "".join(f'<a href="#{a}">{escape(h)}</a>' for a, h, _ in self.sections)
        body = "\n".join(f'<section id="{a}"><h2>{escape(h)}</h2>\n' + "\n".join(p) + "</section>"
                         for a, h, p in self.sections)
        sub = "".join(f"<p>{escape(s)}</p>" for s in self.subtitle)
        js = re.sub(r"</(script)", r"<\\/\1", plotly_js, flags=re.IGNORECASE)
        return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">\n'
                f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
                f"<title>{escape(self.title)}</title>\n<style>{CSS}</style>\n"
                f"<script>{js}</script>\n</head>\n"
                f'<body data-plots-expected="{self.n_plots}">\n'
                f"<header><h1>{escape(self.title)}</h1>{sub}"
                f'<p id="saeray-status">drawing {self.n_plots} plots (needs JavaScript)</p></header>\n'
                f"<nav>{nav}</nav>\n<main>\n{body}\n</main>\n<script>{BOOT}</script>\n</body></html>\n")
