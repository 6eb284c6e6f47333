"""Documents -> context windows -> right-padded batches of bucketed shapes, and blocks of documents.

A window holds up to `context_size` tokens: BOS (when the SAE expects it) plus a slice of one document, so
windows never mix documents and a token only attends to earlier tokens of its own window. Only windows that
hold a selected position are run. An image document is one window as the processor made it (its own BOS).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Iterator

import numpy as np
import torch

if TYPE_CHECKING:
    from .contexts import Document

Window = tuple[int, int, int]
"""(document index, start, length): tokens start .. start + length of the document, BOS not counted."""


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
    pixel_values: torch.Tensor | None = None
    """[n_images, 3, H, W]: the images of the rows that hold image documents, in row order."""
    token_type_ids: torch.Tensor | None = None
    """[B, T] for vision-language models: 0 on image documents' tokens (one bidirectional prefix), 1 elsewhere."""
    selected: dict[str, tuple[torch.Tensor, ...]] = field(default_factory=dict)
    """group -> (row, col, doc_id, pos) as int64 tensors on the batch's device (filled by `to`)."""

    def to(self, device: torch.device) -> "Batch":
        """The batch on `device`, selections included. To a GPU, pinned host tensors (`batches(pin=True)`, built
        so in the worker's prefetch thread) are copied without blocking the host and stay referenced by this
        batch until the model has read them; unpinned ones (train, probe) are copied as they are, with no
        pinned staging copy made per batch."""
        cuda = device.type == "cuda"

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=cuda and t.is_pinned())

        host = self.selected or _selection_tensors(self, pin=False)
        return dataclasses.replace(
            self, input_ids=move(self.input_ids), attention_mask=move(self.attention_mask),
            pixel_values=move(self.pixel_values), token_type_ids=move(self.token_type_ids),
            selected={g: tuple(move(t) for t in ts) for g, ts in host.items()})


