"""Greenlet-safe pools of reused SMTP connections, one pool per destination.

A destination is the full identity of a connection, `PoolKey`: sending IP, MX
host, port and TLS mode; two keys never share a connection. Within a pool:

- a connection is checked out by one greenlet at a time and comes back to the
  idle stack when it is still usable, until the end of its term: its own share of
  `max_messages` and `max_age`, drawn when it opens (engine.pool_terms), so that
  connections opened together do not retire together; and never two of the pool
  at once (one whose term ends while another retires or a connect is under way
  carries on, up to the configured limits);
- connections are created lazily, at most `max_connections` open (or opening)
  at once; callers beyond that wait for one to come back, and waiting is not a
  delivery attempt; a caller that finds the open ones all busy, below the cap,
  opens a new one in the background and takes whichever comes first;
- the idle stack is LIFO, so a trickle of mail keeps one connection warm and
  the rest age out after `idle_timeout`;
- an idle connection is checked before reuse (`Connection.is_alive`, no round
  trip; idle `reuse_check_after` or longer, an RSET too: `Connection.answers`): one
  the server closed, 421'd or left half-open while idle is dropped;
- a connection given back while callers wait goes straight to the first of them
  (checked with `Connection.reusable`, no syscall: it was in use a moment ago);
  with PIPELINING it goes to them even before the reply to the message's final
  dot, which the next holder reads after sending its own commands (`pass_on`):
  under load one round trip per message instead of two;
- a failed connect puts the pool in backoff for `connect_backoff` seconds: the
  failure reaches every waiting caller at once, callers during the backoff fail
  fast (unless a healthy idle connection is there to take), and afterwards one
  probe connects at a time until one succeeds (engine.pool_health);
- a connection about to be retired in a busy pool gets its replacement opened
  ahead, in the background, if the caps leave room: the next message does not
  wait for a connection setup (engine.pool_ahead says when);
- at the cap, a retired connection keeps its slot until its QUIT is answered
  (or times out): a server counting sessions until they close never sees one
  more than the cap (`_discard`); then, in a busy pool, its replacement is opened
  in the background at once, while the others carry the mail.

A pool may share a `ConnectionGate` (engine.shaping) with the pools of the
other MX hosts of the same provider: a new connection then also needs one of
the provider's connection slots for this sending IP; and, for a provider with a
cluster-wide limit, one of the cluster's (engine.cluster_connections): a caller the
cluster refuses waits at most `shaping.max_wait` (then `NoSlot`), no connection is
opened ahead (its slot would be asked of Redis in the middle of a checkout), and a
connection whose slot another worker of the cluster wants closes when it comes back.

A worker's pools, one per destination, are kept by engine.pools. Modelled on gevent's
examples/psycopg2_pool.py.
"""
from __future__ import annotations

import logging
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING

import gevent
from gevent.event import AsyncResult

from engine import logs
from engine.config import PoolConfig
from engine.gate import NoSlot
from engine.pool_ahead import Ahead
from engine.pool_health import Health
from engine.pool_terms import NOT_YET, NOW, Term
from engine.reply import DeliveryError, WorkerFault
from engine.smtp import Connection
from engine.waiters import any_waiting, count_waiting, wake_first

if TYPE_CHECKING:
    from engine.gate import ConnectionGate

log = logging.getLogger("mailengine.pool")


class Drained(gevent.GreenletExit):
    """The worker is draining: no connection is handed out any more. A GreenletExit, so
    the delivery code's `except Exception` cannot turn it into a deferral: the task ends
    without a result and its recipients stay pending in the spool."""


