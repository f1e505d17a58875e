"""All the destination pools of one worker (engine.pool), by destination.

A pool is made on first use (`get`), with the settings of its provider (connection
limits from shaping) and the provider's connection gate; `reap` closes idle connections
past their time and forgets pools that are empty and healthy (a failing pool is kept, so
its back-off is remembered); `drain` stops handing out connections at a graceful stop.

Idle connections are bounded across the worker's pools (`pool.max_idle`): a burst to ten
thousand domains would otherwise leave one idle connection (a socket, a descriptor and its
buffers, and the receiver's slot) per domain until `idle_timeout`. Past the bound, the
connection idle longest, whichever its pool, is closed (QUIT) at once. Each connection put
on an idle stack is noted in order (`_idled`); notes of connections taken again since are
dropped when the notes outnumber the bound, so closing the oldest is amortised O(1).
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from engine.config import PoolConfig
from engine.pool import DestinationPool, PoolKey
from engine.smtp import Connection

if TYPE_CHECKING:
    from engine.gate import ConnectionGate


class Pools:
    """All destination pools of one worker."""

    def __init__(self, settings: PoolConfig,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self._clock = clock
        self._pools: dict[PoolKey, DestinationPool] = {}
        self.draining = False
        # (pool, connection) as each was put on an idle stack, oldest first; some may have
        # been taken again or closed since (stale until `_trim_idle` drops them).
        self._idled: deque[tuple[DestinationPool, Connection]] = deque()
        self.idle_closed = 0  # closed for the bound (`max_idle`), for tests and figures

    def find(self, key: PoolKey) -> DestinationPool | None:
        """The pool for `key` if it exists (no factory, no settings to build first)."""
        return self._pools.get(key)

    def get(self, key: PoolKey, open_connection: Callable[[], Connection],
            settings: PoolConfig | None = None,
            gate: ConnectionGate | None = None,
            on_check_failed: Callable[[Connection], None] | None = None) -> DestinationPool:
        """The pool for `key`, made on first use with `settings` (default: the worker's);
        `on_check_failed` is told of each idle connection that fails its check before reuse."""
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = DestinationPool(key, settings or self.settings,
                                                      open_connection, self._clock, gate,
                                                      on_check_failed, self._trim_idle)
            pool.draining = self.draining
        return pool

    def _trim_idle(self, pool: DestinationPool, conn: Connection) -> None:
        """`conn` was just put on `pool`'s idle stack: past `max_idle` idle connections in
        the worker, close the one idle longest. The notes are compacted to the connections
        still idle (each once, at its latest note) only when they outnumber the bound."""
        self._idled.append((pool, conn))
        limit = self.settings.max_idle
        if len(self._idled) <= limit:
            return
        seen: set[int] = set()
        kept: deque[tuple[DestinationPool, Connection]] = deque()
        for noted, idle in reversed(self._idled):
            if id(idle) not in seen and noted.holds_idle(idle):
                seen.add(id(idle))
                kept.appendleft((noted, idle))
        self._idled = kept
        while len(self._idled) > limit:
            oldest_pool, oldest = self._idled.popleft()
            if oldest_pool.close_idle_connection(oldest):
                self.idle_closed += 1

    def drain(self) -> None:
        """Hand out no more connections (graceful stop). Transactions already holding
        one finish; callers still waiting end with `Drained`, reporting nothing, so
        their recipients stay spooled.

        Regression (a graceful restart sent mail twice): a worker holds up to
        `limits.max_in_flight` tasks, most waiting for one of a few connections.
        Draining them all outlasted `drain_timeout`; the supervisor then killed the
        worker mid-transaction, and messages the server had taken but nobody had
        recorded went out again after the restart."""
        self.draining = True
        for pool in self._pools.values():
            pool.drain()

    def reap(self) -> int:
        """Close expired idle connections and forget empty, healthy pools."""
        closed = 0
        for key, pool in list(self._pools.items()):
            closed += pool.close_idle()
            if not pool.busy and not pool.idle and not pool.failing():
                del self._pools[key]
                if pool.gate is not None:
                    pool.gate.forget(pool.close_one_idle)
        return closed

    def close_all(self) -> None:
        for pool in self._pools.values():
            pool.stop_opening_ahead()
            pool.close_idle(force=True)

    def drop_idle(self) -> int:
        """Close every idle connection at once, without QUIT: the sending IP is gone, what
        they would send goes nowhere and a QUIT would only wait for its timeout. (A
        connection whose source address was removed is not closed by the kernel: reused, its
        transaction would time out, a counted and perhaps ambiguous attempt.)"""
        return sum(pool.close_idle(force=True, polite=False) for pool in self._pools.values())

    @property
    def open_connections(self) -> int:
        return sum(p.open for p in self._pools.values())

    def __len__(self) -> int:
        return len(self._pools)

    def __iter__(self) -> Iterator[DestinationPool]:
        """The pools there are (a view, for tests)."""
        return iter(list(self._pools.values()))
