"""Hardening on the wire, in process: what reaches a scripted server from an envelope, a
reply or a body; the prohibited destinations in the delivery stack, against servers and a
DNS server on loopback; the supervisor's sockets bounded. docs/SECURITY.md explains each
rule; the rules without a socket are tests/unit/test_security.py, the whole engine
tests/engine/test_security.py, hostile servers tests/conversation/test_hostile.py, the
fuzzers tests/support/fuzz.py, the flood tests/engine/test_flood.py.
"""
from __future__ import annotations

import ipaddress
import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.config import PoolConfig, Route, from_dict
from engine.delivery import Deliverer
from engine.intake import INGEST_HWM
from engine.job import normalise_message, parse_job
from engine.mx import DestinationPolicy, Resolver
from engine.protocol import Attempt, Status, Task
from engine.results import RESULTS_HWM
from engine.smtp import MAX_REPLY_TEXT, Connection, ReplyLimits, dot_stuff, send_mail
from engine.supervisor import EVENTS_HWM, Supervisor
from engine.testing.sink import SinkServer
from tests.support.dnsserver import DnsServer
from tests.support.fuzz import BODIES, SMUGGLER, check_client_bytes, run_session
from tests.support.playbook import (
    FAST,
    HELO,
    MESSAGE,
    SENDER,
    Connect,
    Scripted,
    greet,
    mail,
    rcpt,
)
from tests.support.smtpserver import DATA, WAIT_CLOSE, C, S, Step
from tests.support.stack import build

# =======================================================================================
# 2. Nothing from data reaches the wire unchecked
# =======================================================================================

@pytest.mark.parametrize("field", ["sender", "rcpt"])
def test_nul_in_an_envelope_address_is_refused_unsent(
        scripted: Scripted, field: str, connect: Connect) -> None:
    server = scripted([*greet(), WAIT_CLOSE()])
    conn = connect(server)
    evil = "a\0b@example.test"
    sender, rcpts = (evil, ("r@example.test",)) if field == "sender" else (SENDER, (evil,))
    results = send_mail(conn, sender, rcpts, MESSAGE)
    assert [r.reply.code for r in results] == [501]
    conn.close()
    server.wait_finished()
    assert [line.split()[0].upper() for line in server.client_lines()] == ["EHLO"]


def test_mail_parameters_come_from_the_engine_not_the_data(
        scripted: Scripted, connect: Connect) -> None:
    """SIZE is the message's length, BODY and SMTPUTF8 fixed words; nothing else."""
    server = scripted([*greet("SIZE 1000", "8BITMIME", "SMTPUTF8"),
                       C(f"MAIL FROM:<{SENDER}> SIZE={len(MESSAGE)} BODY=8BITMIME SMTPUTF8"),
                       S("250 ok"), rcpt("j\u00f6@example.test"), S("250 ok"), C("DATA"),
                       S("354 go"), DATA(), S("250 queued")])
    conn = connect(server)
    results = send_mail(conn, SENDER, ("j\u00f6@example.test",), MESSAGE, smtputf8=True,
                                eightbit=True)
    assert [r.reply.code for r in results] == [250]
    conn.close()
    server.wait_finished()
    assert server.errors == []


def test_a_hostile_reply_text_is_cut_before_it_reaches_events(
        scripted: Scripted, connect: Connect) -> None:
    long_lines = [f"550-{'x' * 4000}" for _ in range(50)]
    server = scripted([*greet(), mail(), S(*long_lines, "550 5.7.1 no"), C("RSET"),
                       S("250 ok"), WAIT_CLOSE()])
    conn = connect(server)
    results = send_mail(conn, SENDER, ("r@example.test",), MESSAGE)
    assert results[0].reply.code == 550
    assert len(results[0].reply.text) <= MAX_REPLY_TEXT + 3
    conn.close()


# =======================================================================================
# 3. The body cannot smuggle a second message
# =======================================================================================