class StaleTurn(Exception):
    """No idle connection, and the caller's turn is no longer current (the provider pushed
    back or was blocked since it was taken): nothing was opened for it. Regression: every
    message waiting for a slot when a block came opened its own connection as the slots
    came free, each refused at the banner: twenty knocks at a receiver that had said stop."""


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
                 clock: Callable[[], float] = time.monotonic,
                 gate: ConnectionGate | None = None,
                 on_check_failed: Callable[[Connection], None] | None = None,
                 on_idle: Callable[[DestinationPool, Connection], None] | None = None) -> None:
        self.key = key
        self.settings = settings
        self.gate = gate
        if gate is not None:
            gate.on_idle(self.close_one_idle)
        self._open_connection = open_connection
        self._clock = clock
        self._idle: list[Connection] = []
        self._waiters: deque[AsyncResult] = deque()
        self.open = 0  # connections open or being opened
        self._connecting = 0
        self.health = Health(settings, clock)  # back-off and capacity (engine.pool_health)
        self.stale_dropped = 0
        self._on_check_failed = on_check_failed or (lambda conn: None)  # metric and log
        self._on_idle = on_idle  # told of each connection put on the idle stack (engine.pools)
        self.draining = False
        self.ahead = Ahead()  # replacements opened ahead (engine.pool_ahead)
        self._terms: dict[int, Term] = {}  # id() of each open connection -> its term
        self._rng = random.Random()
        self._quitting = 0  # retired at the cap, their slot held until the QUIT's reply

    # -- checkout -------------------------------------------------------------

    def connection(self, current: Callable[[], bool] | None = None) -> _Checkout:
        """Check out a connection as (connection, reused); give it back afterwards
        (`with pool.connection() as (conn, reused): ...`). `current`: whether the caller's
        turn still holds; checked before anything is opened or waited for (StaleTurn).

        The caller reports a broken connection by closing it (sock is None). A
        connection left by an exception (a bug, a gevent Timeout, a kill) is closed:
        it may be mid-transaction, and reusing it would pair the next message's
        commands with this one's late replies.
        """
        return _Checkout(self, current)

    def acquire(self, current: Callable[[], bool] | None = None) -> tuple[Connection, bool]:
        if self.draining:
            raise Drained()
        conn, reused = self._acquire(current)
        if self.draining:  # woke up after the drain began: give it back unused
            self.release(conn)  # ...which wakes the next waiter, which does the same
            raise Drained()
        now = self._clock()
        term = self._term(conn)
        if self.ahead.checked_out(now, conn, term.messages_left(conn.messages_sent),
                                  term.seconds_left(now), self.settings,
                                  any_waiting(self._waiters), self._idle):
            if self._open_ahead():
                self.ahead.replaced.add(id(conn))
        return conn, reused

    def _acquire(self, current: Callable[[], bool] | None) -> tuple[Connection, bool]:
        tried_ahead = False
        deadline: float | None = None  # refused by the cluster: wait for a slot until then
        while True:
            if self.draining:  # woken by drain(): leave at once
                raise Drained()
            # A healthy idle connection first: a failed *new* connect (typically a 421
            # "too many connections" at the banner) must not strand the ones already open.
            conn = self._take_idle()
            if conn is not None:
                return conn, conn.messages_sent > 0  # one opened ahead has carried nothing
            self.health.raise_if_backing_off()
            if current is not None and not current():
                raise StaleTurn()
            gated = False
            # (count_waiting walks the line: only when a connect ahead runs at all)
            if self.ahead.running and self.ahead.on_its_way(count_waiting(self._waiters)):
                pass  # a connection opened ahead is on its way and nobody else waits for it
            elif self.open < self.health.max_connections() and not (
                    self.health.probing and self._connecting):
                if (not tried_ahead and self.open > self._connecting + self._quitting
                        and self._open_ahead()):
                    # Others are open, all busy: one of them may come back before a new
                    # connection is ready. Open it in the background and take whichever
                    # comes first. Once per call: a connect ahead that fails backs nothing
                    # off, so the next try is the caller's own, with the usual back-off.
                    tried_ahead = True
                elif self.gate is None or self.gate.try_enter():
                    conn = self._connect()
                    if conn is not None:
                        return conn, False
                    continue  # the server wants fewer connections: wait for one of them
                gated = True  # the provider's slots are taken: wait for one too
            timeout = None
            limit = self.gate.cluster_wait() if gated and self.gate is not None else None
            if limit is not None:
                deadline = self._clock() + limit if deadline is None else deadline
                timeout = max(0.0, deadline - self._clock())
            conn = self._wait(self.gate if gated else None, timeout)
            if conn is not None:  # handed over by release()
                return conn, conn.messages_sent > 0

    def release(self, conn: Connection) -> None:
        if conn.owes:  # handed on, then not used for a transaction: read what is owed
            conn.settle()
        retiring = conn.sock is not None and self._retires(conn)
        usable = (conn.sock is not None and not retiring
                  and not (self.gate is not None and self.gate.give_back()))
        if usable and self._hand_over(conn):
            return
        if usable and not self._slot_wanted_elsewhere():
            self._idle.append(conn)
            if self._on_idle is not None:
                self._on_idle(self, conn)
        else:
            # Retired without a replacement opened ahead (no room then, or no sign of a
            # busy pool), in a busy pool: its replacement is opened in the background as
            # soon as its slot is free (at the cap, after the QUIT's reply).
            self._discard(conn, replace=retiring and id(conn) not in self.ahead.replaced
                          and self._busy())
        self._wake_one()

    def pass_on(self, conn: Connection) -> bool:
        """Hand `conn` to the longest waiting caller in the middle of a transaction whose
        final reply is still to come (engine.smtp.transaction, `Transaction._pass_on`): the
        caller's commands go out at once and it reads that reply first. Not when the
        transaction is the connection's last (`max_messages`): it is retired after the
        reply; nor when its slot goes back to the cluster (`release` closes it)."""
        if conn.messages_sent + 1 >= self._term(conn).messages:
            return False
        if self.gate is not None and self.gate.give_back():
            return False
        return self._hand_over(conn)

    def _hand_over(self, conn: Connection) -> bool:
        """Give `conn` straight to the longest waiting caller, if any.

        Parked and the waiter woken instead, the waiter would run `_acquire` again:
        `_take_idle`, the idle-timeout check and `is_alive()`'s select() on a connection
        that finished a transaction microseconds ago. `reusable()` keeps the check that
        costs no syscall (nothing unread: a 421 sent along with the last reply)."""
        if self.draining or not self._waiters or not conn.reusable():
            return False
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.ready():  # skip any answered already (by the gate, or failed)
                waiter.set(conn)
                return True
        return False

    def _slot_wanted_elsewhere(self) -> bool:
        """Nobody here needs the connection, but another MX host of the provider waits
        for a slot: hand the slot over now rather than idle here until the idle timeout
        (a waiter at the gate is only woken when a connection closes)."""
        return (self.gate is not None and not any_waiting(self._waiters)
                and self.gate.has_waiters())

    # -- housekeeping ---------------------------------------------------------

    def drain(self) -> None:
        """Hand out no more connections: waiting callers end with `Drained`, and
        connects running ahead are stopped (the connector closes what they opened)."""
        self.draining = True
        self.wake_all()
        self.stop_opening_ahead()

    def stop_opening_ahead(self) -> None:
        """Stop every connect ahead (the connector closes what they opened)."""
        for greenlet in list(self.ahead.running):
            greenlet.kill(block=False)  # started: GreenletExit inside the connect
            if greenlet.dead and greenlet in self.ahead.running:
                # It had not started: it never runs, so its slot is given back here.
                self._ahead_ended(greenlet, opened=False)

    def close_idle(self, force: bool = False, polite: bool = True) -> int:
        """Close idle connections older than idle_timeout (all of them if `force`); with a
        QUIT first unless not `polite`."""
        now = self._clock()
        keep: list[Connection] = []
        drop: list[Connection] = []
        for conn in self._idle:
            expired = now - conn.last_used >= self.settings.idle_timeout
            (drop if force or expired else keep).append(conn)
        self._idle = keep
        for conn in drop:
            self._discard(conn, polite)
        return len(drop)

    def close_one_idle(self) -> bool:
        """Give up the oldest idle connection (another pool of the provider needs its slot)."""
        if not self._idle:
            return False
        self._discard(self._idle.pop(0))
        return True

    def holds_idle(self, conn: Connection) -> bool:
        """Whether `conn` is on this pool's idle stack now."""
        return any(idle is conn for idle in self._idle)

    def close_idle_connection(self, conn: Connection) -> bool:
        """Close `conn` if it is idle here (the worker holds too many idle: engine.pools)."""
        for i, idle in enumerate(self._idle):
            if idle is conn:
                del self._idle[i]
                self._discard(conn)
                return True
        return False

    @property
    def idle(self) -> int:
        return len(self._idle)

    @property
    def idle_connections(self) -> tuple[Connection, ...]:
        """The idle connections, oldest first: the last is reused next (a view, for tests)."""
        return tuple(self._idle)

    @property
    def busy(self) -> bool:
        return self.open > 0 or bool(self._waiters)

    @property
    def opening_ahead(self) -> int:
        """Connects running in the background, opening a replacement ahead of time."""
        return len(self.ahead.running)

    def failing(self) -> bool:
        return self.health.failing()

    # -- internals --------------------------------------------------------------

    def _take_idle(self) -> Connection | None:
        while self._idle:
            conn = self._idle.pop()
            idle_for = self._clock() - conn.last_used
            if idle_for >= self.settings.idle_timeout:
                self._discard(conn)
            elif self._expired(conn):  # at a configured limit: a busy pool gets a new one
                self._discard(conn, replace=id(conn) not in self.ahead.replaced
                              and self._busy())
            elif not conn.is_alive():
                self.stale_dropped += 1
                self._discard(conn, polite=False)
            elif (idle_for >= self.settings.reuse_check_after
                  and not conn.answers(self.settings.reuse_check_timeout)):
                self._on_check_failed(conn)
                self._discard(conn, polite=False)
            else:
                return conn
        return None

    def _connect(self) -> Connection | None:
        """A new connection; None when the server refused only this extra one."""
        self.open += 1
        self._connecting += 1
        started = self._clock()
        try:
            conn = self._open_connection()
        except DeliveryError as err:
            self._closed()
            if isinstance(err, WorkerFault):  # the worker's trouble (descriptors, its IP),
                self._wake_one()  # not the destination's: no back-off, no waiter fails with it
            elif self.health.at_capacity(err, self.open):
                return None
            else:
                self._fail(err)
            raise
        except BaseException:
            self._closed()
            self._wake_one()
            raise
        finally:
            self._connecting -= 1
        self.ahead.setup_time = self._clock() - started
        self._begin(conn)
        self._back()
        return conn

    def _back(self) -> None:
        """A connect worked."""
        if self.health.back():  # the destination is back: let the waiters connect too
            self.wake_all()

    def _fail(self, err: DeliveryError) -> None:
        """A connect failed: back off, and every caller waiting gets the error now."""
        self.health.failed(err)
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.ready():
                waiter.set_exception(type(err)(err.reply, err.command, err.blame))

    def _wait(self, gate: ConnectionGate | None = None,
              timeout: float | None = None) -> Connection | None:
        """Until this pool gives a connection back, fails, or (`gate`) a slot frees;
        `timeout`: NoSlot after that long. Returns the connection `release` handed over,
        if it did."""
        waiter = AsyncResult()
        self._waiters.append(waiter)
        if gate is not None:
            gate.add_waiter(waiter)
        try:
            if timeout is not None and not waiter.wait(timeout) and not waiter.ready():
                raise NoSlot()
            conn: Connection | None = waiter.get()
            return conn
        except BaseException:
            # Killed (or timed out) after a connection was handed over, before taking it:
            # pass it on, or it would never come back to the pool.
            if waiter.ready() and waiter.successful() and waiter.value is not None:
                self.release(waiter.value)
            raise
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
            if gate is not None:
                gate.remove_waiter(waiter)

    def _wake_one(self) -> None:
        wake_first(self._waiters)

    def wake_all(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.ready():
                waiter.set(None)

    def _closed(self) -> None:
        """One connection fewer, here and in the provider's gate."""
        self.open -= 1
        if self.gate is not None:
            self.gate.leave()

    def _discard(self, conn: Connection, polite: bool = True, replace: bool = False) -> None:
        """Close `conn` (with a QUIT if `polite`) and free its slot; `replace`: then open
        its replacement in the background (its term is over, in a busy pool)."""
        replaced = self.ahead.replaced
        if replaced:
            replaced.discard(id(conn))
        self._terms.pop(id(conn), None)
        if not polite or conn.sock is None:
            conn.close()
            self._closed()
            if replace:
                self._open_ahead()
        elif self._at_cap():
            # Finding 2: freed now, the slot's next connection would leave with the QUIT,
            # and a server counting sessions until they close would see one too many
            # (the "421 too many connections" of a reconnect at the cap). Keep the slot
            # until the QUIT is answered (or times out) and the socket is closed.
            self._quitting += 1
            gevent.spawn(self._quit_then_free, conn, replace)
        else:  # below the cap, a new connection is within the limit anyway: free it now
            self._closed()
            gevent.spawn(conn.quit_quietly)  # QUIT costs a round trip: not the caller's
            if replace:
                self._open_ahead()

    def _at_cap(self) -> bool:
        """Would the slot of a connection closing now be taken again at once?"""
        if self.open >= self.health.max_connections() or any_waiting(self._waiters):
            return True
        gate = self.gate
        # A cluster's slot is freed once the socket is closed: another host's connection
        # may take it at once.
        return gate is not None and (gate.open >= gate.max_connections or gate.has_waiters()
                                     or gate.cluster is not None)

    def _quit_then_free(self, conn: Connection, replace: bool = False) -> None:
        try:
            conn.quit_quietly()
        finally:
            self._quitting -= 1
            self._closed()
            if replace and self._busy():  # its replacement, now that the slot is free
                self._open_ahead()
            self._wake_one()

    # -- terms: when a connection retires (engine.pool_terms) ----------------------

    def _begin(self, conn: Connection) -> None:
        """A new connection: its term starts now."""
        self._terms[id(conn)] = Term(self.settings, self._clock(), self._rng)

    def _term(self, conn: Connection) -> Term:
        term = self._terms.get(id(conn))
        if term is None:  # not opened by this pool (tests hand some in): from now on
            term = self._terms[id(conn)] = Term(self.settings, self._clock(), self._rng)
        return term

    def _retires(self, conn: Connection) -> bool:
        """Whether `conn` retires now: at a configured limit, or at its own term unless
        another retirement or a connect of this destination is under way (then later, so
        that two never overlap)."""
        due = self._term(conn).due(conn.messages_sent, self._clock(), self.settings)
        if due == NOT_YET:
            return False
        return due == NOW or not (self.ahead.running or self._quitting)

    def _expired(self, conn: Connection) -> bool:
        """Whether `conn`, idle, is at a configured limit (`max_age`). One only at its own
        term carries one more message, the one a caller wants it for now: retired when
        it comes back, the others carry the next ones while its replacement opens."""
        return self._term(conn).due(conn.messages_sent, self._clock(), self.settings) == NOW

    def _busy(self) -> bool:
        """Callers wait, or the pool's last checkout was a moment ago (engine.pool_ahead)."""
        return not self.draining and (any_waiting(self._waiters)
                                      or self.ahead.busy(self._clock(), self.settings))

    # -- opening replacements ahead (engine.pool_ahead decides when) -----------------

    def _open_ahead(self) -> bool:
        """Start a connect in the background whose connection goes to the first waiter
        or the idle stack, if the caps leave room for it; True if it started.

        The connection being opened counts as open, here and in the provider's gate,
        from now on: the caps are never exceeded. At the cap nothing is opened ahead:
        the destination's limit wins over the latency (finding 2's order: the old
        connection's slot comes free after its QUIT, then the next one is opened)."""
        if (self.draining or self.health.probing or self.failing()
                or self.open >= self.health.max_connections()):
            return False
        gate = self.gate
        if gate is not None:
            # Never by closing another pool's idle connection (try_enter would): only a
            # slot that is free now; never for a suspended provider (a block's knocks).
            if (gate.paused() or gate.cluster is not None
                    or gate.open >= gate.max_connections or not gate.try_enter()):
                return False
        self.open += 1
        self._connecting += 1
        self.ahead.running.add(gevent.spawn(self._ahead_run))
        return True

    def _ahead_run(self) -> None:
        greenlet = gevent.getcurrent()
        started = self._clock()
        try:
            conn = self._open_connection()
        except BaseException as exc:
            self._ahead_ended(greenlet, opened=False)
            if isinstance(exc, gevent.GreenletExit):  # stopped by drain(): nothing to say
                return
            if not isinstance(exc, Exception):  # a gevent.Timeout, SystemExit...: not ours
                self._wake_one()
                raise
            self._ahead_failed(exc)
            return
        self._ahead_ended(greenlet, opened=True)
        self.ahead.setup_time = self._clock() - started
        self._begin(conn)
        self._back()
        if self.draining:
            self._discard(conn)
            return
        self.ahead.opened += 1
        conn.last_used = self._clock()  # idle from now, for the idle timeout
        self.release(conn)

    def _ahead_failed(self, exc: Exception) -> None:
        """A connect ahead failed: logged and counted; the pool does not back off (a
        caller's own connect decides that). A refusal by the server goes to the first
        caller waiting, as its own connect's would: a block said at the banner reaches
        the provider's shaper at once (regression: each waiter in turn opened its own
        connection into the same block). The others go the usual way."""
        self.ahead.failed += 1
        expected = isinstance(exc, DeliveryError)  # else a bug: its traceback too
        log.log(logging.INFO if expected else logging.ERROR,
                logs.kv("connect_ahead_failed", ip=self.key.source_ip, mx=self.key.host,
                        port=self.key.port, error=exc), exc_info=not expected)
        if (isinstance(exc, DeliveryError) and not isinstance(exc, WorkerFault)
                and not self.health.at_capacity(exc, self.open)
                and self._fail_first(exc)):
            return
        self._wake_one()  # whoever waited for it connects itself, or waits

    def _fail_first(self, err: DeliveryError) -> bool:
        """The first caller waiting gets `err` as its own; False if nobody waits."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.ready():
                waiter.set_exception(type(err)(err.reply, err.command, err.blame))
                return True
        return False

    def _ahead_ended(self, greenlet: gevent.Greenlet, opened: bool) -> None:
        """A connect ahead is over; without a connection (`opened` False) its slot in
        the pool and the gate, counted from `_open_ahead` on, is free again."""
        self.ahead.running.discard(greenlet)
        self._connecting -= 1
        if not opened:
            self._closed()


class _Checkout:
    """The context manager behind `DestinationPool.connection` (a class rather than a
    generator-based `@contextmanager`: one per message, and the generator machinery
    costs several times these two methods), and the connection's `holder` meanwhile."""

    __slots__ = ("conn", "current", "pool")

    def __init__(self, pool: DestinationPool, current: Callable[[], bool] | None) -> None:
        self.pool = pool
        self.current = current

    def __enter__(self) -> tuple[Connection, bool]:
        conn, reused = self.pool.acquire(self.current)
        conn.holder = self
        self.conn = conn
        return conn, reused

    def pass_on(self) -> bool:
        """engine.smtp's `Holder.pass_on`, answered by the pool."""
        conn = self.conn
        if not self.pool.pass_on(conn):
            return False
        conn.holder = None  # the next caller's now: leaving the `with` must not touch it
        return True

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        conn = self.conn
        if conn.holder is not self:
            return  # passed on mid-transaction: the next holder gives it back
        conn.holder = None
        if exc is not None:
            conn.close()
        self.pool.release(conn)
