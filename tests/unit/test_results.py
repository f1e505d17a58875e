"""engine.results.plan: what one worker's result means for its recipient, a pure function of
the result, the job in flight, the time and the retry schedule (no sockets). The group commit
of results on real sockets is tests/conversation/test_supervisor_parts.py.
"""
from __future__ import annotations

import json

import pytest

from engine import results
from engine.dispatch import InFlight
from engine.protocol import Status
from engine.spool import RcptUpdate
from tests.support.supervisor import IP2, NOW, RCPT, SCHEDULE, attempt


def flight(attempts: int = 0, expires_in: float = 3600.0) -> InFlight:
    return InFlight(IP2, {"k": "v"}, NOW - 10, NOW + expires_in, {RCPT: attempts})


@pytest.mark.parametrize("status", [Status.DELIVERED, Status.BOUNCED])
def test_a_final_result_is_recorded_and_published_as_it_is(status: Status) -> None:
    update, event = results.plan(attempt(status), flight(attempts=2), NOW, SCHEDULE)
    assert update == RcptUpdate("j", RCPT, status, reply=attempt(status).reply)
    assert event is not None and event[0] == status.value
    assert json.loads(event[1])["attempt"] == 3 and json.loads(event[1])["meta"] == {"k": "v"}


def test_a_deferral_comes_back_by_the_retry_schedule() -> None:
    update, event = results.plan(attempt(Status.DEFERRED), flight(attempts=1), NOW, SCHEDULE)
    assert update is not None and update.status is Status.DEFERRED
    assert update.next_attempt == NOW + 300.0 and update.count_attempt
    assert event is not None and json.loads(event[1])["next_attempt"] == NOW + 300.0


def test_a_deferral_whose_next_attempt_falls_after_the_expiry_expires() -> None:
    update, event = results.plan(attempt(Status.DEFERRED), flight(expires_in=30), NOW,
                                 SCHEDULE)
    assert update is not None and update.status is Status.EXPIRED
    assert event is not None and event[0] == "expired"


def test_a_throttle_comes_back_when_shaping_says_and_costs_no_attempt() -> None:
    update, event = results.plan(attempt(Status.DEFERRED, throttled=True, retry_at=NOW + 5),
                                 flight(), NOW, SCHEDULE)
    assert update is not None and update.next_attempt == NOW + 5
    assert not update.count_attempt
    assert event is not None and json.loads(event[1])["throttled"] is True


def test_a_shaping_wait_is_spooled_but_not_published() -> None:
    update, event = results.plan(attempt(Status.DEFERRED, attempted=False, retry_at=NOW + 2),
                                 flight(), NOW, SCHEDULE)
    assert update is not None and update.next_attempt == NOW + 2 and not update.count_attempt
    assert event is None


def test_a_late_result_keeps_a_final_outcome_and_forgets_a_deferral() -> None:
    update, event = results.plan(attempt(Status.DELIVERED), None, NOW, SCHEDULE)
    assert update is not None and update.status is Status.DELIVERED and event is None
    assert results.plan(attempt(Status.DEFERRED), None, NOW, SCHEDULE) == (None, None)


def test_jitter_moves_a_scheduled_wait_either_way_by_at_most_its_fraction() -> None:
    low, _ = results.plan(attempt(Status.DEFERRED), flight(attempts=1), NOW, SCHEDULE,
                          jitter=0.1, rand=lambda: 0.0)
    high, _ = results.plan(attempt(Status.DEFERRED), flight(attempts=1), NOW, SCHEDULE,
                           jitter=0.1, rand=lambda: 0.999999)
    assert low is not None and low.next_attempt == pytest.approx(NOW + 270.0)
    assert high is not None and high.next_attempt == pytest.approx(NOW + 330.0, abs=0.01)


def test_jitter_only_lengthens_a_wait_shaping_set() -> None:
    """A suspension gives every recipient waiting for the provider the same `retry_at`: it is
    spread after it, never before (shaping said not before)."""
    spread = [results.plan(attempt(Status.DEFERRED, attempted=False, retry_at=NOW + 100),
                           flight(), NOW, SCHEDULE, jitter=0.1, rand=lambda r=r: r)[0]
              for r in (0.0, 0.5, 0.999999)]
    assert [u.next_attempt for u in spread if u is not None] == pytest.approx(
        [NOW + 100, NOW + 105, NOW + 110], abs=0.01)


def test_a_long_wait_shaping_set_is_lengthened_by_a_minute_at_most() -> None:
    """A daily cap waits for midnight (hours): 10% of it would be an hour late."""
    update, _ = results.plan(attempt(Status.DEFERRED, attempted=False, retry_at=NOW + 36000),
                             flight(expires_in=86400.0), NOW, SCHEDULE, jitter=0.1,
                             rand=lambda: 0.999999)
    assert update is not None
    assert update.next_attempt == pytest.approx(NOW + 36000 + results.SHAPING_SPREAD, abs=0.01)
