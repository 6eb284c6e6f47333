"""The actor pool's decisions without Ray: which unit a free worker gets, what a lost unit becomes, when a
unit counts as hung, and what each worker reserves (executors/schedule.py, executors/cluster.py)."""
from __future__ import annotations

import pytest

from saeray.engine.units import Ledger, Task, uid_of
from saeray.executors.base import RunResult
from saeray.executors.cluster import GPU_WORKER_CPUS, describe, worker_resources
from saeray.executors.local import with_next
from saeray.executors.schedule import HELD_UNITS, Schedule, UnitClock


def _schedule(n_units: int, budget: int | None = None, max_attempts: int = 3) -> Schedule:
    ledger = None
    if budget is not None:
        ledger = Ledger(budget, 1)
        ledger.file_complete(0, n_units)
    s = Schedule(RunResult("run", "fp", n_units, []), ledger, UnitClock(None), max_attempts)
    for k in reversed(range(n_units)):  # added out of order: the queue still hands out the earliest
        s.add(Task(uid_of(0, k), 0, k, row_start=10 * k, n_rows=10))
    return s


def _take(s: Schedule, worker: str) -> tuple[str, int, int | None] | None:
    call = s.next_call(worker)
    if call is None:
        return None
    kind, st, prefix = call
    s.started(st, kind)
    return kind, st.task.uid, prefix


def test_without_a_budget_units_go_out_in_canonical_order_to_whoever_is_free():
    s = _schedule(3)
    assert [_take(s, w) for w in ("a", "b", "a")] == [("process", 0, None), ("process", 1, None),
                                                      ("process", 2, None)]
    assert _take(s, "b") is None
    assert {st.status for st in s.units.values()} == {"processing"}


def test_under_a_budget_a_unit_is_processed_with_the_tokens_before_it():
    s = _schedule(4, budget=1000)
    assert _take(s, "a") == ("count", 0, None)
    assert _take(s, "b") == ("count", 1, None)
    s.counted_by(s.units[1], "b", 30)
    # b's unit 1 cannot go yet: unit 0 is not counted, so its prefix is unknown; b counts the next one
    assert _take(s, "b") == ("count", 2, None)
    s.counted_by(s.units[0], "a", 20)
    s.counted_by(s.units[2], "b", 40)
    # each worker processes the counted units it holds first (their documents are in its memory)
    assert _take(s, "b") == ("process", 1, 20)
    assert _take(s, "a") == ("process", 0, 0)
    assert _take(s, "b") == ("process", 2, 50)


def test_a_worker_holds_at_most_HELD_UNITS_undecided_units_unless_the_new_one_comes_first():
    s = _schedule(HELD_UNITS + 3, budget=10_000)
    assert _take(s, "slow") == ("count", 0, None)  # never returns: every later prefix stays unknown
    for k in range(1, HELD_UNITS + 1):
        assert _take(s, "a") == ("count", k, None)
        s.counted_by(s.units[k], "a", 10)
    assert _take(s, "a") is None  # holding HELD_UNITS undecided units: it must wait
    assert _take(s, "b") == ("count", HELD_UNITS + 1, None)  # another worker may still count


def test_a_dead_workers_counted_units_go_to_any_worker_with_their_counts():
    s = _schedule(2, budget=1000)
    assert _take(s, "a") == ("count", 0, None)
    assert _take(s, "b") == ("count", 1, None)
    s.counted_by(s.units[0], "a", 25)
    s.counted_by(s.units[1], "b", 5)
    s.forget("a")
    assert s.units[0].holder is None and s.units[0].tokens == 25
    assert _take(s, "b") == ("process", 1, 25)  # its own unit first, then the orphan
    assert _take(s, "b") == ("process", 0, 0)


