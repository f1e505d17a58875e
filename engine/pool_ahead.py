"""When to open a connection's replacement ahead of time, in a busy pool (finding 3).

A pooled connection retires at the end of its term (engine.pool_terms: its own share of
`max_messages` and `max_age`). Without help, the message after its last one waits for a
whole connection setup (connect, banner, EHLO, STARTTLS): in a busy pool, a stall at every
retirement. So when a connection checked out is close to the end of its term, and the pool
is busy, its replacement is opened now, in the background (engine.pool does the opening),
and goes to the first waiter or the idle stack when it is ready.

How close is close: the setup time (as the pool's last connect took) at the pool's pace of
checkouts (a moving average of the time between them), plus one, at most half of
`max_messages` (`lead`); or, for its age, less than twice the setup time plus one interval
between checkouts left. Busy: the previous checkout is less than `BUSY_WITHIN` seconds ago
(at most half the idle timeout), or callers wait. Not when another open connection, fresh
and far from its own end, will take over anyway.

`Ahead` is one pool's record of this: its pace, the connects running in the background
and the connections they replace. It decides; it opens nothing and knows no pool.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import gevent

from engine.config import PoolConfig
from engine.smtp import Connection

# Weight of the newest interval between checkouts in the pool's moving average.
_INTERVAL_WEIGHT = 0.25
# A pool is busy (worth opening a connection's replacement ahead) when its previous
# checkout is less than this long ago (at most half the idle timeout) or callers wait.
BUSY_WITHIN = 5.0


class Ahead:
    """One pool's connects ahead: the pace of its checkouts, the connects running in the
    background, and the connections whose replacement they are."""

    __slots__ = ("_interval", "_last_checkout", "failed", "opened", "replaced", "running",
                 "setup_time")

    def __init__(self) -> None:
        self.running: set[gevent.Greenlet] = set()  # connects in the background
        self.replaced: set[int] = set()  # id() of connections whose replacement was opened
        self.setup_time = 0.0  # how long the last connect took (the pool's clock)
        self._interval = -1.0  # moving average of the time between checkouts (-1: none yet)
        self._last_checkout = -1.0
        self.opened = 0  # connections opened ahead
        self.failed = 0  # connects ahead that failed

    def on_its_way(self, waiting: int) -> bool:
        """Whether a caller about to connect should wait instead: more connects ahead are
        running than callers already wait (those are served first), so one is its own."""
        return len(self.running) > waiting

    def checked_out(self, now: float, conn: Connection, left: int, seconds_left: float,
                    settings: PoolConfig, waiting: bool, idle: Sequence[Connection]) -> bool:
        """Book a checkout (the pool's pace); True when `conn`, close to the end of its
        term in a busy pool (`left` messages, this one included, or `seconds_left`),
        should have its replacement opened now."""
        gap = now - self._last_checkout if self._last_checkout >= 0 else -1.0
        self._last_checkout = now
        if gap >= 0:
            self._interval = gap if self._interval < 0 else (
                self._interval + (gap - self._interval) * _INTERVAL_WEIGHT)
        most = settings.max_messages
        if most < 2 or id(conn) in self.replaced:
            return False  # (max_messages 1 is a connection per message, on purpose)
        if left > self.lead(most) and seconds_left > self._lead_time():
            return False
        # Only while the pool is busy: in a pool that carries a message now and then, the
        # replacement might idle out (or the traffic stop) before it is used.
        if not (0 <= gap < min(BUSY_WITHIN, settings.idle_timeout / 2) or waiting):
            return False
        return not self._taken_over(idle, now, most, settings.idle_timeout / 2)

    def _taken_over(self, idle: Sequence[Connection], now: float, most: int,
                    fresh: float) -> bool:
        """Another open connection will take over, not about to end itself: no need."""
        return any(now - c.last_used < fresh and most - c.messages_sent > self.lead(most)
                   for c in idle)

    def busy(self, now: float, settings: PoolConfig) -> bool:
        """Checkouts come close together (their moving average), the last a moment ago."""
        within = min(BUSY_WITHIN, settings.idle_timeout / 2)
        return (0 <= self._interval < within and self._last_checkout >= 0
                and now - self._last_checkout < within)

    def _lead_time(self) -> float:
        """How long before the end of a connection's term its replacement starts."""
        return 2 * self.setup_time + max(0.0, self._interval)

    def lead(self, max_messages: int) -> int:
        """How many messages before its last one a connection's replacement starts: its
        setup time (as the last connect took) at the pool's pace of checkouts, plus one,
        and at most half of `max_messages`."""
        most = max(1, max_messages // 2)
        if self.setup_time <= 0:
            return 1
        if self._interval <= 0:
            return most
        return min(most, 1 + math.ceil(self.setup_time / self._interval))
