"""Exports of a run for other tools: Neuronpedia feature dashboards (SAEDashboard's NeuronpediaRunner layout).

`neuronpedia(run, out)` writes, per batch of features, `batch-N.json` in the layout SAEDashboard's
NeuronpediaRunner writes and Neuronpedia imports (top-level model_id, layer, sae_set, sae_id_suffix,
features; every feature key that runner writes), plus `skipped_indexes.json` and `run_settings.json`.
It reads only the run's statistics, partials and docs (a statistics-only run works) and the model's and
SAE's weights (for logits and decoder alignment).

What differs from SAEDashboard by design (see `DIFFERENCES`): saeray's figures come from the whole corpus
the run read, not ~24k prompts of 128 tokens; frac_nonzero is the exact density over counted tokens (not
read back from a percentage rounded to 3 decimals, and special tokens are not in the denominator); the
activation histogram has saeray's fixed log-spaced bins; the top examples are the feature's top documents
(one example per document, where SAEDashboard may show one prompt several times); interval groups are
saeray's log-spaced intervals; contexts are `output.context_radius` tokens either side of the example, not
the whole prompt; correlated neurons and features are not computed (empty lists).
"""

from __future__ import annotations

import gc
import gzip
import json
import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import polars as pl
import torch

from ..engine.run import open_run
from ..engine.storage import write_local
from .logit_fields import LOGIT_ROWS, fit_strings, token_strings
from .logit_fields import logit_fields as compute_logit_fields
from .logit_fields import weights as load_weights

log = logging.getLogger(__name__)


class Steps:
    """Progress of an export in log lines: step i of n, what it covered, elapsed time and an estimate of the rest
    (at most one line every `every` seconds, and the last one)."""

    def __init__(self, what: str, total: int, every: float = 5.0):
        self.what, self.total, self.every = what, total, every
        self.started = self.shown = time.monotonic()
        self.done = 0

    def step(self, detail: str) -> None:
        self.done += 1
        now = time.monotonic()
        if now - self.shown < self.every and self.done < self.total:
            return
        self.shown = now
        spent = now - self.started
        left = spent / self.done * (self.total - self.done)
        log.info("%s: %d/%d %s | elapsed %.0fs | ETA %.0fs", self.what, self.done, self.total, detail, spent, left)

DIFFERENCES = {
    "frac_nonzero": "exact n_active / n_tokens over the run's counted tokens (special tokens excluded from both)",
    "freq_hist": "counts of positive activations in saeray's fixed log-spaced bins (partials.EDGES) from the lowest "
                 "to the highest bin reached; values are the bins' geometric centres",
    "top examples": "the top documents by their maximum (one example per document), at the maximum's position",
    "interval examples": "saeray's interval examples (whole log-spaced value bins), bin_contains = fraction of "
                         "counted tokens whose value lies in the interval; highest interval first",
    "contexts": "output.context_radius tokens either side of the example (clipped to the document), not the prompt",
    "correlated_neurons, correlated_features": "not computed: empty lists",
    "logits": "W_U @ (final norm gain * W_dec[f]) (saeray.tools.logits), as TransformerLens' folded W_U gives",
}

# SAEDashboard's substitutions of vocabulary pieces for display (byte-level BPE markers and mojibake)
def opened(run: Any, sae: str | None, group: str | None) -> tuple[Any, dict, Any, Any, str, str, pl.DataFrame]:
    """(the open run, its manifest, config, the SAE's config, SAE name, group, that (SAE, group)'s statistics)."""
    from ..analysis.stats import features as run_features
    from ..engine import config as config_mod
    from ..tools.probe import pick_sae
    from .data import choose_pair

    run = open_run(run)
    manifest = run.read_manifest()
    cfg = config_mod.from_dict(manifest["config"])
    sae_cfg = pick_sae(cfg, sae)
    stats = run_features(run).collect()
    sae_name, group = choose_pair(stats.filter(pl.col("sae") == sae_cfg.name), sae_cfg.name, group)
    stats = stats.filter((pl.col("sae") == sae_name) & (pl.col("group") == group)).sort("feature")
    return run, manifest, cfg, sae_cfg, sae_name, group, stats


