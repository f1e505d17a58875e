"""A wall clock and a monotonic clock the test moves by hand, for engine.clock: `advance`
moves both (time passing), `step` the wall clock alone (NTP's step, an operator's date -s)."""
from __future__ import annotations

from engine.clock import EngineClock


class Clocks:
    def __init__(self, wall: float, monotonic: float = 1000.0) -> None:
        self.wall_now = wall
        self.monotonic_now = monotonic

    def wall(self) -> float:
        return self.wall_now

    def monotonic(self) -> float:
        return self.monotonic_now

    def advance(self, seconds: float) -> None:
        self.wall_now += seconds
        self.monotonic_now += seconds

    def step(self, seconds: float) -> None:
        self.wall_now += seconds

    def engine_clock(self, floor: float = 0.0) -> EngineClock:
        return EngineClock(floor, self.wall, self.monotonic)
