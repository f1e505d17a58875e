"""engine.gctune.PauseWatch: the collector's full collections timed and the long ones logged,
from the process's loop, never from inside the collector."""
from __future__ import annotations

import gc
import logging

import pytest

from engine.gctune import SLOW_PAUSE, PauseWatch

pytestmark = pytest.mark.timeout(30)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_full_collection_is_timed_at_the_next_report() -> None:
    clock, sent = Clock(), []
    watch = PauseWatch(sent.append, clock)
    watch("start", {"generation": 2})
    clock.now = 0.012
    watch("stop", {"generation": 2, "collected": 5})
    assert sent == []  # nothing sent from inside the collector
    watch.report()
    assert sent == [pytest.approx(12.0)]
    watch.report()
    assert sent == [pytest.approx(12.0)]  # reported once


def test_young_collections_are_not_timed() -> None:
    clock, sent = Clock(), []
    watch = PauseWatch(sent.append, clock)
    for generation in (0, 1):
        watch("start", {"generation": generation})
        clock.now += 1.0
        watch("stop", {"generation": generation, "collected": 0})
    watch.report()
    assert sent == []


def test_a_long_pause_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    clock, sent = Clock(), []
    watch = PauseWatch(sent.append, clock)
    for seconds in (SLOW_PAUSE / 2, SLOW_PAUSE * 2):
        watch("start", {"generation": 2})
        clock.now += seconds
        watch("stop", {"generation": 2, "collected": 7})
    with caplog.at_level(logging.WARNING, logger="mailengine.gc"):
        watch.report()
    lines = [r.getMessage() for r in caplog.records if "gc_pause" in r.getMessage()]
    assert lines == [f"event=gc_pause seconds={round(SLOW_PAUSE * 2, 3)} collected=7"]
    assert len(sent) == 2


def test_the_real_collector_is_watched_until_stopped() -> None:
    sent: list[float] = []
    watch = PauseWatch(sent.append).start()
    try:
        gc.collect()
        watch.report()
        assert len(sent) == 1 and sent[0] >= 0.0
    finally:
        watch.stop()
    gc.collect()
    watch.report()
    assert len(sent) == 1
    assert watch not in gc.callbacks
