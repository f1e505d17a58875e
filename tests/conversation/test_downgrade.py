"""engine.downgrade on the wire, against a scripted server on loopback: converted bytes
without 8BITMIME (SIZE, DATA and BDAT of the converted bytes), the original with
BODY=8BITMIME, and a refusal (554 5.6.3) before any MAIL. The converter itself is
tests/unit/test_downgrade.py.
"""
from __future__ import annotations

import pytest

from engine.smtp import send_mail
from tests.support.mime import CONVERTED, MESSAGE_8BIT, leaves
from tests.support.playbook import (
    HELO,
    MODES,
    RCPTS,
    SENDER,
    Connect,
    Scripted,
    greet,
    outcome,
    rcpt,
    sent_upper,
)
from tests.support.smtpserver import BDAT, DATA, WAIT_CLOSE, C, S


def one_message(extensions: tuple[str, ...], mail_cmd: str) -> list:
    """Banner, EHLO with `extensions`, one delivered transaction whose MAIL is `mail_cmd`."""
    if "CHUNKING" in extensions and "PIPELINING" in extensions:
        return [*greet(*extensions), C(mail_cmd), rcpt(RCPTS[0]), BDAT(last=True),
                S("250 ok", "250 ok", "250 queued")]
    if "PIPELINING" in extensions:
        return [*greet(*extensions), C(mail_cmd), rcpt(RCPTS[0]), C("DATA"),
                S("250 ok", "250 ok", "354 go"), DATA(), S("250 queued")]
    return [*greet(*extensions), C(mail_cmd), S("250 ok"), rcpt(RCPTS[0]), S("250 ok"),
            C("DATA"), S("354 go"), DATA(), S("250 queued")]


@pytest.mark.parametrize("mode", MODES)
def test_8bit_message_to_server_without_8bitmime_arrives_7bit(scripted: Scripted,
                                                              mode: str, connect: Connect) -> None:
    extensions = ("SIZE 10485760", *MODES[mode])
    server = scripted(one_message(extensions, f"MAIL FROM:<{SENDER}> SIZE={len(CONVERTED)}"))
    conn = connect(server)
    results = send_mail(conn, SENDER, RCPTS[:1], MESSAGE_8BIT, eightbit=True)
    assert outcome(results) == [(RCPTS[0], 250, None, False)]
    server.wait_finished()
    assert server.errors == []
    assert server.messages == [CONVERTED]  # DATA dot-stuffed (and unstuffed) or BDAT n
    assert server.messages[0].isascii()
    assert leaves(server.messages[0]) == leaves(MESSAGE_8BIT)


@pytest.mark.parametrize("mode", MODES)
def test_8bit_message_to_server_with_8bitmime_arrives_unchanged(
        scripted: Scripted, mode: str, connect: Connect) -> None:
    extensions = ("SIZE 10485760", "8BITMIME", *MODES[mode])
    server = scripted(one_message(extensions,
                                  f"MAIL FROM:<{SENDER}> SIZE={len(MESSAGE_8BIT)} BODY=8BITMIME"))
    conn = connect(server)
    results = send_mail(conn, SENDER, RCPTS[:1], MESSAGE_8BIT, eightbit=True)
    assert outcome(results) == [(RCPTS[0], 250, None, False)]
    server.wait_finished()
    assert server.errors == []
    assert server.messages == [MESSAGE_8BIT]


def test_unconvertible_message_bounces_5_6_3_without_mail(
        scripted: Scripted, connect: Connect) -> None:
    server = scripted([*greet("PIPELINING", "CHUNKING", "SIZE 1000"), WAIT_CLOSE()])
    conn = connect(server)
    message = b"Subject: Gr\xc3\xbc\xc3\x9fe\r\n\r\nhello\r\n"
    results = send_mail(conn, SENDER, RCPTS[:2], message, eightbit=True)
    assert outcome(results) == [(r, 554, "5.6.3", False) for r in RCPTS[:2]]
    assert results[0].reply.permanent
    assert "8BITMIME" in results[0].reply.text and "Subject header" in results[0].reply.text
    assert conn.sock is not None  # the connection is fine; only this message can't go here
    conn.close()
    server.wait_finished()
    assert sent_upper(server) == [f"EHLO {HELO}".upper()]  # not even MAIL


def test_smtputf8_message_is_not_converted(scripted: Scripted, connect: Connect) -> None:
    """SMTPUTF8 is its own case: a server without it refuses the message 5.6.7, as before."""
    server = scripted([*greet("PIPELINING"), WAIT_CLOSE()])
    conn = connect(server)
    results = send_mail(conn, SENDER, ("jos\u00e9@example.test",), MESSAGE_8BIT,
                                smtputf8=True, eightbit=True)
    assert outcome(results) == [("jos\u00e9@example.test", 553, "5.6.7", False)]
    conn.close()
    server.wait_finished()
    assert sent_upper(server) == [f"EHLO {HELO}".upper()]
