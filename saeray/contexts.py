"""Documents -> token ids -> context windows -> padded batches, and which positions count.

A document's `token_ids` are its text tokens (no BOS); `pos` indexes them. Each window
holds up to `context_size` tokens: BOS (when the SAE expects it) plus a slice of the
document. Every document is its own context: windows never mix documents, and batches are
right-padded, so a token only ever attends to earlier tokens of its own window.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .config import PositionsConfig


class PositionsError(ValueError):
    """A position marker cannot be tokenized."""


@dataclass
class Document:
    doc_id: int
    token_ids: np.ndarray
    """int32 [n_tokens], the document's text tokens."""
    extras: dict[str, Any]
    groups: dict[str, np.ndarray] = field(default_factory=dict)
    """group name -> sorted int32 positions whose activations are kept."""


@dataclass
class Batch:
    input_ids: torch.Tensor
    """[B, T] int64, right-padded."""
    attention_mask: torch.Tensor
    """[B, T] int64."""
    sel_row: dict[str, np.ndarray]
    """group -> row in the batch of each selected position."""
    sel_col: dict[str, np.ndarray]
    """group -> column in the batch of each selected position."""
    sel_doc: dict[str, np.ndarray]
    """group -> doc_id (int64) of each selected position."""
    sel_pos: dict[str, np.ndarray]
    """group -> pos (int32) of each selected position."""
    n_tokens: int
    """Real (unpadded) tokens in the batch, BOS included."""


