"""Windows, bucketed shapes, batches and blocks (engine/batching.py) on documents small enough to check by hand."""

from __future__ import annotations

import numpy as np
import pytest

from saeray.engine.batching import batches, blocks, bucket_rows, bucket_width, windows
from saeray.engine.contexts import Document

BOS, PAD = 1, 0


def doc(doc_id: int, n: int, positions: list[int] | None = None, first: int = 100) -> Document:
    """A document of tokens first, first + 1, ...; `positions` selected in group `all` (default: every one)."""
    pos = np.arange(n) if positions is None else np.asarray(positions)
    return Document(doc_id, np.arange(first, first + n, dtype=np.int32), {}, {"all": pos.astype(np.int32)})


def test_windows_of_ten_tokens_with_context_four():
    # BOS takes one of the 4 places: the document is cut every 3 tokens
    assert windows([doc(0, 10)], 4, prepend_bos=True) == [(0, 0, 3), (0, 3, 3), (0, 6, 3), (0, 9, 1)]
    assert windows([doc(0, 10)], 4, prepend_bos=False) == [(0, 0, 4), (0, 4, 4), (0, 8, 2)]


def test_windows_hold_only_selected_positions():
    docs = [doc(0, 10, [1, 8]), doc(1, 5, []), doc(2, 5, [4])]
    assert windows(docs, 4, prepend_bos=True) == [(0, 0, 3), (0, 6, 3), (2, 3, 2)]


