"""The garbage collector's settings for the engine's long-running loops.

Both processes hold many long-lived objects (config, sockets, jobs or pools,
greenlets) and make many short-lived ones per message, nearly all freed by
reference counting. With the default thresholds (700, 10, 10) the cyclic
collector ran every few hundred allocations and rescanned the long-lived ones
again and again.
"""
from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable
from typing import Any

from engine import logs

log = logging.getLogger("mailengine.gc")

# Allocations (net of frees) before a young collection, then young and middle collections
# before an older one: a young collection every few hundred messages.
THRESHOLDS = (50_000, 50, 100)
# A full collection pausing the loop this long is logged (`gc_pause`); every full one is timed.
SLOW_PAUSE = 0.05


def settle_for_a_long_run() -> None:
    """Call once set up, before the loop: what exists now is never collected (it lives as
    long as the process) and is no longer scanned; young objects are collected less often
    (those in cycles, such as a greenlet and its exception's traceback, still are)."""
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)


class PauseWatch:
    """Times the collector's full collections (the oldest generation: the long pauses, as
    they scan every object not frozen). The process's loop does nothing else meanwhile, so
    a stall of intake or of a worker's deliveries shows here if the collector caused it.
    The callback only notes each pause; `report`, from the process's loop, sends them to
    `timing` (milliseconds) and logs those of SLOW_PAUSE or more (no I/O inside the
    collector)."""

    def __init__(self, timing: Callable[[float], None],
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self._timing = timing
        self._clock = clock
        self._began = 0.0
        self._pauses: list[tuple[float, int]] = []  # (seconds, objects collected)

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if info.get("generation") != 2:
            return
        if phase == "start":
            self._began = self._clock()
        elif len(self._pauses) < 100:  # a loop that never reports keeps a few
            self._pauses.append((self._clock() - self._began, info.get("collected", 0)))

    def report(self) -> None:
        pauses, self._pauses = self._pauses, []
        for seconds, collected in pauses:
            self._timing(seconds * 1000)
            if seconds >= SLOW_PAUSE:
                log.warning(logs.kv("gc_pause", seconds=round(seconds, 3),
                                    collected=collected))

    def start(self) -> PauseWatch:
        if self not in gc.callbacks:
            gc.callbacks.append(self)
        return self

    def stop(self) -> None:
        if self in gc.callbacks:
            gc.callbacks.remove(self)
