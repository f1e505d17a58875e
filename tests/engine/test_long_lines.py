"""Lines over 998 octets in the whole engine (issue #14, RFC 5322 2.1.1): refused at intake with
a `rejected` event naming the line, or, under `limits.long_lines: encode`, re-encoded and
delivered to a real SMTP sink with every line within the limit and the same content.
"""
from __future__ import annotations

import binascii
from collections.abc import Callable
from typing import Any

import pytest

from engine.testing.harness import LocalEngine, final_outcomes
from engine.testing.sink import SinkServer

SENDER, RCPT = "s@example.test", "r@example.test"
LONG_BODY = b"intro\r\n" + b"x" * 1204 + b"\r\nbye\r\n"
MESSAGE = b"From: s@example.test\r\nSubject: long\r\n\r\n" + LONG_BODY  # the long one: line 5


def _job(job_id: str) -> tuple[dict[str, Any], bytes]:
    return {"id": job_id, "from": SENDER, "to": [RCPT]}, MESSAGE


@pytest.mark.timeout(90)
def test_a_long_line_is_rejected_naming_it(plain_sink: SinkServer,
                                           local_engine: Callable[..., LocalEngine]) -> None:
    engine = local_engine(plain_sink.port)
    assert not engine.push([_job("long")], timeout=20)
    (event,) = [e for e in engine.events() if e["id"] == "long"]
    assert event["event"] == "rejected"
    assert event["error"] == ("line 5 is 1204 octets long, over RFC 5322's 998 (set"
                              " limits.long_lines: encode to convert)")
    assert plain_sink.messages == []


@pytest.mark.timeout(90)
def test_with_encode_it_is_delivered_in_lines_within_the_limit(
        plain_sink: SinkServer, local_engine: Callable[..., LocalEngine]) -> None:
    engine = local_engine(plain_sink.port, extra={"limits": {"long_lines": "encode"}})
    assert engine.push([_job("encoded")])
    finals = final_outcomes(engine.wait_final(1))
    assert finals[("encoded", RCPT)]["event"] == "delivered"
    (received,) = plain_sink.messages
    assert max(map(len, received.content.split(b"\r\n"))) <= 998
    head, _, body = received.content.partition(b"\r\n\r\n")
    assert b"Content-Transfer-Encoding: quoted-printable" in head.split(b"\r\n")
    assert binascii.a2b_qp(body) == LONG_BODY
