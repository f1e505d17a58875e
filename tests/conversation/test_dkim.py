"""The signing hook of engine.smtp.send_mail on the wire, against a scripted server on loopback:
the hook gets the bytes that go out (converted to 7-bit for a server without 8BITMIME) and
SIZE and BDAT count the signed message; a message that cannot be signed defers 451 4.3.5
before MAIL. engine/dkim.py's signatures themselves: tests/unit/test_dkim.py."""
from __future__ import annotations

import pytest

from engine.dkim import signing_refused
from engine.smtp import send_mail
from tests.support.mime import CONVERTED, MESSAGE_8BIT
from tests.support.playbook import (
    HELO,
    RCPTS,
    SENDER,
    Connect,
    Scripted,
    greet,
    outcome,
    rcpt,
    sent_upper,
)
from tests.support.smtpserver import BDAT, WAIT_CLOSE, C, S

SIGNATURE = b"DKIM-Signature: v=1; (a stand-in for engine.dkim's)\r\n"


@pytest.mark.parametrize("eightbitmime", [True, False], ids=["8bitmime", "converted"])
def test_the_hook_signs_what_goes_out_after_the_conversion(
        scripted: Scripted, connect: Connect, eightbitmime: bool) -> None:
    sent = MESSAGE_8BIT if eightbitmime else CONVERTED
    body = " BODY=8BITMIME" if eightbitmime else ""
    extensions = ("SIZE 10485760", "PIPELINING", "CHUNKING", *(("8BITMIME",) * eightbitmime))
    server = scripted([*greet(*extensions),
                       C(f"MAIL FROM:<{SENDER}> SIZE={len(SIGNATURE + sent)}{body}"),
                       rcpt(RCPTS[0]), BDAT(last=True), S("250 ok", "250 ok", "250 queued")])
    seen: list[tuple[bytes, bool]] = []

    def sign(message: bytes, converted: bool) -> bytes:
        seen.append((message, converted))
        return SIGNATURE + message

    results = send_mail(connect(server), SENDER, RCPTS[:1], MESSAGE_8BIT, eightbit=True,
                        sign=sign)
    assert outcome(results) == [(RCPTS[0], 250, None, False)]
    assert seen == [(sent, not eightbitmime)]
    server.wait_finished()
    assert server.errors == []
    assert server.messages == [SIGNATURE + sent]


def test_a_message_that_cannot_be_signed_defers_before_mail(
        scripted: Scripted, connect: Connect) -> None:
    server = scripted([*greet("PIPELINING", "CHUNKING", "8BITMIME"), WAIT_CLOSE()])
    conn = connect(server)

    def sign(message: bytes, converted: bool) -> bytes:
        raise signing_refused("no DKIM key of example.org is valid on 2026-12-07")

    results = send_mail(conn, SENDER, RCPTS[:2], MESSAGE_8BIT, eightbit=True, sign=sign)
    assert outcome(results) == [(r, 451, "4.3.5", False) for r in RCPTS[:2]]
    assert "DKIM signing failed" in results[0].reply.text
    assert conn.sock is not None  # the connection is fine: only this message can't go now
    conn.close()
    server.wait_finished()
    assert sent_upper(server) == [f"EHLO {HELO}".upper()]  # not even MAIL
