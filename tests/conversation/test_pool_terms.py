"""Pooled connections' terms on the network (engine.pool_terms): retirements staggered, a
retired connection's replacement opened at once at the cap; and what a certificate that does
not verify costs in handshakes (engine.tls). Real connections to real servers on loopback.

In this (unpatched) process a socket blocks the whole process, so the pool is driven here
as two deliveries at once would drive it: two checkouts, a message on each, two releases.
"""
from __future__ import annotations

import ssl
import threading
from collections.abc import Callable, Iterator

import pytest

from engine.config import PoolConfig
from engine.connector import Connector, Identity
from engine.metrics import Metrics
from engine.mx import MxHost, Resolver
from engine.pool import DestinationPool, PoolKey
from engine.smtp import Connection, ReplyLimits, send_mail
from engine.testing.sink import SinkServer
from engine.testing.tlscert import server_tls_context
from engine.tls import TlsPolicy
from tests.support.counting_proxy import CountingProxy, until
from tests.support.playbook import CLIENT_IP, FAST, HELO, MESSAGE, RCPTS, SENDER
from tests.support.stack import LOOPBACK_ALLOWED


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def connector(tls: TlsPolicy) -> Connector:
    return Connector(Identity(CLIENT_IP, HELO), Resolver(), tls, FAST, ReplyLimits(),
                     Metrics(None, CLIENT_IP), LOOPBACK_ALLOWED)


def opener(port: int, tls: TlsPolicy) -> Callable[[], Connection]:
    made = connector(tls)
    return lambda: made.open(MxHost("127.0.0.1", 10, port), "test")


@pytest.fixture
def proxied_sink() -> Iterator[tuple[SinkServer, CountingProxy]]:
    with SinkServer(tls=False) as sink:
        proxy = CountingProxy((sink.host, sink.port))
        try:
            yield sink, proxy
        finally:
            proxy.stop()


def send(conn: Connection) -> None:
    results = send_mail(conn, SENDER, RCPTS[:1], MESSAGE)
    assert [r.reply.code for r in results] == [250]


def test_two_pooled_connections_never_retire_at_once_and_the_cap_holds(
        proxied_sink: tuple[SinkServer, CountingProxy]) -> None:
    """Two connections carrying messages in step, `max_messages` 10: each one's own term is
    9 (engine.pool_terms), so both reach it in the same round. One retires; the other
    carries on until the first one's replacement is open (one message more, within the
    10), then retires in its turn. Before: both retired in the same round, every 10
    messages, and the destination had no connection to send on."""
    sink, proxy = proxied_sink
    key = PoolKey(CLIENT_IP, "127.0.0.1", proxy.port, "none")
    pool = DestinationPool(key, PoolConfig(max_connections=2, max_messages=10),
                           opener(proxy.port, TlsPolicy("none")))
    retirements = 0
    for _ in range(40):
        a, _ = pool.acquire()
        b, _ = pool.acquire()  # the other one (or, the first time, opened now)
        assert a is not b
        send(a)
        send(b)
        pool.release(a)
        pool.release(b)
        kept = [c for c in (a, b) if c in pool.idle_connections]
        assert kept, "both connections retired in the same round"
        retirements += 2 - len(kept)
        # At the cap: the retired one's replacement is opened as soon as its QUIT is
        # answered, nobody asking for it (before: only when the next message did).
        until(lambda: pool.idle == 2 and not pool.opening_ahead)
        assert all(c.messages_sent <= 10 for c in pool.idle_connections)
    assert retirements >= 6  # 80 messages, 9 or 10 per connection
    assert proxy.most == 2  # the cap: a slot is taken again only after the 221
    pool.close_idle(force=True)
    until(lambda: pool.open == 0)
    assert proxy.sessions == 2 + retirements
    assert len(sink.messages) == 80


class HandshakeCount:
    """The server's count of TLS handshakes: every ClientHello (the SNI callback runs for
    each, with or without a name)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.started = 0

    def context(self) -> ssl.SSLContext:
        ctx = server_tls_context()  # a self-signed certificate: it does not verify
        ctx.sni_callback = self._hello
        return ctx

    def _hello(self, *_: object) -> None:
        with self.lock:
            self.started += 1


def test_a_host_whose_certificate_does_not_verify_costs_one_handshake_a_day() -> None:
    """The first connection finds out (a verifying handshake, aborted: "unknown ca", then
    one without the check); from then on, for `smtp.tls_unverified_ttl` (a day), each new
    connection costs the server one handshake, also past `tls_broken_ttl` (an hour), which
    this memory used to share."""
    clock = Clock()
    count = HandshakeCount()
    with SinkServer(tls=True, tls_context=count.context()) as sink:
        tls = TlsPolicy("opportunistic", broken_ttl=3600.0, clock=clock)
        open_one = opener(sink.port, tls)

        def handshakes_of_one_connection() -> int:
            before = count.started
            conn = open_one()
            assert conn.tls_version is not None and conn.tls_verified is False
            send(conn)
            conn.quit_quietly()
            return count.started - before

        assert handshakes_of_one_connection() == 2  # the check, aborted, and the one used
        assert handshakes_of_one_connection() == 1
        clock.now += 2 * 3600  # past tls_broken_ttl
        assert handshakes_of_one_connection() == 1
        clock.now += 86400  # past tls_unverified_ttl: checked again, once
        assert handshakes_of_one_connection() == 2
        assert handshakes_of_one_connection() == 1
        assert len(sink.messages) == 5