def _steps(cap: int, start: int = 16) -> list[int]:
    """16, 20, 24, 28, 32, 40, ... written out: four equal steps per octave from 16 on."""
    out, lo = [], start
    while lo < 4 * cap:
        out += [lo + i * lo // 4 for i in range(4)]
        lo *= 2
    return out


@pytest.mark.parametrize("width,cap,want", [(1, 1024, 16), (16, 1024, 16), (17, 1024, 20), (20, 1024, 20),
                                            (21, 1024, 24), (33, 1024, 40), (64, 1024, 64), (65, 1024, 80),
                                            (100, 1024, 112), (1000, 1024, 1024), (100, 64, 64), (3, 4, 4)])
def test_bucket_width_by_hand(width, cap, want):
    assert bucket_width(width, cap) == want


def test_bucket_width_is_the_smallest_step_that_holds_the_window():
    steps = _steps(4096)
    for width in range(1, 2049):
        assert bucket_width(width, 4096) == min(s for s in steps if s >= width), width


@pytest.mark.parametrize("n,want", [(1, 1), (7, 7), (8, 8), (9, 10), (10, 10), (11, 12), (15, 16), (17, 20),
                                    (33, 40), (64, 64), (65, 80)])
def test_bucket_rows_by_hand(n, want):
    assert bucket_rows(n) == want


def test_bucket_rows_is_the_smallest_step_that_holds_the_rows():
    steps = list(range(1, 8)) + _steps(4096, start=8)
    for n in range(1, 2049):
        assert bucket_rows(n) == min(s for s in steps if s >= n), n


def test_batches_of_ten_tokens_by_hand():
    got = batches([doc(7, 10)], 16, context_size=4, bos_id=BOS, pad_id=PAD)
    assert len(got) == 2
    a, b = got
    # three full windows share width 4; the last one (BOS + 1 token) would fill half of it, so it starts a batch
    assert a.input_ids.tolist() == [[1, 100, 101, 102], [1, 103, 104, 105], [1, 106, 107, 108]]
    assert a.attention_mask.tolist() == [[1] * 4] * 3
    assert a.n_tokens == 12
    assert a.sel_row["all"].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert a.sel_col["all"].tolist() == [1, 2, 3] * 3
    assert a.sel_pos["all"].tolist() == list(range(9))
    assert a.sel_doc["all"].tolist() == [7] * 9
    assert b.input_ids.tolist() == [[1, 109, 0, 0]]
    assert b.attention_mask.tolist() == [[1, 1, 0, 0]]
    assert (b.n_tokens, b.sel_col["all"].tolist(), b.sel_pos["all"].tolist()) == (2, [1], [9])
    assert a.token_type_ids is None and a.pixel_values is None


def test_a_batch_ends_before_a_window_of_half_its_width():
    got = batches([doc(0, 12), doc(1, 7), doc(2, 8)], 1000, context_size=16, bos_id=BOS, pad_id=PAD)
    # widths with BOS: 13, 8, 9; 8 fills half of 16, so it opens a batch of its own (width 16, the smallest)
    assert [b.sel_doc["all"][0] for b in got] == [0, 1]
    assert [sorted(set(b.sel_doc["all"].tolist())) for b in got] == [[0, 2], [1]]


def test_batches_without_bos():
    (only,) = batches([doc(0, 6, [0, 5])], 64, context_size=32, bos_id=None, pad_id=PAD)
    assert only.input_ids.tolist() == [[100, 101, 102, 103, 104, 105] + [0] * 10]  # width 16: the smallest bucket
    assert only.sel_col["all"].tolist() == [0, 5]
    (capped,) = batches([doc(0, 6, [0, 5])], 64, context_size=8, bos_id=None, pad_id=PAD)
    assert capped.input_ids.tolist() == [[100, 101, 102, 103, 104, 105, 0, 0]]  # no wider than the context


def test_short_batches_get_filler_rows_that_attend_to_one_token():
    # 9 windows of BOS + 12 tokens (width 16) where 16 rows fit: 9 rows rounded up to 10; the filler is not counted
    (b,) = batches([doc(i, 12) for i in range(9)], 16 * 16, context_size=16, bos_id=BOS, pad_id=PAD)
    assert b.input_ids.shape == (10, 16)
    assert b.attention_mask[9].tolist() == [1] + [0] * 15
    assert b.input_ids[9].tolist() == [PAD] * 16
    assert b.n_tokens == 9 * 13
    assert set(b.sel_row["all"].tolist()) == set(range(9))


@pytest.mark.parametrize("bos", [BOS, None])
@pytest.mark.parametrize("batch_tokens", [16, 40, 100, 1000])
def test_batches_stay_in_budget_and_cover_every_window_once(bos, batch_tokens):
    rng = np.random.default_rng(0)
    docs = []
    for i in range(40):
        n = int(rng.integers(1, 70))
        keep = np.flatnonzero(rng.random(n) < 0.5)
        docs.append(doc(1000 + i, n, keep.tolist(), first=int(rng.integers(5, 300))))
    ctx = 24
    got = batches(docs, batch_tokens, context_size=ctx, bos_id=bos, pad_id=PAD)
    wins = windows(docs, ctx, prepend_bos=bos is not None)
    by_id = {d.doc_id: d for d in docs}
    seen: list[tuple[int, int]] = []
    real_rows = 0
    for b in got:
        rows, width = b.input_ids.shape
        assert width <= ctx
        assert rows * width <= max(batch_tokens, width)
        ids, mask = b.input_ids.numpy(), b.attention_mask.numpy()
        r, c, d, p = (b.sel_row["all"], b.sel_col["all"], b.sel_doc["all"], b.sel_pos["all"])
        # every selected position reads its own token
        assert all(ids[ri, ci] == by_id[di].token_ids[pi] for ri, ci, di, pi in zip(r, c, d, p))
        assert mask[r, c].all()
        seen += list(zip(d.tolist(), p.tolist()))
        real = sorted(set(r.tolist()))
        real_rows += len(real)
        assert real == list(range(len(real)))  # windows fill the first rows, filler rows come last
        for row in real:  # each real row: BOS (if any), then a slice of one document, then padding
            n = int(mask[row].sum())
            tokens = ids[row, :n]
            if bos is not None:
                assert tokens[0] == BOS
                tokens = tokens[1:]
            owner = by_id[int(d[r == row][0])].token_ids
            start = int(p[r == row][0]) - int(c[r == row][0]) + int(bos is not None)
            assert tokens.tolist() == owner[start:start + len(tokens)].tolist()
            assert (ids[row, n:] == PAD).all()
        assert b.n_tokens == int(mask[real].sum())
    want = [(dd.doc_id, int(q)) for dd in docs for q in dd.groups["all"]]
    assert sorted(seen) == sorted(want)  # every selected position exactly once
    assert real_rows == len(wins)  # every window exactly once
    assert sum(b.n_tokens for b in got) == sum(length + (bos is not None) for _, _, length in wins)


def test_blocks_hold_at_least_the_budget():
    docs = [doc(i, n) for i, n in enumerate([3, 3, 3, 5, 1])]
    got = [[d.doc_id for d in block] for block in blocks(docs, 6)]
    assert got == [[0, 1], [2, 3], [4]]
    assert [[d.doc_id for d in block] for block in blocks(docs, 100)] == [[0, 1, 2, 3, 4]]
    assert list(blocks([], 6)) == []
