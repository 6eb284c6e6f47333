"""`write_report`: one run (optionally against a second run, a separation and a category column)
-> OUT/index.html (self-contained, works offline) + OUT/figures/*.png (+ OUT/diff/ with --vs)."""

from __future__ import annotations

import json
import logging
import re
import time
from html import escape
from pathlib import Path
from typing import Any

import plotly.offline
import polars as pl

from .. import __version__
from ..analysis.diff import CLASSES, METRICS, top_changes, write_diff
from ..analysis.diff import DEFINITIONS as DIFF_DEFINITIONS
from ..analysis.stats import features as run_features
from ..analysis.stats import summary_notes
from ..engine.run import open_run
from . import interactive as iv
from . import png
from .data import (
    Card,
    Overview,
    SeparationData,
    cards,
    choose_pair,
    has_activations,
    has_examples,
    heatmap_matrix,
    overview,
    read_separation,
    token_label,
)
from .page import Page, context, link, table

log = logging.getLogger(__name__)
progress = logging.getLogger("saeray.report.progress")
"""The report's stages as they start: shown on the console, where `log` (held at WARNING) is not."""

MAX_HEATMAP_FEATURES = 40


def _picks(ov: Overview, sae: str, group: str, *, features: list[int] | None, top: int, diff: pl.DataFrame | None,
           vs: str | None, sep: SeparationData | None) -> list[tuple[str, int, str]]:
    """(run, feature, why) for the cards: given features, else the largest changes, best separators, or highest means."""
    run = ov.run
    if features:
        if diff is None:
            return [(run, f, "chosen") for f in features]
        d = diff.filter((pl.col("sae") == sae) & (pl.col("group") == group))
        means = {f: (a or 0.0, b or 0.0) for f, a, b in d.select("feature", "mean_a", "mean_b").rows()}
        return [(vs if means.get(f, (0, 0))[1] > means.get(f, (0, 0))[0] else run, f,  # type: ignore[misc]
                 "chosen; contexts from the run where its mean is higher") for f in features]
    if diff is not None:
        d = diff.filter((pl.col("sae") == sae) & (pl.col("group") == group))
        up = top_changes(d.filter(pl.col("d_mean") > 0), "mean", k=(top + 1) // 2)
        down = top_changes(d.filter(pl.col("d_mean") < 0).with_columns(-pl.col("d_mean")), "mean", k=top // 2)
        return ([(vs, f, f"largest increase of mean in B (+{x:.3g}); contexts from B")  # type: ignore[misc]
                 for f, x in up.select("feature", "d_mean").rows()]
                + [(run, f, f"largest decrease of mean in B (-{x:.3g}); contexts from A")
                   for f, x in down.select("feature", "d_mean").rows()])
    if sep is not None:
        s = sep.scores.filter((pl.col("sae") == sae) & (pl.col("group") == group))
        if s.height:
            best = s.sort((pl.col("auroc") - 0.5).abs(), descending=True, nulls_last=True).head(top)
            return [(sep.run, f, f"separates {sep.metadata['label']}: AUROC {a:.3f}")
                    for f, a in best.select("feature", "auroc").rows()]
    best = (ov.features.filter((pl.col("sae") == sae) & (pl.col("group") == group) & (pl.col("n_active") > 0))
            .sort(["mean", "feature"], descending=[True, False]).head(top))
    return [(run, f, f"highest mean activation ({m:.3g})") for f, m in best.select("feature", "mean").rows()]


def _card_html(page: Page, card: Card, png_name: str) -> str:
    st = card.stats
    head = (f'<h3>Feature {card.feature} <span class="why">{escape(card.sae)}/{escape(card.group)} - '
            f"{escape(card.why)}</span></h3>"
            f'<p class="note">density {st["density"]:.4g} ({st["n_active"]:,} of {st["n_tokens"]:,} tokens), '
            f'mean {st["mean"]:.4g}, mean when active {st["mean_active"] or 0:.4g}, max {st["max"] or 0:.4g}, '
            f'active in {st["n_docs_active"]:,} documents; run {escape(card.run)}. '
            f'{link(card.neuronpedia, "Neuronpedia page") if card.neuronpedia else "no Neuronpedia id in the SAE config"}'
            f' | <a href="figures/{escape(png_name)}">PNG</a></p>')
    vmax = max((abs(a) for e in card.examples for a in e["acts"]), default=0.0)
    ctx = "".join(f'<div class="ctx"><span class="meta">#{i + 1} doc {e["doc_id"]} pos {e["pos"]} max {e["value"]:.3g}'
                  f'</span>{context(e["tokens"], e["acts"], e["mark"], vmax)}</div>'
                  for i, e in enumerate(card.examples)) or (
        '<p class="note">no active tokens in this run</p>' if has_examples(card.run) else
        '<p class="note">no contexts: the run keeps neither activation rows nor example documents with token ids '
        '(output.activations, output.top_k, output.docs)</p>')
    note = next((e["note"] for e in card.examples if e.get("note")), None)
    if card.logits is not None and card.logits.height:
        cols: dict[str, list] = {}
        for d in ("promoted", "suppressed"):
            mine = card.logits.filter(pl.col("direction") == d).sort("rank")
            cols[f"{d} token"] = [token_label(t, i) for t, i in mine.select("token", "token_id").rows()]
            cols[f"{d} logit"] = mine["logit"].to_list()
        n = max(len(v) for v in cols.values())  # fewer in one direction when special tokens were left out
        frame = pl.DataFrame({k: v + [None] * (n - len(v)) for k, v in cols.items()},
                             schema={k: pl.String if k.endswith("token") else pl.Float64 for k in cols})
        logits = ("<b>Direct logit effects</b> (logit per unit activation, before the final norm's 1/rms; "
                  "special and unused tokens left out; \u2423 space, \u23ce newline, \u21e5 tab)"
                  + table(frame, links=()))
    else:
        logits = f'<p class="note">{escape(card.logits_note or "no logit effects")}</p>'
    hist = (page.plot(f"hist-{len(page.sections)}-{page.n_plots}", iv.activation_histogram(card))
            if card.hist_edges is not None else "")
    return (f'<div class="card" id="feature-{escape(card.sae)}-{card.feature}">{head}<div class="cardgrid">'
            f"<div>{hist}</div><div>{logits}</div></div><b>Top contexts</b> (background: activation / largest shown; "
            "outlined: the document's maximum)" + (f'<p class="note">{escape(note)}</p>' if note else "") + ctx + "</div>")


def _run_section(page: Page, ov: Overview, figs: Path, written: list[Path]) -> None:
    parts = page.section("run", "Run")
    parts.append("<h3>Summary</h3>" + table(ov.summary)
                 + "".join(f'<p class="note">{escape(n)}</p>' for n in summary_notes(ov.summary)))
    if ov.reconstruction is not None:
        parts.append("<h3>Reconstruction</h3>" + table(ov.reconstruction))
    parts.append(page.plot("density", iv.density_histogram(ov.features)))
    parts.append(page.plot("mean-density", iv.mean_vs_density(ov.features)))
    written += [png.density_histogram(ov.features, figs / "density.png"),
                png.mean_vs_density(ov.features, figs / "mean_vs_density.png")]


def _diff_section(page: Page, diff: pl.DataFrame, meta: dict[str, Any], figs: Path, written: list[Path]) -> None:
    parts = page.section("diff", "Diff")
    a, b = Path(meta["run_a"]).name, Path(meta["run_b"]).name
    th = ", ".join(f"{k} {'none' if v is None else v}" for k, v in meta["thresholds"].items())
    parts.append(f'<p class="note">A = {escape(meta["run_a"])}, B = {escape(meta["run_b"])}; preset '
                 f'{escape(str(meta["preset"]))} (thresholds: {escape(th)}). Tables and CSVs '
                 f'(top 100 increases per group and metric, with Neuronpedia links) are in '
                 f'<a href="diff/">diff/</a>.</p>')
    parts.append(page.plot("diff-scatter", iv.diff_scatter(diff, "A", "B")))
    parts.append(page.plot("diff-classes", iv.class_counts(diff)))
    by_class = (diff.group_by("sae", "group", "class").agg(
        pl.len().alias("features"), *[pl.col(f"{m}_{r}").median().alias(f"median {m}_{r}")
                                      for m in ("mean", "density") for r in "ab"],
        pl.col("rho").median().alias("median rho"))
        .sort("sae", "group", pl.col("class").replace_strict({c: i for i, c in enumerate(CLASSES)})))
    parts.append("<h3>Summary by class</h3>" + table(by_class))
    parts.append(page.plot("diff-rho", iv.rho_histogram(diff)))
    parts.append('<div class="row">' + "".join(
        f"<div><h3>Largest increases of {escape(m)} (B over A)</h3>"
        + table(top_changes(diff, m, 10).drop("sae", "group", "class") if diff["sae"].n_unique() == 1
                and diff["group"].n_unique() == 1 else top_changes(diff, m, 10)) + "</div>" for m in METRICS) + "</div>")
    parts.append(f"<details><summary>Definitions</summary>{table(_definitions(DIFF_DEFINITIONS), links=())}</details>")
    written += [png.diff_scatter(diff, a, b, figs / "diff_scatter.png", log=False),
                png.diff_scatter(diff, a, b, figs / "diff_scatter_log.png", log=True),
                png.class_counts(diff, figs / "diff_classes.png"), png.rho_histogram(diff, figs / "diff_rho.png")]


def _separation_section(page: Page, sep: SeparationData, figs: Path, written: list[Path]) -> None:
    parts = page.section("separation", "Separation")
    meta = sep.metadata
    pos = f"{meta['label']} = {meta['positive']}"
    neg = f"{meta['label']} != {meta['positive']}"
    docs = "; ".join(f"{g}: {n['positive']:,} positive, {n['negative']:,} negative" for g, n in meta["documents"].items())
    dropped = (", ".join(f"{k} {v:,}" for k, v in meta["dropped"].items()) or "none") if meta.get("reference") else \
        "no reference run"
    parts.append(f'<p class="note">{escape(sep.path)}: run {escape(sep.run)}, positive: {escape(pos)}; documents '
                 f"{escape(docs)}; features dropped for reference density > {meta['max_density']}: {escape(dropped)}. "
                 "Each document's value is the feature's activation at its last counted position.</p>")
    parts.append(page.plot("separation-scores", iv.separation_scores(sep.scores)))
    top = (sep.scores.filter((pl.col("f_pos") > 0) | (pl.col("f_neg") > 0))
           .sort((pl.col("auroc") - 0.5).abs(), descending=True, nulls_last=True).head(20))
    cols = [c for c in ("sae", "group", "feature", "auroc", "f_pos", "f_neg", "f_diff", "cohens_d", "q",
                        "ref_density", "neuronpedia") if c in top.columns]
    parts.append("<h3>Top separating features (by |AUROC - 0.5|; features that fire at a last position)</h3>"
                 + table(top.select(cols)))
    if meta.get("heldout"):
        parts.append("<h3>Held-out classifier</h3>" + table(pl.DataFrame(meta["heldout"])))
    written.append(png.separation_scores(sep.scores, figs / "separation_scores.png"))
    for f in sep.top:
        parts.append(page.plot(f"separation-{f}", iv.separation_feature(sep.values, f, pos, neg)))
        written.append(png.separation_feature(sep.values, f, pos, neg, figs / f"separation_feature_{f}.png"))


def _definitions(d: dict[str, str]) -> pl.DataFrame:
    return pl.DataFrame({"term": list(d), "definition": list(d.values())})


def write_report(run: str | Path, out_dir: str | Path, *, vs: str | Path | None = None,
                 separation: str | Path | None = None, features: list[int] | None = None, top: int = 6, k: int = 5,
                 category: str | None = None, sae: str | None = None, group: str | None = None, logits: bool = False,
                 preset: str = "default", window: tuple[int, int] = (12, 6)) -> Path:
    """Write out_dir/index.html (offline, interactive) and out_dir/figures/*.png; return the page's path.

    With `vs`, run `vs` is diffed against `run` (A) into out_dir/diff/. Cards show `features`, else
    the largest mean changes (with `vs`), the best separators (with `separation`), or the features
    with the highest mean. `category` (a docs column) adds a heatmap of those features across
    documents. Cards and heatmap use one (sae, group): the given one, else the first. `window` is
    the tokens of context (before, after) each card shows around a document's maximum. Logit effects
    are those saved with the run (saeray.tools.logits.save_logit_effects); `logits=True` computes the
    others, loading the model's weights (no model is loaded otherwise).
    """
    run, vs = open_run(run), (open_run(vs) if vs is not None else None)  # opened once: markers, tokenizer
    started = time.monotonic()

    def step(what: str) -> None:  # the report's stages, on the console as they start (each takes seconds to minutes)
        progress.info("report: %s (elapsed %.0fs)", what, time.monotonic() - started)

    if top < 1 or k < 1:
        raise ValueError(f"top and k must be at least 1, got top={top}, k={k}")
    out = Path(out_dir)
    figs = out / "figures"
    figs.mkdir(parents=True, exist_ok=True)
    ov = overview(run)
    s, g = choose_pair(ov.features, sae, group)
    width = ov.features.filter((pl.col("sae") == s) & (pl.col("group") == g)).height
    bad = [f for f in features or [] if not 0 <= f < width]
    if bad:
        raise ValueError(f"feature {bad[0]} is out of range: SAE {s!r} has {width} features (0-{width - 1})")
    if category is not None and not has_activations(run):
        raise ValueError(f"{run} is a statistics-only run (output.activations: false): a heatmap by {category!r} "
                         "needs activation rows; drop --category or extract with output.activations: true")
    sep = read_separation(separation, sae=sae) if separation is not None else None
    cfg = ov.manifest["config"]
    page = Page(f"saeray report: {run}" + (f" vs {vs}" if vs else ""), [
        f"model {cfg['model']['name']}; SAEs " + ", ".join(f"{x['name']} ({x['hook']}, {x['d_sae']:,} features)"
                                                            for x in ov.manifest["resolved"]["saes"]),
        f"{int(ov.summary['tokens'].max() or 0):,} counted tokens; fingerprint {ov.manifest['fingerprint']}; "
        f"made {ov.manifest['created_at'][:19]}; report by saeray {__version__}"])
    written: list[Path] = []
    step("statistics and their figures")
    _run_section(page, ov, figs, written)
    diff = None
    frames = {str(run): ov.features}
    if vs is not None:
        step(f"the diff against {vs}")
        path = write_diff(run, vs, out / "diff", preset=preset)
        diff = pl.read_parquet(path)
        _diff_section(page, diff, json.loads((out / "diff" / "diff.json").read_text()), figs, written)
        frames[str(vs)] = run_features(vs).collect()
    if sep is not None:
        _separation_section(page, sep, figs, written)
        if sep.run not in frames:
            frames[sep.run] = run_features(sep.run).collect()
    picks = _picks(ov, s, g, features=features, top=top, diff=diff, vs=None if vs is None else str(vs), sep=sep)
    picks = [(str(r), f, w) for r, f, w in picks]
    parts = page.section("features", "Feature cards")
    step(f"{len(picks)} feature cards (top contexts, histograms, logit effects)")
    for card in cards(picks, frames, sae=s, group=g, k=k, window=window, logits=logits):
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", f"feature_{card.sae}_{card.group}_{card.feature}") + ".png"
        written.append(png.feature_card(card, figs / name))
        parts.append(_card_html(page, card, name))
    if category is not None:
        step(f"the heatmap by {category}")
        feats = (features or sorted({f for _, f, _ in picks}))[:MAX_HEATMAP_FEATURES]
        matrix, stride = heatmap_matrix(run, feats, category, sae=s, group=g)
        parts = page.section("explore", "Exploration")
        parts.append(page.plot("heatmap", iv.heatmap(matrix, feats, category, stride)))
        written.append(png.heatmap(matrix, feats, category, stride, figs / "heatmap.png"))
    files = page.section("figures", "PNG figures")
    files.append('<ul class="files">' + "".join(f'<li><a href="figures/{escape(p.name)}">{escape(p.name)}</a></li>'
                                                for p in written) + "</ul>")
    html = page.render(plotly.offline.get_plotlyjs())
    index = out / "index.html"
    tmp = out / ".index.html.tmp"
    tmp.write_text(html, encoding="utf-8")
    tmp.replace(index)
    log.info("wrote %s (%d plots) and %d PNG figures in %s", index, page.n_plots, len(written), figs)
    return index
