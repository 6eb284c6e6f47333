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

import json
import logging
import math
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from ..engine.run import open_run
from ..engine.storage import write_local

log = logging.getLogger(__name__)


class _Steps:
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
_PIECE_SUBSTITUTIONS = [("Ġ", " "), ("Ċ", "\n"), ("ĉ", "\t"), ("âĢĶ", "—"), ("âĢĵ", "–"), ("âĢľ", "“"), ("âĢĿ", "”"),
                        ("âĢĺ", "‘"), ("âĢĻ", "’"), ("âĢĭ", " ")]


def vocab_strings(tokenizer: Any, d_vocab: int) -> list[str]:
    """Display string per token id as Neuronpedia's batch files carry them: the vocabulary piece with
    SAEDashboard's substitutions; ids past the vocabulary are `<|outofrange|>`."""
    pieces = {i: p for p, i in tokenizer.get_vocab().items()}
    marked = re.compile("[" + "".join({a[0] for a, _ in _PIECE_SUBSTITUTIONS}) + "]").search
    out = []
    for i in range(d_vocab):
        p = pieces.get(i)
        if p is None:
            out.append("<|outofrange|>")
            continue
        if marked(p):
            for a, b in _PIECE_SUBSTITUTIONS:
                p = p.replace(a, b)
        out.append(p)
    return out


def ranked(x: torch.Tensor, k: int, *, largest: bool = True, block: int = 256) -> np.ndarray:
    """Column indices [rows, k] of each row's k largest values, largest first, ties to the smaller index (the first
    k of `np.argsort(-row, kind="stable")`); with largest=False its k smallest, smallest first, ties to the larger
    index (the first k of that order reversed). `x` holds no NaN.

    Each row is first narrowed to the blocks of `block` columns whose maximum reaches the k-th largest block maximum
    (k blocks, more where maxima tie), and the columns past the last whole block: every value that can be among the
    k is there, ties at the cut included."""
    rows, n = x.shape
    k = min(k, n)
    whole = n // block
    if whole <= k:
        return _ranked(x, torch.arange(n).expand(rows, n), k, largest)
    blocks = x[:, :whole * block].view(rows, whole, block)
    extremes = blocks.amax(2) if largest else blocks.amin(2)
    ends, which = torch.topk(extremes, k + 1, dim=1, largest=largest)
    offsets, rest = torch.arange(block), torch.arange(whole * block, n)
    narrowed = torch.cat([(which[:, :k, None] * block + offsets).reshape(rows, k * block),
                          rest.expand(rows, len(rest))], dim=1)
    out = _ranked(x.gather(1, narrowed), narrowed, k, largest)
    for r in torch.nonzero(ends[:, k] == ends[:, k - 1])[:, 0].tolist():  # every block that reaches the k-th's end
        reach = (extremes[r] >= ends[r, k - 1]) if largest else (extremes[r] <= ends[r, k - 1])
        cols = torch.cat([(reach.nonzero() * block + offsets).reshape(-1), rest])
        out[r] = _ranked(x[r, cols][None], cols[None], k, largest)[0]
    return out


def _ranked(values: torch.Tensor, columns: torch.Tensor, k: int, largest: bool) -> np.ndarray:
    """`ranked` of `values` [rows, m] (float32) whose entries are the columns `columns` [rows, m] of the matrix
    ranked: one torch.topk over int64 keys that order by value, then column (no two equal in a row)."""
    bits = (values.numpy() + np.float32(0.0)).view(np.int32).astype(np.int64)  # + 0.0: -0.0 is 0.0, as in argsort
    keys = np.where(bits < 0, bits ^ 0x7FFFFFFF, bits) * 2**32 + (2**32 - 1 - columns.numpy())
    return columns.gather(1, torch.topk(torch.from_numpy(keys), k, dim=1, largest=largest).indices).numpy()


def _histc(x: torch.Tensor, lo: float, hi: float, bins: int = 50) -> tuple[list[int], list[float]]:
    """Equal-width histogram of `x` over [lo, hi] (its min and max) with the max in the last bin (torch.histc), and
    bin centres."""
    heights = torch.histc(x, bins=bins, min=lo, max=hi).long().tolist()
    width = (hi - lo) / bins
    centres = (np.linspace(lo, hi, bins + 1)[:-1] + width / 2).round(5).tolist()
    return heights, centres


