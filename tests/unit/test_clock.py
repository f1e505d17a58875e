"""engine.clock: the engine's time follows the monotonic clock, notices a step of the wall
clock and never follows it. A pair of hand-moved clocks (`Clocks`) stands in for the
system's; the supervisor's parts on this clock are tests/conversation/test_clock_steps.py,
the whole engine under libfaketime tests/engine/test_clock_steps.py."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from engine import spool as spool_mod
from engine.clock import STEP_TOLERANCE, EngineClock
from engine.job import Job
from engine.protocol import Status
from engine.spool import RcptUpdate, Spool
from tests.support.clocks import Clocks

NOW = 1_800_000_000.0


def test_the_engines_time_starts_at_the_wall_clock_and_advances_with_the_monotonic_one(
        ) -> None:
    clocks = Clocks(NOW)
    clock = clocks.engine_clock()
    assert clock.now() == NOW
    clocks.advance(42.5)
    assert clock.now() == NOW + 42.5
    assert clock.apart() == 0.0 and clock.step() is None


@pytest.mark.parametrize("seconds", [3600.0, -3600.0])
def test_a_step_of_the_wall_clock_is_noticed_once_and_not_followed(seconds: float) -> None:
    clocks = Clocks(NOW)
    clock = clocks.engine_clock()
    clocks.advance(10)
    clocks.step(seconds)
    assert clock.now() == NOW + 10  # not followed
    assert clock.apart() == seconds
    assert clock.step() == seconds  # noticed, with its direction
    clocks.advance(60)
    assert clock.step() is None  # once
    assert clock.now() == NOW + 70
    clocks.step(-seconds)  # and back again: a step of its own
    assert clock.step() == -seconds and clock.apart() == 0.0


def test_a_drift_within_the_tolerance_is_no_step() -> None:
    clocks = Clocks(NOW)
    clock = clocks.engine_clock()
    clocks.step(STEP_TOLERANCE)
    assert clock.step() is None
    clocks.step(STEP_TOLERANCE / 2)  # added up since the last step noticed, not per call
    assert clock.step() == pytest.approx(1.5 * STEP_TOLERANCE)


def test_the_engines_time_never_starts_below_the_floor_and_says_so() -> None:
    """A step back while the engine was down: its time takes up where the spool left it,
    and the first check reports the step."""
    clocks = Clocks(NOW - 3600)
    clock = clocks.engine_clock(floor=NOW)
    assert clock.now() == NOW
    assert clock.step() == -3600.0
    assert clock.step() is None
    assert clocks.engine_clock(floor=NOW - 7200).now() == NOW - 3600  # below: the wall clock


def test_the_spools_latest_now_and_a_shift_of_its_times(tmp_path: Path) -> None:
    with Spool(str(tmp_path)) as spool:
        assert spool.latest_now() == 0.0
        jobs = [Job(id=f"j{i}", sender="s@example.test", rcpts=("r@example.test",),
                    message=b"x\r\n") for i in range(2)]
        spool.accept(jobs[:1], NOW, 600.0)
        spool.accept(jobs[1:], NOW + 5, 600.0)
        assert spool.latest_now() == NOW + 5
        spool.shift(-100.0)
        assert spool.latest_now() == NOW - 95
        assert [p.job.id for p in spool.due(NOW - 95, 10)] == ["j0", "j1"]
        assert [p.expires_ts for p in spool.due(NOW - 95, 10)] == [NOW + 500, NOW + 505]
        assert spool.due(NOW - 101, 10) == []


def test_an_engine_clock_over_the_real_clocks_reads_them() -> None:
    before = time.time()
    now = EngineClock().now()
    assert before - 1 <= now <= time.time() + 1


def test_a_planned_shift_is_done_at_the_next_open_a_chunk_at_a_time_and_resumes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """At a stop after a step only the plan is written (a big spool must not hold up the
    stop); the next open moves the rows, SHIFT_CHUNK per transaction, and a crash in the
    middle resumes without moving any row twice."""
    monkeypatch.setattr(spool_mod, "SHIFT_CHUNK", 3)
    jobs = [Job(id=f"j{i}", sender="s@example.test", rcpts=("r@example.test",),
                message=b"x\r\n") for i in range(8)]
    with Spool(str(tmp_path)) as spool:
        spool.accept(jobs, NOW, 600.0)
        spool.record([RcptUpdate("j7", "r@example.test", Status.DELIVERED)], NOW)
        spool.plan_shift(-100.0)
        assert spool.latest_now() == NOW  # nothing moved yet
    real_write = Spool._write
    writes = 0

    def dies_in_the_second_chunk(self: Spool) -> Any:
        nonlocal writes
        writes += 1
        if writes == 2:
            raise KeyboardInterrupt  # a crash between two chunks' transactions
        return real_write(self)
    monkeypatch.setattr(Spool, "_write", dies_in_the_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        Spool(str(tmp_path))
    monkeypatch.setattr(Spool, "_write", real_write)
    with Spool(str(tmp_path)) as spool:
        assert spool.shifted is not None and spool.shifted[0] == -100.0
        assert spool.latest_now() == NOW - 100  # every job once, the finished id too
        assert {p.expires_ts for p in spool.due(NOW - 100, 10)} == {NOW + 500}
        assert len(spool.due(NOW - 100, 10)) == 7
    with Spool(str(tmp_path)) as spool:
        assert spool.shifted is None  # done: nothing the next time
        assert spool.latest_now() == NOW - 100
