"""A provider's connections for the whole cluster against a real redis-server on loopback
(engine.cluster_connections, through the provider's gate, engine.gate): several workers,
each with its own link to Redis as on its own host, never hold more slots together than
`cluster_connections`; a slot given back goes to a worker that waits; a holder killed
stops counting after its lease; idle connections beyond a share close when others wait;
each worker's share while Redis is down, and its slots registered again when it is back;
and a worker's delivery (engine.delivery) whose message finds no slot within max_wait,
which uses up none of its caps; after close() nothing is started.

Connections are played by greenlets that enter the gate, hold their slot a moment and
leave, as engine.pool does (gevent, unpatched: redis-py's calls block the loop for their
loopback round trip, a fraction of a millisecond)."""
from __future__ import annotations

import datetime
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import gevent
import pytest
from gevent.event import AsyncResult

from engine.cluster import FALLBACK, SHARED, Cluster
from engine.cluster_connections import ClusterConnections
from engine.config import (
    ClusterConfig,
    ProviderLimits,
    Route,
    ShapingConfig,
    ThrottleConfig,
    WarmupConfig,
)
from engine.gate import ConnectionGate
from engine.mx import Resolver
from engine.protocol import Attempt, Status
from engine.shaping import Shaping, ShapingPlan
from engine.testing.sink import SinkServer
from tests.support.recorded_metrics import Recorded
from tests.support.redis import RedisServer, serving
from tests.support.stack import POOL, Stack, build
from tests.support.wait import yielding_until

pytestmark = pytest.mark.timeout(90)

T = TypeVar("T")


MADE: list[ClusterConnections] = []


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with serving(MADE) as server:  # their keepers stop at the end, as at a worker's end
        yield server


def worker_gate(server: RedisServer, host: str, limit: int, metrics: Recorded | None = None,
                max_connections: int = 50, max_wait: float = 10.0,
                **options: Any) -> ConnectionGate:
    """A worker's gate to provider "example", with its cluster slots (`limit` for all)."""
    cluster = Cluster(ClusterConfig(redis=server.url, **options), host, metrics)
    gate = ConnectionGate(max_connections, 0.0)
    made = ClusterConnections(cluster, "example", limit, f"{host}/127.0.0.2", metrics)
    MADE.append(made)
    gate.limit_cluster(made, max_wait)
    return gate


def slots(gate: ConnectionGate) -> ClusterConnections:
    assert gate.cluster is not None
    return gate.cluster


def enter(gate: ConnectionGate, timeout: float) -> bool:
    """A caller wanting a connection: a slot now, or once woken (the pool's way)."""
    deadline = time.monotonic() + timeout
    while not gate.try_enter():
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        waiter: AsyncResult[Any] = AsyncResult()
        gate.add_waiter(waiter)
        try:
            waiter.wait(left)
        finally:
            gate.remove_waiter(waiter)
    return True


class Open:
    """Connections open now across every worker, and the most there ever were."""

    def __init__(self) -> None:
        self.now = 0
        self.most = 0
        self.by: dict[int, int] = {}

    def connection(self, gate: ConnectionGate, seconds: float) -> None:
        if not enter(gate, 5.0):
            return
        self.now += 1
        self.most = max(self.most, self.now)
        self.by[id(gate)] = self.by.get(id(gate), 0) + 1
        gevent.sleep(seconds)
        self.now -= 1  # closed, then its slot is given back
        gate.leave()


def busy(gate: ConnectionGate, opened: Open, stop: float, callers: int = 6) -> list[Any]:
    """`callers` greenlets opening connections of 20-40 ms one after another until `stop`."""
    def caller(n: int) -> None:
        while time.monotonic() < stop:
            opened.connection(gate, 0.02 + 0.005 * (n % 5))
    return [gevent.spawn(caller, n) for n in range(callers)]


