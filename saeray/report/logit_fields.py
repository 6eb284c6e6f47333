"""The logit fields of a Neuronpedia batch file: per decoder row its top and bottom logits over the vocabulary, the
logit histogram and its neuron alignment, with the vocabulary's display strings.

The logits of a feature are W_U @ (final norm gain * W_dec[f]) (saeray.tools.logits), float32 on the CPU: for a
262k-token vocabulary a matrix product of 335 MFLOP per feature, the export's largest cost (about 0.8 core-seconds
per 256 features on this project's test machines, histogram and ranking included).
"""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import torch

_PIECE_SUBSTITUTIONS = [("Ġ", " "), ("Ċ", "\n"), ("ĉ", "\t"), ("âĢĶ", "—"), ("âĢĵ", "–"), ("âĢľ", "“"), ("âĢĿ", "”"),
                        ("âĢĺ", "‘"), ("âĢĻ", "’"), ("âĢĭ", " ")]


def vocab_strings(vocab: dict[str, int], d_vocab: int | None = None) -> list[str]:
    """Display string per token id of a tokenizer's vocabulary {piece: id} (0..d_vocab-1; default: to its largest
    id) as Neuronpedia's batch files carry them: the piece with SAEDashboard's substitutions; ids past the
    vocabulary are `<|outofrange|>`."""
    pieces = {i: p for p, i in vocab.items()}
    marked = re.compile("[" + "".join({a[0] for a, _ in _PIECE_SUBSTITUTIONS}) + "]").search
    out = []
    for i in range(max(pieces, default=-1) + 1 if d_vocab is None else d_vocab):
        p = pieces.get(i)
        if p is None:
            out.append("<|outofrange|>")
            continue
        if marked(p):
            for a, b in _PIECE_SUBSTITUTIONS:
                p = p.replace(a, b)
        out.append(p)
    return out



def weights(cfg: Any, sae_cfg: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(unembedding [vocab, d_model], the final norm's gain [d_model], decoder [d_sae, d_model]), float32 on CPU:
    what the logits and decoder alignment of the batch files need."""
    from ..engine.models import load_model_and_processor
    from ..engine.saes import decoder
    from ..tools.logits import final_norm, norm_gain

    device = torch.device("cpu")
    model = load_model_and_processor(cfg.model, device, tokenizer=False)[0]
    w_u = model.get_output_embeddings().weight.detach().float()
    norm = final_norm(model)
    gain = norm_gain(norm, w_u.shape[1], w_u.device, next(norm.parameters(), w_u).dtype)
    return w_u, gain, decoder(sae_cfg)


def token_strings(model_cfg: Any) -> np.ndarray:
    """`vocab_strings` of the model's tokenizer (ids 0 to its largest) as an object array. A model folder with the
    fast tokenizer's own file (tokenizer.json) is read as JSON (`file_vocab`: a tenth of transformers' load of a
    262k-token tokenizer); else the tokenizer transformers loads."""
    from ..engine.models import resolve_source

    source, kwargs = resolve_source(model_cfg.name)
    path = Path(source) / "tokenizer.json"
    vocab = file_vocab(path) if not kwargs and model_cfg.revision in (None, "main") and path.is_file() else None
    if vocab is None:
        from transformers import AutoTokenizer

        vocab = AutoTokenizer.from_pretrained(source, revision=model_cfg.revision,
                                              trust_remote_code=model_cfg.trust_remote_code, **kwargs).get_vocab()
    return np.array(vocab_strings(vocab), dtype=object)


def file_vocab(path: Path) -> dict[str, int] | None:
    """The vocabulary of a tokenizer.json as the `tokenizers` library's get_vocab gives it (the model's pieces, then
    the added tokens): BPE, WordPiece and WordLevel hold {piece: id}, Unigram [[piece, score], ...] in id order.
    None for another model type (the caller loads the tokenizer instead)."""
    data = orjson.loads(path.read_bytes())
    model = data.get("model") or {}
    vocab = model.get("vocab")
    if model.get("type") in ("BPE", "WordPiece", "WordLevel") and isinstance(vocab, dict):
        out = dict(vocab)
    elif model.get("type") == "Unigram" and isinstance(vocab, list):
        out = {entry[0]: i for i, entry in enumerate(vocab)}
    else:
        return None
    out.update({t["content"]: t["id"] for t in data.get("added_tokens") or []})
    return out


def fit_strings(strings: np.ndarray, n: int) -> np.ndarray:
    """`strings` for ids 0..n-1: cut, or extended with `<|outofrange|>` (an unembedding wider than the vocabulary)."""
    if len(strings) >= n:
        return strings[:n]
    return np.concatenate([strings, np.array(["<|outofrange|>"] * (n - len(strings)), dtype=object)])


LOGIT_ROWS = 256
"""Decoder rows whose logits one worker computes at once (into a buffer it reuses: [256, vocab] float32, 268 MB
for a 262k vocabulary): a product of 256 rows runs ~1.5x faster per row than one of 128 into a new tensor."""

_SCRATCH = threading.local()


def _logits(w: torch.Tensor, w_u: torch.Tensor) -> torch.Tensor:
    """w @ w_u.T [rows, vocab] in this thread's reused buffer (valid until its next call in this thread)."""
    n = w.shape[0] * w_u.shape[0]
    buf = getattr(_SCRATCH, "logits", None)
    if buf is None or buf.numel() < n:
        buf = _SCRATCH.logits = torch.empty(n)
    out = buf[:n].view(w.shape[0], w_u.shape[0])
    return torch.mm(w, w_u.T, out=out)


def logit_fields(w: torch.Tensor, gain: torch.Tensor, w_u: torch.Tensor, strings: np.ndarray) -> list[dict[str, Any]]:
    """Per decoder row of `w` [n, d_model]: its neuron alignment, top and bottom 10 logits and logit histogram,
    as the batch file's fields; the logits of all rows are one matrix product."""
    logits = _logits(w * gain, w_u)
    pos, neg, align = ranked(logits, 10), ranked(logits, 10, largest=False), ranked(w, 3)
    rows = torch.arange(len(logits))  # each row's minimum and maximum: the first of its bottom and top logits
    lows, highs = (logits[rows, torch.from_numpy(ends[:, 0])].tolist() for ends in (neg, pos))
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