def _opened(run: Any, sae: str | None, group: str | None) -> tuple[Any, dict, Any, Any, str, str, pl.DataFrame]:
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
                per_interval: int = 5, top: int = 20) -> list[Path]:
    """Write Neuronpedia batch files for one (SAE, position group) of `run` into `out`; return the files.

    `features`: only these (default: all), still cut into the batches of the whole SAE (NeuronpediaRunner's
    np.array_split of 0..d_sae-1 into ceil(d_sae / features_per_batch) chunks). Each file is written (temporary
    name, then rename) as soon as its batch is done."""
    from ..analysis.top import interval_examples, top_examples
    from .data import activation_histograms

    run, manifest, cfg, sae_cfg, sae_name, group, stats = _opened(run, sae, group)
    d_sae = stats.height
    radius = int(manifest["config"]["output"].get("context_radius", 32))
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
    steps = _Steps("neuronpedia", len(todo))
    # the workers load the model, then compute the batches' logit fields while this thread reads and writes
    with _workers() as pool:
        weights = pool.submit(_weights, cfg, sae_cfg)

        def fields(batch: list[int]) -> list[dict[str, Any]]:
            w_u, gain, w_dec, strings = weights.result()
            return _logit_fields(w_dec[batch], gain, w_u, strings)

        pair = {"sae": sae_name, "group": group, "window": window}
        for reads in _reads(todo, READ_FEATURES):
            logit_fields = [pool.submit(fields, batch) for _, batch in reads]
            feats = [f for _, batch in reads for f in batch]
            tops = top_examples(run, feats, k=top, **pair)
            ivs = interval_examples(run, feats, bins=n_intervals, per_bin=per_interval, **pair)
            hists = activation_histograms(run, feats, sae=sae_name, group=group)
            strings = weights.result()[3]
            tops, ivs = _Examples(tops, strings), _Examples(ivs, strings)
            for (n, batch), done in zip(reads, logit_fields):
                entries = [_feature(f, float(density[f]), int(n_tokens[f]), lf, hists.get(f, (None, None)), tops, ivs,
                                    corpus) for f, lf in zip(batch, done.result())]
                path = out_dir / f"batch-{n}.json"
                write_local(path, json.dumps({"model_id": model_id, "layer": layer, "sae_set": sae_name,
                                              "sae_id_suffix": None, "features": entries}).encode(), fsync=False)
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


def _weights(cfg: Any, sae_cfg: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray]:
    """(unembedding [vocab, d_model], the final norm's gain [d_model], decoder [d_sae, d_model], token strings),
    float32 on CPU: what the logits and decoder alignment of the batch files need."""
    from ..engine.models import load_model
    from ..engine.saes import load
    from ..tools.logits import final_norm, norm_gain

    device = torch.device("cpu")
    model, tokenizer = load_model(cfg.model, device)
    w_u = model.get_output_embeddings().weight.detach().float()
    norm = final_norm(model)
    gain = norm_gain(norm, w_u.shape[1], w_u.device, next(norm.parameters(), w_u).dtype)
    w_dec = load(sae_cfg, device).W_dec.detach().float()
    return w_u, gain, w_dec, np.array(vocab_strings(tokenizer, w_u.shape[0]), dtype=object)


def _logit_fields(w: torch.Tensor, gain: torch.Tensor, w_u: torch.Tensor, strings: np.ndarray) -> list[dict[str, Any]]:
    """Per decoder row of `w` [n, d_model]: its neuron alignment, top and bottom 10 logits and logit histogram,
    as the batch file's fields; the logits of all rows are one matrix product."""
    logits = (w * gain) @ w_u.T
    pos, neg, align = ranked(logits, 10), ranked(logits, 10, largest=False), ranked(w, 3)
    lows, highs = logits.amin(dim=1).tolist(), logits.amax(dim=1).tolist()
    out = []
    for r, (lv, wr) in enumerate(zip(logits.numpy(), w.numpy())):
        a = align[r]
        l1 = float(np.abs(wr).sum()) or 1.0
        lh, lc = _histc(logits[r], lows[r], highs[r])
        out.append({
            "neuron_alignment_indices": a.tolist(),
            "neuron_alignment_values": wr[a].astype(float).round(5).tolist(),
            "neuron_alignment_l1": (np.abs(wr[a]) / l1).astype(float).round(5).tolist(),
            "neg_str": strings[neg[r]].tolist(), "neg_values": lv[neg[r]].astype(float).round(5).tolist(),
            "pos_str": strings[pos[r]].tolist(), "pos_values": lv[pos[r]].astype(float).round(5).tolist(),
            "logits_hist_data_bar_heights": lh, "logits_hist_data_bar_values": lc})
    return out


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


DELPHI_NOTE = ("each example `saeray top` shows (its output.top_k top documents and its interval examples, 5 intervals "
               "x output.samples_per_bin documents; saeray/engine/partials.py) is one "
               "sequence: the tokens pos - radius .. pos + radius of its document (clipped, padded on the right with "
               "the pad token, which never activates) with the feature's values there; load with delphi's "
               "ConstructorConfig(example_ctx_len=cache_ctx_len) so each sequence is one example")