def around_a_release(stack: Stack, other: ClusterConnections, server: RedisServer,
                     between: Callable[[], T]) -> tuple[list[Attempt], float, T, list[Attempt]]:
    """A message delivered while `other` (another host) holds the provider's only slot,
    `between()` then, and another message once `other` has released it and Redis has heard
    so: the first's attempts, how long it took, what `between()` said, the second's."""
    started = time.monotonic()
    waited = stack.deliver(["a@example.test"], job_id="one")
    took = time.monotonic() - started
    said = between()
    other.release()  # told to Redis in the background
    client: Any = server.client()
    yielding_until(lambda: not client.hgetall("mailengine:conns:127.0.0.1"), 5,
                   "Redis to hold no slot of the provider: the other host's release heard")
    sent = stack.deliver(["b@example.test"], job_id="two")
    return waited, took, said, sent


def test_three_workers_never_hold_more_than_the_limit_together(
        redis_server: RedisServer) -> None:
    metrics = Recorded()
    gates = [worker_gate(redis_server, f"host{i}", 4, metrics) for i in range(3)]
    opened = Open()
    stop = time.monotonic() + 3.0
    greenlets = [g for gate in gates for g in busy(gate, opened, stop)]
    gevent.joinall(greenlets, timeout=20, raise_error=True)
    assert opened.most == 4, opened.most  # the limit, all of it used, never more
    # Every worker had its turns (a share that follows demand, not one worker's hoard).
    assert all(opened.by.get(id(gate), 0) >= 10 for gate in gates), opened.by
    assert metrics.total("cluster_connections_denied") > 0
    yielding_until(lambda: all(slots(gate).held == 0 for gate in gates), 5, "every slot back")
    client: Any = redis_server.client()
    yielding_until(lambda: not client.hgetall("mailengine:conns:example"), 5,
                   "Redis to hold no slot")


def test_a_released_slot_goes_to_a_waiting_worker(redis_server: RedisServer) -> None:
    first = worker_gate(redis_server, "host0", 1)
    second = worker_gate(redis_server, "host1", 1)
    assert first.try_enter()
    waiting = gevent.spawn(enter, second, 10.0)
    yielding_until(lambda: slots(second).denied > 0, 5, "the second worker to be refused")
    gevent.sleep(0.3)
    assert not waiting.ready()  # refused while the first holds the only slot
    first.leave()
    took = yielding_until(waiting.ready, 5, "the second worker's slot")
    assert waiting.value is True
    assert took < 1.0, took  # asked again every ASK_AGAIN (0.1 s) while it waits
    assert (slots(first).held, slots(second).held) == (0, 1)
    assert not first.try_enter()  # now the first one waits
    second.leave()


def test_a_holder_whose_lease_lapsed_stops_counting(redis_server: RedisServer) -> None:
    killed = worker_gate(redis_server, "host0", 2, connection_lease=1.0, poll=0.2)
    other = worker_gate(redis_server, "host1", 2, connection_lease=1.0, poll=0.2)
    assert killed.try_enter() and killed.try_enter()
    gevent.sleep(1.5)  # renewed meanwhile: it holds both still
    assert not other.try_enter()
    slots(killed).close()  # killed -9: no renewal, no release, ever again
    since = time.monotonic()
    assert enter(other, 5.0)
    lapsed = time.monotonic() - since
    assert lapsed < 2.5, lapsed  # within its lease (1 s) of its last renewal (0.2 s each)
    assert enter(other, 1.0)  # both of its slots are free
    assert slots(other).held == 2


def test_after_close_nothing_is_started_and_a_release_tells_redis_in_its_caller(
        redis_server: RedisServer) -> None:
    """Regression (CI: a greenlet left running after a test's close failed the hub check
    of every test after it): close() is final, as at a worker's end."""
    gate = worker_gate(redis_server, "host0", 2)
    slots(gate).close()
    assert gate.try_enter()  # a slot still, from Redis; no keeper started for its lease
    client: Any = redis_server.client()
    assert client.hgetall("mailengine:conns:example") == {b"host0/127.0.0.2": b"1"}
    gate.leave()
    assert client.hgetall("mailengine:conns:example") == {}  # told before leave() returned
    gevent.get_hub().loop.update_now()
    assert gevent.wait(timeout=1.0), "a greenlet or timer started after close()"