def _selection_tensors(b: Batch, pin: bool) -> dict[str, tuple[torch.Tensor, ...]]:
    def t(a: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(a)
        return x.pin_memory() if pin else x

    return {g: (t(b.sel_row[g]), t(b.sel_col[g]), t(b.sel_doc[g]), t(b.sel_pos[g].astype(np.int64)))
            for g in b.sel_row}


def windows(docs: list[Document], context_size: int, prepend_bos: bool) -> list[Window]:
    """Every window that holds a selected position: documents cut every context_size - BOS tokens."""
    step = context_size - int(prepend_bos)
    out = []
    for i, d in enumerate(docs):
        selected = np.concatenate(list(d.groups.values())) if d.groups else np.empty(0, np.int32)
        if selected.size == 0:
            continue
        if d.pixel_values is not None:  # an image document is one window, as the processor made it
            out.append((i, 0, len(d.token_ids)))
            continue
        for w in np.unique(selected // step):
            start = int(w) * step
            out.append((i, start, min(step, len(d.token_ids) - start)))
    return out


def batches(docs: list[Document], batch_tokens: int, *, context_size: int, bos_id: int | None, pad_id: int,
            token_types: bool = False, device: torch.device | None = None, pin: bool = False) -> list[Batch]:
    """The documents' windows sorted by length and packed greedily into right-padded batches, on `device`
    (None: on the host, for `Batch.to` later; `pin`: in pinned memory, for copies to a GPU). `bos_id`: the
    token each text window starts with (None: no BOS); `token_types`: fill token_type_ids (vision-language).

    Shapes are bucketed (widths and a short batch's rows rounded up in quarter-octave steps) so a long run
    sees few distinct shapes: kernel caches stay small on CPU and GPU. A batch holds only windows longer than
    half its width, so padding stays small when long and short documents mix (bench/throughput.py: 84% -> 92%
    real tokens). A batch holds at most max(batch_tokens, width) tokens, padding included.
    """
    bos = int(bos_id is not None)
    offset = [0 if d.pixel_values is not None else bos for d in docs]  # image documents carry their own BOS
    full = lambda w: w[2] + offset[w[0]]  # noqa: E731  (a window's length in the batch)
    wins = sorted(windows(docs, context_size, bos_id is not None), key=lambda w: (-full(w), w[0], w[1]))
    out, i = [], 0
    while i < len(wins):
        width = bucket_width(full(wins[i]), context_size)
        rows = max(1, batch_tokens // width)
        chunk = wins[i:i + rows]
        # Length bucketing: the batch ends before a window that would fill half its width or less.
        chunk = chunk[:next((k for k, w in enumerate(chunk) if k and 2 * full(w) <= width), len(chunk))]
        i += len(chunk)
        n_rows = len(chunk) if len(chunk) == rows else min(rows, bucket_rows(len(chunk)))
        batch = _assemble(docs, chunk, offset, (n_rows, width), bos_id, pad_id, token_types, pin)
        out.append(batch.to(device) if device is not None else batch)
    return out


def _assemble(docs: list[Document], chunk: list[Window], offset: list[int], shape: tuple[int, int],
              bos_id: int | None, pad_id: int, token_types: bool, pin: bool) -> Batch:
    """One host batch of `shape` (rows, width) holding the windows of `chunk`, one per row; rows past them are
    filler that attends to one pad token (no empty softmax)."""
    ids = np.full(shape, pad_id, dtype=np.int64)
    mask = np.zeros(shape, dtype=np.int64)
    mask[len(chunk):, 0] = 1
    types = np.ones(shape, dtype=np.int64)
    images = []
    sel: dict[str, list[tuple[np.ndarray, ...]]] = {}
    for r, (di, start, length) in enumerate(chunk):
        d = docs[di]
        off = offset[di]
        if off:
            ids[r, 0] = bos_id
        ids[r, off:off + length] = d.token_ids[start:start + length]
        mask[r, :off + length] = 1
        if d.pixel_values is not None:
            types[r, :length] = 0
            images.append(d.pixel_values)
        for g, pos in d.groups.items():
            # positions are sorted: a binary search, not a scan of the document per window
            lo, hi = np.searchsorted(pos, np.array((start, start + length), dtype=pos.dtype))
            p = pos[lo:hi]
            sel.setdefault(g, []).append((np.full(len(p), r), p - start + off,
                                          np.full(len(p), d.doc_id, dtype=np.int64), p))
    cat = {g: [np.concatenate(parts) for parts in zip(*v)] for g, v in sel.items()}
    host = lambda a: torch.from_numpy(a).pin_memory() if pin else torch.from_numpy(a)  # noqa: E731
    batch = Batch(
        input_ids=host(ids), attention_mask=host(mask),
        sel_row={g: v[0].astype(np.int64) for g, v in cat.items()},
        sel_col={g: v[1].astype(np.int64) for g, v in cat.items()},
        sel_doc={g: v[2] for g, v in cat.items()},
        sel_pos={g: v[3].astype(np.int32) for g, v in cat.items()},
        n_tokens=int(mask[:len(chunk)].sum()),
        pixel_values=torch.stack(images) if images else None,
        token_type_ids=host(types) if token_types else None,
    )
    batch.selected = _selection_tensors(batch, pin)
    return batch


def blocks(docs: Iterable[Document], budget: int) -> Iterator[list[Document]]:
    """Consecutive documents in groups of at least `budget` tokens (the last group may hold fewer):
    the unit a worker batches, encodes and writes at once."""
    block: list[Document] = []
    n = 0
    for d in docs:
        block.append(d)
        n += len(d.token_ids)
        if n >= budget:
            yield block
            block, n = [], 0
    if block:
        yield block


def bucket_width(width: int, cap: int) -> int:
    """Round up to 16, 20, 24, 28, 32, 40, 48, 56, 64, 80, ... (four steps per octave), at most `cap`."""
    if width <= 16:
        return min(16, cap)  # windows never exceed cap, so this is >= width
    step = 1 << (width.bit_length() - 3)
    return min(cap, -(-width // step) * step)


def bucket_rows(n: int) -> int:
    """Round a row count up to 1..8, 10, 12, 14, 16, 20, 24, 28, 32, 40, ... (four steps per octave)."""
    if n <= 8:
        return n
    step = 1 << (n.bit_length() - 3)
    return -(-n // step) * step
