"""engine.descriptors: a delivery short of file descriptors waits, counted, and gives its
task back after WAIT_MAX instead of waiting for ever (issue #14)."""
from __future__ import annotations

import pytest

from engine import descriptors
from engine.descriptors import Descriptors
from engine.metrics import Metrics
from engine.reply import DescriptorsExhausted, Reply


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def exhausted() -> DescriptorsExhausted:
    return DescriptorsExhausted(Reply.local(451, "4.3.0", "out of file descriptors"))


def test_a_wait_counts_and_returns_until_the_bound_then_gives_the_error_back(
        monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []
    monkeypatch.setattr(descriptors.gevent, "sleep", slept.append)
    clock = Clock()
    waits = Descriptors(Metrics(None, "worker"), clock)
    since = waits.now()
    err = exhausted()
    waits.wait("example", err, since)
    clock.now += descriptors.WAIT_MAX - 0.01
    waits.wait("example", err, since)
    assert waits.waits == 2 and len(slept) == 2
    assert all(0.5 * descriptors.BACKOFF <= s <= 1.5 * descriptors.BACKOFF for s in slept)
    clock.now += 0.01
    with pytest.raises(DescriptorsExhausted) as raised:
        waits.wait("example", err, since)
    assert raised.value is err and waits.waits == 2  # no wait after the bound
    waits.wait("example", err, waits.now())  # another delivery's wait starts afresh
    assert waits.waits == 3