def delphi(run: str | Path, out: str | Path, *, sae: str | None = None, group: str | None = None, n_splits: int = 5,
           hookpoint: str | None = None, n_intervals: int = 5, features_at_a_time: int = 4096) -> list[Path]:
    """Write delphi's latent cache layout for one (SAE, group) of `run`: out/latents/<hookpoint>/config.json and
    `{start}_{end}.safetensors` per latent range (delphi's split formula), each with locations [N, 3] (sequence,
    position, latent - start; uint16 when they fit, else uint32; sorted by (sequence, position, latent)),
    activations (float16) and the token matrix [n_sequences, 2 * radius + 1] (int64, in every split, as delphi
    writes it). The sequences are the run's kept examples (DELPHI_NOTE): delphi's LatentDataset then yields, per
    latent, exactly the run's examples of it. Return the files written."""
    from safetensors.numpy import save_file

    from ..analysis.top import interval_examples, top_examples

    run, manifest, cfg, _, sae_name, group, stats = _opened(run, sae, group)
    width = stats.height
    out_cfg = manifest["config"]["output"]
    radius = int(out_cfg.get("context_radius", 32))
    from ..analysis.stats import has_kind

    if not has_kind(run, "examples"):
        raise ValueError(f"{run} holds no example partials (made before saeray kept them, or output.top_k and "
                         "output.samples_per_bin 0): rerun it to export it for delphi")
    k, per_bin = int(out_cfg.get("top_k", 0)), int(out_cfg.get("samples_per_bin", 0))
    parts = []
    starts = range(0, width, features_at_a_time)
    steps = _Steps("delphi", len(starts))
    for a in starts:
        feats = list(range(a, min(width, a + features_at_a_time)))
        if k:
            parts.append(top_examples(run, feats, sae=sae_name, group=group, k=k, window=(radius, radius)))
        if per_bin:
            parts.append(interval_examples(run, feats, sae=sae_name, group=group, bins=n_intervals, per_bin=per_bin,
                                           window=(radius, radius)))
        steps.step(f"feature ranges read (features {a}-{feats[-1]})")
    cols = ["feature", "doc_id", "window_start", "token_ids", "acts"]
    ex = pl.concat([p.select(cols) for p in parts]).unique(["feature", "doc_id"], keep="first").sort("feature", "doc_id")
    ctx = 2 * radius + 1
    tok = run.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    # a sequence per distinct (doc_id, window_start), numbered in order of first appearance
    seqs: dict[tuple[int, int], int] = {}
    keys = zip(ex["doc_id"].to_list(), ex["window_start"].to_list())
    seq_of = np.fromiter((seqs.setdefault(key, len(seqs)) for key in keys), np.int64, ex.height)
    firsts = ex["token_ids"].gather(np.unique(seq_of, return_index=True)[1])
    row, col, ids = _flat(firsts)
    tokens = np.full((len(firsts), ctx), pad, np.int64)
    tokens[row, col] = ids
    row, pos, acts = _flat(ex["acts"])
    acts = acts.astype(np.float64)
    kept = np.abs(acts) > 1e-5  # what delphi's cache keeps
    seq, pos, lat = seq_of[row[kept]], pos[kept], ex["feature"].to_numpy().astype(np.int64)[row[kept]]
    val = acts[kept].astype(np.float32)
    order = np.lexsort((lat, pos, seq))
    seq, pos, lat, val = seq[order], pos[order], lat[order], val[order]
    hook = hookpoint or next(s["hook"] for s in manifest["resolved"]["saes"] if s["name"] == sae_name)
    d = Path(out) / "latents" / hook
    d.mkdir(parents=True, exist_ok=True)
    bounds = torch.linspace(0, width, n_splits + 1).long().tolist()
    written = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        m = (lat >= a) & (lat < b)
        loc = np.stack([seq[m], pos[m], lat[m] - a], axis=1) if m.any() else np.zeros((0, 3), np.int64)
        small = not m.any() or (loc[:, 0].max() < 65536 and loc[:, 2].max() < 65536)
        path = d / f"{a}_{b - 1}.safetensors"
        save_file({"locations": loc.astype(np.uint16 if small else np.uint32), "activations": val[m].astype(np.float16),
                   "tokens": tokens}, str(path))
        written.append(path)
    (d / "config.json").write_text(json.dumps({
        "dataset_repo": cfg.data.dataset, "dataset_split": cfg.data.split, "dataset_name": "",
        "dataset_column": cfg.data.text_column, "batch_size": len(tokens), "cache_ctx_len": ctx,
        "n_tokens": int(tokens.size), "n_splits": n_splits, "model_name": cfg.model.name,
        "saeray": {"run": str(run), "fingerprint": manifest["fingerprint"], "sae": sae_name, "group": group,
                   "radius": radius, "sequences": DELPHI_NOTE}}, indent=2))
    return written


def _flat(lists: pl.Series) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A list column's items flattened: (the row of each, its position in its list, the values)."""
    lengths = lists.list.len().to_numpy().astype(np.int64)
    row = np.repeat(np.arange(len(lengths)), lengths)
    starts = np.cumsum(lengths) - lengths
    return row, np.arange(len(row)) - starts[row], lists.explode(empty_as_null=False).to_numpy()
