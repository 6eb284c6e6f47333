"""What a report shows, gathered from the analyses (stats, top, diff, separate, explore, logits).

Everything here returns plain data (Polars frames, numpy arrays, dataclasses); the
figures and the page are drawn from it elsewhere. Histograms are binned in Polars so a
feature with millions of active tokens costs two streaming passes, not its rows in memory.
"""

from __future__ import annotations

import json
import logging
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from ..analysis.stats import features as run_features
from ..analysis.stats import reconstruction, summary
from ..analysis.top import scan_feature_rows, top_examples
from ..engine.run import open_run
from .style import pair_label

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Overview:
    """A run: its manifest and per-feature statistics."""

    run: str
    manifest: dict[str, Any]
    features: pl.DataFrame
    summary: pl.DataFrame
    reconstruction: pl.DataFrame | None


@dataclass
class Card:
    """One feature of one (sae, group): statistics, top contexts, activation histogram, logit effects."""

    sae: str
    group: str
    feature: int
    run: str
    why: str
    stats: dict[str, Any]
    examples: list[dict[str, Any]] = field(default_factory=list)
    hist_edges: np.ndarray | None = None
    hist_counts: np.ndarray | None = None
    logits: pl.DataFrame | None = None
    logits_note: str | None = None
    neuronpedia: str | None = None


@dataclass(frozen=True)
class SeparationData:
    """A separation output directory and, for its top features, each labelled document's value."""

    path: str
    run: str
    metadata: dict[str, Any]
    scores: pl.DataFrame
    values: pl.DataFrame
    """sae, group, feature, doc_id, value (0 where the feature is silent), y (positive?)."""
    top: list[int]
    """The features in `values`, best separating first (by |AUROC - 0.5|)."""


def overview(run: str | Path) -> Overview:
    manifest = open_run(run).read_manifest()
    feats = run_features(run).collect()
    recon = None
    if manifest["config"]["output"].get("reconstruction"):
        try:
            recon = reconstruction(run).drop("sq_err_hist")
        except FileNotFoundError as e:
            log.warning("no reconstruction table: %s", e)
    return Overview(str(run), manifest, feats, summary(feats), recon)


def pairs(frame: pl.DataFrame) -> list[tuple[str, str]]:
    """The (sae, group) pairs of a per-feature frame, sorted."""
    return [tuple(r) for r in frame.select("sae", "group").unique().sort("sae", "group").rows()]  # type: ignore[misc]


def series(frame: pl.DataFrame, rows: pl.DataFrame | None = None) -> list[tuple[int, str, pl.DataFrame]]:
    """Per (sae, group) of `frame`, sorted: its index (colour, marker, line style), its legend label (the group,
    prefixed by the SAE when `frame` has several) and its rows of `rows` (default: `frame`)."""
    several = frame["sae"].n_unique() > 1
    rows = frame if rows is None else rows
    return [(i, pair_label(sae, group, several), rows.filter((pl.col("sae") == sae) & (pl.col("group") == group)))
            for i, (sae, group) in enumerate(pairs(frame))]


def choose_pair(frame: pl.DataFrame, sae: str | None, group: str | None) -> tuple[str, str]:
    """The (sae, group) that cards and heatmaps are drawn for: the given one, else the first."""
    have = pairs(frame)
    chosen = [(s, g) for s, g in have if (sae is None or s == sae) and (group is None or g == group)]
    if not chosen:
        listed = ", ".join(f"{s}/{g}" for s, g in have)
        raise ValueError(f"sae={sae!r} group={group!r} is not in the run: it has (sae/group) {listed}; "
                         "pass --sae and --group")
    if len(chosen) > 1:
        log.info("feature cards and heatmap for %s/%s (of %d sae/group pairs; choose with sae=, group=)",
                 *chosen[0], len(chosen))
    return chosen[0]


def neuronpedia_prefix(run: str | Path, sae: str) -> str | None:
    """https://www.neuronpedia.org/<neuronpedia_id>/ when the SAE's config names one."""
    for s in open_run(run).read_manifest()["resolved"]["saes"]:
        if s["name"] == sae and s.get("neuronpedia_id"):
            return f"https://www.neuronpedia.org/{s['neuronpedia_id']}/"
    return None


