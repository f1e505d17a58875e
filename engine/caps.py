"""Caps on what one sending IP may send to one provider: per hour, and per day while warming up.

Both count turns taken (engine.shaping): messages per hour in one-minute buckets over the
last hour, on the monotonic clock (an interval: a step of the wall clock neither empties the
hour nor holds it shut for an hour more); messages per UTC day, a date of the wall clock,
against the warm-up schedule's cap for the IP's day of warm-up. A cap reached defers the
message until the cap frees (the oldest minute leaves the hour, or the next UTC midnight): a
`Deferral`, never an attempt. A message counted that goes back to the spool untried (no
connection slot, a turn taken again that is not now) is given back (`give_back`): a message
never sent uses up no cap.
"""
from __future__ import annotations

import datetime
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

Clock = Callable[[], float]


@dataclass(frozen=True)
class Deferral:
    """Not now: come back at `retry_at` (Unix time). Not an attempt."""

    retry_at: float
    reason: str


@dataclass(frozen=True)
class Counted:
    """One message counted against the caps: when (the hour's clock) and on which UTC day,
    so that it is given back from the minute and the day it was counted in."""

    at: float
    day: str


@dataclass
class HourWindow:
    """Counts in one-minute buckets over the last hour."""

    buckets: deque[tuple[int, int]] = field(default_factory=deque)  # (minute, count)

    def add(self, now: float) -> None:
        minute = int(now // 60)
        if self.buckets and self.buckets[-1][0] == minute:
            self.buckets[-1] = (minute, self.buckets[-1][1] + 1)
        else:
            self.buckets.append((minute, 1))

    def remove(self, at: float | None = None) -> None:
        """One count less (given back unused): of the minute of `at`, the time it was
        added, if that minute is still counted (None: the last minute counted). Taken from
        a later minute, it would leave the hour a minute late: one message too many in it
        meanwhile."""
        index = len(self.buckets) - 1
        if at is not None:
            minute = int(at // 60)
            while index >= 0 and self.buckets[index][0] != minute:
                index -= 1
        if index < 0:
            return
        minute, count = self.buckets[index]
        if count > 1:
            self.buckets[index] = (minute, count - 1)
        else:
            del self.buckets[index]

    def total(self, now: float) -> int:
        horizon = int(now // 60) - 59
        while self.buckets and self.buckets[0][0] < horizon:
            self.buckets.popleft()
        return sum(count for _, count in self.buckets)

    def frees_at(self) -> float:
        """When the oldest minute leaves the hour."""
        return (self.buckets[0][0] + 60) * 60.0 if self.buckets else 0.0


class Caps:
    """The hourly cap (`hourly`, 0: none) and the warm-up's daily cap (`daily_cap()`, None:
    none) of one sending IP x provider, with what was sent against them."""

    def __init__(self, hourly: int, daily_cap: Callable[[], int | None], wall: Clock,
                 clock: Clock) -> None:
        self.hourly = hourly
        self._daily_cap = daily_cap
        self._wall = wall  # the UTC day
        self._clock = clock  # the hour (monotonic)
        self._hour = HourWindow()
        self.sent_today = 0
        self._day_start = self._day_end = 0.0  # the UTC day `today()` last formatted
        self._today_text = ""
        self.day = self.today()

    def reached(self) -> Deferral | None:
        """A Deferral if a cap is reached now, else None."""
        now = self._wall()
        if self.hourly and self._hour.total(self._clock()) >= self.hourly:
            frees_in = self._hour.frees_at() - self._clock()
            return Deferral(now + max(frees_in, 1.0), "hourly limit")
        cap = self._daily_cap()
        self._roll_day()
        if cap is not None and self.sent_today >= cap:
            return Deferral(_next_midnight(now), "warm-up daily limit")
        return None

    def count(self) -> Counted:
        """One more message sent against both caps: what it took, to give back."""
        now = self._clock()
        self._hour.add(now)
        self.sent_today += 1
        return Counted(now, self.day)

    def give_back(self, counted: Counted) -> None:
        """A message counted (`counted`) went back to the spool untried: not counted."""
        self._hour.remove(counted.at)
        if counted.day == self.day:  # another day's count is spent
            self.sent_today = max(0, self.sent_today - 1)

    def counted_this_hour(self) -> bool:
        """Whether the hourly cap counts messages of the last hour (forgotten, it would let
        a full hour more through: engine.shaping_idle)."""
        return bool(self.hourly) and self._hour.total(self._clock()) > 0

    @property
    def daily_cap(self) -> int | None:
        return self._daily_cap()

    def today(self) -> str:
        """Today's UTC date, "2026-11-28". Asked at every turn: formatted only when the
        wall clock leaves the day formatted last (a float comparison otherwise)."""
        now = self._wall()
        if not self._day_start <= now < self._day_end:
            day = now // 86400  # Unix time has no leap seconds: a UTC day is 86400 s
            self._day_start, self._day_end = day * 86400, (day + 1) * 86400
            self._today_text = datetime.datetime.fromtimestamp(now, datetime.UTC).strftime(
                "%Y-%m-%d")
        return self._today_text

    def _roll_day(self) -> None:
        today = self.today()
        if today != self.day:
            self.day, self.sent_today = today, 0


def _next_midnight(now: float) -> float:
    day = datetime.datetime.fromtimestamp(now, datetime.UTC).date()
    midnight = datetime.datetime.combine(day + datetime.timedelta(days=1), datetime.time(),
                                         datetime.UTC)
    return midnight.timestamp()
