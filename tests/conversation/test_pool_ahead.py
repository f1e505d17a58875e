"""Opening a retiring connection's replacement ahead (finding 3) and freeing a slot only after
the QUIT at the cap (finding 2), on the network: real connections, real servers.

In this (unpatched) process a connection's socket blocks the whole process, so the tests here
check order and counts. The test that needs connects running alongside transactions runs the
whole engine (its worker is gevent-patched) behind the benchmarks' latency proxy:
tests/engine/test_pool_ahead.py.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import gevent
import pytest

from engine.config import PoolConfig, Route
from engine.delivery import Deliverer
from engine.metrics import Metrics
from engine.mx import Resolver
from engine.pool import PoolKey
from engine.pools import Pools
from engine.protocol import Attempt, Status, Task
from tests.support.counting_proxy import CountingProxy, until
from tests.support.playbook import CLIENT_IP, MESSAGE, RCPTS, SENDER, delivered_once, greet
from tests.support.smtpserver import CLOSE, SLEEP, WAIT_CLOSE, C, S, ScriptedServer
from tests.support.stack import LOOPBACK_ALLOWED, build

DOMAIN = "example.test"
PIPELINED = ("PIPELINING", "CHUNKING")


@pytest.fixture
def proxies() -> Iterator[list[CountingProxy]]:
    made: list[CountingProxy] = []
    yield made
    for proxy in made:
        proxy.stop()


def stack(port: int, max_connections: int, max_messages: int) -> tuple[Deliverer, Pools]:
    resolver = Resolver(routes={DOMAIN: Route("127.0.0.1", port)})
    built = build(resolver, policy=LOOPBACK_ALLOWED,
                  metrics=Metrics.create("127.0.0.1", 9, "test", CLIENT_IP, enabled=False),
                  pool=PoolConfig(max_connections=max_connections, max_messages=max_messages,
                                  idle_timeout=60.0, connect_backoff=30.0))
    return built.deliverer, built.pools


def deliver(deliverer: Deliverer, number: int) -> list[Attempt]:
    attempts: list[Attempt] = []
    task = Task(f"job-{number}", SENDER, (RCPTS[0],), MESSAGE, time.time())
    deliverer.deliver(task, attempts.extend)
    return attempts


def close_pools(pools: Pools) -> None:
    pools.drain()
    pools.close_all()
    assert gevent.wait(timeout=5)  # the greenlets of the QUITs ended: the loop is empty


def slow_quit_behind_a_proxy(scripted: Any, proxies: list[CountingProxy]
                             ) -> tuple[ScriptedServer, CountingProxy]:
    """A server that takes one message per connection and answers QUIT 0.3 s late, behind
    a proxy counting the sessions it holds."""
    script = [*greet(*PIPELINED), *delivered_once(*PIPELINED), C("QUIT"), SLEEP(0.3),
              S("221 2.0.0 bye"), WAIT_CLOSE()]
    server: ScriptedServer = scripted([script], extra="repeat_last")
    proxy = CountingProxy((server.host, server.port))
    proxies.append(proxy)
    return server, proxy


def test_at_the_cap_the_next_connection_is_dialled_only_after_the_221(
        scripted: Any, proxies: list[CountingProxy]) -> None:
    """Finding 2: a connection per message, one allowed, a server slow to answer QUIT: the
    next message's connection reaches the server only after the previous session's 221."""
    server, proxy = slow_quit_behind_a_proxy(scripted, proxies)
    deliverer, pools = stack(proxy.port, max_connections=1, max_messages=1)
    started = time.monotonic()
    for number in range(3):
        assert [a.status for a in deliver(deliverer, number)] == [Status.DELIVERED]
    took = time.monotonic() - started
    close_pools(pools)
    server.wait_finished(3)
    assert proxy.sessions == 3 and proxy.most == 1
    assert took >= 0.6  # two reconnects, each after a QUIT answered 0.3 s late
    assert not server.errors


def test_below_the_cap_the_slot_is_not_held_for_the_quit(
        scripted: Any, proxies: list[CountingProxy]) -> None:
    server, proxy = slow_quit_behind_a_proxy(scripted, proxies)
    deliverer, pools = stack(proxy.port, max_connections=3, max_messages=1)
    for number in range(2):
        assert [a.status for a in deliver(deliverer, number)] == [Status.DELIVERED]
    assert proxy.sessions == 2 and proxy.most == 2  # the 2nd went out with the 1st's QUIT
    close_pools(pools)
    server.wait_finished(2)


def test_a_refused_connect_ahead_defers_nothing(scripted: Any) -> None:
    """The replacement opened ahead is refused at the banner: every message is delivered
    (the next one connects the usual way), nothing deferred, the pool not backing off."""
    two = [*greet(*PIPELINED), *delivered_once(*PIPELINED), *delivered_once(*PIPELINED),
           C("QUIT"), S("221 2.0.0 bye"), WAIT_CLOSE()]
    refused = [S("421 4.7.0 too many connections"), CLOSE()]
    server: ScriptedServer = scripted([two, refused, two])
    deliverer, pools = stack(server.port, max_connections=2, max_messages=2)
    assert [a.status for a in deliver(deliverer, 1)] == [Status.DELIVERED]
    assert [a.status for a in deliver(deliverer, 2)] == [Status.DELIVERED]
    pool = pools.find(PoolKey(CLIENT_IP, "127.0.0.1", server.port, "none"))
    assert pool is not None
    until(lambda: pool.ahead.failed)  # the connect ahead ran and was refused
    assert pool.ahead.failed == 1 and not pool.failing()
    assert [a.status for a in deliver(deliverer, 3)] == [Status.DELIVERED]
    assert [a.status for a in deliver(deliverer, 4)] == [Status.DELIVERED]
    close_pools(pools)
    server.wait_finished(3)
    assert server.connections == 3 and len(server.messages) == 4
    assert not server.errors


def test_drain_right_after_a_connect_ahead_leaves_no_connection(scripted: Any) -> None:
    two = [*greet(*PIPELINED), *delivered_once(*PIPELINED), *delivered_once(*PIPELINED),
           C("QUIT"), S("221 2.0.0 bye"), WAIT_CLOSE()]
    server: ScriptedServer = scripted([two])
    deliverer, pools = stack(server.port, max_connections=2, max_messages=2)
    deliver(deliverer, 1)
    deliver(deliverer, 2)  # started the connect ahead, which has not run yet
    pool = pools.find(PoolKey(CLIENT_IP, "127.0.0.1", server.port, "none"))
    assert pool is not None and pool.opening_ahead == 1
    pools.drain()
    pools.close_all()
    assert gevent.wait(timeout=5)  # the stopped connect ahead and the QUIT ended
    assert pool.open == 0 and pool.opening_ahead == 0 and pools.open_connections == 0
    server.wait_finished(1)
    assert server.connections == 1 and not server.errors
