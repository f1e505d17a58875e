"""Half-open pooled connections (issue #14): a peer gone without a FIN is found before reuse.

On loopback the kernel ACKs whatever is sent, even to a server that stopped reading: no
keepalive can fire there, so the bounded check before reuse (an RSET within
`pool.reuse_check_timeout`) is what is tested against a real server that goes silent. That
keepalive is set on every connection is read back from the socket; that it drops a
connection whose packets vanish is shown in a network namespace of the test's own, where
its loopback goes down (skipped without root or `ip netns`).
"""
from __future__ import annotations

import itertools
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace

import pytest

from engine.config import PoolConfig, Route, Timeouts
from engine.metrics import Metrics
from engine.mx import Resolver
from engine.protocol import Status
from tests.support import ROOT
from tests.support.playbook import FAST
from tests.support.rawserver import Behaviour, Peer, RawServer
from tests.support.stack import LOOPBACK_ALLOWED, POOL, Stack
from tests.support.statsd_catcher import StatsdCatcher

DOMAIN = "example.test"
RCPT = f"rcpt@{DOMAIN}"
# A MAIL timeout of a minute: without the check, the message after the silent connection
# would wait that long, past this tier's timeout.
PATIENT = replace(FAST, mail=60.0, transaction=120.0)
CHECKED = replace(POOL, reuse_check_after=0.0, reuse_check_timeout=0.5)


def _transaction(peer: Peer) -> None:
    """MAIL, RCPT, DATA, the message, one step at a time (no PIPELINING offered)."""
    peer.line()
    peer.send(b"250 ok\r\n")
    _after_mail(peer)


def _after_mail(peer: Peer) -> None:
    for reply in (b"250 ok\r\n", b"354 go ahead\r\n"):
        peer.line()
        peer.send(reply)
    while peer.line() != b".":
        pass
    peer.send(b"250 2.0.0 queued\r\n")


def _greet(peer: Peer) -> None:
    peer.send(b"220 mx.test ESMTP\r\n")
    peer.line()
    peer.send(b"250 mx.test\r\n")


def _serve_commands(peer: Peer) -> None:
    """After a transaction: RSET and NOOP answered, another MAIL served, QUIT ends."""
    while True:
        command = peer.line().upper()
        if command.startswith(b"QUIT"):
            peer.send(b"221 bye\r\n")
            return
        peer.send(b"250 ok\r\n")
        if command.startswith(b"MAIL"):
            _after_mail(peer)


def silent_after_first_transaction() -> Behaviour:
    """The first connection takes one message, then stops reading and never answers (the
    kernel still ACKs): a peer gone without a FIN, as far as the client can tell. Every
    later connection is a working server."""
    numbers = itertools.count()

    def behaviour(peer: Peer) -> None:
        first = next(numbers) == 0
        _greet(peer)
        _transaction(peer)
        if first:
            peer.hold()
        else:
            _serve_commands(peer)
    return behaviour


@pytest.fixture
def statsd() -> Iterator[StatsdCatcher]:
    with StatsdCatcher() as catcher:
        yield catcher


def _stack(stack: Callable[..., Stack], server: RawServer, statsd: StatsdCatcher,
           pool: PoolConfig, timeouts: Timeouts = PATIENT) -> Stack:
    resolver = Resolver(routes={DOMAIN: Route("127.0.0.1", server.port)})
    metrics = Metrics.create("127.0.0.1", statsd.port, "test", "127.0.0.1")
    return stack(resolver, pool=pool, timeouts=timeouts, policy=LOOPBACK_ALLOWED,
                 metrics=metrics)


def _counter(statsd: StatsdCatcher, metric: str) -> float:
    return sum(statsd.counter_sum(name) for name in statsd.names("counter")
               if name.endswith(f".{metric}"))


def test_a_silent_idle_connection_fails_its_check_and_the_next_message_goes_on_a_new_one(
        raw: Callable[..., RawServer], stack: Callable[..., Stack],
        statsd: StatsdCatcher) -> None:
    server = raw(silent_after_first_transaction())
    delivery = _stack(stack, server, statsd, CHECKED)
    first = delivery.deliver([RCPT])
    assert [a.status for a in first] == [Status.DELIVERED]
    started = time.monotonic()
    second = delivery.deliver([RCPT])
    took = time.monotonic() - started
    assert [(a.status, a.conn_reused, a.attempted) for a in second] == [
        (Status.DELIVERED, False, True)]
    assert took < 3.0, f"the next message took {took:.1f}s: the check did not bound it"
    assert server.connections == 2
    delivery.metrics.flush()
    assert statsd.wait_for(lambda: _counter(statsd, "connections_check_failed") == 1, 3)
    assert _counter(statsd, "connections_stale") == 0
    assert _counter(statsd, "deferred") == 0