def activation_histograms(run: str | Path, features: list[int], *, sae: str, group: str,
                          source: str = "auto") -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per feature: (edges [n+1], counts [n]) of its positive activations over all counted tokens, on the
    fixed log-spaced value bins (partials.EDGES) from the lowest to the highest bin it reaches.

    `source`: the units' hist partials (auto, when every unit has them) or the rows (the reference).
    Display edges: the first bin (0, 1e-4] starts at 10^(-33/8), the last (1e4, inf) ends at 10^(33/8).
    """
    from ..analysis.stats import histograms, source_for
    from ..engine.partials import EDGES, N_BINS, value_bins_np

    if source_for(run, source, "hist") == "partials":
        counts = histograms(run, features, sae=sae, group=group).filter(pl.col("bin") > 0)
    else:
        rows = scan_feature_rows(run, features, sae=sae, group=group).filter(pl.col("value") > 0).select("feature", "value")
        vals = rows.collect(engine="streaming")
        counts = (vals.with_columns(pl.Series("bin", value_bins_np(vals["value"].to_numpy()), dtype=pl.Int16))
                  .group_by("feature", "bin").agg(pl.len().cast(pl.Int64).alias("count")))
    step = 10 ** (1 / 8)
    display = np.concatenate([[EDGES[1] / step], EDGES[1:], [EDGES[-1] * step]]).astype(np.float64)
    counts = counts.sort("feature", "bin")
    feat = counts["feature"].to_numpy()
    bins, n = counts["bin"].to_numpy().astype(np.int64), counts["count"].to_numpy().astype(np.int64)
    starts = np.flatnonzero(np.r_[True, feat[1:] != feat[:-1]]) if len(feat) else np.zeros(0, np.int64)
    out = {}
    for a, z in zip(starts.tolist(), [*starts[1:].tolist(), len(feat)]):  # one feature's bins, ascending
        b = bins[a:z]
        lo, hi = int(b[0]), int(b[-1])
        c = np.zeros(hi - lo + 1, dtype=np.int64)
        c[b - lo] = n[a:z]
        out[int(feat[a])] = (display[lo - 1:hi + 1], c)
    assert len(display) == N_BINS
    return out


def has_activations(run: str | Path) -> bool:
    """False for a statistics-only run (output.activations: false): no heatmaps (they read every document)."""
    return bool(open_run(run).read_manifest()["config"]["output"].get("activations", True))


def has_examples(run: str | Path) -> bool:
    """Whether top contexts can be shown: activation rows, or example partials with token ids (output.docs)."""
    from ..analysis.stats import has_kind

    out = open_run(run).read_manifest()["config"]["output"]
    return has_activations(run) or (has_kind(run, "examples") and out.get("docs", "all") != "none"
                                    and out.get("top_k", 0) > 0)


def decade_limits(values: np.ndarray) -> tuple[float, float] | None:
    """Axis limits for positive `values` on a log axis that hold at least two powers of ten: the data's own
    range, widened to the enclosing powers of ten when it holds fewer (else no tick would be labelled)."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v) & (v > 0)]
    if not v.size:
        return None
    lo, hi = float(v.min()), float(v.max())
    if np.floor(np.log10(hi)) - np.ceil(np.log10(lo)) >= 1:
        return None
    a, b = np.floor(np.log10(lo)), np.ceil(np.log10(hi))
    return 10.0 ** a, 10.0 ** max(b, a + 1)


def has_histograms(run: str | Path) -> bool:
    from ..analysis.stats import has_kind

    return has_activations(run) or has_kind(run, "hist")


def _tokenizer(run: str | Path) -> tuple[Any, str | None]:
    try:
        return open_run(run).tokenizer, None
    except Exception as e:  # a hub model not cached here: show token ids instead
        log.warning("cannot load the tokenizer of %s (%s): contexts show token ids", run, e)
        return None, f"tokenizer unavailable ({type(e).__name__}): token ids shown"