@settings(max_examples=200, deadline=None)
@given(BODIES, st.booleans())
def test_the_bytes_written_carry_the_message_once_and_nothing_else(raw: bytes,
                                                                   chunking: bool) -> None:
    """On the wire, through a real Connection: BDAT's length is the message's, DATA's body
    is the stuffed message with one terminator, and no other line appears."""
    message = normalise_message(raw)
    ehlo = b"250-mx\r\n250-PIPELINING\r\n250 CHUNKING\r\n" if chunking else b"250 mx\r\n"
    replies = b"220 mx\r\n" + ehlo + b"250 ok\r\n250 ok\r\n"
    replies += b"250 ok\r\n" if chunking else b"354 go\r\n250 ok\r\n"
    session = run_session(replies, "s@example.test", ["r@example.test"], message)
    assert [r.reply.code for r in session.results] == [250]
    assert check_client_bytes(session.wrote, "s@example.test", ["r@example.test"], message,
                              False, False)
    if chunking:
        assert b"BDAT %d LAST\r\n" % len(message) + message in session.wrote
    else:
        assert b"DATA\r\n" + dot_stuff(message) + b".\r\nQUIT\r\n" in session.wrote


@pytest.mark.parametrize("chunking", [False, True], ids=["data", "bdat"])
def test_smuggling_attempts_arrive_as_one_message_intact(chunking: bool) -> None:
    job = parse_job([json.dumps({"from": "s@example.test", "to": ["r@example.test"]}).encode(),
                     SMUGGLER], 10**6, 10)
    with SinkServer(tls=False, chunking=chunking) as sink:
        conn = Connection(HELO, "127.0.0.1", FAST, ReplyLimits())
        conn.open(sink.host, sink.port)
        conn.hello()
        results = send_mail(conn, job.sender, job.rcpts, job.message)
        assert [r.reply.code for r in results] == [250]
        conn.quit_quietly()
        sink.wait_idle()
        assert len(sink.messages) == 1
        got = sink.messages[0]
    assert got.via == ("BDAT" if chunking else "DATA")
    assert got.rcpt_tos == ("r@example.test",)
    assert got.content == job.message == normalise_message(SMUGGLER)
    assert b"\r\n.\r\nMAIL FROM:<evil@example.test>\r\n" in got.content  # data, not a command


# =======================================================================================
# 4. Prohibited destinations
# =======================================================================================

def stack(resolver: Resolver, policy: DestinationPolicy | None = None,
          connect_backoff: float = 0.0) -> Deliverer:
    return build(resolver, ip="127.0.0.1", policy=policy,
                 pool=PoolConfig(max_connections=2, max_messages=10, idle_timeout=60.0,
                                 connect_backoff=connect_backoff)).deliverer


def deliver(deliverer: Deliverer, rcpt: str) -> Attempt:
    attempts: list[Attempt] = []
    deliverer.deliver(Task("job", SENDER, (rcpt,), MESSAGE, time.time()), attempts.extend)
    deliverer.pools.close_all()
    assert len(attempts) == 1
    return attempts[0]


def delivering_script() -> list[Step]:
    return [*greet(), mail(), S("250 ok"), C("RCPT TO:*"), S("250 ok"), C("DATA"),
            S("354 go"), DATA(), S("250 queued")]


def test_mx_resolving_to_loopback_is_deferred_and_never_connected(scripted: Scripted) -> None:
    server = scripted(delivering_script(), host="127.0.0.10")
    zone = {"evil.test": {"MX": [(10, "mx.evil.test")]}, "mx.evil.test": {"A": ["127.0.0.10"]}}
    with DnsServer(zone) as dns:
        resolver = Resolver(["127.0.0.1"], port=dns.port, smtp_port=server.port)
        attempt = deliver(stack(resolver), "x@evil.test")
    assert attempt.status is Status.DEFERRED
    assert (attempt.reply.code, attempt.reply.enhanced) == (451, "4.4.4")
    assert "prohibited destination: 127.0.0.10 is a loopback address" in attempt.reply.text
    assert attempt.mx == "mx.evil.test"
    assert not server.pending()  # the refusal came before any connect: none is on its way
    assert server.connections == 0


