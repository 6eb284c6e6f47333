"""Work units and the budget's ledger on small obvious cases (no model, no Ray)."""

from __future__ import annotations

import random

from saeray.engine.reading import _apportion
from saeray.engine.units import Ledger, parquet_units, split_rows, split_uid, uid_of


def test_parquet_units_merge_row_groups_and_split_big_ones():
    units = parquet_units(2, [10, 10, 10, 40, 5], [100, 100, 100, 1000, 50], unit_bytes=250)
    assert [(u.row_start, u.n_rows) for u in units] == [(0, 30), (30, 10), (40, 10), (50, 10), (60, 10), (70, 5)]
    assert [u.uid for u in units] == [uid_of(2, k) for k in range(6)] and all(u.file == 2 for u in units)
    assert [(u.row_start, u.n_rows) for u in split_rows(0, 10, 3)] == [(0, 3), (3, 3), (6, 4)]
    assert split_rows(0, 0, 3) == [] and len(split_rows(0, 2, 5)) == 2


def test_apportion_gives_exactly_n_units_in_proportion():
    assert _apportion([20, 20, 20], 7) == [3, 2, 2] and _apportion([10, 0, 7, 6], 5) == [2, 0, 2, 1]
    assert _apportion([3], 100) == [3] and _apportion([20, 20, 20], 1) == [1, 1, 1]


def _brute(counts: dict[int, int], order: list[int], budget: int, uid: int) -> int:
    total = 0
    for u in order:
        if u == uid:
            return total
        total += counts[u]
    raise KeyError(uid)


def test_ledger_prefix_equals_a_running_sum_in_any_arrival_order():
    rng = random.Random(0)
    for trial in range(200):
        sizes = [rng.randint(0, 4) for _ in range(rng.randint(1, 4))]  # units per file (some files empty)
        order = [uid_of(f, k) for f, n in enumerate(sizes) for k in range(n)]
        counts = {u: rng.randint(0, 30) for u in order}
        budget = rng.randint(1, max(1, sum(counts.values()) + 5))
        ledger = Ledger(budget, len(sizes))
        events = [("count", u) for u in order] + [("file", f) for f in range(len(sizes))]
        rng.shuffle(events)
        for kind, x in events:
            if kind == "count":
                ledger.counted(x, counts[x])
            else:
                ledger.file_complete(x, sizes[x])
        end = next((u for u in order if _brute(counts, order, budget, u) + counts[u] >= budget), None)
        assert ledger.reached() == (end is not None), (sizes, counts, budget)
        for u in order:
            want = _brute(counts, order, budget, u)
            if end is not None and u > end:
                assert ledger.beyond(u) and ledger.prefix(u) >= budget
            else:
                assert not ledger.beyond(u) and ledger.prefix(u) == want


def test_ledger_waits_for_earlier_units_and_file_ends():
    ledger = Ledger(100, 3)
    ledger.counted(uid_of(0, 1), 30)
    assert ledger.prefix(uid_of(0, 1)) is None  # unit (0, 0) is not counted yet
    ledger.counted(uid_of(0, 0), 20)
    assert ledger.prefix(uid_of(0, 1)) == 20 and ledger.prefix(uid_of(0, 2)) == 50
    ledger.counted(uid_of(1, 0), 10)
    assert ledger.prefix(uid_of(1, 0)) is None  # file 0 may have more units
    ledger.file_complete(0, 2)
    assert ledger.prefix(uid_of(1, 0)) == 50 and not ledger.reached()
    ledger.counted(uid_of(1, 1), 40)
    assert ledger.reached() and ledger.prefix(uid_of(1, 1)) == 60 and ledger.beyond(uid_of(2, 0))


def test_unit_ids_split_back_into_file_and_index():
    for file, k in [(0, 0), (0, 999_999), (3, 7), (29, 12_345)]:
        assert split_uid(uid_of(file, k)) == (file, k)
    assert uid_of(1, 0) > uid_of(0, 999_999)  # ids order by file, then by unit within it
