"""SIGTERM while transactions wait for their replies (issue #14: every duplicate is avoided
or counted).

The final dot's timeout (10 minutes by default) is longer than the drain: on SIGTERM the
worker waits for the replies owed up to its drain deadline, then stops what is left. A
transaction whose end of message was written by then may have been taken by the server:
its recipient is reported deferred and ambiguous before the worker exits, so the spool
counts the attempt and the event says the retry may be a duplicate. A transaction whose
message never left is not reported at all: it stays pending, and no attempt is counted.

The whole engine (gevent-patched worker, supervisor, spool, events log) against a playbook
server that never answers, then, after a restart, against a recording sink.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from engine.testing.harness import LocalEngine, final_outcomes
from engine.testing.sink import SinkServer
from tests.support.playbook import ehlo_reply
from tests.support.smtpserver import BDAT, DATA, SLEEP, WAIT_CLOSE, C, S, ScriptedServer, Step
from tests.support.wait import until

pytestmark = pytest.mark.timeout(90)

Scripted = Callable[..., ScriptedServer]
SENT, UNSENT = "sent@example.test", "unsent@example.test"
DRAIN = 2.0  # s, the supervisor's; the worker's own drain deadline comes a second earlier
SETTINGS = {"drain_timeout": f"{DRAIN:g}s", "pool": {"max_connections": 2},
            "throttle": {"slow_start": False}, "retry": {"schedule": ["1s"]}}


def silent_after(extensions: tuple[str, ...], then: list[Step]) -> list[Step]:
    """A connection that reads a MAIL and a RCPT, plays `then`, and says nothing more."""
    return [S("220 mx.test ESMTP"), C("EHLO *"), ehlo_reply(*extensions),
            C("MAIL FROM:<*>*"), C("RCPT TO:<*>*"), *then, WAIT_CLOSE()]


def job(number: int, rcpt: str) -> tuple[dict[str, Any], bytes]:
    message = (f"From: <sender@example.org>\r\nTo: <{rcpt}>\r\nSubject: {number}\r\n\r\n"
               f"Message {number}.\r\n").encode()
    return {"id": f"job-{number}", "from": "sender@example.org", "to": [rcpt]}, message


def attempts_of(events: list[dict[str, Any]], job_id: str) -> list[dict[str, Any]]:
    return [e for e in events if e["id"] == job_id and e["event"] != "queued"]


def stop_and_check(engine: LocalEngine, server: ScriptedServer) -> None:
    """SIGTERM: the engine stops at the drain deadline, not the final dot's, and says that
    the first job's message may have been delivered, and nothing of the second's."""
    stopping = time.monotonic()
    assert engine.stop(timeout=DRAIN + 15) == 0
    assert time.monotonic() - stopping < DRAIN + 5
    events = engine.events()
    (lost,) = attempts_of(events, "job-1")
    assert (lost["event"], lost["code"], lost["attempt"]) == ("deferred", 451, 1)
    assert lost.get("ambiguous") is True and "engine stopping" in lost["reply"]
    assert attempts_of(events, "job-2") == []  # never sent: nothing reported, nothing counted
    assert server.errors == [] and len(server.messages) == 1


def restart_and_check(engine: LocalEngine, sink: SinkServer) -> None:
    """Restarted towards a sink that answers: each job is delivered once more, the first
    as its second attempt (the ambiguous one counted), the second as its first."""
    engine.config["smtp"]["port"] = sink.port
    engine.write_config()
    engine.start()
    finals = final_outcomes(engine.wait_final(2, timeout=30))
    assert finals[("job-1", SENT)]["attempt"] == 2
    assert finals[("job-2", UNSENT)]["attempt"] == 1
    assert {e["event"] for e in finals.values()} == {"delivered"}
    assert sorted(m.rcpt_tos for m in sink.wait_for(2)) == [(SENT,), (UNSENT,)]


def test_sigterm_reports_a_sent_message_without_its_final_reply_ambiguous_and_the_unsent_not(
        scripted: Scripted, plain_sink: SinkServer,
        local_engine: Callable[..., LocalEngine]) -> None:
    # The first job's whole message leaves with its MAIL (BDAT LAST); the second's DATA is
    # never answered, so its message never leaves. Neither gets a reply.
    server = scripted([silent_after(("PIPELINING", "CHUNKING"), [BDAT(last=True)]),
                       silent_after(("PIPELINING",), [C("DATA")])])
    engine = local_engine(server.port, extra=SETTINGS)
    assert engine.push([job(1, SENT)])
    until(lambda: server.messages, 20, "the first message at the server")
    assert engine.push([job(2, UNSENT)])  # the first connection is busy: a second one
    until(lambda: server.connections == 2 and "DATA" in server.client_lines(1), 20,
          "the second transaction's DATA at the server")
    stop_and_check(engine, server)
    server.wait_finished(2)
    restart_and_check(engine, plain_sink)


def test_sigterm_reports_a_message_handed_on_before_its_final_reply_ambiguous(
        scripted: Scripted, plain_sink: SinkServer,
        local_engine: Callable[..., LocalEngine]) -> None:
    """PIPELINING without CHUNKING, one connection: the first message's dot leads the
    second's MAIL, RCPT and DATA in one write (engine.smtp.handover), and the second
    message's holder reads the first's final reply, which never comes. The server got the
    first message, never the second (no 354). The banner comes late, so that both jobs wait
    for the one connection."""
    first_answered = [C("DATA"), S("250 ok", "250 ok", "354 go"), DATA()]
    server = scripted([SLEEP(0.5), *silent_after(("PIPELINING",), [
        *first_answered, C("MAIL FROM:<*>*"), C("RCPT TO:<*>*"), C("DATA")])])
    engine = local_engine(server.port, extra={**SETTINGS, "pool": {"max_connections": 1}})
    assert engine.push([job(1, SENT), job(2, UNSENT)])
    until(lambda: server.connections and server.client_lines().count("DATA") == 2, 20,
          "the second transaction's DATA at the server")
    stop_and_check(engine, server)
    server.wait_finished(1)
    restart_and_check(engine, plain_sink)