def cards(picks: list[tuple[str, int, str]], frames: dict[str, pl.DataFrame], *, sae: str, group: str,
          k: int = 5, window: tuple[int, int] = (12, 6), logits: bool = False) -> list[Card]:
    """Feature cards for `picks` = (run, feature, why), with statistics from `frames[run]` (features()).

    Logit effects come from the run's saved ones (analysis.saved_logits); with `logits`, those not saved are
    computed, loading the model's weights."""
    out: list[Card] = []
    by_run: dict[str, list[tuple[int, str]]] = {}
    for run, f, why in picks:
        by_run.setdefault(run, []).append((f, why))
    for run, chosen in by_run.items():
        feats = [f for f, _ in chosen]
        stats = frames[run].filter((pl.col("sae") == sae) & (pl.col("group") == group))
        width = stats.height
        bad = [f for f in feats if not 0 <= f < width]
        if bad:
            raise ValueError(f"feature {bad[0]} is out of range: SAE {sae!r} has {width} features (0-{width - 1})")
        rd = open_run(run)  # one open run: its manifest, markers and tokenizer are read once for all the cards
        if has_examples(rd):
            tok, note = _tokenizer(rd)
            ex = top_examples(rd, feats, sae=sae, group=group, k=k, window=window, tokenizer=tok)
        else:
            ex = pl.DataFrame(schema={"feature": pl.Int32, "rank": pl.Int32})
        hists = activation_histograms(rd, feats, sae=sae, group=group) if has_histograms(rd) else {}
        effects, effects_note = _logits(rd, feats, sae, compute=logits)
        prefix = neuronpedia_prefix(rd, sae)
        for f, why in chosen:
            row = stats.filter(pl.col("feature") == f).row(0, named=True)
            mine = ex.filter(pl.col("feature") == f).sort("rank")
            examples = []
            for e in mine.iter_rows(named=True):
                tokens = e.get("tokens") or [f"[{t}]" for t in e["token_ids"]]
                examples.append({"doc_id": e["doc_id"], "value": e["value"], "pos": e["pos"],
                                 "mark": e["pos"] - e["window_start"], "tokens": tokens, "acts": e["acts"],
                                 "note": note})
            edges, counts = hists.get(f, (None, None))
            out.append(Card(sae, group, f, run, why, row, examples, edges, counts,
                            None if effects is None else effects.filter(pl.col("feature") == f),
                            effects_note, f"{prefix}{f}" if prefix else None))
    return out


LOGIT_RANKS = 8
"""Promoted and suppressed tokens a card shows."""

WHITESPACE = {" ": "\u2423", "\n": "\u23ce", "\t": "\u21e5"}
"""How a token's whitespace is drawn in tables and figure labels: space, newline, tab (others as escapes)."""
UNUSED = re.compile(r"<unused\d+>|<\|?reserved[_\w]*\|?>")
"""Tokens a vocabulary keeps as placeholders (Gemma's <unused122>, <|reserved_special_token_3|>)."""