READ_FEATURES = 4096
"""Features whose examples and histograms `neuronpedia` reads from the run at once (each read scans every unit's
partials); the batch files are cut from each read."""


def neuronpedia(run: str | Path, out: str | Path, *, sae: str | None = None, group: str | None = None,
                features_per_batch: int = 128, features: list[int] | None = None, n_intervals: int = 5,
                per_interval: int = 5, top: int = 20, context: int | None = None, compress: bool = False
                ) -> list[Path]:
    """Write Neuronpedia batch files for one (SAE, position group) of `run` into `out`; return the files.

    `features`: only these (default: all), still cut into the batches of the whole SAE (NeuronpediaRunner's
    np.array_split of 0..d_sae-1 into ceil(d_sae / features_per_batch) chunks). Each file is written (temporary
    name, then rename) as soon as its batch is done.

    What makes a feature's record large is its examples: `top` top documents and `n_intervals` x `per_interval`
    interval examples, each with `context` tokens either side (default and most: the run's output.context_radius).
    `compress` writes batch-N.json.gz (gzip) instead."""
    from ..analysis.top import interval_examples, top_examples
    from .data import activation_histograms

    run, manifest, cfg, sae_cfg, sae_name, group, stats = opened(run, sae, group)
    d_sae = stats.height
    radius = int(manifest["config"]["output"].get("context_radius", 32))
    if context is not None:
        if not 0 <= context <= radius:
            raise ValueError(f"context {context}: the run kept {radius} tokens either side of its examples "
                             f"(output.context_radius); give 0 to {radius}")
        radius = context
    hook = next(s for s in manifest["resolved"]["saes"] if s["name"] == sae_name)["hook"]
    layer = int(hook.split(".")[1]) if hook.startswith("blocks.") else 0
    n_docs = sum(int(m.get("docs", 0)) for m in run.completions().values())
    corpus = {"n_prompts_total": n_docs, "n_tokens_in_prompt": int(manifest["resolved"]["context_size"]),
              "dataset": cfg.data.dataset}
    chunks = np.array_split(np.arange(d_sae), math.ceil(d_sae / features_per_batch))
    wanted = set(features) if features is not None else None
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    model_id = cfg.model.name
    window = (radius, radius)
    todo = [(n, feats) for n, chunk in enumerate(chunks)
            if (feats := [int(f) for f in chunk if wanted is None or int(f) in wanted])]
    density, n_tokens = stats["density"].to_list(), stats["n_tokens"].to_list()
    steps = Steps("neuronpedia", len(todo))
    # the workers load the weights and the vocabulary, then compute the logit fields while this thread reads and
    # writes
    with _workers() as pool, _no_cycle_collection():
        weights = pool.submit(load_weights, cfg, sae_cfg)
        vocab = pool.submit(token_strings, cfg.model)

        def strings() -> np.ndarray:  # one string per row of the unembedding
            return fit_strings(vocab.result(), weights.result()[0].shape[0])

        def fields(feats: list[int]) -> list[dict[str, Any]]:
            w_u, gain, w_dec = weights.result()
            return compute_logit_fields(w_dec[feats], gain, w_u, strings())

        pair = {"sae": sae_name, "group": group, "window": window}
        for reads in _reads(todo, READ_FEATURES):
            logit_fields = [(pool.submit(fields, [f for _, batch in part for f in batch]), part)
                            for part in _reads(reads, LOGIT_ROWS)]
            feats = [f for _, batch in reads for f in batch]
            tops = top_examples(run, feats, k=top, **pair)
            ivs = interval_examples(run, feats, bins=n_intervals, per_bin=per_interval, **pair)
            hists = activation_histograms(run, feats, sae=sae_name, group=group)
            tops, ivs = _Examples(tops, strings()), _Examples(ivs, strings())
            for done, batches in logit_fields:
                at = 0
                for n, batch in batches:
                    lfs = done.result()[at:at + len(batch)]
                    at += len(batch)
                    entries = [_feature(f, float(density[f]), int(n_tokens[f]), lf, hists.get(f, (None, None)), tops,
                                        ivs, corpus) for f, lf in zip(batch, lfs)]
                    path = out_dir / f"batch-{n}.json{'.gz' if compress else ''}"
                    data = orjson.dumps({"model_id": model_id, "layer": layer, "sae_set": sae_name,
                                         "sae_id_suffix": None, "features": entries})
                    write_local(path, gzip.compress(data, 6, mtime=0) if compress else data, fsync=False)
                    written.append(path)
                    steps.step(f"batch files ({len(batch)} features in {path.name})")
    (out_dir / "skipped_indexes.json").write_text(json.dumps(
        {"model_id": model_id, "layer": str(layer), "sae_set": sae_name, "log_sparsity": None, "skipped_indexes": []}))
    (out_dir / "run_settings.json").write_text(json.dumps(
        {"exporter": "saeray", "run": str(run), "fingerprint": manifest["fingerprint"], "sae": sae_name, "group": group,
         "hook": hook, "model_id": model_id, "layer": layer, "d_sae": d_sae, "n_features_at_a_time": features_per_batch,
         "n_prompts_total": n_docs, "n_tokens_in_prompt": corpus["n_tokens_in_prompt"],
         "top_acts_group_size": top, "n_quantiles": n_intervals, "quantile_group_size": per_interval,
         "context_radius": radius, "differences_from_saedashboard": DIFFERENCES}, indent=2))
    return written


