"""Hostile SMTP servers: each must cost a bounded time and end in a transient outcome.

Raw socket servers on loopback (tests/support/rawserver.py, a behaviour per connection) play
what real tarpits and broken MTAs do. These tests drive the delivery stack in this process
(Deliverer -> Pools -> Connector -> Connection) with short timeouts; the whole engine against
several hostile destinations at once is tests/engine/test_hostile.py.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import fields, replace

import pytest

from engine.config import PoolConfig, Route, Timeouts
from engine.connector import Connector, Identity
from engine.metrics import Metrics
from engine.mx import Resolver
from engine.protocol import Attempt, Status
from engine.smtp import ReplyLimits, send_mail
from engine.tls import TlsPolicy
from tests.support.playbook import HELO, MESSAGE, SENDER, greet, mail, rcpt
from tests.support.rawserver import (
    Behaviour,
    RawServer,
    dripping_banner,
    early_close,
    endless_line,
    endless_multiline,
    garbage,
    silent,
    slow_multiline,
    slow_steps_every,
    slow_transaction,
    stops_reading_after_354,
    stops_reading_bdat,
)
from tests.support.smtpserver import BDAT, DATA, WAIT_CLOSE, C, S, ScriptedServer
from tests.support.stack import build

PHASE = 1.0  # every per-step timeout in these tests
HOSTILE = replace(Timeouts(**{f.name: PHASE for f in fields(Timeouts)}), setup=1.5,
                  transaction=2.5)
# What one hostile destination may cost at most: a deadline, plus slack for a slow machine.
BOUND = 2.5 + 1.5
RCPT = "rcpt@hostile.test"


# ---------------------------------------------------------------------------------------
# The delivery stack in this process


def deliver(port: int, message: bytes = MESSAGE) -> tuple[list[Attempt], float]:
    """One task to RCPT via a route to 127.0.0.1:`port`; the attempts and the time taken."""
    resolver = Resolver(routes={"hostile.test": Route("127.0.0.1", port)})
    stack = build(resolver, ip="127.0.0.1", timeouts=HOSTILE,
                  pool=PoolConfig(max_connections=2, max_messages=10, idle_timeout=60.0,
                                  connect_backoff=0.0))
    started = time.monotonic()
    attempts = stack.deliver((RCPT,), message)
    elapsed = time.monotonic() - started
    stack.pools.close_all()
    return attempts, elapsed


def deferred(attempts: list[Attempt]) -> Attempt:
    assert [(a.rcpt, a.status) for a in attempts] == [(RCPT, Status.DEFERRED)], attempts
    assert attempts[0].reply.code // 100 == 4
    return attempts[0]


HOSTILE_CASES: dict[str, tuple[Behaviour, float, str]] = {
    # behaviour, the most it may take, words in the reply
    "tarpit-silent": (silent, PHASE + 1.0, "timeout after 1s in BANNER"),
    "tarpit-one-byte-a-second": (dripping_banner, PHASE + 1.0, "timeout after 1s in BANNER"),
    "slow-steps-under-each-timeout": (slow_steps_every(0.8), BOUND,
                                      "setup took longer than 1.5s (in EHLO)"),
    "endless-multiline-reply": (endless_multiline, 1.0, "reply longer than 100 lines"),
    "slow-endless-multiline-reply": (slow_multiline, PHASE + 1.0, "timeout after 1s in EHLO"),
    "endless-line": (endless_line, 1.0, "reply line longer than 4096 bytes"),
    "garbage": (garbage, 1.0, "malformed reply line"),
    "early-close": (early_close, 1.0, "connection lost"),
}


@pytest.mark.parametrize("case", HOSTILE_CASES)
def test_hostile_server_costs_bounded_time_and_defers(raw: Callable[..., RawServer],
                                                      case: str) -> None:
    behaviour, bound, words = HOSTILE_CASES[case]
    server = raw(behaviour)
    attempts, elapsed = deliver(server.port)
    attempt = deferred(attempts)
    assert words in attempt.reply.text
    assert elapsed < bound, f"{case} took {elapsed:.1f}s"
    assert not attempt.ambiguous  # nothing of the message reached the server


def test_replies_each_just_in_time_end_at_the_transaction_deadline(
        raw: Callable[..., RawServer]) -> None:
    server = raw(slow_transaction)
    many = tuple(f"r{i}@hostile.test" for i in range(6))  # 6 x 0.8 s > 2.5 s
    resolver = Resolver(routes={"hostile.test": Route("127.0.0.1", server.port)})
    connector = Connector(Identity("127.0.0.1", HELO), resolver, TlsPolicy("none"), HOSTILE,
                          ReplyLimits(), Metrics(None, "127.0.0.1"))
    conn = connector.open(resolver.destination("hostile.test").hosts[0], "test", routed=True)
    started = time.monotonic()
    results = send_mail(conn, SENDER, many, MESSAGE)
    elapsed = time.monotonic() - started
    assert 2.4 < elapsed < BOUND
    assert {r.reply.code for r in results} == {451}
    assert all("transaction took longer than 2.5s (in RCPT)" in r.reply.text for r in results)
    assert conn.sock is None  # a connection cut off mid-transaction is not pooled again


@pytest.mark.parametrize("behaviour", [stops_reading_after_354, stops_reading_bdat],
                         ids=["data", "bdat"])
def test_server_that_stops_reading_the_message_times_out_unambiguously(
        raw: Callable[..., RawServer], behaviour: Behaviour) -> None:
    server = raw(behaviour, rcvbuf=4096)
    big = b"Subject: big\r\n\r\n" + (b"y" * 998 + b"\r\n") * 16000  # 16 MB: fills any window
    attempts, elapsed = deliver(server.port, big)
    attempt = deferred(attempts)
    assert "timeout after 1s" in attempt.reply.text
    assert not attempt.ambiguous  # the whole message never left: no duplicate risk
    assert elapsed < BOUND


# -- replies where a success code does not mean success (found by the fuzzers) -------------

def test_250_to_data_is_a_protocol_error_not_a_delivery(scripted: Callable[..., ScriptedServer]
                                                        ) -> None:
    """Regression: the recipients were reported delivered, the body never sent."""
    server = scripted([*greet(), mail(), S("250 ok"), rcpt(RCPT), S("250 ok"), C("DATA"),
                       S("250 2.0.0 sure"), WAIT_CLOSE()])
    attempts, _ = deliver(server.port)
    attempt = deferred(attempts)
    assert "250 reply to DATA" in attempt.reply.text and not attempt.ambiguous
    server.wait_finished()
    assert server.messages == []


@pytest.mark.parametrize("chunking", [False, True], ids=["data", "bdat"])
def test_3xx_after_the_message_is_a_protocol_error_not_a_delivery(
        scripted: Callable[..., ScriptedServer], chunking: bool) -> None:
    """Regression: "354" to the final dot (or BDAT LAST) counted as delivered."""
    if chunking:
        script = [*greet("PIPELINING", "CHUNKING"), mail(), rcpt(RCPT), BDAT(last=True),
                  S("250 ok", "250 ok", "354 what?"), WAIT_CLOSE()]
    else:
        script = [*greet(), mail(), S("250 ok"), rcpt(RCPT), S("250 ok"), C("DATA"),
                  S("354 go"), DATA(), S("354 what?"), WAIT_CLOSE()]
    server = scripted(script)
    attempts, _ = deliver(server.port)
    attempt = deferred(attempts)
    assert "354 reply to" in attempt.reply.text
    assert attempt.ambiguous  # the message went out: the server may have it
