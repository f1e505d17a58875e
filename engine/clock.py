"""The engine's time: Unix seconds that advance with the monotonic clock.

Every time the supervisor writes to the spool or compares with one (a job's `queued_ts`
and `expires_ts`, a recipient's `next_attempt`, a finished id's `ts`) is
`EngineClock.now()`: the wall clock read once, at start, then advanced by the monotonic
clock. So an interval is what it says whatever the wall clock does meanwhile (NTP stepping a
clock that was wrong, an operator's `date -s`): a 30-minute `expires` is 30 minutes, a retry
60 s after a deferral is 60 s after it, an hour's step forward expires nothing and an hour's
step back stalls nothing.

A step is noticed (`step`, at each supervisor tick) when the wall clock has moved away from
the engine's time by more than STEP_TOLERANCE since the last step noticed. It is reported,
never followed: until the supervisor stops, its times differ from the wall clock's by the
steps seen (`apart`). At a clean stop the spool's times are moved by that much
(`Spool.shift`), so the next run, anchored to the wall clock again, finds them where they
belong. `floor`: the latest "now" the spool holds; the engine's time never starts below it,
so a step back while the engine was down (or a crash after one during a run) cannot put
mail already due in the future. A step forward while it was down cannot be told from time
passing: queued mail is older by the step. docs/SPOOL.md, "Time".
"""
from __future__ import annotations

import time
from collections.abc import Callable

Clock = Callable[[], float]

# Seconds the wall clock may move away from the engine's time before it counts as a step:
# far above what NTP's slewing does between two ticks, far below any interval that matters.
STEP_TOLERANCE = 5.0


class EngineClock:
    """The supervisor's clock (see the module's docstring). `wall` and `monotonic` are the
    clocks it reads: injected by tests, which move them without sleeping."""

    def __init__(self, floor: float = 0.0, wall: Clock = time.time,
                 monotonic: Clock = time.monotonic) -> None:
        self._wall = wall
        self._monotonic = monotonic
        self._offset = max(wall(), floor) - monotonic()
        self._apart = 0.0  # wall minus engine time, as of the last step noticed

    def now(self) -> float:
        """The engine's time, Unix seconds."""
        return self._offset + self._monotonic()

    def apart(self) -> float:
        """The wall clock minus the engine's time, now (+: the wall clock is ahead)."""
        return self._wall() - self.now()

    def step(self) -> float | None:
        """The step the wall clock took since the last one noticed (seconds, +: forward),
        if it is more than STEP_TOLERANCE; else None. A start floored above the wall clock
        (see `floor`) is noticed as a step back at the first call."""
        apart = self.apart()
        moved = apart - self._apart
        if abs(moved) <= STEP_TOLERANCE:
            return None
        self._apart = apart
        return moved
