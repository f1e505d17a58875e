"""A connection handed to the next message before the reply to the final dot (RFC 2920 3.1).

With PIPELINING and no CHUNKING, a message takes two round trips: MAIL, RCPT and DATA in one
flight, the message and its dot in the next. When another message waits for the connection,
the pool hands it over as soon as the dot is on the wire: the next message's MAIL, RCPT and
DATA go out at once, and the reply to the dot is read before their replies. A busy connection
carries one message per round trip.

The whole engine (its worker is gevent-patched) against scripted servers: a script that
expects the next MAIL right after a message's dot, before it answers that dot, fails on a
client that waits for the answer. Two jobs are pushed together while the only connection
allowed is still being opened (the banner comes 0.5 s late), so the second waits for the
first's connection.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from engine.testing.harness import LocalEngine, final_outcomes
from tests.support.playbook import ehlo_reply
from tests.support.smtpserver import CLOSE, DATA, SLEEP, WAIT_CLOSE, C, S, ScriptedServer, Step

pytestmark = pytest.mark.timeout(60)

Scripted = Callable[..., ScriptedServer]
FIRST, SECOND, THIRD = "one@example.test", "two@example.test", "three@example.test"
# One connection, and no pace (slow start spaces the first messages 50 ms apart: the next
# would not be waiting for the connection when the previous one's dot goes out).
ONE_CONNECTION = {"pool": {"max_connections": 1}, "throttle": {"slow_start": False}}


def greet(*extensions: str, late: float = 0.5) -> list[Step]:
    return [SLEEP(late), S("220 mx.test ESMTP"), C("EHLO *"), ehlo_reply(*extensions)]


def envelope(rcpt: str) -> list[Step]:
    """MAIL, RCPT and DATA, as the engine pipelines them."""
    return [C("MAIL FROM:<*>*"), C(f"RCPT TO:<{rcpt}>*"), C("DATA")]


def handed_on(*then: Step) -> list[Step]:
    """The first message up to its dot, the second's MAIL, RCPT and DATA right behind it,
    then `then` (the server's answer to both, or its end)."""
    return [*greet("PIPELINING"), *envelope(FIRST), S("250 ok", "250 ok", "354 go"), DATA(),
            *envelope(SECOND), *then]


def delivered_alone(rcpt: str) -> list[Step]:
    """A connection of its own carrying one message."""
    return [*greet("PIPELINING", late=0), *envelope(rcpt), S("250 ok", "250 ok", "354 go"),
            DATA(), S("250 2.0.0 queued"), WAIT_CLOSE()]


def stop(engine: LocalEngine, server: ScriptedServer, connections: int = 1) -> None:
    """The engine stops cleanly and the server saw every conversation as scripted."""
    assert engine.stop(timeout=20) == 0
    server.wait_finished(connections)
    assert server.errors == [] and server.connections == connections


def job(number: int, rcpt: str) -> tuple[dict[str, Any], bytes]:
    message = (f"From: <sender@example.org>\r\nTo: <{rcpt}>\r\nSubject: {number}\r\n\r\n"
               f"Message {number}.\r\n").encode()
    return {"id": f"job-{number}", "from": "sender@example.org", "to": [rcpt]}, message


def run(local_engine: Callable[..., LocalEngine], server: ScriptedServer,
        jobs: list[tuple[dict[str, Any], bytes]], finals: int,
        extra: dict[str, Any] | None = None) -> tuple[LocalEngine, list[dict[str, Any]]]:
    engine = local_engine(server.port, extra=extra or ONE_CONNECTION)
    assert engine.push(jobs)
    events = engine.wait_for(lambda evs: len([e for e in evs if e["event"] in (
        "delivered", "bounced", "deferred")]) >= finals, timeout=20)
    return engine, events


def by_job(events: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each job's outcome event (the last one)."""
    return {e["id"]: e for e in events if e["event"] in ("delivered", "bounced", "deferred")}


@pytest.mark.parametrize(("first_reply", "first_event"), [
    ("250 2.0.0 first queued", "delivered"), ("554 5.7.1 first refused", "bounced")])
def test_the_next_envelope_goes_out_before_the_reply_to_the_dot(
        scripted: Scripted, local_engine: Callable[..., LocalEngine], first_reply: str,
        first_event: str) -> None:
    """Each reply reaches its own message: the first's dot is answered in the second's turn.
    A refusal of the first harms nothing: the dot ended its transaction, so no RSET goes out
    before the next MAIL (which is on the wire already)."""
    server = scripted(handed_on(S(first_reply, "250 ok", "250 ok", "354 go"), DATA(),
                                S("250 2.0.0 second queued"), WAIT_CLOSE()))
    engine, events = run(local_engine, server, [job(1, FIRST), job(2, SECOND)], 2)
    outcome = by_job(events)
    assert outcome["job-1"]["event"] == first_event
    assert first_reply[10:] in outcome["job-1"]["reply"]
    assert outcome["job-2"]["event"] == "delivered"
    assert "second queued" in outcome["job-2"]["reply"]
    assert outcome["job-2"]["conn_reused"] is True
    stop(engine, server)
    assert len(server.messages) == 2


def test_a_421_to_the_dot_defers_that_message_and_the_next_goes_on_a_fresh_connection(
        scripted: Scripted, local_engine: Callable[..., LocalEngine]) -> None:
    server = scripted([handed_on(S("421 4.3.2 shutting down"), CLOSE()),
                       delivered_alone(SECOND)])
    # A 421 is a throttle (a shipped rule): the worker would send the first again at its
    # next turn, ahead of the second, which the script does not expect; retry_after keeps
    # it in the spool for a minute instead.
    extra = {**ONE_CONNECTION, "throttle": {"slow_start": False, "retry_after": "1m"}}
    engine, events = run(local_engine, server, [job(1, FIRST), job(2, SECOND)], 2, extra)
    outcome = by_job(events)
    assert outcome["job-1"]["event"] == "deferred"
    assert outcome["job-1"]["code"] == 421
    assert not outcome["job-1"].get("ambiguous")  # the server said no: nothing to duplicate
    # The second never got an answer on the closing connection: sent again, not deferred.
    assert outcome["job-2"]["event"] == "delivered"
    assert outcome["job-2"]["conn_reused"] is False
    stop(engine, server, 2)


def test_a_connection_lost_before_the_reply_to_the_dot_makes_that_message_ambiguous(
        scripted: Scripted, local_engine: Callable[..., LocalEngine]) -> None:
    server = scripted([handed_on(CLOSE()), delivered_alone(SECOND)])
    engine, events = run(local_engine, server, [job(1, FIRST), job(2, SECOND)], 2)
    outcome = by_job(events)
    assert outcome["job-1"]["event"] == "deferred"
    assert outcome["job-1"]["ambiguous"] is True  # the server may have it
    assert outcome["job-2"]["event"] == "delivered"
    stop(engine, server, 2)


def test_a_connections_last_message_reads_its_own_reply_then_quits(
        scripted: Scripted, local_engine: Callable[..., LocalEngine]) -> None:
    """`max_messages` 2: the first message hands the connection on, the second (its last)
    does not; the third waits for a new connection."""
    first = [*greet("PIPELINING"), *envelope("*"), S("250 ok", "250 ok", "354 go"), DATA(),
             *envelope("*"), S("250 2.0.0 queued", "250 ok", "250 ok", "354 go"), DATA(),
             S("250 2.0.0 queued"), C("QUIT"), S("221 2.0.0 bye"), WAIT_CLOSE()]
    server = scripted([first, delivered_alone("*")])
    extra = {"pool": {"max_connections": 1, "max_messages": 2}}
    engine, events = run(local_engine, server,
                         [job(1, FIRST), job(2, SECOND), job(3, THIRD)], 3, extra)
    assert {e["event"] for e in final_outcomes(events).values()} == {"delivered"}
    assert len(final_outcomes(events)) == 3
    stop(engine, server, 2)


def test_a_message_refused_before_sending_reads_the_reply_it_was_handed(
        scripted: Scripted, local_engine: Callable[..., LocalEngine]) -> None:
    """The second message needs SMTPUTF8, which the server lacks: refused before MAIL.
    It still reads the first message's reply, which it was handed the connection with."""
    server = scripted([*greet("PIPELINING"), *envelope(FIRST), S("250 ok", "250 ok", "354 go"),
                       DATA(), S("250 2.0.0 first queued"), WAIT_CLOSE()])
    engine, events = run(local_engine, server, [job(1, FIRST), job(2, "zoë@example.test")], 2)
    outcome = by_job(events)
    assert outcome["job-1"]["event"] == "delivered"
    assert "first queued" in outcome["job-1"]["reply"]
    assert outcome["job-2"]["event"] == "bounced"
    assert outcome["job-2"]["enhanced"] == "5.6.7"
    stop(engine, server)
