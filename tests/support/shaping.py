"""A traffic shaper on a fake clock: `FakeTime`, whose sleep advances it, so pacing tests run
instantly and exactly; `limits(...)`, the config's default limits of an IP x provider with
changes; `shaper(...)`, a ProviderShaper on such a clock. And the throttling provider the
throttling tests play: the sink's token bucket (LIMIT, BURST), its replies, and `halves`."""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from engine.config import PoolConfig, SendingLimits, ShapingConfig, ThrottleConfig
from engine.shaping import ProviderShaper


class FakeTime:
    """A clock whose sleep advances it: pacing tests run instantly and exactly."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


DEFAULT_LIMITS = SendingLimits.of(PoolConfig(), ShapingConfig(), "192.0.2.10", "example.net")
DEFAULT_THROTTLE = ThrottleConfig()


def limits(**changes: Any) -> SendingLimits:
    """The config's default limits of an IP x provider, with `changes`."""
    return dataclasses.replace(DEFAULT_LIMITS, **changes)


def shaper(limits: SendingLimits = DEFAULT_LIMITS, throttle: ThrottleConfig = DEFAULT_THROTTLE,
           t: FakeTime | None = None, max_wait: float = 10.0, cap: int | None = None,
           provider: str = "example.net") -> tuple[ProviderShaper, FakeTime]:
    t = t or FakeTime()
    return ProviderShaper(provider, limits, throttle, max_wait, lambda: cap, t.clock, t.clock,
                          t.sleep), t


LIMIT = 20.0  # msg/s per client IP at the throttling sink
BURST = 5.0
SLOW_DOWN_421 = "421 4.7.0 Rate limited, slow down"
SLOW_DOWN_451 = "451 4.7.1 Rate limited, slow down"


def halves(times: Sequence[float], start: float, end: float) -> tuple[int, int]:
    middle = (start + end) / 2
    return (sum(1 for t in times if t < middle), sum(1 for t in times if t >= middle))
