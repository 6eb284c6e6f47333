"""The progress line: tokens against the budget, tokens of units in flight, `--` until a rate can be measured,
an ETA from the budget or the units left, never nan."""

from __future__ import annotations

import pytest

from saeray.executors import progress as progress_mod
from saeray.executors.progress import Progress, duration


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(progress_mod.time, "time", c)
    return c


def test_budget_line_counts_tokens_in_flight_and_shows_dashes_until_measurable(clock):
    lines: list[str] = []
    p = Progress(16, every=10.0, sink=lines.append, budget=60_000)
    p.set_phase("starting Ray in this process")
    assert lines[-1] == "starting Ray in this process (budget 60,000 tokens) | elapsed 0s"
    clock.now += 5
    p.set_phase("loading the model and SAEs (1 worker)")
    assert lines[-1] == "loading the model and SAEs (1 worker) (budget 60,000 tokens) | elapsed 5s"
    p.flight(0, 1_000)  # the first unit started: rates count from now
    clock.now += 1
    p.update(force=True)
    assert lines[-1] == "1,000/60,000 tokens (2%) | units 0 done, 1 running | -- tok/s | elapsed 6s | ETA --"
    clock.now += 9
    p.flight(0, 20_000)
    p.set_phase("")
    # 20,000 tokens in 10 s of work: 2,000 tok/s; 40,000 left: 20 s
    assert lines[-1] == "20,000/60,000 tokens (33%) | units 0 done, 1 running | 2,000 tok/s | elapsed 15s | ETA 20s"
    assert "/16" not in lines[-1]
    clock.now += 20
    p.update({"tokens": 60_000, "shard": 0})
    p.close()
    assert lines[-1] == "60,000/60,000 tokens (100%) | units 1 done | 2,000 tok/s | elapsed 35s"
    assert not any("nan" in ln for ln in lines)


def test_units_line_without_budget_estimates_from_finished_units(clock):
    lines: list[str] = []
    p = Progress(4, every=0.0, sink=lines.append)
    p.working()
    clock.now += 10
    p.update({"tokens": 1_000, "shard": 0})
    # 1,000 tokens per unit, 3 units left = 3,000 tokens at 100 tok/s
    assert lines[-1] == "units 1/4 | 1,000 tokens | 100 tok/s | elapsed 10s | ETA 30s"
    p.flight(1, 500)
    p.update()
    assert lines[-1] == "units 1/4 (1 running) | 1,500 tokens | 150 tok/s | elapsed 10s | ETA 17s"


def test_streamed_without_budget_has_no_eta_but_never_nan(clock):
    lines: list[str] = []
    p = Progress(None, every=0.0, sink=lines.append)
    p.update(force=True)
    p.working()
    clock.now += 3
    p.update({"tokens": 300, "shard": 5})
    assert lines[-1] == "units 1 | 300 tokens | 100 tok/s | elapsed 3s | ETA --"
    assert not any("nan" in ln.lower() for ln in lines)


def test_a_note_is_written_when_it_appears(clock):
    lines: list[str] = []
    p = Progress(None, every=100.0, sink=lines.append)
    p.set_phase("placing 1 worker on the cluster")
    n = len(lines)
    p.set_note("no worker running: 1 waiting 31s to be placed")
    assert len(lines) == n + 1 and lines[-1].endswith("| no worker running: 1 waiting 31s to be placed")
    p.set_note("no worker running: 1 waiting 32s to be placed")  # an update of it waits for the next line
    assert len(lines) == n + 1


def test_duration():
    assert [duration(s) for s in (0, 59.4, 61, 3599, 3725)] == ["0s", "59s", "1m01s", "59m59s", "1h02m"]