def test_address_literal_recipient_at_a_private_address_is_deferred(scripted: Scripted) -> None:
    server = scripted(delivering_script())
    attempt = deliver(stack(Resolver(smtp_port=server.port)), "x@[127.0.0.1]")
    assert attempt.status is Status.DEFERRED and "prohibited destination" in attempt.reply.text
    assert server.connections == 0


def test_prohibited_addresses_of_a_host_are_skipped_and_the_allowed_one_used(
        scripted: Scripted) -> None:
    server = scripted(delivering_script(), host="127.0.0.10")
    zone = {"mixed.test": {"MX": [(10, "mx.mixed.test")]},
            "mx.mixed.test": {"A": ["127.0.0.11", "127.0.0.10", "127.0.0.12"]}}
    only_10 = DestinationPolicy(allowed=(ipaddress.ip_network("127.0.0.10/32"),))
    with DnsServer(zone) as dns:
        resolver = Resolver(["127.0.0.1"], port=dns.port, smtp_port=server.port)
        attempt = deliver(stack(resolver, only_10), "x@mixed.test")
    assert attempt.status is Status.DELIVERED
    assert server.connections == 1


def test_routes_are_exempt(scripted: Scripted) -> None:
    server = scripted(delivering_script())
    resolver = Resolver(routes={"internal.test": Route("127.0.0.1", server.port)})
    assert deliver(stack(resolver), "x@internal.test").status is Status.DELIVERED


def test_a_refused_mx_does_not_put_a_route_to_the_same_host_in_backoff(
        scripted: Scripted) -> None:
    """An MX record naming the route's own host and port shares its pool: the refusal must
    come before the pool, or one hostile message would stall the route for connect_backoff."""
    server = scripted(delivering_script())
    zone = {"evil.test": {"MX": [(10, "127.0.0.1")]}}
    with DnsServer(zone) as dns:
        resolver = Resolver(["127.0.0.1"], port=dns.port, smtp_port=server.port,
                            routes={"internal.test": Route("127.0.0.1", server.port)})
        deliverer = stack(resolver, connect_backoff=60.0)
        evil = deliver(deliverer, "x@evil.test")
        internal = deliver(deliverer, "x@internal.test")
    assert evil.status is Status.DEFERRED and "prohibited destination" in evil.reply.text
    assert internal.status is Status.DELIVERED
    assert server.connections == 1


# =======================================================================================
# 5. Bounded resources
# =======================================================================================

@pytest.fixture
def supervisor(tmp_path: Path) -> Iterator[Supervisor]:
    sockets = tempfile.mkdtemp(prefix="me-")
    cfg = from_dict({"hostname": "mta.test", "ips": ["127.0.0.2"],
                     "ingest": f"ipc://{sockets}/in", "events": f"ipc://{sockets}/ev",
                     "control": f"ipc://{sockets}/ctl", "run_dir": sockets,
                     "spool": str(tmp_path / "spool"), "events_log": "",
                     "statsd": {"enabled": False}, "limits": {"max_message_size": "1MiB"}})
    sup = Supervisor(cfg, None)
    yield sup
    sup.events.close()
    sup.spool.close()
    sup.zctx.destroy(linger=0)
    shutil.rmtree(sockets, ignore_errors=True)


def test_every_supervisor_socket_is_bounded(supervisor: Supervisor) -> None:
    assert supervisor.intake.sock.getsockopt(zmq.RCVHWM) == INGEST_HWM
    assert supervisor.intake.sock.getsockopt(zmq.MAXMSGSIZE) == 2**20 + 2**20  # message + envelope
    assert supervisor.events.socket is not None
    assert supervisor.events.socket.getsockopt(zmq.SNDHWM) == EVENTS_HWM
    assert supervisor.results.sock.getsockopt(zmq.RCVHWM) == RESULTS_HWM
    assert supervisor.control.sock.getsockopt(zmq.MAXMSGSIZE) > 0
    assert supervisor.control.sock.getsockopt(zmq.RCVHWM) > 0