def test_a_connection_reused_at_once_pays_no_round_trip(
        raw: Callable[..., RawServer], stack: Callable[..., Stack],
        statsd: StatsdCatcher) -> None:
    """Below `reuse_check_after` the silent connection is reused unchecked: what the check
    costs is paid only by connections idle a while (here the MAIL timeout finds it)."""
    server = raw(silent_after_first_transaction())
    quick = replace(PATIENT, mail=0.5)
    delivery = _stack(stack, server, statsd, replace(POOL, reuse_check_after=30.0), quick)
    delivery.deliver([RCPT])
    second = delivery.deliver([RCPT])
    assert [a.status for a in second] == [Status.DELIVERED]
    delivery.metrics.flush()
    assert statsd.wait_for(lambda: _counter(statsd, "connections_stale") == 1, 3)
    assert _counter(statsd, "connections_check_failed") == 0


def _idle_socket(delivery: Stack) -> socket.socket:
    (pool,) = list(delivery.pools)
    (conn,) = pool.idle_connections
    assert conn.sock is not None
    return conn.sock


def test_every_connection_has_tcp_keepalive_with_the_configured_probes(
        raw: Callable[..., RawServer], stack: Callable[..., Stack],
        statsd: StatsdCatcher) -> None:
    server = raw(silent_after_first_transaction())
    pool = replace(POOL, keepalive_idle=15.0, keepalive_interval=4.5, keepalive_count=3)
    delivery = _stack(stack, server, statsd, pool)
    delivery.deliver([RCPT])
    sock = _idle_socket(delivery)
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 15
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 5  # rounded up
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 3


def test_keepalive_idle_0_leaves_it_off(raw: Callable[..., RawServer],
                                        stack: Callable[..., Stack],
                                        statsd: StatsdCatcher) -> None:
    server = raw(silent_after_first_transaction())
    delivery = _stack(stack, server, statsd, replace(POOL, keepalive_idle=0.0))
    delivery.deliver([RCPT])
    assert _idle_socket(delivery).getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0


# -- keepalive where packets really vanish: a network namespace of the test's own ----------

_IN_NAMESPACE = r'''
import select, socket, subprocess, sys, time
from engine.config import Timeouts
from engine.smtp import Connection, Keepalive, ReplyLimits
from tests.support.rawserver import RawServer
from tests.conversation.test_half_open import silent_after_first_transaction

server = RawServer(silent_after_first_transaction())
conn = Connection("client.test", "127.0.0.1", Timeouts(), ReplyLimits(), Keepalive(1, 1, 2))
assert conn.open("127.0.0.1", server.port).code == 220 and conn.hello().ok
unguarded = Connection("client.test", "127.0.0.1", Timeouts(), ReplyLimits())
assert unguarded.open("127.0.0.1", server.port).code == 220 and unguarded.hello().ok
# This namespace's loopback goes down: every packet is lost from now on, the peer gone
# without a FIN, as when its host dies or a NAT forgets the flow.
subprocess.run(["ip", "link", "set", "lo", "down"], check=True)
started = time.monotonic()
assert conn.is_alive()  # nothing to tell yet
while conn.is_alive() and time.monotonic() - started < 20:
    select.select([conn.sock], [], [], 0.2)
print(f"dead_after={time.monotonic() - started:.1f}")
assert unguarded.is_alive()  # without keepalive, nothing tells
unguarded.close()
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
conn.close()
server.stop()
'''


def _namespaces_usable() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("ip") is not None


@pytest.mark.skipif(not _namespaces_usable(), reason="needs root and ip netns")
def test_keepalive_finds_a_peer_whose_packets_vanish_in_seconds() -> None:
    """In a namespace of its own (its loopback only), every packet is lost after the
    greeting (the namespace's loopback goes down): with keepalive 1 s + 2 probes 1 s apart,
    the idle connection reads as dead within a few seconds, where without it nothing would
    ever tell."""
    name = f"me-test-{uuid.uuid4().hex[:8]}"
    if subprocess.run(["ip", "netns", "add", name], capture_output=True).returncode != 0:
        pytest.skip("ip netns add is not permitted here")
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"],
                       check=True, timeout=10)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        out = subprocess.run(["ip", "netns", "exec", name, sys.executable, "-c", _IN_NAMESPACE],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=25)
        assert out.returncode == 0, out.stderr
        dead_after = float(out.stdout.strip().rpartition("dead_after=")[2])
        assert 1.5 <= dead_after <= 8.0, out.stdout
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)