@contextmanager
def _workers() -> Iterator[ThreadPoolExecutor]:
    """A pool of as many threads as torch has, torch set to one thread meanwhile: the workers' matrix products run
    side by side (torch releases the GIL) instead of each one's threads waiting on each other. On an error or a
    stop the tasks not started are dropped."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    pool = ThreadPoolExecutor(max_workers=threads)
    try:
        yield pool
    except BaseException:
        pool.shutdown(cancel_futures=True)
        raise
    finally:
        pool.shutdown()
        torch.set_num_threads(threads)


@contextmanager
def _no_cycle_collection() -> Iterator[None]:
    """Python's cycle collector off meanwhile: the batch files are millions of small lists and dicts (no cycles),
    whose allocation would otherwise start a full collection over them again and again (a fifth of the export)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _reads(todo: list[tuple[int, list[int]]], most: int) -> Iterator[list[tuple[int, list[int]]]]:
    """The (batch number, features) in runs of whole batches of at most `most` features (a larger batch alone)."""
    run: list[tuple[int, list[int]]] = []
    size = 0
    for n, feats in todo:
        if run and size + len(feats) > most:
            yield run
            run, size = [], 0
        run.append((n, feats))
        size += len(feats)
    if run:
        yield run


class _Examples:
    """One read's examples (a top_examples or interval_examples frame) by feature, with every row's display tokens,
    activations rounded to 5 decimals and position in its context made for all rows at once."""

    def __init__(self, frame: pl.DataFrame, strings: np.ndarray):
        ends = frame["token_ids"].list.len().cum_sum().to_list()
        starts = [0, *ends[:-1]]
        tokens = strings[frame["token_ids"].explode(empty_as_null=False).to_numpy()].tolist()
        # numpy's round of a float32 value is Python's round(value, 5): value * 1e5 is exact in float64
        values = frame["acts"].explode(empty_as_null=False).to_numpy().astype(np.float64).round(5).tolist()
        self.tokens = [tokens[a:b] for a, b in zip(starts, ends)]
        self.values = [values[a:b] for a, b in zip(starts, ends)]
        self.qualifying = (frame["pos"] - frame["window_start"]).to_list()
        self.value = frame["value"].to_list()
        if "bin" in frame.columns:
            self.bin, self.bin_lo, self.bin_hi = (frame[c].to_list() for c in ("bin", "bin_lo", "bin_hi"))
        self.rows: dict[int, list[int]] = {}
        for i, f in enumerate(frame["feature"].to_list()):
            self.rows.setdefault(f, []).append(i)

    def example(self, i: int, bin_min: float, bin_max: float, bin_contains: float) -> dict[str, Any]:
        return {"bin_min": bin_min, "bin_max": bin_max, "bin_contains": bin_contains, "tokens": self.tokens[i],
                "values": self.values[i], "qualifying_token_index": self.qualifying[i],
                "dfa_values": [], "dfa_maxValue": 0, "dfa_targetIndex": -1}