class Tokenization:
    """Turns text into token ids and chooses the positions to keep, as the config says."""

    def __init__(self, tokenizer: Any, positions: PositionsConfig, *, prepend_bos: bool,
                 context_size: int, exclude_special: bool):
        self.tokenizer = tokenizer
        self.positions = positions
        self.prepend_bos = prepend_bos
        self.context_size = context_size
        self.exclude_special = exclude_special
        bos = tokenizer.bos_token_id
        if prepend_bos and bos is None:
            raise PositionsError("the SAE expects a BOS token but the tokenizer has none: "
                                 "set tokens.prepend_bos: false")
        self.bos_id = bos
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (bos or 0)
        self.special_ids = np.array(sorted(set(tokenizer.all_special_ids)), dtype=np.int64)
        self.markers = {name: (self._marker_ids(g.marker, name), g.offset) for name, g in positions.groups.items()}

    def _marker_ids(self, marker: str, group: str) -> np.ndarray:
        ids = self.tokenizer(marker, add_special_tokens=False)["input_ids"]
        if not ids:
            raise PositionsError(f"positions.groups.{group}.marker {marker!r} tokenizes to nothing")
        return np.asarray(ids, dtype=np.int64)

    def encode(self, text: str) -> np.ndarray:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        return np.asarray(ids, dtype=np.int32)

    def counted(self, token_ids: np.ndarray) -> np.ndarray:
        """Boolean mask of the tokens that count (special tokens excluded unless configured)."""
        if not self.exclude_special or len(self.special_ids) == 0:
            return np.ones(len(token_ids), dtype=bool)
        return ~np.isin(token_ids, self.special_ids)

    def select(self, token_ids: np.ndarray) -> dict[str, np.ndarray]:
        mode = self.positions.mode
        if mode == "all":
            return {"all": np.flatnonzero(self.counted(token_ids)).astype(np.int32)}
        if mode == "last":
            idx = np.flatnonzero(self.counted(token_ids))
            return {"last": idx[-1:].astype(np.int32)}
        out = {}
        n = len(token_ids)
        for name, (marker, offset) in self.markers.items():
            m = len(marker)
            if n < m:
                out[name] = np.empty(0, dtype=np.int32)
                continue
            windows = np.lib.stride_tricks.sliding_window_view(token_ids.astype(np.int64), m)
            anchors = np.flatnonzero((windows == marker).all(axis=1)) + (m - 1)
            pos = anchors + offset
            out[name] = np.unique(pos[(pos >= 0) & (pos < n)]).astype(np.int32)
        return out

    def document(self, doc_id: int, text: Any, extras: dict[str, Any], max_tokens: int | None = None) -> Document:
        if text is None:
            text = ""
        if not isinstance(text, str):
            raise TypeError(f"doc {doc_id}: the text column holds {type(text).__name__} {text!r:.60}, expected a string")
        ids = self.encode(text)
        if max_tokens is not None:
            ids = ids[:max_tokens]
        return Document(doc_id, ids, extras, self.select(ids))

    # ---- windows and batches ----------------------------------------------------------

    def windows(self, docs: list[Document]) -> list[tuple[int, int, int]]:
        """(doc index, start, length) of every window that holds a selected position."""
        step = self.context_size - int(self.prepend_bos)
        out = []
        for i, d in enumerate(docs):
            selected = np.concatenate(list(d.groups.values())) if d.groups else np.empty(0, np.int32)
            if selected.size == 0:
                continue
            # Positions are only read from windows that hold them: skip windows with none.
            for w in np.unique(selected // step):
                start = int(w) * step
                out.append((i, start, min(step, len(d.token_ids) - start)))
        return out

    def batches(self, docs: list[Document], batch_tokens: int, device: torch.device) -> list[Batch]:
        """Windows sorted by length and packed greedily into right-padded batches.

        Shapes are bucketed (widths rounded up in quarter-octave steps, a trailing batch's
        rows rounded up to a power of two) so a long run sees few distinct shapes: kernel
        caches stay small on CPU and GPU, and padding costs at most ~25% of a window.
        """
        wins = sorted(self.windows(docs), key=lambda w: (-w[2], w[0], w[1]))
        off = int(self.prepend_bos)
        batches, i = [], 0
        while i < len(wins):
            width = _bucket(wins[i][2] + off, self.context_size)
            rows = max(1, batch_tokens // width)
            chunk = wins[i:i + rows]
            i += len(chunk)
            n_rows = len(chunk) if len(chunk) == rows else min(rows, 1 << (len(chunk) - 1).bit_length())
            ids = np.full((n_rows, width), self.pad_id, dtype=np.int64)
            mask = np.zeros((n_rows, width), dtype=np.int64)
            mask[len(chunk):, 0] = 1  # filler rows attend to one pad token: no empty softmax
            sel: dict[str, list[tuple[np.ndarray, ...]]] = {}
            for r, (di, start, length) in enumerate(chunk):
                d = docs[di]
                if off:
                    ids[r, 0] = self.bos_id
                ids[r, off:off + length] = d.token_ids[start:start + length]
                mask[r, :off + length] = 1
                for g, pos in d.groups.items():
                    p = pos[(pos >= start) & (pos < start + length)]
                    sel.setdefault(g, []).append((np.full(len(p), r), p - start + off,
                                                  np.full(len(p), d.doc_id, dtype=np.int64), p))
            cat = {g: [np.concatenate(parts) for parts in zip(*v)] for g, v in sel.items()}
            batches.append(Batch(
                input_ids=torch.from_numpy(ids).to(device), attention_mask=torch.from_numpy(mask).to(device),
                sel_row={g: v[0].astype(np.int64) for g, v in cat.items()},
                sel_col={g: v[1].astype(np.int64) for g, v in cat.items()},
                sel_doc={g: v[2] for g, v in cat.items()},
                sel_pos={g: v[3].astype(np.int32) for g, v in cat.items()},
                n_tokens=int(mask[:len(chunk)].sum()),
            ))
        return batches


def _bucket(width: int, cap: int) -> int:
    """Round up to 16, 20, 24, 28, 32, 40, 48, 56, 64, 80, ... (four steps per octave), at most `cap`."""
    if width <= 16:
        return min(16, cap)  # windows never exceed cap, so this is >= width
    step = 1 << (width.bit_length() - 3)
    return min(cap, -(-width // step) * step)
