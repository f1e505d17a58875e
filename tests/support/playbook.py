"""The client's side of the playbook tests (tests/support/smtpserver.py plays the server's):
who the client is, the timeouts, the greetings and transactions scripts are built from, and
a Connection opened past banner and EHLO.

Each playbook says what the remote says (`S`), what the client must send (`C`), what happens
on the wire (`DATA`, `BDAT`, `CLOSE`, ...). A client line that does not match the script is
a recorded server error, so `server.errors == []` asserts the client's half of the
conversation; the result asserts how the engine judged the server's half.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import fields

from engine.config import Timeouts
from engine.smtp import Connection, RcptResult, ReplyLimits
from tests.support.smtpserver import BDAT, DATA, C, S, ScriptedServer, Step

Scripted = Callable[..., ScriptedServer]  # the `scripted` fixture: starts a ScriptedServer
Connect = Callable[..., Connection]  # the `connect` fixture: open_connection, closed after

CLIENT_IP = "127.0.0.1"
HELO = "client.test"
SENDER = "sender@example.org"
MESSAGE = b"From: sender@example.org\r\nTo: rcpt@example.test\r\nSubject: hi\r\n\r\nHello.\r\n"
FAST = Timeouts(**{f.name: 2.0 for f in fields(Timeouts)})

# The three ways a transaction goes out, by the extensions that choose them.
MODES: dict[str, tuple[str, ...]] = {
    "lockstep": (),
    "pipelining+data": ("PIPELINING",),
    "pipelining+bdat": ("PIPELINING", "CHUNKING"),
}

# The modes whose message leaves only after the server's first reply (MAIL's, or DATA's 354):
# a reused connection lost before that reply was stale, whatever the server had read. With
# PIPELINING and CHUNKING the whole message leaves with MAIL, and such a loss is ambiguous.
MESSAGE_AFTER_A_REPLY = ("lockstep", "pipelining+data")

RCPTS = ("ok@example.test", "bad@example.test", "later@example.test")
RCPT_REPLIES = ("250 2.1.5 ok", "550 5.1.1 no such user", "451 4.3.0 try later")


def ehlo_reply(*extensions: str) -> S:
    lines = ["mx.test", *extensions]
    return S(*(f"250-{line}" for line in lines[:-1]), f"250 {lines[-1]}")


def greet(*extensions: str) -> list[Step]:
    """Banner and EHLO, offering `extensions`."""
    return [S("220 mx.test ESMTP"), C(f"EHLO {HELO}"), ehlo_reply(*extensions)]


def mail(sender: str = SENDER) -> C:
    return C(f"MAIL FROM:<{sender}>")


def rcpt(address: str) -> C:
    return C(f"RCPT TO:<{address}>")


def open_connection(server: ScriptedServer, timeouts: Timeouts = FAST,
                    limits: ReplyLimits | None = None) -> Connection:
    """A Connection past banner and EHLO (the `connect` fixture closes it after the test)."""
    conn = Connection(HELO, CLIENT_IP, timeouts, limits or ReplyLimits())
    banner = conn.open(server.host, server.port)
    assert banner.code == 220
    assert conn.hello().code == 250
    return conn


def outcome(results: Sequence[RcptResult]) -> list[tuple[str, int, str | None, bool]]:
    return [(r.rcpt, r.reply.code, r.reply.enhanced, r.ambiguous) for r in results]


def sent_upper(server: ScriptedServer, index: int = 0) -> list[str]:
    return [line.upper() for line in server.client_lines(index)]


def partial_refusal_script(mode: str) -> list[Step]:
    """One message to RCPTS: the first accepted, the second refused, the third deferred."""
    ok, bad, later = (rcpt(r) for r in RCPTS)
    if mode == "lockstep":
        return [*greet(), mail(), S("250 2.1.0 ok"), ok, S(RCPT_REPLIES[0]), bad,
                S(RCPT_REPLIES[1]), later, S(RCPT_REPLIES[2]), C("DATA"), S("354 go on"),
                DATA(), S("250 2.0.0 queued")]
    if mode == "pipelining+data":
        # the server reads every command before it answers: they came in one flight
        return [*greet(*MODES[mode]), mail(), ok, bad, later, C("DATA"),
                S("250 2.1.0 ok", *RCPT_REPLIES, "354 go on"), DATA(), S("250 2.0.0 queued")]
    return [*greet(*MODES[mode]), mail(), ok, bad, later, BDAT(last=True),
            S("250 2.1.0 ok", *RCPT_REPLIES, "250 2.0.0 queued")]


def delivered_once(*extensions: str) -> list[Step]:
    """One message delivered on the connection, in whatever mode `extensions` choose."""
    if "CHUNKING" in extensions and "PIPELINING" in extensions:
        return [mail(), rcpt(RCPTS[0]), BDAT(last=True), S("250 ok", "250 ok", "250 queued")]
    if "PIPELINING" in extensions:
        return [mail(), rcpt(RCPTS[0]), C("DATA"), S("250 ok", "250 ok", "354 go"), DATA(),
                S("250 queued")]
    return [mail(), S("250 ok"), rcpt(RCPTS[0]), S("250 ok"), C("DATA"), S("354 go"), DATA(),
            S("250 queued")]


def first_flight(mode: str) -> list[Step]:
    """What the client sends of a transaction before it waits for a reply."""
    if mode == "lockstep":
        return [mail()]
    if mode == "pipelining+data":
        return [mail(), rcpt(RCPTS[0]), C("DATA")]
    return [mail(), rcpt(RCPTS[0]), BDAT(last=True)]
