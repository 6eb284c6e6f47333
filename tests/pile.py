"""A mini-Pile in the Pile's layout, and the one-process reference over the documents a budget covers.

`train/NN.jsonl.zst`: each file one zstd frame of JSON lines `{"text": ..., "meta": {"pile_set_name": ...}}`,
document lengths log-normal (median ~60 words, a long tail of documents thousands of words long), words
from the tiny tokenizer's vocabulary. The reference decompresses with zstandard itself, parses with the
stdlib's json, tokenizes with the model's tokenizer, and sums tokens in canonical order to the budget.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import zstandard

from saeray.assets.tiny import WORDS

SETS = ["Pile-CC", "Github", "ArXiv", "Books3", "Wikipedia (en)", "FreeLaw", "StackExchange"]


@dataclass
class MiniPile:
    root: Path
    """The dataset folder (holds train/)."""
    files: list[Path]
    texts: list[list[str]]
    """texts[file][row]"""


def write_mini_pile(root: Path, n_files: int = 4, bytes_per_file: int = 2_500_000, seed: int = 0) -> MiniPile:
    rng = random.Random(seed)
    train = root / "train"
    train.mkdir(parents=True)
    files, texts = [], []
    for i in range(n_files):
        lines, docs, size = [], [], 0
        while size < bytes_per_file:
            n = max(1, min(4000, int(rng.lognormvariate(4.1, 1.0))))
            text = " ".join(rng.choice(WORDS) for _ in range(n))
            if rng.random() < 0.3:
                text = text.replace(" the ", "\nthe ", 3)  # newlines inside documents, escaped in JSON
            line = json.dumps({"text": text, "meta": {"pile_set_name": rng.choice(SETS)}})
            lines.append(line)
            docs.append(text)
            size += len(line) + 1
        path = train / f"{i:02d}.jsonl.zst"
        path.write_bytes(zstandard.ZstdCompressor(level=3).compress(("\n".join(lines) + "\n").encode()))
        files.append(path)
        texts.append(docs)
    return MiniPile(root, files, texts)


def budget_documents(pile: MiniPile, tokenizer, max_tokens: int) -> tuple[list[int], list[str], list[int], int]:
    """(doc ids, texts, token counts kept, compressed bytes of the files' prefix they cover) for a budget."""
    ids, texts, lengths = [], [], []
    total = 0
    covered = 0
    for f, path in enumerate(pile.files):
        raw = zstandard.ZstdDecompressor().decompress(path.read_bytes())
        lines = raw.split(b"\n")[:-1]
        assert [json.loads(line)["text"] for line in lines] == pile.texts[f]
        used = 0
        for r, line in enumerate(lines):
            text = pile.texts[f][r]
            n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
            keep = min(n, max_tokens - total)
            ids.append((f << 32) | r)
            texts.append(text)
            lengths.append(keep)
            total += keep
            used += len(line) + 1
            if total >= max_tokens:
                # a single zstd frame has no per-document sizes: the covered share of the file's compressed
                # bytes is taken in proportion to the uncompressed bytes (uniform on this random text)
                return ids, texts, lengths, covered + int(path.stat().st_size * used / len(raw))
        covered += path.stat().st_size
    return ids, texts, lengths, covered


def total_tokens(pile: MiniPile, tokenizer) -> int:
    return sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for docs in pile.texts for t in docs)
