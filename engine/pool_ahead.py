"""Opening a connection's replacement ahead of time, in a busy pool (finding 3).

A pooled connection retires after `max_messages`. Without help, the message after its
last one waits for a whole connection setup (connect, banner, EHLO, STARTTLS): in a busy
pool, a stall every `max_messages` messages. So when a connection checked out is close to
its last message, and the pool is busy, its replacement is opened now, in the background,
and goes to the first waiter or the idle stack when it is ready.

How close is close: the setup time (as the pool's last connect took) at the pool's pace of
checkouts (a moving average of the time between them), plus one, at most half of
`max_messages` (`lead`). Busy: the previous checkout is less than `BUSY_WITHIN` seconds ago
(at most half the idle timeout), or callers wait. Not when another open connection, fresh
and far from its own end, will take over anyway.

The caps are never exceeded: a connection being opened ahead counts as open, in the pool
and in the provider's gate, from the moment it starts; at the cap nothing is opened ahead
(the destination's limit wins over the latency). A failed connect ahead is logged and
counted; no caller gets it and the pool does not back off (a caller's own connect decides
that).

`OpeningAhead` is one pool's part of this; it works on its pool's counts and waiters by
the pool's own rules, and takes the pool as an argument rather than holding it (no
reference cycle: a pool reaped is freed at once).
"""
from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING

import gevent
from gevent.event import AsyncResult

from engine import logs
from engine.reply import DeliveryError
from engine.smtp import Connection
from engine.waiters import any_waiting

if TYPE_CHECKING:
    from engine.pool import DestinationPool

log = logging.getLogger("mailengine.pool")

# Weight of the newest interval between checkouts in the pool's moving average.
_INTERVAL_WEIGHT = 0.25
# A pool is busy (worth opening a connection's replacement ahead) when its previous
# checkout is less than this long ago (at most half the idle timeout) or callers wait.
BUSY_WITHIN = 5.0


class OpeningAhead:
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

    def on_its_way(self, waiters: deque[AsyncResult]) -> bool:
        """Whether a caller about to connect should wait instead: more connects ahead are
        running than callers already wait (those are served first), so one is its own."""
        running = self.running
        return bool(running) and len(running) > sum(1 for w in waiters if not w.ready())

    def checked_out(self, pool: DestinationPool, conn: Connection) -> None:
        """Bookkeeping of a checkout: the pool's pace, and whether `conn`, close to its
        `max_messages`, should have its replacement opened now."""
        now = pool._clock()
        gap = now - self._last_checkout if self._last_checkout >= 0 else -1.0
        self._last_checkout = now
        if gap >= 0:
            self._interval = gap if self._interval < 0 else (
                self._interval + (gap - self._interval) * _INTERVAL_WEIGHT)
        settings = pool.settings
        most = settings.max_messages
        left = most - conn.messages_sent  # this message included
        if most < 2 or left > self.lead(most) or id(conn) in self.replaced:
            return  # (max_messages 1 is a connection per message, on purpose)
        # Only while the pool is busy: in a pool that carries a message now and then, the
        # replacement might idle out (or the traffic stop) before it is used.
        busy_within = min(BUSY_WITHIN, settings.idle_timeout / 2)
        if not (0 <= gap < busy_within or any_waiting(pool._waiters)):
            return
        if self._taken_over(pool._idle, now, most, settings.idle_timeout / 2):
            return
        if self.start(pool):
            self.replaced.add(id(conn))

    def _taken_over(self, idle: Sequence[Connection], now: float, most: int,
                    fresh: float) -> bool:
        """Another open connection will take over, not about to end itself: no need."""
        return any(now - c.last_used < fresh and most - c.messages_sent > self.lead(most)
                   for c in idle)

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

    def start(self, pool: DestinationPool) -> bool:
        """Start a connect in the background whose connection goes to the first waiter
        or the idle stack, if the caps leave room for it; True if it started.

        The connection being opened counts as open, here and in the provider's gate,
        from now on: the caps are never exceeded. At the cap nothing is opened ahead:
        the destination's limit wins over the latency (finding 2's order: the old
        connection's slot comes free after its QUIT, then the next one is opened)."""
        if (pool.draining or pool._probing or pool.failing()
                or pool.open >= pool._max_connections()):
            return False
        gate = pool.gate
        if gate is not None:
            # Never by closing another pool's idle connection (try_enter would): only a
            # slot that is free now.
            if gate.open >= gate.max_connections or not gate.try_enter():
                return False
        pool.open += 1
        pool._connecting += 1
        self.running.add(gevent.spawn(self._run, pool))
        return True

    def stop(self, pool: DestinationPool) -> None:
        """Stop every connect ahead (the connector closes what they opened)."""
        for greenlet in list(self.running):
            greenlet.kill(block=False)  # started: GreenletExit inside the connect (_run)
            if greenlet.dead and greenlet in self.running:
                # It had not started: it never runs, so its slot is given back here.
                self._ended(pool, greenlet, opened=False)

    def _run(self, pool: DestinationPool) -> None:
        greenlet = gevent.getcurrent()
        started = pool._clock()
        try:
            conn = pool._open_connection()
        except BaseException as exc:
            self._ended(pool, greenlet, opened=False)
            if isinstance(exc, gevent.GreenletExit):  # stopped by drain(): nothing to say
                return
            if not isinstance(exc, Exception):  # a gevent.Timeout, SystemExit...: not ours
                pool._wake_one()
                raise
            self._failed(pool, exc)
            return
        self._ended(pool, greenlet, opened=True)
        self.setup_time = pool._clock() - started
        pool._back()
        if pool.draining:
            pool._discard(conn)
            return
        self.opened += 1
        conn.last_used = pool._clock()  # idle from now, for the idle timeout
        pool.release(conn)

    def _failed(self, pool: DestinationPool, exc: Exception) -> None:
        """Nobody waits on this greenlet: the failure is logged and counted, no caller
        gets it and the pool does not back off (a caller's own connect decides that)."""
        self.failed += 1
        expected = isinstance(exc, DeliveryError)  # else a bug: its traceback too
        key = pool.key
        log.log(logging.INFO if expected else logging.ERROR,
                logs.kv("connect_ahead_failed", ip=key.source_ip, mx=key.host,
                        port=key.port, error=exc), exc_info=not expected)
        if isinstance(exc, DeliveryError):
            pool._at_capacity(exc)
        # Whoever waited for it goes the usual way: connects itself, or waits.
        pool._wake_one()

    def _ended(self, pool: DestinationPool, greenlet: gevent.Greenlet, opened: bool) -> None:
        """A connect ahead is over; without a connection (`opened` False) its slot in
        the pool and the gate, counted from `start` on, is free again."""
        self.running.discard(greenlet)
        pool._connecting -= 1
        if not opened:
            pool._closed()