def token_label(token: str | None, token_id: int | None = None) -> str:
    """A token as a visible label: whitespace as marks (\u2423 space, \u23ce newline, \u21e5 tab), other
    invisible characters as \\xNN / \\uNNNN escapes, an empty token as \u2205, a missing one as [id]."""
    if token is None:
        return f"[{token_id}]"
    if token == "":
        return "\u2205"
    out = []
    for ch in token:
        if ch in WHITESPACE:
            out.append(WHITESPACE[ch])
        elif ch.isspace() or unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn"):
            out.append(f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return "".join(out)


def hidden_token_ids(tokenizer: Any) -> set[int]:
    """The tokenizer's special tokens (bos, eos, pad, chat markers, added special tokens): no logit effect of
    theirs says anything about what a feature writes."""
    if tokenizer is None:
        return set()
    ids = set(getattr(tokenizer, "all_special_ids", None) or [])
    for i, t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(t, "special", False):
            ids.add(int(i))
    return ids


def visible_logits(effects: pl.DataFrame, hidden: set[int], k: int = LOGIT_RANKS) -> pl.DataFrame:
    """Logit effects without special tokens (ids in `hidden`) and placeholders (UNUSED), the first `k` of
    each feature and direction, ranked again from 0."""
    keep = ~pl.col("token_id").is_in(pl.Series(sorted(hidden), dtype=effects["token_id"].dtype).implode())
    keep &= ~pl.col("token").fill_null("").str.strip_chars().str.contains(f"^(?:{UNUSED.pattern})$")
    return (effects.filter(keep).sort("feature", "direction", "rank")
            .with_columns(pl.int_range(pl.len()).over("feature", "direction").cast(effects["rank"].dtype).alias("rank"))
            .filter(pl.col("rank") < k))


def _logits(run: Any, feats: list[int], sae: str, *, compute: bool) -> tuple[pl.DataFrame | None, str | None]:
    """(logit effects of `feats`: the run's saved ones, and with `compute` the others computed; a note on the
    features without any). Special and placeholder tokens are left out (`visible_logits`); computed effects
    ask for as many more ranks as there are special tokens, so that LOGIT_RANKS remain."""
    from ..analysis.saved_logits import saved_effects

    try:
        tok = run.tokenizer
    except Exception as e:  # a hub model not cached here: only placeholders recognised by name
        log.warning("cannot load the tokenizer of %s (%s): special tokens not left out of logit effects", run, e)
        tok = None
    hidden = hidden_token_ids(tok)
    try:
        saved, missing = saved_effects(run, feats, sae=sae, k=LOGIT_RANKS)
    except ValueError as e:  # a file saved for another run
        log.warning("saved logit effects not used: %s", e)
        saved, missing = None, list(feats)
    saved = None if saved is None else visible_logits(saved, hidden)
    if not missing:
        return saved, None
    if not compute:
        return saved, ("logit effects not computed: they load the model's weights (saeray report --logits, "
                       "or save them with the run first: saeray logits RUN --feature F --save)")
    from ..tools.logits import logit_effects_for_run

    try:
        # enough ranks that LOGIT_RANKS remain after the special tokens (Gemma has 6,000+ <unusedN>) go
        extra = LOGIT_RANKS + len(hidden) + 3 * LOGIT_RANKS
        got = logit_effects_for_run(run, missing, sae=sae, k=min(extra, len(tok)) if tok is not None else extra)
    except Exception as e:  # the model's weights are not here (a hub model), or its norm is unusual
        log.warning("logit effects not computed for %s: %s", run, e)
        return saved, f"logit effects not computed: {type(e).__name__}: {e}"
    got = visible_logits(got, hidden)
    return (got if saved is None else pl.concat([saved, got.select(saved.columns)])), None


def read_separation(path: str | Path, *, top: int = 4, sae: str | None = None,
                    group: str | None = None) -> SeparationData:
    """A `saeray separate` output directory, plus per-document values of its `top` features."""
    import pyarrow.parquet as pq

    from ..analysis.separate import last_values, read_labels

    d = Path(path)
    file = d / "separation.parquet"
    if not file.is_file():
        raise FileNotFoundError(f"{d} has no separation.parquet: give the --out directory of `saeray separate`")
    raw = pq.read_schema(file).metadata or {}
    if b"saeray.separation" not in raw:
        raise ValueError(f"{file} has no saeray.separation metadata: write it with `saeray separate`")
    meta = json.loads(raw[b"saeray.separation"])
    run = meta["run"]
    if not (Path(run) / "manifest.json").is_file():
        raise FileNotFoundError(f"the separation in {d} was computed on run {run}, which is not found from here: "
                                "run `saeray report` from the directory `saeray separate` ran in")
    scores = pl.read_parquet(file)
    s, g = choose_pair(scores, sae, group)
    fires = (pl.col("f_pos") > 0) | (pl.col("f_neg") > 0)
    best = (scores.filter((pl.col("sae") == s) & (pl.col("group") == g) & fires)
            .sort([(pl.col("auroc") - 0.5).abs(), "feature"], descending=[True, False], nulls_last=True).head(top))
    labels, _ = read_labels(run, meta["label"], meta["positive"])
    x, docs = last_values(run, labels)
    docs = docs.filter(pl.col("group") == g)
    grid = docs.join(best.select("sae", "group", "feature"), on="group")
    values = (grid.join(x.select("sae", "group", "doc_id", "feature", "value"),
                        on=["sae", "group", "doc_id", "feature"], how="left")
              .with_columns(pl.col("value").fill_null(0.0))
              .select("sae", "group", "feature", "doc_id", "value", "y").sort("feature", "doc_id"))
    return SeparationData(str(d), run, meta, scores, values, best["feature"].to_list())


def heatmap_matrix(run: str | Path, features: list[int], category: str, *, sae: str, group: str,
                   max_docs: int = 2000) -> tuple[pl.DataFrame, int]:
    """(documents x features frame grouped by category, stride): every `stride`-th document when there are
    more than max_docs, so the category blocks keep their order and proportions."""
    from ..analysis.explore import feature_by_doc_matrix

    m = feature_by_doc_matrix(run, features, category, sae=sae, group=group)
    stride = max(1, -(-m.height // max_docs))
    return (m.gather_every(stride) if stride > 1 else m), stride
