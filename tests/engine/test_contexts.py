"""Tokenization (engine/contexts.py): batched encodes equal one-at-a-time encodes, documents carry the positions
their selector picks, and its windows and batches are batching.py's."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import corpus, make_tokenizer

from saeray.engine import batching
from saeray.engine.config import PositionsConfig
from saeray.engine.contexts import Tokenization


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def tokenization(tok, mode: str = "all", **kw) -> Tokenization:
    return Tokenization(tok, PositionsConfig(mode=mode), prepend_bos=kw.pop("prepend_bos", True),
                        context_size=kw.pop("context_size", 16), exclude_special=True, **kw)


def test_encode_many_equals_encode(tok):
    t = tokenization(tok)
    texts = corpus(30, seed=5) + ["", "<|im_start|>assistant hi<|im_end|>", " leading space", "a\nb"]
    many = t.encode_many(texts)
    assert len(many) == len(texts)
    for text, ids in zip(texts, many):
        assert ids.dtype == np.int32
        assert ids.tolist() == t.encode(text).tolist(), text
    assert many[len(texts) - 4].tolist() == []


def test_text_documents_equal_documents(tok):
    t = tokenization(tok, mode="last")
    texts = corpus(8, seed=1)
    batched = t.text_documents([(i, s, {"k": i}) for i, s in enumerate(texts)])
    for i, (d, s) in enumerate(zip(batched, texts)):
        one = t.document(i, s, {"k": i})
        assert d.token_ids.tolist() == one.token_ids.tolist()
        assert {g: p.tolist() for g, p in d.groups.items()} == {g: p.tolist() for g, p in one.groups.items()}
        assert d.groups["last"].tolist() == [len(d.token_ids) - 1]  # the tiny corpus has no special tokens
        assert d.extras == {"k": i}


def test_from_ids_drops_a_leading_bos_only_when_windows_add_one(tok):
    ids = [tok.bos_token_id, 338, 283]
    assert tokenization(tok).from_ids(3, ids, {}).token_ids.tolist() == [338, 283]
    assert tokenization(tok, prepend_bos=False).from_ids(3, ids, {}).token_ids.tolist() == ids
    d = tokenization(tok).from_ids(3, ids, {})
    assert d.groups["all"].tolist() == [0, 1]


def test_cut_keeps_the_first_tokens_and_reselects(tok):
    t = tokenization(tok, mode="last")
    d = t.document(0, "of to is of to", {})
    cut = t.cut(d, 2)
    assert cut.token_ids.tolist() == d.token_ids[:2].tolist()
    assert cut.groups["last"].tolist() == [1]


def test_batches_are_batching_batches(tok):
    t = tokenization(tok, context_size=8)
    docs = t.text_documents([(i, s, {}) for i, s in enumerate(corpus(10, seed=2))])
    assert t.windows(docs) == batching.windows(docs, 8, prepend_bos=True)
    mine = t.batches(docs, 64)
    theirs = batching.batches(docs, 64, context_size=8, bos_id=tok.bos_token_id, pad_id=t.pad_id)
    assert len(mine) == len(theirs) > 1
    for a, b in zip(mine, theirs):
        assert a.input_ids.equal(b.input_ids) and a.attention_mask.equal(b.attention_mask)
        assert a.input_ids[:, 0].tolist()[:1] == [tok.bos_token_id]
        assert {g: v.tolist() for g, v in a.sel_pos.items()} == {g: v.tolist() for g, v in b.sel_pos.items()}
