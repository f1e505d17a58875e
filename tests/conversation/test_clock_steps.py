"""Issue #14 (7): a step of the wall clock, an hour forward or back, neither expires queued
mail early nor stalls its retries. The supervisor's parts (intake, dispatch, results, on
real sockets and a real spool: tests/conversation/test_supervisor_parts.py) run on an
engine.clock over hand-moved clocks (tests/support/clocks.py); the whole engine under
libfaketime is tests/engine/test_clock_steps.py.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from engine.clock import EngineClock
from engine.protocol import Status
from tests.support.clocks import Clocks
from tests.support.supervisor import IP2, NOW, SCHEDULE, Parts, job_envelope, tasks

EXPIRES = 1800.0  # the job's `expires`: half an hour


class Clocked(Parts):
    def __init__(self, tmp: Path, sockdir: str, clocks: Clocks) -> None:
        self.clocks = clocks
        self.clock: EngineClock = clocks.engine_clock()
        super().__init__(tmp, sockdir, self.clock)

    def events(self, name: str) -> list[dict[str, object]]:
        return [json.loads(line) for event, line in self.published if event == name]


@pytest.fixture
def parts(tmp_path: Path, sockdir: str) -> Iterator[Clocked]:
    built = Clocked(tmp_path, sockdir, Clocks(NOW))
    yield built
    built.close()


def handed_out_and_deferred(parts: Clocked, pull: zmq.Socket, **fields: object) -> float:
    """The job goes to the worker, which defers it (a 451, or what `fields` say) on its wall
    clock. Returns the task's `queued_ts`."""
    parts.dispatcher.dispatch_due()
    assert pull.poll(1000), "the job was not handed out"
    header, _ = pull.recv_multipart()
    assert json.loads(header)["id"] == "j" and not pull.poll(100)
    parts.report(parts.answer(Status.DEFERRED, ts=parts.clocks.wall_now, **fields))
    return float(json.loads(header)["queued_ts"])


@pytest.mark.parametrize("step", [3600.0, -3600.0], ids=["forward", "back"])
def test_a_step_of_the_wall_clock_neither_expires_mail_nor_moves_its_retries(
        parts: Clocked, step: float) -> None:
    _, pull = parts.worker(IP2, alive=True)
    parts.push([job_envelope("j", expires=EXPIRES)])
    parts.dispatcher.offer(parts.intake.take())
    assert tasks(pull) == ["j"]
    parts.report(parts.answer(Status.DEFERRED, ts=parts.clocks.wall_now))
    assert parts.events("deferred")[-1]["next_attempt"] == NOW + SCHEDULE[0]

    parts.clocks.step(step)
    assert parts.clock.step() == step
    parts.dispatcher.dispatch_due()
    assert tasks(pull) == [] and parts.events("expired") == []  # nothing early, or expired

    parts.clocks.advance(SCHEDULE[0] - 1)
    parts.dispatcher.dispatch_due()
    assert tasks(pull) == []
    parts.clocks.advance(1)  # the retry's interval, on the monotonic clock
    # The worker's wall clock took the step: its throttle's retry_at is 30 s after its ts,
    # and the queued_ts it is told is on its wall clock (it times the delivery).
    queued_ts = handed_out_and_deferred(parts, pull, throttled=True,
                                        retry_at=parts.clocks.wall_now + 30)
    assert queued_ts == NOW + step
    parts.clocks.advance(29)
    parts.dispatcher.dispatch_due()
    assert tasks(pull) == []
    parts.clocks.advance(1)
    handed_out_and_deferred(parts, pull)
    assert parts.events("expired") == []
    # Each event's delay is the time since the job was queued, not that plus the step.
    assert [e["delay_ms"] for e in parts.events("deferred")] == [0, 60_000, 90_000]

    parts.clocks.advance(EXPIRES - SCHEDULE[0] - 30)  # the job's half hour is over
    parts.dispatcher.dispatch_due()
    assert [e["id"] for e in parts.events("expired")] == ["j"]
    assert parts.spool.stats().jobs == 0
