"""Greenlet-safe pools of reused SMTP connections, one pool per destination.

A destination is the full identity of a connection, `PoolKey`: sending IP, MX
host, port and TLS mode; two keys never share a connection. Within a pool:

- a connection is checked out by one greenlet at a time and comes back to the
  idle stack when it is still usable, until it has carried `max_messages`;
- connections are created lazily, at most `max_connections` open (or opening)
  at once; callers beyond that wait for one to come back, and waiting is not a
  delivery attempt;
- the idle stack is LIFO, so a trickle of mail keeps one connection warm and
  the rest age out after `idle_timeout`;
- an idle connection is checked before reuse (`Connection.is_alive`, no round
  trip): one the server closed or 421'd while idle is dropped;
- a failed connect puts the pool in backoff for `connect_backoff` seconds: the
  failure reaches every waiting caller at once, callers during the backoff fail
  fast (unless a healthy idle connection is there to take), and afterwards one
  probe connects at a time until one succeeds: a dead destination never causes
  a reconnect storm.

Modelled on gevent's examples/psycopg2_pool.py.
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import gevent
from gevent.event import AsyncResult

from engine.config import PoolConfig
from engine.reply import DeliveryError
from engine.smtp import Connection


@dataclass(frozen=True)
class PoolKey:
    source_ip: str
    host: str
    port: int
    tls: str

    def __str__(self) -> str:
        return f"{self.source_ip}->{self.host}:{self.port}/{self.tls}"


class DestinationPool:
    """Connections to one destination."""

    def __init__(self, key: PoolKey, settings: PoolConfig,
                 open_connection: Callable[[], Connection],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.key = key
        self.settings = settings
        self._open_connection = open_connection
        self._clock = clock
        self._idle: list[Connection] = []
        self._waiters: deque[AsyncResult] = deque()
        self.open = 0  # connections open or being opened
        self._connecting = 0
        self._failure: DeliveryError | None = None
        self._failed_until = 0.0
        self._probing = False  # after a failure: one connect at a time until one works
        self.stale_dropped = 0

    # -- checkout -------------------------------------------------------------

    @contextmanager
    def connection(self) -> Iterator[tuple[Connection, bool]]:
        """Check out a connection as (connection, reused); give it back afterwards.

        The caller reports a broken connection by closing it (sock is None). A
        connection left by an exception (a bug, a gevent Timeout, a kill) is closed:
        it may be mid-transaction, and reusing it would pair the next message's
        commands with this one's late replies.
        """
        conn, reused = self.acquire()
        try:
            yield conn, reused
        except BaseException:
            conn.close()
            raise
        finally:
            self.release(conn)

    def acquire(self) -> tuple[Connection, bool]:
        while True:
            # A healthy idle connection first: a failed *new* connect (typically a 421
            # "too many connections" at the banner) must not strand the ones already open.
            conn = self._take_idle()
            if conn is not None:
                return conn, True
            self._raise_if_backing_off()
            if self.open < self.settings.max_connections and not (
                    self._probing and self._connecting):
                return self._connect(), False
            self._wait()

    def release(self, conn: Connection) -> None:
        usable = conn.sock is not None and conn.messages_sent < self.settings.max_messages
        if usable:
            self._idle.append(conn)
        else:
            self._discard(conn)
        self._wake_one()

    # -- housekeeping ---------------------------------------------------------

    def close_idle(self, force: bool = False) -> int:
        """Close idle connections older than idle_timeout (all of them if `force`)."""
        now = self._clock()
        keep, drop = [], []
        for conn in self._idle:
            expired = now - conn.last_used >= self.settings.idle_timeout
            (drop if force or expired else keep).append(conn)
        self._idle = keep
        for conn in drop:
            self._discard(conn)
        return len(drop)

    @property
    def idle(self) -> int:
        return len(self._idle)

    @property
    def busy(self) -> bool:
        return self.open > 0 or bool(self._waiters)

    def failing(self) -> bool:
        return self._failure is not None and self._clock() < self._failed_until

    # -- internals --------------------------------------------------------------

    def _raise_if_backing_off(self) -> None:
        if self._failure is not None and self._clock() < self._failed_until:
            err = self._failure
            raise type(err)(err.reply, err.command, err.blame)

    def _take_idle(self) -> Connection | None:
        while self._idle:
            conn = self._idle.pop()
            if self._clock() - conn.last_used >= self.settings.idle_timeout:
                self._discard(conn)
            elif conn.is_alive():
                return conn
            else:
                self.stale_dropped += 1
                self._discard(conn, polite=False)
        return None

    def _connect(self) -> Connection:
        self.open += 1
        self._connecting += 1
        try:
            conn = self._open_connection()
        except DeliveryError as err:
            self.open -= 1
            self._fail(err)
            raise
        except BaseException:
            self.open -= 1
            self._wake_one()
            raise
        finally:
            self._connecting -= 1
        if self._probing:  # the destination is back: let the waiters connect too
            self._probing = False
            self._failure = None
            self._wake_all()
        return conn

    def _fail(self, err: DeliveryError) -> None:
        self._failure = err
        self._failed_until = self._clock() + self.settings.connect_backoff
        self._probing = True
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.ready():
                waiter.set_exception(type(err)(err.reply, err.command, err.blame))

    def _wait(self) -> None:
        waiter = AsyncResult()
        self._waiters.append(waiter)
        try:
            waiter.get()
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.ready():
                waiter.set(None)
                return

    def _wake_all(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.ready():
                waiter.set(None)

    def _discard(self, conn: Connection, polite: bool = True) -> None:
        self.open -= 1
        if polite and conn.sock is not None:
            gevent.spawn(conn.quit_quietly)  # QUIT costs a round trip: not the caller's
        else:
            conn.close()


class Pools:
    """All destination pools of one worker."""

    def __init__(self, settings: PoolConfig,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self._clock = clock
        self._pools: dict[PoolKey, DestinationPool] = {}

    def get(self, key: PoolKey, open_connection: Callable[[], Connection]) -> DestinationPool:
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = DestinationPool(key, self.settings, open_connection,
                                                      self._clock)
        return pool

    def reap(self) -> int:
        """Close expired idle connections and forget empty, healthy pools."""
        closed = 0
        for key, pool in list(self._pools.items()):
            closed += pool.close_idle()
            if not pool.busy and not pool.idle and not pool.failing():
                del self._pools[key]
        return closed

    def close_all(self) -> None:
        for pool in self._pools.values():
            pool.close_idle(force=True)

    @property
    def open_connections(self) -> int:
        return sum(p.open for p in self._pools.values())

    def __len__(self) -> int:
        return len(self._pools)
