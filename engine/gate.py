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

In a cluster, a provider with `cluster_connections` also needs one of the cluster's slots
for each new connection (engine.cluster_connections, `limit_cluster`): asked after the
local limits admit it, given back when the connection has closed. A caller refused by
the cluster waits at most `shaping.max_wait` (`cluster_wait`; then `NoSlot`: its message
goes back to the spool), and no connection is opened ahead of callers (engine.pool).
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import gevent
from gevent.event import AsyncResult

from engine.waiters import any_waiting, wake_first

if TYPE_CHECKING:
    from engine.cluster_connections import ClusterConnections

Clock = Callable[[], float]


class NoSlot(Exception):
    """The cluster's connections to the provider stayed taken for `shaping.max_wait`: the
    message goes back to the spool without an attempt (engine.delivery)."""


class ConnectionGate:
    """Open connections of one IP x provider across its MX hosts' pools."""

    def __init__(self, max_connections: int, connection_rate: float,
                 clock: Clock = time.monotonic,
                 paused: Callable[[], bool] = lambda: False,
                 opened: Callable[[], None] = lambda: None) -> None:
        self.max_connections = max_connections
        self.paused = paused
        self.opened = opened  # told of each connection let in (engine.shaping: shown)
        self.connection_rate = connection_rate
        self._clock = clock
        self.open = 0
        self._next_at = 0.0  # when the next new connection may start
        self._waiters: deque[AsyncResult] = deque()
        self._timer: Any = None
        self._idle_closers: list[Callable[[], bool]] = []
        self.cluster: ClusterConnections | None = None  # the cluster's slots, if limited
        self._max_wait = 0.0

    def limit_cluster(self, slots: ClusterConnections, max_wait: float) -> None:
        """Each new connection also needs one of the cluster's `slots`; a caller waits for
        one at most `max_wait`."""
        self.cluster = slots
        self._max_wait = max_wait
        slots.waiters = self.has_waiters
        slots.wake = self.wake_one
        slots.shed = self.shed_idle

    def cluster_wait(self) -> float | None:
        """How long a caller refused a slot may wait for one: `shaping.max_wait` when the
        cluster is what refuses (room here, none in the cluster); None: as long as it
        takes (this IP's own limit, whose connections come back)."""
        if self.cluster is None or self.open >= self.max_connections:
            return None
        return self._max_wait

    def give_back(self) -> bool:
        """A connection coming back should close rather than be reused: this worker holds
        more than its share of the cluster's slots while other workers wait."""
        return self.cluster is not None and self.cluster.over_share

    def shed_idle(self, count: int) -> int:
        """Close up to `count` idle connections of the provider (oldest first, each pool
        in turn): how many were."""
        closed = 0
        while closed < count and self._close_someone_idle():
            closed += 1
        return closed

    def try_enter(self) -> bool:
        """Take a connection slot if one is free now."""
        if self.open >= self.max_connections:
            # Closing an idle connection elsewhere frees its slot for us right now.
            if not self._close_someone_idle() or self.open >= self.max_connections:
                return False
        now = self._clock()
        if self.connection_rate > 0 and now < self._next_at:
            self._wake_at(self._next_at - now)
            return False
        if self.cluster is not None and not self._cluster_slot():
            return False
        if self.connection_rate > 0:
            self._next_at = max(now, self._next_at) + 1.0 / self.connection_rate
        self.open += 1
        self.opened()
        return True

    def _cluster_slot(self) -> bool:
        """One of the cluster's slots (a round trip to Redis). Counted open meanwhile, so
        that callers of this worker do not overtake the local limit while it is asked. A
        refusal closes an idle connection of the provider here, if any: its slot serves
        the callers waiting when it is free."""
        assert self.cluster is not None
        self.open += 1
        try:
            granted = self.cluster.acquire()
        finally:
            self.open -= 1
        if not granted:
            self._close_someone_idle()
        return granted

    def leave(self) -> None:
        self.open -= 1
        if self.cluster is not None:
            self.cluster.release()
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
