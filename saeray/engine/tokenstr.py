"""Readable strings for single tokens, also for tokens that are only part of a UTF-8 character.

Decoding one token alone gives U+FFFD when the token holds a fragment of a multi-byte
character (byte-level BPE, SentencePiece byte fallback). Such tokens are shown as their bytes
in hex, e.g. `<e2 80>`, so two different fragments never look alike.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

REPLACEMENT = "\ufffd"


@lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
    """The inverse of GPT-2's bytes-to-unicode table (byte-level BPE writes bytes as these characters)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, n = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(keep, chars)}


def _fragment_bytes(raw: str) -> bytes | None:
    """The bytes a token stands for, from its vocabulary string, when that can be told."""
    if raw.startswith("<0x") and raw.endswith(">") and len(raw) == 6:  # SentencePiece byte fallback
        try:
            return bytes([int(raw[3:5], 16)])
        except ValueError:
            return None
    table = _byte_level_decoder()
    if raw and all(c in table for c in raw):
        return bytes(table[c] for c in raw)
    return None


def token_strings(tokenizer: Any, ids: list[int]) -> list[str]:
    """One display string per token id: its decoded text, or `<hex bytes>` for a character fragment."""
    texts = tokenizer.batch_decode([[int(i)] for i in ids])
    out = []
    for i, text in zip(ids, texts):
        if REPLACEMENT in text:
            raw = tokenizer.convert_ids_to_tokens(int(i))
            frag = _fragment_bytes(raw) if isinstance(raw, str) else None
            if frag is not None and REPLACEMENT.encode() not in frag:
                text = "<" + " ".join(f"{b:02x}" for b in frag) + ">"
        out.append(text)
    return out