def test_idle_connections_beyond_a_share_close_when_another_worker_waits(
        redis_server: RedisServer) -> None:
    metrics = Recorded()
    hoarder = worker_gate(redis_server, "host0", 4, metrics, poll=0.2)
    idle: list[int] = []

    def close_one_idle() -> bool:  # a pool's hook: an idle connection closes, its slot too
        if not idle:
            return False
        idle.pop()
        hoarder.leave()
        return True
    hoarder.on_idle(close_one_idle)
    for n in range(4):
        assert hoarder.try_enter()
        idle.append(n)  # connections left idle: waiting for nothing
    wanting = worker_gate(redis_server, "host1", 4, metrics, poll=0.2)
    got = gevent.spawn(lambda: [enter(wanting, 10.0), enter(wanting, 10.0)])
    took = yielding_until(got.ready, 10, "the waiting worker's share")
    assert got.value == [True, True]
    assert took < 2.0, took  # the hoarder learns within a renewal (0.2 s) that others wait
    assert (slots(hoarder).held, len(idle), slots(wanting).held) == (2, 2, 2)
    assert slots(hoarder).share == 2
    assert metrics.total("cluster_connections_shed") == 2
    assert not wanting.try_enter()  # at its share too, while the hoarder... holds its own


def test_busy_connections_beyond_a_share_are_given_back_when_they_come_back(
        redis_server: RedisServer) -> None:
    holder = worker_gate(redis_server, "host0", 2, poll=0.2)
    assert holder.try_enter() and holder.try_enter()  # both busy
    wanting = worker_gate(redis_server, "host1", 2, poll=0.2)
    got = gevent.spawn(enter, wanting, 10.0)
    yielding_until(lambda: holder.give_back(), 5, "the holder to learn that another waits")
    holder.leave()  # the pool closes a connection that comes back (engine.pool.release)
    yielding_until(got.ready, 5, "the waiting worker's slot")
    assert not holder.give_back()  # at its share (1 of 2) now: keeps the other
    assert (slots(holder).held, slots(wanting).held) == (1, 1)


def test_redis_killed_each_worker_holds_its_share_then_registers_again(
        redis_server: RedisServer) -> None:
    gates = [worker_gate(redis_server, f"host{i}", 4, retry=0.3, poll=0.2)
             for i in range(2)]
    for gate in gates:
        assert gate.try_enter()
    yielding_until(lambda: all(slots(gate).members == 2 for gate in gates), 5,
                   "both workers to see each other (the first at its renewal)")

    redis_server.kill()
    for gate in gates:  # each may hold the limit / the holders it last saw: 2
        assert gate.try_enter()
        assert not gate.try_enter()
    assert [slots(gate).mode for gate in gates] == [FALLBACK, FALLBACK]
    gates[1].leave()  # one closes while Redis is away

    redis_server.start()  # empty: the holders register what they hold at their next call
    client: Any = redis_server.client()
    yielding_until(lambda: client.hgetall("mailengine:conns:example") == {
        b"host0/127.0.0.2": b"2", b"host1/127.0.0.2": b"1"}, 5,
        "the slots held registered again")
    assert [slots(gate).mode for gate in gates] == [SHARED, SHARED]
    assert gates[1].try_enter()  # 4 of 4: the limit again, for both
    assert not gates[0].try_enter() and not gates[1].try_enter()


def test_a_message_that_gets_no_slot_within_max_wait_goes_back_to_the_spool_unattempted(
        redis_server: RedisServer) -> None:
    """Another host holds the provider's only slot: the message waits `shaping.max_wait`
    (0.5 s) and is deferred 451 4.4.5, not attempted, no connection opened; once the slot
    is free the next message goes."""
    other = ClusterConnections(Cluster(ClusterConfig(redis=redis_server.url), "host1"),
                               "127.0.0.1", 1, "host1/127.0.0.3")
    MADE.append(other)
    assert other.acquire()
    with SinkServer(tls=False) as sink:
        stack = build(Resolver(routes={"example.test": Route("127.0.0.1", sink.port)}),
                      policy=None)
        stack.deliverer.shaping = shaping = Shaping(ShapingPlan(
            ip="127.0.0.2", pool=POOL, throttle=ThrottleConfig(slow_start=False),
            shaping=ShapingConfig(max_wait=0.5, providers={
                "127.0.0.1": ProviderLimits(cluster_connections=1)}),
            cluster=ClusterConfig(redis=redis_server.url, host="host0")))
        try:
            waited, took, _, sent = around_a_release(stack, other, redis_server, lambda: None)
        finally:
            stack.close()
            shaping.close()
    assert [(a.status, a.attempted, a.reply.code, a.reply.status) for a in waited] == [
        (Status.DEFERRED, False, 451, "4.4.5")]
    assert "127.0.0.1 cluster connections" in waited[0].reply.text
    assert waited[0].retry_at is not None and waited[0].retry_at >= time.time() - 1
    assert 0.45 <= took < 3.0, took
    assert [a.status for a in sent] == [Status.DELIVERED]
    assert sink.connections == 1  # none while the other host held the slot


