"""Texts (or token ids, or image + text) -> documents: token ids and the positions kept per group.

A document's `token_ids` are its text tokens (no BOS); `pos` indexes them. Which positions are kept is
positions.py's; cutting documents into windows and batches is batching.py's (`Tokenization.batches`).

An image document (vision-language models) is the processor's whole sequence instead: image
tokens, BOS, the text, "\n" (PaliGemma's layout), stored as is in `token_ids` and never split
into windows; its text is cut when the sequence exceeds `context_size`. It runs as the processor
prepares it: with its pixel values and as one prefix (token_type_ids 0), so image and prompt
tokens attend to each other both ways, as PaliGemma does. Text documents stay causal.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from . import batching
from .longtext import LONG_CHARS, encode_in_pieces
from .config import PositionsConfig
from .positions import PositionSelector, PositionsError

log = logging.getLogger(__name__)


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
        self.selector = PositionSelector(positions, tokenizer, exclude_special=exclude_special,
                                         image_token_id=image_token_id, images=images)
        self.special_ids = self.selector.special_ids
        self.select = self.selector.select
        """Positions per group of a document (PositionSelector.select)."""
        self.counted = self.selector.counted
        """Boolean mask of a document's counted tokens (PositionSelector.counted)."""
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
        return self.selector.group_names

    def encode(self, text: str) -> np.ndarray:
        long = self._long_backend(text)
        if long is not None:
            return encode_in_pieces(long, text)[0]
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        return np.asarray(ids, dtype=np.int32)

    def _long_backend(self, text: str) -> Any:
        """The Rust tokenizer when `text` is long enough to tokenize in pieces (longtext.py), else None."""
        if len(text) <= LONG_CHARS:
            return None
        return self.tokenizer.backend_tokenizer if _batch_backend(self.tokenizer) is not None else None

    def encode_many(self, texts: list[str]) -> list[np.ndarray]:
        """`encode` of each text, in one call: a fast tokenizer's Rust batch encode (parallel when the
        process allows it: TOKENIZERS_PARALLELISM, RAYON_NUM_THREADS), without building offsets or
        Python encodings; other tokenizers one text at a time. Same ids as `encode` (tests/engine/test_contexts.py)."""
        backend = _batch_backend(self.tokenizer)
        if backend is None:
            return [self.encode(t) for t in texts]
        nonempty = [i for i, t in enumerate(texts) if t and len(t) <= LONG_CHARS]
        out = [np.empty(0, dtype=np.int32)] * len(texts)
        for i, t in enumerate(texts):
            if len(t) > LONG_CHARS:
                out[i] = self.encode(t)
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
            long = self._long_backend(text)
            if long is not None:
                ids, starts, ends = encode_in_pieces(long, text)
                out.append((ids, _word_final(text, starts, ends)))
                continue
            enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True) if text else None
            ids = np.asarray(enc["input_ids"] if enc else [], dtype=np.int32)
            spans = enc["offset_mapping"] if enc else []
            final = np.zeros(len(ids), dtype=bool)
            for j, (a, b) in enumerate(spans):
                nxt = spans[j + 1][0] if j + 1 < len(spans) else len(text)
                final[j] = (b >= len(text) or text[b].isspace()) and nxt >= b and bool(text[a:b].strip())
            out.append((ids, final))
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

    # ---- windows and batches (batching.py) -------------------------------------------

    def windows(self, docs: list[Document]) -> list[batching.Window]:
        """(doc index, start, length) of every window that holds a selected position."""
        return batching.windows(docs, self.context_size, self.prepend_bos)

    def batches(self, docs: list[Document], batch_tokens: int, device: torch.device | None = None,
                pin: bool = False) -> list[batching.Batch]:
        """The documents' windows in right-padded batches of about `batch_tokens` (batching.batches), on `device`
        (None: on the host; `pin`: in pinned memory, for copies to a GPU)."""
        return batching.batches(docs, batch_tokens, context_size=self.context_size,
                       bos_id=self.bos_id if self.prepend_bos else None, pad_id=self.pad_id,
                       token_types=self.processor is not None, device=device, pin=pin)


def _word_final(text: str, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """The rule of `_encode_with_word_ends` on offset arrays (long texts), without a Python object per token."""
    n = len(text)
    nxt = np.append(starts[1:], n)
    ends_word = np.fromiter((b >= n or text[b].isspace() for b in ends.tolist()), dtype=bool, count=len(ends))
    visible = np.fromiter((bool(text[a:b].strip()) for a, b in zip(starts.tolist(), ends.tolist())), dtype=bool,
                          count=len(ends))
    return ends_word & (nxt >= ends) & visible


def _batch_backend(tokenizer: Any) -> Any:
    """The Rust tokenizer's batch encode when calling it directly gives what `tokenizer(text)` gives: a fast
    tokenizer with no truncation or padding configured on its backend. None otherwise."""
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is None or backend.truncation is not None or backend.padding is not None:
        return None
    return getattr(backend, "encode_batch_fast", None) or backend.encode_batch
