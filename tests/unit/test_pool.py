"""engine.pool with a fake connection factory: the concurrency rules, with real greenlets.

No network here: a `FakeConnection` has what the pool looks at (`sock`, `messages_sent`,
`last_used`, `is_alive`, `answers`, `quit_quietly`, `close`) and the factory yields with
`gevent.sleep`, as a real connect would in a worker. Time that the pool measures (backoff,
idle timeout) is a fake clock the tests move.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, cast

import gevent
import pytest

from engine.config import PoolConfig
from engine.pool import DestinationPool, Drained, PoolKey, StaleTurn
from engine.pools import Pools
from engine.reply import DescriptorsExhausted, PermanentError, Reply, TransientError
from engine.smtp import Connection

KEY = PoolKey("127.0.0.1", "mx.example.test", 25, "opportunistic")
CONNECT_TIME = 0.01


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeConnection:
    def __init__(self, number: int, clock: FakeClock, quit_delay: float = 0.0) -> None:
        self.number = number
        self.quit_delay = quit_delay  # how long the server takes to answer QUIT
        self.sock: object | None = object()
        self.messages_sent = 0
        self.last_used = clock()
        self.alive = True
        self.quit = False
        self.holder: object | None = None
        self.owes = False  # handed on with a final reply still to read (Connection.settle)
        self.settled = 0
        self.answering = True  # answers the check before reuse (False: half-open)
        self.checks = 0

    def is_alive(self) -> bool:
        return self.alive

    def answers(self, timeout: float) -> bool:  # as Connection.answers: closed if not
        self.checks += 1
        if not self.answering:
            self.sock = None
        return self.answering

    def reusable(self) -> bool:  # no select(), as Connection.reusable: `alive` is not seen
        return self.sock is not None

    def settle(self) -> None:
        self.owes = False
        self.settled += 1

    def quit_quietly(self) -> None:
        self.quit = True
        if self.quit_delay:
            gevent.sleep(self.quit_delay)
        self.sock = None

    def close(self) -> None:
        self.sock = None

    def __repr__(self) -> str:
        return f"FakeConnection({self.number})"


class Factory:
    """Opens FakeConnections, slowly, or fails; records how many were opening at once."""

    def __init__(self, clock: FakeClock, delay: float = CONNECT_TIME) -> None:
        self.clock = clock
        self.delay = delay
        self.failing = False
        self.fail_calls: set[int] = set()  # these calls fail (1 = the first)
        self.quit_delay = 0.0
        self.calls = 0
        self.opening = 0
        self.max_opening = 0
        self.opening_at_call: list[int] = []  # how many were opening, this call included
        self.made: list[FakeConnection] = []
        self.at_call: list[int] = []  # connections alive or opening, this one included

    def __call__(self) -> Connection:
        self.calls += 1
        call = self.calls
        self.opening += 1
        self.at_call.append(self.opening + self.alive())
        self.max_opening = max(self.max_opening, self.opening)
        self.opening_at_call.append(self.opening)
        try:
            gevent.sleep(self.delay)
            if self.failing or call in self.fail_calls:
                raise TransientError(Reply(421, "4.3.2", "go away"), "BANNER")
            conn = FakeConnection(len(self.made) + 1, self.clock, self.quit_delay)
            self.made.append(conn)
            return cast(Connection, conn)
        finally:
            self.opening -= 1

    def alive(self) -> int:
        """Connections the server still counts: not closed yet (a QUIT unanswered too)."""
        return sum(1 for conn in self.made if conn.sock is not None)


def make_pool(**settings: Any) -> tuple[DestinationPool, Factory, FakeClock]:
    clock = FakeClock()
    factory = Factory(clock)
    config = PoolConfig(**{"max_connections": 3, "max_messages": 100, "idle_timeout": 60.0,
                           "connect_backoff": 30.0, **settings})
    return DestinationPool(KEY, config, factory, clock), factory, clock


def use(pool: DestinationPool, hold: float = 0.02) -> tuple[FakeConnection, bool]:
    """What a delivery does: check out, send (time passes), give back."""
    with pool.connection() as (conn, reused):
        gevent.sleep(hold)
        conn.messages_sent += 1
        return cast(FakeConnection, conn), reused


def spawn_all(count: int, target: Callable[[], Any]) -> list[gevent.Greenlet]:
    greenlets = [gevent.spawn(target) for _ in range(count)]
    gevent.joinall(greenlets, timeout=5)
    return greenlets


def test_never_more_than_max_connections_open() -> None:
    pool, factory, _ = make_pool(max_connections=3)
    most_open = 0

    def deliver() -> None:
        nonlocal most_open
        with pool.connection() as (conn, _reused):
            most_open = max(most_open, pool.open)
            gevent.sleep(0.02)
            conn.messages_sent += 1

    greenlets = spawn_all(12, deliver)
    assert all(g.successful() for g in greenlets)
    assert factory.calls == 3
    assert most_open == 3
    assert pool.open == pool.idle == 3


def test_waiter_gets_the_connection_released_by_another() -> None:
    pool, factory, _ = make_pool(max_connections=1)
    first = gevent.spawn(use, pool, 0.05)
    gevent.sleep(0)  # first is now connecting
    second = gevent.spawn(use, pool, 0.0)
    gevent.joinall([first, second], timeout=5)
    (conn1, reused1), (conn2, reused2) = first.value, second.value
    assert factory.calls == 1
    assert conn2 is conn1
    assert (reused1, reused2) == (False, True)


def test_connect_failure_reaches_every_waiter_at_once_and_later_callers_fail_fast() -> None:
    pool, factory, clock = make_pool(max_connections=1)
    factory.failing = True
    greenlets = [gevent.spawn(pool.acquire) for _ in range(4)]
    gevent.joinall(greenlets, timeout=5)
    assert factory.calls == 1  # one connect; the three waiters did not try again
    for greenlet in greenlets:
        assert isinstance(greenlet.exception, TransientError)
        assert greenlet.exception.reply.code == 421
    assert pool.open == 0 and pool.failing()
    # during the backoff: the same error, at once, without connecting
    clock.now += 29
    with pytest.raises(TransientError, match="421"):
        pool.acquire()
    assert factory.calls == 1


def test_extra_connection_refused_while_another_works_waits_for_it_instead_of_failing() -> None:
    """A second connect refused ("421 too many connections") while the first connection is
    busy is the server's capacity, not an outage: the caller waits for the working
    connection (no deferral), and the pool stays at one connection for connect_backoff."""
    pool, factory, clock = make_pool(max_connections=2, connect_backoff=30.0)
    conn, _ = pool.acquire()
    factory.failing = True
    got: list[tuple[FakeConnection, bool]] = []
    waiter = gevent.spawn(lambda: got.append(pool.acquire()))  # type: ignore[arg-type]
    gevent.sleep(0.05)
    assert factory.calls == 2 and not got and not waiter.dead  # refused, and waiting
    conn.messages_sent += 1
    pool.release(conn)
    waiter.join(timeout=1)
    assert got == [(conn, True)]
    factory.failing = False
    pool.release(got[0][0])
    blocked = gevent.spawn(pool.acquire)
    first, _ = pool.acquire()  # the idle one
    gevent.sleep(0.05)
    assert factory.calls == 2 and not blocked.dead  # capped at 1: no new connect yet
    pool.release(first)
    blocked.join(timeout=1)
    clock.now += 31
    assert factory.calls == 2


def test_a_refused_connect_with_nothing_open_still_fails_fast() -> None:
    pool, factory, _ = make_pool(max_connections=2)
    factory.failing = True
    with pytest.raises(TransientError):
        pool.acquire()
    with pytest.raises(TransientError):  # backing off: no second connect
        pool.acquire()
    assert factory.calls == 1


def test_after_the_backoff_one_probe_connects_at_a_time() -> None:
    pool, factory, clock = make_pool(max_connections=5, connect_backoff=30.0)
    factory.failing = True
    with pytest.raises(TransientError):
        pool.acquire()
    clock.now += 30
    # the destination is still down: one probe, and its failure reaches the callers waiting on it
    greenlets = spawn_all(3, pool.acquire)
    assert factory.calls == 2 and factory.max_opening == 1
    assert all(isinstance(g.exception, TransientError) for g in greenlets)
    # and it is back: one probe first, then the waiters connect alongside each other
    clock.now += 30
    factory.failing = False
    factory.opening_at_call.clear()
    greenlets = spawn_all(4, lambda: use(pool, 0.05))
    assert all(g.successful() for g in greenlets)
    assert factory.opening_at_call == [1, 1, 2, 3]  # the probe alone, then the others at once
    assert not pool.failing() and pool.open == 4


def test_connection_that_carried_max_messages_is_closed() -> None:
    pool, factory, clock = make_pool(max_messages=2)
    conn1, _ = use(pool)
    clock.now += 10  # a quiet pool: no replacement opened ahead (engine.pool_ahead.BUSY_WITHIN)
    conn2, reused = use(pool)
    assert conn2 is conn1 and reused
    assert pool.idle == 0 and pool.open == 0 and factory.calls == 1
    gevent.sleep(0)  # the QUIT runs in a greenlet of its own
    assert conn1.quit
    conn3, reused = use(pool)
    assert conn3 is not conn1 and not reused
    assert factory.calls == 2


def test_idle_connection_past_idle_timeout_is_not_reused() -> None:
    pool, factory, clock = make_pool(idle_timeout=60.0)
    conn1, _ = use(pool)
    conn1.last_used = clock()
    clock.now += 60
    conn2, reused = use(pool)
    assert conn2 is not conn1 and not reused
    gevent.sleep(0)
    assert conn1.quit
    assert factory.calls == 2 and pool.open == 1


def test_close_idle_reaps_only_expired_connections() -> None:
    pool, _, clock = make_pool(idle_timeout=60.0)
    greenlets = spawn_all(2, lambda: use(pool))
    old, young = (g.value[0] for g in greenlets)
    old.last_used = clock() - 61
    young.last_used = clock()
    assert pool.close_idle() == 1
    assert pool.idle == 1 and pool.open == 1
    assert pool.close_idle(force=True) == 1
    assert pool.open == 0
    assert gevent.wait(timeout=5)  # the QUITs of the closed connections ended


def test_idle_stack_is_lifo() -> None:
    pool, _, _ = make_pool()
    a, _ = pool.acquire()
    b, _ = pool.acquire()
    a.messages_sent = b.messages_sent = 1  # reused: they carried mail before
    pool.release(a)
    pool.release(b)
    again, reused = pool.acquire()
    assert again is b and reused
    pool.release(again)
    assert pool.acquire()[0] is b


def test_dead_idle_connection_is_dropped_without_quit_and_replaced() -> None:
    pool, factory, _ = make_pool()
    conn1, _ = use(pool)
    conn1.alive = False  # the server closed it, or sent 421, while it sat idle
    conn2, reused = use(pool)
    assert conn2 is not conn1 and not reused
    assert pool.stale_dropped == 1
    gevent.sleep(0)
    assert conn1.sock is None and not conn1.quit  # no QUIT on a dead connection
    assert factory.calls == 2 and pool.open == 1


def test_connection_idle_past_reuse_check_after_is_checked_and_a_silent_one_replaced() -> None:
    """Regression (#14, half-open connections): a connection whose peer vanished without a
    FIN passed is_alive and held the next MAIL for its 300 s timeout."""
    failed: list[object] = []
    clock = FakeClock()
    factory = Factory(clock)
    pool = DestinationPool(KEY, PoolConfig(max_connections=3, reuse_check_after=2.0), factory,
                           clock, on_check_failed=failed.append)
    conn1, _ = use(pool)
    clock.now += 1.9
    assert use(pool) == (conn1, True) and conn1.checks == 0  # back to back: no round trip
    clock.now += 2.0
    assert use(pool) == (conn1, True) and conn1.checks == 1  # idle a while: checked
    conn1.answering = False  # half-open: is_alive() still says yes
    clock.now += 2.0
    conn2, reused = use(pool)
    assert conn2 is not conn1 and not reused
    assert failed == [conn1] and conn1.sock is None and not conn1.quit
    assert factory.calls == 2 and pool.open == 1 and pool.stale_dropped == 0


def test_a_connect_short_of_file_descriptors_puts_no_back_off_on_the_destination() -> None:
    """EMFILE is the worker's trouble: the caller gets it (and waits, engine.delivery), the
    slot is free again, nobody else fails with it, and the next connect goes ahead."""
    clock = FakeClock()
    factory = Factory(clock)
    emfile = DescriptorsExhausted(Reply(451, "4.3.0", "out of file descriptors"), "CONNECT")
    short = [True]

    def connect() -> Connection:
        if short.pop() if short else False:
            raise emfile
        return factory()
    pool = DestinationPool(KEY, PoolConfig(max_connections=1), connect, clock)
    with pytest.raises(DescriptorsExhausted):
        pool.acquire()
    assert pool.open == 0 and not pool.failing()
    _, reused = pool.acquire()
    assert not reused and pool.open == 1 and factory.calls == 1


def test_broken_connection_given_back_is_discarded_and_wakes_a_waiter() -> None:
    pool, factory, _ = make_pool(max_connections=1)
    conn, _ = pool.acquire()
    waiter = gevent.spawn(pool.acquire)
    gevent.sleep(0)
    conn.close()  # how a caller reports a broken connection
    pool.release(conn)
    waiter.join(timeout=5)
    new, reused = waiter.value
    assert new is not conn and not reused
    assert factory.calls == 2 and pool.open == 1


def test_released_connection_goes_straight_to_the_first_waiter_without_a_liveness_check(
        ) -> None:
    pool, factory, _ = make_pool(max_connections=1)
    conn, _ = pool.acquire()
    waiters = [gevent.spawn(pool.acquire) for _ in range(2)]
    gevent.sleep(0)
    conn.alive = False  # is_alive() would say so: a hand-over does not ask (no select())
    conn.messages_sent += 1
    pool.release(conn)
    assert pool.idle == 0  # never parked
    first, _ = gevent.joinall(waiters[:1], timeout=5)[0].value
    assert first is conn and pool.stale_dropped == 0
    assert not waiters[1].ready()  # one connection, one waiter woken
    pool.release(first)
    assert waiters[1].join(timeout=5) is None and waiters[1].value == (conn, True)
    assert factory.calls == 1


def test_connection_handed_to_a_waiter_killed_before_it_ran_goes_to_the_next() -> None:
    pool, factory, _ = make_pool(max_connections=1)
    conn, _ = pool.acquire()
    doomed, patient = gevent.spawn(pool.acquire), gevent.spawn(pool.acquire)
    gevent.sleep(0)
    doomed.kill(block=False)  # it dies at the next loop turn...
    conn.messages_sent += 1
    pool.release(conn)  # ...after the connection was handed to it, before it could take it
    patient.join(timeout=5)
    assert patient.value == (conn, True)
    assert factory.calls == 1 and pool.open == 1


def test_closed_connection_is_not_handed_over() -> None:
    pool, factory, _ = make_pool(max_connections=1)
    conn, _ = pool.acquire()
    waiter = gevent.spawn(pool.acquire)
    gevent.sleep(0)
    conn.close()
    pool.release(conn)
    waiter.join(timeout=5)
    assert waiter.value[0] is not conn and factory.calls == 2


@pytest.mark.parametrize("interruption", [RuntimeError("a bug"), gevent.Timeout()],
                         ids=["exception", "gevent-timeout"])
def test_connection_left_by_an_exception_is_closed_not_pooled(
        interruption: BaseException) -> None:
    # Mid-transaction, its late replies would be read as the next message's.
    pool, factory, _ = make_pool()
    with pytest.raises(type(interruption)), pool.connection() as (conn, _reused):
        raise interruption
    assert conn.sock is None
    assert pool.idle == 0 and pool.open == 0
    assert use(pool)[0] is not conn and factory.calls == 2


def test_pools_keep_one_pool_per_full_key_and_reap_empty_ones() -> None:
    clock = FakeClock()
    pools = Pools(PoolConfig(idle_timeout=60.0), clock)
    factory = Factory(clock, delay=0)
    other_tls = PoolKey(KEY.source_ip, KEY.host, KEY.port, "none")
    other_ip = PoolKey("127.0.0.2", KEY.host, KEY.port, KEY.tls)
    pool = pools.get(KEY, factory)
    assert pools.get(KEY, factory) is pool
    assert pools.get(other_tls, factory) is not pool
    assert pools.get(other_ip, factory) is not pool
    assert len(pools) == 3
    conn, _ = pool.acquire()
    pool.release(conn)
    assert pools.open_connections == 1
    assert pools.reap() == 0 and len(pools) == 1  # the two empty pools are gone
    clock.now += 60
    assert pools.reap() == 1 and len(pools) == 0
    assert gevent.wait(timeout=5)  # the QUIT of the reaped connection ended


def test_idle_connections_bounded_across_pools_the_one_idle_longest_closed() -> None:
    """Issue #19, many destinations: a burst to many domains leaves one idle connection
    each; past `max_idle` in the worker, the oldest idle (whichever pool) is closed at once,
    and reap then forgets the pools left empty. A connection reused meanwhile is not taken
    for an old one (its first note is stale)."""
    clock = FakeClock()
    pools = Pools(PoolConfig(idle_timeout=60.0, max_idle=3), clock)
    factory = Factory(clock, delay=0)
    keys = [PoolKey(KEY.source_ip, f"mx{i}.example.test", 25, KEY.tls) for i in range(6)]
    conns = []
    for key in keys[:3]:
        pool = pools.get(key, factory)
        conn, _ = pool.acquire()
        pool.release(conn)
        conns.append(conn)
    assert sum(p.idle for p in pools) == 3 and pools.idle_closed == 0
    first = pools.get(keys[0], factory)  # the oldest idle is used again: now the newest
    again, _ = first.acquire()
    assert again is conns[0]
    first.release(again)
    for key in keys[3:5]:
        pool = pools.get(key, factory)
        conn, _ = pool.acquire()
        pool.release(conn)
        conns.append(conn)
    assert sum(p.idle for p in pools) == 3 and pools.idle_closed == 2
    assert gevent.wait(timeout=5)  # the QUITs ended
    assert [c.quit for c in conns] == [False, True, True, False, False]
    assert [c.sock is None for c in conns] == [False, True, True, False, False]
    assert pools.reap() == 0 and len(pools) == 3  # the pools of mx1 and mx2 are gone
    assert {p.key.host for p in pools} == {"mx0.example.test", "mx3.example.test",
                                           "mx4.example.test"}


def test_drain_ends_every_waiter_at_once_and_lets_the_holder_finish() -> None:
    """Graceful stop: tasks waiting for a connection end with Drained (their recipients stay
    spooled), the transaction holding the connection finishes, nothing new is handed out."""
    from engine.pool import Drained

    pools = Pools(PoolConfig(max_connections=1))
    made: list[FakeConnection] = []

    def opener() -> Connection:
        made.append(FakeConnection(len(made) + 1, FakeClock()))
        return cast(Connection, made[-1])

    pool = pools.get(PoolKey("127.0.0.2", "mx.test", 25, "none"), opener)
    holder_conn, _ = pool.acquire()
    outcomes: list[str] = []

    def waiter() -> None:
        try:
            pool.acquire()
            outcomes.append("got one")
        except Drained:
            outcomes.append("drained")

    waiters = [gevent.spawn(waiter) for _ in range(5)]
    gevent.sleep(0.01)
    pools.drain()
    gevent.joinall(waiters, timeout=2)
    assert outcomes == ["drained"] * 5
    pool.release(holder_conn)  # the transaction in progress finished
    with pytest.raises(Drained):
        pool.acquire()
    assert len(made) == 1


def test_a_connection_going_idle_hands_its_slot_to_another_mx_host_waiting_at_the_gate() -> None:
    """Two MX hosts of one provider share two connection slots. When host A's connection
    comes back and nobody at A needs it, host B's waiter gets the slot at once, instead of
    waiting for A's idle timeout."""
    from engine.shaping import ConnectionGate

    gate = ConnectionGate(max_connections=1, connection_rate=0)
    made: list[FakeConnection] = []

    def opener() -> Connection:
        made.append(FakeConnection(len(made) + 1, FakeClock()))
        return cast(Connection, made[-1])

    pools = Pools(PoolConfig(max_connections=1, idle_timeout=3600))
    pool_a = pools.get(PoolKey("127.0.0.2", "mx1.example", 25, "none"), opener, gate=gate)
    pool_b = pools.get(PoolKey("127.0.0.2", "mx2.example", 25, "none"), opener, gate=gate)
    conn_a, _ = pool_a.acquire()
    got: list[tuple[Connection, bool]] = []
    waiter = gevent.spawn(lambda: got.append(pool_b.acquire()))
    gevent.sleep(0.01)
    assert not got  # B waits at the gate: A holds the only slot
    pool_a.release(conn_a)
    waiter.join(timeout=1)
    assert got and got[0][0] is made[1]  # B connected on the slot A gave up
    assert pool_a.idle == 0 and gate.open == 1


# -- opening the replacement ahead (finding 3), freeing the slot after QUIT (finding 2) --------


def stream(pool: DestinationPool, count: int, hold: float = 0.02,
           gap: float = 0.005) -> list[tuple[FakeConnection, bool, float]]:
    """Messages one after another, as a steady trickle: (connection, reused, seconds waited)."""
    out = []
    for _ in range(count):
        started = time.monotonic()
        with pool.connection() as (conn, reused):
            waited = time.monotonic() - started
            gevent.sleep(hold)
            conn.messages_sent += 1
        out.append((cast(FakeConnection, conn), reused, waited))
        gevent.sleep(gap)
    return out


def test_the_replacement_is_open_before_the_retiring_connection_is_done() -> None:
    """max_messages 2: each connection's replacement is opened while it carries its last
    message (a connect takes half a transaction here), so after the first message no
    message waits for a connect; and never more than the cap open, the one opening
    included."""
    pool, factory, _ = make_pool(max_connections=2, max_messages=2)
    sent = stream(pool, 10)
    assert sent[0][2] >= CONNECT_TIME * 0.9  # the first connects
    assert max(waited for _, _, waited in sent[1:]) < CONNECT_TIME / 2
    conns = [conn for conn, _, _ in sent]
    assert [c.number for c in conns] == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    # a connection opened ahead has carried nothing: its first message is not "reused"
    assert [reused for _, reused, _ in sent] == [False, True] * 5
    assert pool.ahead.opened == 5 and pool.ahead.failed == 0
    assert max(factory.at_call) <= 2
    assert pool.open == 1 and pool.idle == 1  # the 6th, opened ahead, waits in the idle stack


def test_nothing_is_opened_ahead_at_the_cap_and_the_slot_waits_for_the_quit() -> None:
    """max_connections 1: no room for a replacement while the old connection is open, and
    the old one's slot is freed only once its QUIT is answered: the next connect starts
    after that, never alongside (in the background: the pool is busy)."""
    pool, factory, _ = make_pool(max_connections=1, max_messages=2)
    factory.quit_delay = 0.05
    sent = stream(pool, 4)
    assert [c.number for c, _, _ in sent] == [1, 1, 2, 2]
    assert pool.ahead.opened == 1  # the 2nd, once the 1st's QUIT was answered
    assert sent[2][2] > 0.04 + CONNECT_TIME * 0.9  # waited for the QUIT, then the connect
    assert factory.at_call == [1, 1]  # the first was closed when the second was dialled
    assert factory.made[0].quit
    assert gevent.wait(timeout=5)  # the second's QUIT (it retired at the end) ended


def test_at_the_cap_a_waiter_connects_only_after_the_quit_is_answered() -> None:
    pool, factory, _ = make_pool(max_connections=1, max_messages=1)
    factory.quit_delay = 0.05
    conn, _ = pool.acquire()
    waiter = gevent.spawn(pool.acquire)
    gevent.sleep(0.01)
    conn.messages_sent += 1
    pool.release(conn)  # retired, a caller waiting: at the cap
    assert pool.open == 1  # the slot is still held...
    gevent.sleep(0.03)
    assert factory.calls == 1 and not waiter.ready()  # ...while the QUIT is unanswered
    waiter.join(timeout=1)
    new, reused = waiter.value
    assert new is not conn and not reused and conn.sock is None
    assert factory.at_call == [1, 1]


def test_below_the_cap_a_retired_connection_frees_its_slot_at_once() -> None:
    pool, factory, _ = make_pool(max_connections=3, max_messages=1)
    factory.quit_delay = 0.05
    conn, _ = pool.acquire()
    conn.messages_sent += 1
    pool.release(conn)
    assert pool.open == 0  # not waiting for the QUIT's reply: a new one is within the cap
    assert use(pool)[0] is not conn and factory.calls == 2
    assert gevent.wait(timeout=5)  # the QUITs ended


def test_at_the_gates_cap_the_slot_also_waits_for_the_quit() -> None:
    from engine.shaping import ConnectionGate

    gate = ConnectionGate(max_connections=1, connection_rate=0)
    clock = FakeClock()
    factory = Factory(clock)
    factory.quit_delay = 0.05
    pool = DestinationPool(KEY, PoolConfig(max_connections=5, max_messages=2), factory,
                           clock, gate)
    sent = stream(pool, 4)
    assert [c.number for c, _, _ in sent] == [1, 1, 2, 2]
    # the provider's one slot is taken: nothing ahead until the 1st's QUIT is answered
    assert pool.ahead.opened == 1
    assert factory.at_call == [1, 1]
    gevent.sleep(0.1)
    # both retired, their QUITs answered; the 2nd's replacement (the pool is busy) idles
    assert gate.open == pool.open == pool.idle == 1 and factory.at_call == [1, 1, 1]


def test_a_failed_connect_ahead_fails_nobody() -> None:
    """The replacement's connect is refused: nobody sees the error, the next message goes
    the usual way (it connects itself), and the pool is not put in backoff."""
    pool, factory, _ = make_pool(max_connections=2, max_messages=2)
    factory.fail_calls = {2}  # the connect ahead
    sent = stream(pool, 4)
    assert [c.number for c, _, _ in sent] == [1, 1, 2, 2]
    # a 421 while a connection works: the pool keeps to the one it has for connect_backoff
    # (finding 1), so nothing is opened ahead of the 3rd connection's end either
    assert pool.ahead.failed == 1 and pool.ahead.opened == 0
    assert not pool.failing()
    assert factory.calls == 4  # the 4th: the 2nd's replacement, once its QUIT is answered


def test_a_caller_waiting_for_a_connect_ahead_gets_its_refusal_as_its_own() -> None:
    """The server refuses the connect ahead at the banner: the caller waiting for it gets
    that refusal (delivery judges it, as it would its own connect's: a block reaches the
    provider's shaper at once) instead of opening another connection into it; the pool
    does not back off, and the next caller connects itself."""
    pool, factory, _ = make_pool(max_connections=2, max_messages=2)
    use(pool)  # the first message
    factory.fail_calls = {2}
    factory.delay = 0.1
    conn, _ = pool.acquire()  # its last message: the connect ahead starts
    conn.messages_sent += 1
    pool.release(conn)
    got = gevent.spawn(pool.acquire)  # waits for the connect ahead, not a connect of its own
    gevent.sleep(0.05)
    assert factory.calls == 2 and not got.ready()
    factory.delay = CONNECT_TIME
    got.join(timeout=1)
    assert isinstance(got.exception, TransientError) and got.exception.reply.code == 421
    assert factory.calls == 2 and pool.ahead.failed == 1 and not pool.failing()
    _new, reused = pool.acquire()
    assert not reused and factory.calls == 3


def test_a_caller_whose_turn_went_stale_opens_nothing() -> None:
    """No idle connection and the caller's turn no longer holds (a push-back or block came
    since it was taken): StaleTurn, with nothing opened or waited for; an idle connection
    is still handed out (delivery checks the turn then, holding it)."""
    pool, factory, _ = make_pool(max_connections=2, max_messages=10)
    with pytest.raises(StaleTurn):
        pool.acquire(lambda: False)
    assert factory.calls == 0 and pool.open == 0
    use(pool)
    _conn, reused = pool.acquire(lambda: False)
    assert reused and factory.calls == 1


def test_a_permanent_failure_ahead_does_not_back_the_pool_off_either() -> None:
    pool, _factory, _ = make_pool(max_connections=2, max_messages=2)

    def refuse() -> Connection:
        raise PermanentError(Reply(554, "5.7.1", "no"), "BANNER")

    use(pool)
    pool._open_connection = refuse
    _conn, _ = use(pool)
    gevent.sleep(0.01)
    assert pool.ahead.failed == 1 and not pool.failing() and pool.open == 0


def pool_behind_a_gate() -> tuple[Any, Factory, Pools, DestinationPool]:
    """A pool of 3 connections, max_messages 2, behind a provider gate of 3."""
    from engine.shaping import ConnectionGate

    gate = ConnectionGate(max_connections=3, connection_rate=0)
    clock = FakeClock()
    factory = Factory(clock)
    pools = Pools(PoolConfig(max_connections=3, max_messages=2), clock)
    return gate, factory, pools, pools.get(KEY, factory, gate=gate)


def test_drain_stops_a_connect_ahead_and_leaves_nothing_open() -> None:
    gate, factory, pools, pool = pool_behind_a_gate()
    use(pool)
    factory.delay = 1.0
    conn, _ = pool.acquire()  # its last message: the connect ahead starts...
    gevent.sleep(0.01)
    assert pool.opening_ahead == 1 and factory.opening == 1  # ...and is under way
    pools.drain()
    gevent.sleep(0.01)
    assert pool.opening_ahead == 0 and factory.opening == 0 and not factory.made[1:]
    conn.messages_sent += 1
    pool.release(conn)  # the transaction in progress ends; its connection is retired
    gevent.sleep(0.01)
    pools.close_all()
    gevent.sleep(0.01)
    assert pool.open == 0 and gate.open == 0 and factory.alive() == 0


def test_nothing_is_opened_ahead_for_a_suspended_provider() -> None:
    """A block suspended the provider (the gate is `paused`): the retiring connection's
    replacement is not opened ahead; nobody knocks at a receiver that said stop."""
    gate, factory, _pools, pool = pool_behind_a_gate()
    use(pool)
    gate.paused = lambda: True
    conn, _ = pool.acquire()  # its last message: a replacement would start now
    assert pool.opening_ahead == 0 and pool.open == 1 and gate.open == 1
    conn.messages_sent += 1
    pool.release(conn)
    gevent.sleep(0.05)
    assert factory.calls == 1


def test_drain_right_after_a_connect_ahead_was_started_undoes_it() -> None:
    """Killed before it ever ran, the connect ahead still gives its slots back."""
    gate, factory, pools, pool = pool_behind_a_gate()
    use(pool)
    conn, _ = pool.acquire()
    assert pool.opening_ahead == 1 and pool.open == 2 and gate.open == 2
    pools.drain()  # no yield in between: the greenlet never started
    assert pool.opening_ahead == 0 and pool.open == 1 and gate.open == 1
    gevent.sleep(0.05)
    assert factory.calls == 1
    conn.close()
    pool.release(conn)
    assert pool.open == 0 and gate.open == 0


def test_a_connection_opened_ahead_after_the_drain_began_is_closed() -> None:
    pool, factory, _ = make_pool(max_connections=3, max_messages=2)
    use(pool)
    conn, _ = pool.acquire()
    gevent.sleep(0.001)  # the connect ahead is under way
    pool.draining = True  # as Pools.get does for a pool made during a drain; no kill
    gevent.sleep(0.05)
    assert factory.calls == 2 and factory.made[1].quit
    conn.messages_sent += 1
    pool.release(conn)
    gevent.sleep(0.01)
    assert pool.open == 0 and pool.idle == 0 and factory.alive() == 0


def test_a_quiet_pool_opens_nothing_ahead() -> None:
    pool, factory, clock = make_pool(max_connections=2, max_messages=2)
    use(pool)
    clock.now += 30  # the previous message half a minute ago
    use(pool)
    gevent.sleep(0.05)
    assert factory.calls == 1 and pool.open == 0


@pytest.mark.timeout(20)
def test_under_load_the_caps_hold_with_connects_ahead_and_slow_quits() -> None:
    """Many callers, short-lived connections, slow QUITs: the connections the server would
    count (open, opening, or with a QUIT unanswered) never exceed the cap; every message
    goes out."""
    pool, factory, _ = make_pool(max_connections=3, max_messages=3)
    factory.quit_delay = 0.02
    most = 0

    def deliver() -> None:
        nonlocal most
        for _ in range(6):
            with pool.connection() as (conn, _reused):
                most = max(most, factory.alive() + factory.opening)
                gevent.sleep(0.005)
                conn.messages_sent += 1
            gevent.sleep(0.002)

    greenlets = [gevent.spawn(deliver) for _ in range(5)]
    gevent.joinall(greenlets, timeout=15)
    assert all(g.successful() for g in greenlets)
    assert max(factory.at_call) <= 3 and most <= 3
    assert sum(c.messages_sent for c in factory.made) == 30


# -- handing a connection on before the final reply (Transaction._pass_on) ---------------------

def hand_on_mid_transaction(pool: DestinationPool) -> tuple[FakeConnection, bool, list[Any]]:
    """A checkout whose transaction tries to hand the connection on while a second caller
    waits; the second caller records what it got. Returns (connection, handed on, got)."""
    got: list[Any] = []
    checkout = pool.connection()
    conn, _ = checkout.__enter__()
    conn.messages_sent += 1  # the transaction in flight (Connection counts it at the end)
    waiter = gevent.spawn(lambda: got.append(pool.acquire()))
    gevent.sleep(0)  # the waiter is waiting
    handed = checkout.pass_on()
    if handed:
        conn.owes = True  # (as Transaction._pass_on records its debt)
    checkout.__exit__(None, None, None)
    waiter.join(timeout=1)
    return cast(FakeConnection, conn), handed, got


def test_a_connection_is_handed_on_to_the_waiter_and_the_checkout_lets_go_of_it() -> None:
    pool, factory, _ = make_pool(max_connections=1)
    conn, handed, got = hand_on_mid_transaction(pool)
    assert handed and got == [(conn, True)]
    assert conn.holder is None and conn.sock is not None  # leaving the `with` did not touch it
    assert pool.open == 1 and pool.idle == 0 and factory.calls == 1
    pool.release(got[0][0])  # the new holder used it for nothing: what is owed is read
    assert conn.settled == 1 and not conn.owes and pool.idle == 1


def test_nothing_is_handed_on_without_a_waiter() -> None:
    pool, _, _ = make_pool(max_connections=1)
    with pool.connection() as (conn, _):
        assert not conn.holder.pass_on()  # type: ignore[union-attr]
        assert conn.holder is not None
    assert pool.idle == 1


def test_a_connections_last_message_does_not_hand_it_on() -> None:
    pool, _, _ = make_pool(max_connections=1, max_messages=1)
    conn, handed, got = hand_on_mid_transaction(pool)
    assert not handed
    assert conn.quit  # retired after its one message; the waiter connects anew
    assert got and got[0][0] is not conn


def test_nothing_is_handed_on_while_draining() -> None:
    pool, _, _ = make_pool(max_connections=1)
    checkout = pool.connection()
    checkout.__enter__()
    waiter = gevent.spawn(pool.acquire)
    gevent.sleep(0)
    pool.drain()
    assert not checkout.pass_on()
    checkout.__exit__(None, None, None)
    waiter.join(timeout=1)
    assert isinstance(waiter.value, Drained)


def test_a_waiter_drained_after_the_hand_on_reads_what_is_owed_before_giving_it_back() -> None:
    pool, _, _ = make_pool(max_connections=1)
    checkout = pool.connection()
    conn, _ = checkout.__enter__()
    conn.messages_sent += 1
    waiter = gevent.spawn(pool.acquire)
    gevent.sleep(0)
    assert checkout.pass_on()
    conn.owes = True
    pool.drain()  # before the waiter ran
    waiter.join(timeout=1)
    assert isinstance(waiter.value, Drained)
    fake = cast(FakeConnection, conn)
    assert fake.settled == 1 and not fake.owes


# -- a provider's connections limited across the cluster (engine.cluster_connections) ---------


class FakeSlots:
    """The cluster's slots as the gate sees them (engine.cluster_connections), no Redis:
    `free` slots to grant; `over_share`: this worker should give one back."""

    def __init__(self, free: int) -> None:
        self.free = free
        self.held = 0
        self.over_share = False
        self.waiters: Callable[[], bool] = lambda: False
        self.wake: Callable[[], None] = lambda: None
        self.shed: Callable[[int], int] = lambda count: 0

    def acquire(self) -> bool:
        if self.held >= self.free:
            return False
        self.held += 1
        return True

    def release(self) -> None:
        self.held -= 1


def cluster_pool(free: int, max_wait: float) -> tuple[DestinationPool, FakeSlots, Factory]:
    from engine.gate import ConnectionGate

    clock = FakeClock()
    factory = Factory(clock)
    gate = ConnectionGate(max_connections=5, connection_rate=0)
    slots = FakeSlots(free)
    gate.limit_cluster(cast(Any, slots), max_wait)
    pool = DestinationPool(KEY, PoolConfig(max_connections=5, max_messages=100,
                                           idle_timeout=60.0), factory, clock, gate)
    return pool, slots, factory


def test_a_caller_the_cluster_refuses_waits_max_wait_then_no_slot() -> None:
    from engine.gate import NoSlot

    pool, slots, factory = cluster_pool(free=1, max_wait=0.3)
    conn, _ = pool.acquire()  # the only slot of the cluster, busy
    started = time.monotonic()
    with pytest.raises(NoSlot):
        pool.acquire()  # room here (5), none in the cluster: waits max_wait, no more
    assert 0.25 <= time.monotonic() - started < 1.0
    assert factory.calls == 1 and pool.open == 1 and slots.held == 1
    # Given back within max_wait, the connection goes to the waiting caller instead.
    got = gevent.spawn(pool.acquire)
    gevent.sleep(0.05)
    pool.release(conn)
    assert got.get(timeout=1)[0] is conn


def test_a_connection_whose_slot_the_cluster_wants_back_closes_when_it_comes_back() -> None:
    pool, slots, factory = cluster_pool(free=2, max_wait=5.0)
    first, _ = pool.acquire()
    second, _ = pool.acquire()
    assert factory.calls == 2 and pool.opening_ahead == 0  # nothing opened ahead, ever
    slots.over_share = True  # another worker of the cluster waits: above our share
    pool.release(first)
    gevent.sleep(0.05)  # its QUIT, then the slot is free (for the other host)
    assert pool.idle == 0 and slots.held == 1 and cast(FakeConnection, first).quit
    slots.over_share = False
    pool.release(second)
    assert pool.idle == 1 and slots.held == 1  # at its share: kept for the next message


def test_a_connection_the_cluster_wants_back_is_not_passed_on_mid_transaction() -> None:
    pool, slots, _ = cluster_pool(free=1, max_wait=5.0)
    conn, _ = pool.acquire()
    waiting = gevent.spawn(pool.acquire)
    gevent.sleep(0.01)
    assert pool.pass_on(conn) is True  # handed to the caller waiting, before the reply
    got, _ = waiting.get(timeout=1)
    assert got is conn
    slots.over_share = True  # another worker waits: above its share now
    waiting = gevent.spawn(pool.acquire)
    gevent.sleep(0.01)
    assert pool.pass_on(got) is False  # released instead, then closed
    waiting.kill()
