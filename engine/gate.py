"""The connection gate: how many connections one sending IP may hold open to one provider.

A provider's mail goes to several MX hosts, each with its own pool of
connections (engine.pool); the gate is shared by those pools. It admits a new
connection while fewer than `max_connections` are open across them, and no
sooner than `1 / connection_rate` after the last one (0: no pace). A pool that
finds it full waits at the gate; when the gate is full and another of the
provider's MX hosts holds an idle connection, that connection is closed to
make room rather than left to its idle timeout. While the provider is suspended
(`paused`), no connection is opened ahead of a caller: nothing knocks at a receiver
that blocked us. `engine.shaping.ProviderShaper` creates one per sending IP x
provider from its `SendingLimits`.
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any

import gevent
from gevent.event import AsyncResult

from engine.waiters import any_waiting, wake_first

Clock = Callable[[], float]


class ConnectionGate:
    """Open connections of one IP x provider across its MX hosts' pools."""

    def __init__(self, max_connections: int, connection_rate: float,
                 clock: Clock = time.monotonic,
                 paused: Callable[[], bool] = lambda: False) -> None:
        self.max_connections = max_connections
        self.paused = paused
        self.connection_rate = connection_rate
        self._clock = clock
        self.open = 0
        self._next_at = 0.0  # when the next new connection may start
        self._waiters: deque[AsyncResult] = deque()
        self._timer: Any = None
        self._idle_closers: list[Callable[[], bool]] = []

    def try_enter(self) -> bool:
        """Take a connection slot if one is free now."""
        if self.open >= self.max_connections:
            # Closing an idle connection elsewhere frees its slot for us right now.
            if not self._close_someone_idle() or self.open >= self.max_connections:
                return False
        now = self._clock()
        if self.connection_rate > 0:
            if now < self._next_at:
                self._wake_at(self._next_at - now)
                return False
            self._next_at = max(now, self._next_at) + 1.0 / self.connection_rate
        self.open += 1
        return True

    def leave(self) -> None:
        self.open -= 1
        self.wake_one()

    @property
    def in_use(self) -> bool:
        """A connection open or awaited, or a pool still holding this gate (it forgets it
        only once empty: engine.pools.reap): the provider's shaper must not be made anew
        beside it (engine.shaping_idle)."""
        return self.open > 0 or any_waiting(self._waiters) or bool(self._idle_closers)

    def add_waiter(self, waiter: AsyncResult) -> None:
        self._waiters.append(waiter)

    def has_waiters(self) -> bool:
        """Someone waits for a slot: a pool waiting at the gate, for another MX host."""
        return any_waiting(self._waiters)

    def remove_waiter(self, waiter: AsyncResult) -> None:
        if waiter in self._waiters:
            self._waiters.remove(waiter)

    def on_idle(self, closer: Callable[[], bool]) -> None:
        """Register a pool's "close one idle connection" hook."""
        self._idle_closers.append(closer)

    def forget(self, closer: Callable[[], bool]) -> None:
        if closer in self._idle_closers:
            self._idle_closers.remove(closer)

    def wake_one(self) -> None:
        wake_first(self._waiters)

    def _wake_at(self, delay: float) -> None:
        if self._timer is None or self._timer.dead:
            self._timer = gevent.spawn_later(delay, self.wake_one)

    def _close_someone_idle(self) -> bool:
        """All slots taken: an idle connection to another MX host of the provider
        gives its slot up, rather than wait for its idle timeout."""
        return any(closer() for closer in self._idle_closers)