def test_a_message_sent_back_for_want_of_a_slot_uses_up_no_cap(
        redis_server: RedisServer) -> None:
    """Regression: a message that got no slot within max_wait went back to the spool
    untried, but its turn had counted it against the IP's hourly cap, the warm-up's daily
    cap and the cluster's hourly budget: with each at 1, the next message (the slot free
    by then) was deferred for an hour, or a day, having sent nothing."""
    other = ClusterConnections(Cluster(ClusterConfig(redis=redis_server.url), "host1"),
                               "127.0.0.1", 1, "host1/127.0.0.3")
    MADE.append(other)
    assert other.acquire()
    today = datetime.datetime.now(datetime.UTC).date().isoformat()
    with SinkServer(tls=False) as sink:
        stack = build(Resolver(routes={"example.test": Route("127.0.0.1", sink.port)}),
                      policy=None)
        stack.deliverer.shaping = shaping = Shaping(ShapingPlan(
            ip="127.0.0.2", pool=POOL, throttle=ThrottleConfig(slow_start=False),
            shaping=ShapingConfig(max_wait=0.3, providers={"127.0.0.1": ProviderLimits(
                cluster_connections=1, hourly=1, cluster_hourly=1)}),
            warmup=WarmupConfig(schedule=(1,), ips={"127.0.0.2": today}),
            cluster=ClusterConfig(redis=redis_server.url, host="host0")))
        shaper = shaping.get("127.0.0.1")
        try:
            waited, _, untouched, sent = around_a_release(
                stack, other, redis_server,
                lambda: (shaper.sent_today, shaper.caps.counted_this_hour()))
        finally:
            stack.close()
            shaping.close()
    assert [(a.attempted, a.reply.status) for a in waited] == [(False, "4.4.5")]
    assert "cluster connections" in waited[0].reply.text
    assert untouched == (0, False)
    assert [a.status for a in sent] == [Status.DELIVERED], sent
    assert shaper.sent_today == 1
    client: Any = redis_server.client()
    assert sum(int(n) for n in client.hgetall(
        "mailengine:hourly:127.0.0.1").values()) == 1  # the one sent, not the one sent back


def test_slots_registered_again_past_the_limit_are_given_back_as_connections_close(
        redis_server: RedisServer) -> None:
    """Redis restarted empty: a worker asking first is granted slots the holders had not
    registered again yet; once they have, the cluster holds more than the limit, and a
    holder above its share closes its connections as they come back, down to the limit."""
    holder = worker_gate(redis_server, "host0", 2, retry=0.3, poll=0.2)
    assert holder.try_enter() and holder.try_enter()
    redis_server.kill()
    redis_server.start()  # empty, before the holder's next renewal
    newcomer = worker_gate(redis_server, "host1", 2, retry=0.3, poll=0.2)
    assert newcomer.try_enter()  # Redis knows of nobody else yet
    yielding_until(holder.give_back, 5, "the holder registered again, above its share")
    assert slots(holder).total == 3
    holder.leave()  # a connection that came back: closed (engine.pool.release)
    yielding_until(lambda: not holder.give_back(), 5, "the holder at its share")
    yielding_until(lambda: slots(newcomer).total == 2, 5, "the cluster at its limit again")
    assert not newcomer.try_enter()