def _feature(f: int, density: float, n_tok: int, logit_fields: dict[str, Any], hist: tuple[Any, Any],
             tops: _Examples, ivs: _Examples, corpus: dict[str, Any]) -> dict[str, Any]:
    """Feature f's entry of a batch file: `density` and `n_tok` its statistics, `logit_fields` its `_logit_fields`,
    `hist` its (edges, counts), `tops` and `ivs` the read's top and interval examples."""
    edges, counts = hist
    lf = logit_fields
    examples = [tops.example(i, -1, tops.value[i], -1) for i in tops.rows.get(f, ())]
    examples += _interval_examples(ivs, ivs.rows.get(f, []), edges, counts, n_tok)
    return {
        "feature_index": f,
        "neuron_alignment_indices": lf["neuron_alignment_indices"],
        "neuron_alignment_values": lf["neuron_alignment_values"],
        "neuron_alignment_l1": lf["neuron_alignment_l1"],
        "correlated_neurons_indices": [], "correlated_neurons_l1": [], "correlated_neurons_pearson": [],
        "correlated_features_indices": [], "correlated_features_l1": [], "correlated_features_pearson": [],
        "neg_str": lf["neg_str"], "neg_values": lf["neg_values"],
        "pos_str": lf["pos_str"], "pos_values": lf["pos_values"],
        "frac_nonzero": density,
        "freq_hist_data_bar_values": [] if edges is None else np.sqrt(edges[:-1] * edges[1:]).round(5).tolist(),
        "freq_hist_data_bar_heights": [] if counts is None else counts.tolist(),
        "logits_hist_data_bar_heights": lf["logits_hist_data_bar_heights"],
        "logits_hist_data_bar_values": lf["logits_hist_data_bar_values"],
        "n_prompts_total": corpus["n_prompts_total"], "n_tokens_in_prompt": corpus["n_tokens_in_prompt"],
        "dataset": corpus["dataset"], "decoder_weights_dist": [], "activations": examples, "vector": [],
    }


def _interval_examples(ivs: _Examples, rows: list[int], edges: np.ndarray | None, counts: np.ndarray | None,
                       n_tok: int) -> list[dict[str, Any]]:
    """A feature's interval examples (`rows` of `ivs`), highest interval first; bin_contains = the fraction of
    counted tokens whose value lies in the interval (from the feature's histogram)."""
    from ..engine.partials import value_bins_np

    by_bin: dict[int, list[int]] = {}
    for i in rows:
        by_bin.setdefault(ivs.bin[i], []).append(i)
    out = []
    for b in sorted(by_bin, reverse=True):
        part = by_bin[b]
        lo, hi = float(ivs.bin_lo[part[0]]), float(ivs.bin_hi[part[0]])
        contains = 0.0
        if counts is not None and n_tok:
            vb = value_bins_np(np.array([np.nextafter(np.float32(max(lo, 0.0)), np.float32(np.inf)), hi],
                                        dtype=np.float32))
            first_bin = int(value_bins_np(np.array([edges[0] * 1.0001], dtype=np.float32))[0])
            idx = np.arange(first_bin, first_bin + len(counts))
            contains = float(counts[(idx >= vb[0]) & (idx <= vb[1])].sum()) / n_tok
        out.extend(ivs.example(i, lo, hi, contains) for i in part)
    return out
