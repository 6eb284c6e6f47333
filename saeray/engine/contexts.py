"""Documents -> token ids -> context windows -> padded batches, and which positions count.

A document's `token_ids` are its text tokens (no BOS); `pos` indexes them. Each window
holds up to `context_size` tokens: BOS (when the SAE expects it) plus a slice of the
document. Every document is its own context: windows never mix documents, and batches are
right-padded, so a token only ever attends to earlier tokens of its own window.

An image document (vision-language models) is the processor's whole sequence instead: image
tokens, BOS, the text, "\n" (PaliGemma's layout), stored as is in `token_ids` and never split
into windows; its text is cut when the sequence exceeds `context_size`. It runs as the processor
prepares it: with its pixel values and as one prefix (token_type_ids 0), so image and prompt
tokens attend to each other both ways, as PaliGemma does. Text documents stay causal.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import numpy as np
import torch

from .config import PositionsConfig

log = logging.getLogger(__name__)


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
    pixel_values: torch.Tensor | None = None
    """[3, H, W] for an image document (then `token_ids` is the processor's whole sequence), else None."""
    word_final: np.ndarray | None = None
    """positions.word_final: bool [n_tokens], the tokens that end a whitespace-separated word."""


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
        """The batch on `device`, selections included. To a GPU the copies do not block the host: the host
        tensors are pinned (by `Tokenization.batches(pin=True)`, in the thread that built them) and stay
        referenced by this batch until the model has read them."""
        non_blocking = device.type == "cuda"

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            if non_blocking and not t.is_pinned():
                t = t.pin_memory()
            return t.to(device, non_blocking=non_blocking)

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


class Tokenization:
    """Turns text into token ids and chooses the positions to keep, as the config says."""

    def __init__(self, tokenizer: Any, positions: PositionsConfig, *, prepend_bos: bool,
                 context_size: int, exclude_special: bool, processor: Any = None,
                 image_token_id: int | None = None, images: bool = False):
        """`processor` and `image_token_id` describe a vision-language model; `images`: documents may
        carry images (the run has data.image_column), which gives mode `modality` its `image` group."""
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
        if images and (processor is None or image_token_id is None):
            raise PositionsError("data.image_column is set but the model has no processor or image token id: "
                                 "use a vision-language model (model.kind: image_text)")
        self.processor = processor
        self.image_token_id = image_token_id
        self.images = images
        self.truncated = 0
        """Image documents cut to context_size since the owner last reset this count."""
        self._warned_cut = False

    @property
    def group_names(self) -> list[str]:
        """The position groups every document is selected into, in output order."""
        mode = self.positions.mode
        if mode == "markers":
            return list(self.markers)
        if mode == "modality":
            return ["image", "text"] if self.images else ["text"]
        return [mode]

    def _marker_ids(self, marker: str, group: str) -> np.ndarray:
        ids = self.tokenizer(marker, add_special_tokens=False)["input_ids"]
        if not ids:
            raise PositionsError(f"positions.groups.{group}.marker {marker!r} tokenizes to nothing")
        return np.asarray(ids, dtype=np.int64)

    def encode(self, text: str) -> np.ndarray:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        return np.asarray(ids, dtype=np.int32)

    def encode_many(self, texts: list[str]) -> list[np.ndarray]:
        """`encode` of each text, in one call: a fast tokenizer's Rust batch encode (parallel when the
        process allows it: TOKENIZERS_PARALLELISM, RAYON_NUM_THREADS), without building offsets or
        Python encodings; other tokenizers one text at a time. Same ids as `encode` (tests/test_contexts.py)."""
        backend = _batch_backend(self.tokenizer)
        if backend is None:
            return [self.encode(t) for t in texts]
        nonempty = [i for i, t in enumerate(texts) if t]
        out = [np.empty(0, dtype=np.int32)] * len(texts)
        for i, enc in zip(nonempty, backend([texts[i] for i in nonempty], add_special_tokens=False)):
            out[i] = np.asarray(enc.ids, dtype=np.int32)
        return out

    @property
    def wants_word_ends(self) -> bool:
        return self.positions.mode == "sample" and self.positions.word_final

    def _encode_with_word_ends(self, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        """(ids, word_final) per text: token j ends a word when the character after its span is whitespace or
        the text's end, no later token starts inside its span (byte-fallback pieces of one character: the last
        one ends it), and its span holds a non-space character."""
        out = []
        for text in texts:
            enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True) if text else None
            ids = np.asarray(enc["input_ids"] if enc else [], dtype=np.int32)
            spans = enc["offset_mapping"] if enc else []
            final = np.zeros(len(ids), dtype=bool)
            for j, (a, b) in enumerate(spans):
                nxt = spans[j + 1][0] if j + 1 < len(spans) else len(text)
                final[j] = (b >= len(text) or text[b].isspace()) and nxt >= b and bool(text[a:b].strip())
            out.append((ids, final))
        return out

    def _sample(self, token_ids: np.ndarray, doc_id: int, word_final: np.ndarray | None) -> np.ndarray:
        """mode sample: `per_doc` candidates with the smallest draw (partials.draws_np of (doc_id, pos, seed))."""
        from .partials import draws_np

        pc = self.positions
        ok = self.counted(token_ids)
        if pc.word_final:
            if word_final is None:
                raise PositionsError("positions.word_final needs where the document's words end: only text documents "
                                     "have them (not pre-tokenized or image documents)")
            ok &= word_final[:len(token_ids)]
        if pc.within is not None:
            ok[pc.within:] = False
        cand = np.flatnonzero(ok)
        draw = draws_np(np.full(len(cand), doc_id, np.int64), cand, pc.seed)
        return np.sort(cand[np.lexsort((cand, draw))[:pc.per_doc]]).astype(np.int32)

    def counted(self, token_ids: np.ndarray) -> np.ndarray:
        """Boolean mask of the tokens that count (special tokens excluded unless configured)."""
        if not self.exclude_special or len(self.special_ids) == 0:
            return np.ones(len(token_ids), dtype=bool)
        return ~np.isin(token_ids, self.special_ids)

    def select(self, token_ids: np.ndarray, doc_id: int = 0, word_final: np.ndarray | None = None
               ) -> dict[str, np.ndarray]:
        """Positions per group of a document (`doc_id` and `word_final` matter only to mode sample)."""
        mode = self.positions.mode
        if mode == "sample":
            return {"sample": self._sample(token_ids, doc_id, word_final)}
        if mode == "all":
            return {"all": np.flatnonzero(self.counted(token_ids)).astype(np.int32)}
        if mode == "last":
            idx = np.flatnonzero(self.counted(token_ids))
            return {"last": idx[-1:].astype(np.int32)}
        if mode == "modality":
            is_image = (token_ids == self.image_token_id if self.image_token_id is not None
                        else np.zeros(len(token_ids), dtype=bool))
            text = {"text": np.flatnonzero(self.counted(token_ids) & ~is_image).astype(np.int32)}
            return {"image": np.flatnonzero(is_image).astype(np.int32), **text} if self.images else text
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

    def document(self, doc_id: int, text: Any, extras: dict[str, Any], max_tokens: int | None = None,
                 image: Any = None) -> Document:
        """A document from its text (and, for vision-language models, its PIL image or None)."""
        if text is None:
            text = ""
        if not isinstance(text, str):
            raise TypeError(f"doc {doc_id}: the text column holds {type(text).__name__} {text!r:.60}, expected a string")
        if image is not None:
            return self._image_document(doc_id, text, extras, image)
        ids, final = self._encode_with_word_ends([text])[0] if self.wants_word_ends else (self.encode(text), None)
        if self.image_token_id is not None and (ids == self.image_token_id).any():
            raise PositionsError(f"doc {doc_id}: its text contains the image token (id {self.image_token_id}), which "
                                 "only the processor may place: remove it from the text")
        if max_tokens is not None:
            ids = ids[:max_tokens]
            final = final[:max_tokens] if final is not None else None
        return Document(doc_id, ids, extras, self.select(ids, doc_id, final), word_final=final)

    def text_documents(self, items: list[tuple[int, Any, dict[str, Any]]]) -> list[Document]:
        """`document` of each (doc_id, text, extras), the texts tokenized in one batch."""
        for doc_id, text, _ in items:
            if text is not None and not isinstance(text, str):
                raise TypeError(f"doc {doc_id}: the text column holds {type(text).__name__} {text!r:.60}, expected a string")
        docs = []
        texts = [t or "" for _, t, _ in items]
        encoded = (self._encode_with_word_ends(texts) if self.wants_word_ends
                   else [(ids, None) for ids in self.encode_many(texts)])
        for (doc_id, _, extras), (ids, final) in zip(items, encoded):
            if self.image_token_id is not None and (ids == self.image_token_id).any():
                raise PositionsError(f"doc {doc_id}: its text contains the image token (id {self.image_token_id}), "
                                     "which only the processor may place: remove it from the text")
            docs.append(Document(doc_id, ids, extras, self.select(ids, doc_id, final), word_final=final))
        return docs

    def from_ids(self, doc_id: int, ids: Any, extras: dict[str, Any]) -> Document:
        """A pre-tokenized document (data.token_column). A leading BOS is dropped when windows get one
        anyway, so the document's positions are those of the same text tokenized here."""
        arr = np.asarray(ids, dtype=np.int32)
        if self.prepend_bos and len(arr) and self.bos_id is not None and arr[0] == self.bos_id:
            arr = arr[1:]
        return Document(doc_id, arr, extras, self.select(arr, doc_id))

    def cut(self, doc: Document, n_tokens: int) -> Document:
        """The document's first `n_tokens` tokens (the last document of a token budget)."""
        ids = doc.token_ids[:n_tokens]
        final = doc.word_final[:n_tokens] if doc.word_final is not None else None
        return Document(doc.doc_id, ids, doc.extras, self.select(ids, doc.doc_id, final), pixel_values=doc.pixel_values,
                        word_final=final)

    def _image_document(self, doc_id: int, text: str, extras: dict[str, Any], image: Any) -> Document:
        """The processor's sequence for (image, text), cut to context_size in its text part."""
        if not self.images:
            raise PositionsError(f"doc {doc_id} has an image but this run reads none: set data.image_column")
        marker = self.processor.image_token
        if marker in text:
            raise PositionsError(f"doc {doc_id}: its text contains the image token {marker!r}, which only the "
                                 "processor may place: remove it from the text")
        inputs = self.processor(images=image, text=marker + text, return_tensors="pt")
        ids = inputs["input_ids"][0].numpy().astype(np.int32)
        n_image = int((ids == self.image_token_id).sum())
        if n_image + 2 > self.context_size:
            raise PositionsError(f"tokens.context_size {self.context_size} cannot hold an image document "
                                 f"({n_image} image tokens + BOS + text): set tokens.context_size >= {n_image + 2}")
        if len(ids) > self.context_size:
            if not self._warned_cut:
                log.warning("doc %d: image + text is %d tokens, cut to tokens.context_size %d (the end of its text is "
                            "dropped; later cuts are counted per shard)", doc_id, len(ids), self.context_size)
                self._warned_cut = True
            self.truncated += 1
            ids = ids[:self.context_size]
        return Document(doc_id, ids, extras, self.select(ids, doc_id), pixel_values=inputs["pixel_values"][0])

    # ---- windows and batches ----------------------------------------------------------

    def windows(self, docs: list[Document]) -> list[tuple[int, int, int]]:
        """(doc index, start, length) of every window that holds a selected position."""
        step = self.context_size - int(self.prepend_bos)
        out = []
        for i, d in enumerate(docs):
            selected = np.concatenate(list(d.groups.values())) if d.groups else np.empty(0, np.int32)
            if selected.size == 0:
                continue
            if d.pixel_values is not None:  # an image document is one window, as the processor made it
                out.append((i, 0, len(d.token_ids)))
                continue
            # Positions are only read from windows that hold them: skip windows with none.
            for w in np.unique(selected // step):
                start = int(w) * step
                out.append((i, start, min(step, len(d.token_ids) - start)))
        return out

    def batches(self, docs: list[Document], batch_tokens: int, device: torch.device | None = None,
                pin: bool = False) -> list[Batch]:
        """Windows sorted by length and packed greedily into right-padded batches, on `device`
        (None: on the host, for `Batch.to` later; `pin`: in pinned memory, for copies to a GPU).

        Shapes are bucketed (widths and a short batch's rows rounded up in quarter-octave
        steps) so a long run sees few distinct shapes: kernel caches stay small on CPU and
        GPU. A batch holds only windows longer than half its width, so padding stays small
        when long and short documents mix (bench/throughput.py: 84% -> 92% real tokens).
        """
        bos = int(self.prepend_bos)
        offset = [0 if d.pixel_values is not None else bos for d in docs]  # image documents carry their own BOS
        full = lambda w: w[2] + offset[w[0]]  # noqa: E731  (a window's length in the batch)
        wins = sorted(self.windows(docs), key=lambda w: (-full(w), w[0], w[1]))
        vlm = self.processor is not None
        batches, i = [], 0
        while i < len(wins):
            width = _bucket(full(wins[i]), self.context_size)
            rows = max(1, batch_tokens // width)
            chunk = wins[i:i + rows]
            # Length bucketing: the batch ends before a window that would fill half its width or less.
            chunk = chunk[:next((k for k, w in enumerate(chunk) if k and 2 * full(w) <= width), len(chunk))]
            i += len(chunk)
            n_rows = len(chunk) if len(chunk) == rows else min(rows, _bucket_rows(len(chunk)))
            ids = np.full((n_rows, width), self.pad_id, dtype=np.int64)
            mask = np.zeros((n_rows, width), dtype=np.int64)
            mask[len(chunk):, 0] = 1  # filler rows attend to one pad token: no empty softmax
            types = np.ones((n_rows, width), dtype=np.int64)
            images = []
            sel: dict[str, list[tuple[np.ndarray, ...]]] = {}
            for r, (di, start, length) in enumerate(chunk):
                d = docs[di]
                off = offset[di]
                if off:
                    ids[r, 0] = self.bos_id
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
                token_type_ids=host(types) if vlm else None,
            )
            batch.selected = _selection_tensors(batch, pin)
            batches.append(batch.to(device) if device is not None else batch)
        return batches


def _batch_backend(tokenizer: Any) -> Any:
    """The Rust tokenizer's batch encode when calling it directly gives what `tokenizer(text)` gives: a fast
    tokenizer with no truncation or padding configured on its backend. None otherwise."""
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is None or backend.truncation is not None or backend.padding is not None:
        return None
    return getattr(backend, "encode_batch_fast", None) or backend.encode_batch


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


def _bucket(width: int, cap: int) -> int:
    """Round up to 16, 20, 24, 28, 32, 40, 48, 56, 64, 80, ... (four steps per octave), at most `cap`."""
    if width <= 16:
        return min(16, cap)  # windows never exceed cap, so this is >= width
    step = 1 << (width.bit_length() - 3)
    return min(cap, -(-width // step) * step)


def _bucket_rows(n: int) -> int:
    """Round a row count up to 1..8, 10, 12, 14, 16, 20, 24, 28, 32, 40, ... (four steps per octave)."""
    if n <= 8:
        return n
    step = 1 << (n.bit_length() - 3)
    return -(-n // step) * step
