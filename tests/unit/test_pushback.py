"""engine.pushback.Pushback: refusals in a row after mail was accepted lately are push-back,
whatever their words; and a first refusal's verdict, which the next outcome gives."""
from __future__ import annotations

import time

import gevent
import pytest

from engine.pushback import RECENT, Pushback


def refusals(pushback: Pushback, count: int, start: float) -> list[bool]:
    return [pushback.refusal(start + 0.1 * i) for i in range(count)]


@pytest.mark.parametrize("after", [1, 2, 3])
def test_after_refusals_in_a_row_after_an_acceptance_are_pushback(after: int) -> None:
    pushback = Pushback(after)
    pushback.accepted(100.0)
    assert refusals(pushback, after + 2, 101.0) == [False] * (after - 1) + [True] * 3
    assert pushback.pushing and pushback.refused == after + 2
    assert pushback.recognised == 1  # one push-back, however long the run


def test_after_is_at_least_one() -> None:
    assert Pushback(0).after == 1


def test_refusals_at_first_contact_are_never_pushback() -> None:
    """Greylisting, or a provider that never took mail from us: nothing about our pace."""
    pushback = Pushback(2)
    assert refusals(pushback, 10, 100.0) == [False] * 10
    assert pushback.refused == 0 and not pushback.pushing and pushback.recognised == 0


def test_an_acceptance_longer_ago_than_recent_counts_as_first_contact() -> None:
    pushback = Pushback(2)
    pushback.accepted(100.0)
    assert refusals(pushback, 3, 100.0 + RECENT + 1) == [False] * 3
    assert pushback.refused == 0
    just = Pushback(2)
    just.accepted(100.0)
    assert just.refusal(100.0 + RECENT) is False and just.refused == 1  # still recent


def test_an_acceptance_ends_the_run() -> None:
    pushback = Pushback(2)
    pushback.accepted(100.0)
    assert pushback.refusal(100.1) is False
    pushback.accepted(100.2)
    assert pushback.refused == 0
    assert pushback.refusal(100.3) is False  # the first of a new run
    assert pushback.refusal(100.4) is True
    pushback.accepted(100.5)
    assert not pushback.pushing and pushback.recognised == 1


def first_refusal() -> Pushback:
    pushback = Pushback(2)
    pushback.accepted(100.0)
    assert pushback.refusal(100.1) is False
    return pushback


def waiting_verdict(pushback: Pushback, timeout: float = 5.0) -> gevent.Greenlet:
    verdict = gevent.spawn(pushback.verdict, timeout)
    gevent.idle()  # it waits for the next outcome
    assert not verdict.ready()
    return verdict


def test_a_first_refusal_is_pushback_when_the_next_outcome_is_a_refusal() -> None:
    pushback = first_refusal()
    verdict = waiting_verdict(pushback)
    assert pushback.refusal(100.2) is True
    assert verdict.get(timeout=1) is True


def test_a_first_refusal_is_no_pushback_when_the_next_is_accepted() -> None:
    pushback = first_refusal()
    verdict = waiting_verdict(pushback)
    pushback.accepted(100.2)
    assert verdict.get(timeout=1) is False


def test_a_run_recognised_while_the_verdict_waited_is_pushback_though_it_ended() -> None:
    """The second refusal made it push-back, then a probe was accepted before the waiting
    greenlet ran: its refusal was still part of a push-back."""
    pushback = first_refusal()
    verdict = waiting_verdict(pushback)
    pushback.refusal(100.2)
    pushback.accepted(100.3)
    assert verdict.get(timeout=1) is True


def test_no_next_outcome_within_the_timeout_is_no_pushback() -> None:
    pushback = first_refusal()
    started = time.monotonic()
    assert pushback.verdict(0.02) is False
    assert time.monotonic() - started < 0.5


def test_a_verdict_while_pushing_is_given_at_once() -> None:
    pushback = first_refusal()
    pushback.refusal(100.2)
    started = time.monotonic()
    assert pushback.verdict(5.0) is True
    assert time.monotonic() - started < 0.1
