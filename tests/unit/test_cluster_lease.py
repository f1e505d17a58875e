"""engine.cluster_lease: one lease in flight that the other messages join, and the rejoining
guard after a fallback (its end by time, or once as many workers lease as were seen)."""
from __future__ import annotations

import gevent
import pytest
from gevent.event import Event

from engine.cluster_lease import InFlight, Rejoining

pytestmark = pytest.mark.timeout(10)


def test_messages_that_need_a_lease_meanwhile_wait_for_the_one_in_flight() -> None:
    flight = InFlight()
    assert not flight.join()  # none in flight: this message leases itself
    answered = Event()
    joined: list[bool] = []

    def lease() -> None:
        with flight.leasing():
            answered.wait()

    leasing = gevent.spawn(lease)
    gevent.sleep(0)
    assert flight.busy
    waiters = [gevent.spawn(lambda: joined.append(flight.join())) for _ in range(3)]
    gevent.sleep(0)
    assert flight.waiting == 3  # the lease sizes its batch for them too
    answered.set()
    gevent.joinall([leasing, *waiters], timeout=5, raise_error=True)
    assert joined == [True] * 3 and flight.waiting == 0 and not flight.busy


def test_a_failed_lease_lets_the_waiters_go() -> None:
    flight = InFlight()

    def lease() -> None:
        with flight.leasing():
            gevent.sleep(0.01)
            raise OSError("the lease failed")

    leasing = gevent.spawn(lease)
    gevent.sleep(0)
    waiter = gevent.spawn(flight.join)
    gevent.joinall([leasing, waiter], timeout=5)
    assert waiter.value is True and not flight.busy


def test_rejoining_lasts_its_window_from_the_first_answer_after_a_fallback() -> None:
    rejoin = Rejoining(window=65.0)
    assert not rejoin.active(0.0)
    rejoin.answered(0.0, members=1, seen=1)  # shared all along: never rejoining
    assert not rejoin.active(0.0)
    rejoin.fell_back(share=15.0)
    assert rejoin.active(10.0) and rejoin.share == 15.0  # alone: rejoining if Redis answers
    rejoin.answered(70.0, members=1, seen=2)  # back; of the two it saw, only itself yet
    assert rejoin.active(134.9) and not rejoin.active(135.0)


def test_rejoining_ends_once_as_many_lease_as_it_last_saw() -> None:
    rejoin = Rejoining(window=65.0)
    rejoin.fell_back(share=10.0)
    rejoin.answered(70.0, members=1, seen=3)
    rejoin.answered(71.0, members=2, seen=1)  # `seen` counts only when back from fallback
    assert rejoin.active(72.0)
    rejoin.answered(72.0, members=3, seen=1)
    assert not rejoin.active(72.0)