def test_units_past_the_budget_are_never_processed_and_work_done_in_vain_is_counted():
    s = _schedule(5, budget=100)
    for k in range(4):  # one worker per unit: each counts one (a worker processes its own decided unit first)
        assert _take(s, f"w{k}") == ("count", k, None)
        s.counted_by(s.units[k], f"w{k}", 30)  # 30, 60, 90, 120: the budget ends inside unit 3
    assert s.ledger.reached() and s.ledger.beyond(4) and not s.ledger.beyond(3)
    calls = [_take(s, f"w{k}") for k in range(4)]
    assert calls == [("process", 0, 0), ("process", 1, 30), ("process", 2, 60), ("process", 3, 90)]
    assert _take(s, "w0") is None
    assert s.units[4].status == "beyond"
    assert s.result.beyond_budget == 0  # unit 4 was neither read (no payload) nor counted
    s2 = _schedule(3, budget=50)
    for k in range(3):
        assert _take(s2, f"w{k}") == ("count", k, None)
    s2.counted_by(s2.units[2], "w2", 5)
    s2.counted_by(s2.units[0], "w0", 30)
    s2.counted_by(s2.units[1], "w1", 30)  # 30 + 30 >= 50: the budget ends in unit 1
    assert _take(s2, "w2") is None and s2.units[2].status == "beyond"  # its own unit: past the budget
    assert _take(s2, "w0") == ("process", 0, 0)
    assert _take(s2, "w1") == ("process", 1, 30)
    assert s2.result.beyond_budget == 1  # unit 2 was counted for nothing


def test_a_lost_unit_is_retried_until_its_attempts_are_used_then_fails():
    s = _schedule(1, max_attempts=2)
    assert _take(s, "a") == ("process", 0, None)
    assert s.retry_or_fail(s.units[0], "worker died (x)") is True
    assert s.units[0].status == "new"
    assert _take(s, "b") == ("process", 0, None)
    assert s.retry_or_fail(s.units[0], "worker died (y)") is False
    assert s.units[0].status == "failed" and not s.unfinished()
    assert s.result.errors == {0: "worker died (y) on each of 2 attempts"}


def test_a_counted_unit_that_is_lost_keeps_its_count():
    s = _schedule(1, budget=100)
    _take(s, "a")
    s.counted_by(s.units[0], "a", 7)
    assert _take(s, "a") == ("process", 0, 0)
    s.forget("a")
    assert s.retry_or_fail(s.units[0], "timed out") is True
    assert s.units[0].status == "counted" and s.units[0].holder is None
    assert _take(s, "b") == ("process", 0, 0)


def test_fail_undecided_fails_waiting_units_and_leaves_running_ones():
    s = _schedule(3, budget=100)
    assert _take(s, "a") == ("count", 0, None)
    s.fail_undecided("reading stopped")
    assert [s.units[u].status for u in range(3)] == ["counting", "failed", "failed"]
    assert s.result.errors[1].startswith("not processed: reading stopped")


def test_the_unit_clock_learns_from_the_slowest_unit_per_document():
    fixed = UnitClock(30.0)
    assert fixed.limit(10) == fixed.limit(10_000) == 30.0
    clock = UnitClock(None, floor_s=60.0)
    assert clock.limit(100) is None  # no limit before a unit has finished
    clock.finished({"seconds": 2.0, "docs": 10})
    clock.finished({"seconds": 1.0, "docs": 10})  # faster: the slowest rate stays
    assert clock.per_doc == pytest.approx(0.2)
    assert clock.limit(10) == 60.0  # 10 x 0.2 x 10 = 20 s, below the floor
    assert clock.limit(1000) == pytest.approx(2000.0)


def test_worker_resources_give_each_gpu_an_actor_and_its_share_of_cpus():
    nodes = [{"GPU": 4, "CPU": 16}, {"GPU": 8, "CPU": 16}]
    assert worker_resources(nodes, "auto") == (12, {"num_gpus": 1, "num_cpus": 2})  # the fewest per GPU: 16/8
    assert worker_resources(nodes, 3, cpus=1) == (3, {"num_gpus": 1, "num_cpus": 1})
    assert worker_resources([{"CPU": 2}], 4) == (4, {"num_cpus": 0.5})
    assert worker_resources([{"CPU": 8}, {"CPU": 2}], 2) == (2, {"num_cpus": 5})  # whole CPUs, at most a node
    assert worker_resources([{"CPU": 8}], None) == (1, {"num_cpus": 8})
    # an autoscaling cluster with no GPU node yet: ask for max_workers GPU actors
    assert worker_resources([{"CPU": 4}], "auto", max_workers=16) == (16, {"num_gpus": 1,
                                                                          "num_cpus": GPU_WORKER_CPUS})
    assert describe({"num_gpus": 1, "num_cpus": 2}) == "1 GPU, 2 CPU"
    assert describe({"num_cpus": 0.5}) == "0.5 CPU"


def test_with_next_pairs_each_item_with_the_one_after_it():
    assert list(with_next([1, 2, 3])) == [(1, 2), (2, 3), (3, None)]
    assert list(with_next([])) == []
