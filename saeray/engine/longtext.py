"""Tokenize a very long text in pieces, with the memory of one piece.

A fast tokenizer's encoding of a text holds ~100 bytes per token (ids, offsets, token strings, masks): a
20 MB single-line document would hold gigabytes at once. Here the text is tokenized PIECE_CHARS
characters at a time. Consecutive pieces overlap by OVERLAP_CHARS; the next piece starts at a token
boundary inside the overlap, and the two tokenizations are spliced at the first character offset where
both start a token and agree, token for token (ids and offsets), up to a margin before the earlier
piece's end (where its last tokens may be cut). Tokenizers are local (a token depends on the text near
it), so the result equals tokenizing the whole text at once (tests/engine/test_longtext.py checks this on
the shipped models' tokenizers). Where no such splice point exists, the text is tokenized whole.
"""

from __future__ import annotations

from typing import Any

import numpy as np

PIECE_CHARS = 100_000
OVERLAP_CHARS = 2_000
LONG_CHARS = 2 * PIECE_CHARS
"""Texts longer than this are tokenized in pieces."""
MIN_AGREE = 8
"""Tokens that must agree after a splice point (or every token left, when fewer)."""

Spans = tuple[np.ndarray, np.ndarray, np.ndarray]
"""(ids int32, starts int64, ends int64): tokens and their character offsets in the whole text."""


def _encode(backend: Any, text: str, start: int) -> Spans:
    enc = backend.encode(text, add_special_tokens=False)
    off = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2) + start
    return np.asarray(enc.ids, dtype=np.int32), off[:, 0].copy(), off[:, 1].copy()


def _splice(prev: Spans, cur: Spans, reliable_end: int) -> tuple[int, int] | None:
    """(i, j): prev's tokens [:i] then cur's [j:] equal one tokenization, judged on prev's tokens that end by
    `reliable_end`; None when the two never agree there."""
    p_ids, p_st, p_en = prev
    c_ids, c_st, c_en = cur
    common, pi, ci = np.intersect1d(p_st, c_st, assume_unique=False, return_indices=True)
    for c, i, j in zip(common, pi, ci):
        m = int(np.searchsorted(p_en, reliable_end, side="right")) - i  # prev's tokens from i that are reliable
        if m <= 0:
            return None
        m = min(m, len(c_ids) - j)
        if m < min(MIN_AGREE, len(c_ids) - j):
            continue
        if (np.array_equal(p_ids[i:i + m], c_ids[j:j + m]) and np.array_equal(p_st[i:i + m], c_st[j:j + m])
                and np.array_equal(p_en[i:i + m], c_en[j:j + m])):
            return int(i), int(j)
    return None


def encode_in_pieces(backend: Any, text: str) -> Spans:
    """The tokens of `text` (no special tokens added) with their offsets, tokenized piece by piece."""
    n = len(text)
    if n <= LONG_CHARS:
        return _encode(backend, text, 0)
    done: list[Spans] = []
    start = 0
    prev: Spans | None = None
    prev_end = 0
    while True:
        end = min(n, start + PIECE_CHARS)
        cur = _encode(backend, text[start:end], start)
        if prev is not None:
            cut = _splice(prev, cur, prev_end - OVERLAP_CHARS // 4)
            if cut is None:
                return _encode(backend, text, 0)
            i, j = cut
            done.append(tuple(a[:i] for a in prev))  # type: ignore[arg-type]
            cur = tuple(a[j:] for a in cur)  # type: ignore[assignment]
        if end == n:
            done.append(cur)
            break
        st = cur[1]
        lo, hi = np.searchsorted(st, [end - OVERLAP_CHARS, end - OVERLAP_CHARS // 2])
        if hi <= lo or st[lo] <= start:  # no token starts inside the overlap (one huge token): no piece boundary
            return _encode(backend, text, 0)
        prev, prev_end, start = cur, end, int(st[lo])
    return tuple(np.concatenate(parts) for parts in zip(*done))  # type: ignore[return-value]
