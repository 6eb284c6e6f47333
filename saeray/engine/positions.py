"""Which positions of a document count, and which are kept per position group (positions.mode).

Modes (config.PositionsConfig): all = every counted token; last = the last counted token; markers = per named
group, the token at `offset` from each occurrence of the group's marker (anchored at its last token); modality =
image (the model's image token) and text (counted tokens that are not image tokens); sample = `per_doc` counted
candidates with the smallest splitmix64 draw of (doc_id, pos, seed). Counted tokens are all tokens but the
tokenizer's special ones, unless tokens.exclude_special is false.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .config import PositionsConfig
from .partials import draws_np


class PositionsError(ValueError):
    """A position marker cannot be tokenized, or the positions asked for cannot be found in a document."""


class PositionSelector:
    """Selects a document's positions per group, as `config` says, for one tokenizer."""

    def __init__(self, config: PositionsConfig, tokenizer: Any, *, exclude_special: bool,
                 image_token_id: int | None = None, images: bool = False):
        """`image_token_id`: a vision-language model's image token; `images`: documents may carry images (the
        run has data.image_column), which gives mode `modality` its `image` group."""
        self.config = config
        self.exclude_special = exclude_special
        self.special_ids = np.array(sorted(set(tokenizer.all_special_ids)), dtype=np.int64)
        self.markers = {name: (_marker_ids(tokenizer, g.marker, name), g.offset) for name, g in config.groups.items()}
        self.image_token_id = image_token_id
        self.images = images

    @property
    def group_names(self) -> list[str]:
        """The position groups every document is selected into, in output order."""
        mode = self.config.mode
        if mode == "markers":
            return list(self.markers)
        if mode == "modality":
            return ["image", "text"] if self.images else ["text"]
        return [mode]

    def counted(self, token_ids: np.ndarray) -> np.ndarray:
        """Boolean mask of the tokens that count (special tokens excluded unless configured)."""
        if not self.exclude_special or len(self.special_ids) == 0:
            return np.ones(len(token_ids), dtype=bool)
        return ~np.isin(token_ids, self.special_ids)

    def select(self, token_ids: np.ndarray, doc_id: int = 0, word_final: np.ndarray | None = None
               ) -> dict[str, np.ndarray]:
        """Sorted int32 positions per group of a document (`doc_id` and `word_final` matter only to mode sample)."""
        mode = self.config.mode
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
        return {name: _at_marker(token_ids, marker, offset) for name, (marker, offset) in self.markers.items()}

    def _sample(self, token_ids: np.ndarray, doc_id: int, word_final: np.ndarray | None) -> np.ndarray:
        """mode sample: `per_doc` candidates with the smallest draw (partials.draws_np of (doc_id, pos, seed))."""
        pc = self.config
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


def _marker_ids(tokenizer: Any, marker: str, group: str) -> np.ndarray:
    ids = tokenizer(marker, add_special_tokens=False)["input_ids"]
    if not ids:
        raise PositionsError(f"positions.groups.{group}.marker {marker!r} tokenizes to nothing")
    return np.asarray(ids, dtype=np.int64)


def _at_marker(token_ids: np.ndarray, marker: np.ndarray, offset: int) -> np.ndarray:
    """Positions `offset` from the last token of each occurrence of `marker`, inside the document, once each."""
    n, m = len(token_ids), len(marker)
    if n < m:
        return np.empty(0, dtype=np.int32)
    windows = np.lib.stride_tricks.sliding_window_view(token_ids.astype(np.int64), m)
    pos = np.flatnonzero((windows == marker).all(axis=1)) + (m - 1) + offset
    return np.unique(pos[(pos >= 0) & (pos < n)]).astype(np.int32)
