"""engine.smtp conversations against a scripted server on loopback (Haraka-style playbooks).

Each test is a playbook: what the remote says (`S`), what the client must send (`C`), what
happens on the wire (`DATA`, `BDAT`, `CLOSE`, ...). A client line that does not match the
script is a recorded server error, so `server.errors == []` asserts the client's half of the
conversation; the result asserts how the engine judged the server's half.

The client's side of the playbooks (timeouts, greetings, `connect`) is tests/support/playbook.py.
"""
from __future__ import annotations

import gc
import select
import smtplib
import time
import weakref
from collections.abc import Callable
from dataclasses import fields

import pytest

from engine.config import Timeouts
from engine.reply import Blame, DeliveryError, TransientError
from engine.smtp import (
    Connection,
    ReplyLimits,
    StaleConnection,
    TlsError,
    dot_stuff,
    send_mail,
)
from engine.tls import TlsPolicy
from tests.support.playbook import (
    CLIENT_IP,
    FAST,
    HELO,
    MESSAGE,
    MESSAGE_AFTER_A_REPLY,
    MODES,
    RCPT_REPLIES,
    RCPTS,
    SENDER,
    Connect,
    Scripted,
    delivered_once,
    first_flight,
    greet,
    mail,
    open_connection,
    outcome,
    partial_refusal_script,
    rcpt,
    sent_upper,
)
from tests.support.smtpserver import BDAT, CLOSE, DATA, INJECT, WAIT_CLOSE, C, S, Step

# -- per-recipient outcomes in each transaction mode ---------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_some_recipients_refused_gives_per_recipient_results(scripted: Scripted,
                                                             mode: str, connect: Connect) -> None:
    server = scripted(partial_refusal_script(mode))
    conn = connect(server)
    results = send_mail(conn, SENDER, RCPTS, MESSAGE)
    assert outcome(results) == [
        ("ok@example.test", 250, "2.0.0", False),  # the final reply is the accepted one's
        ("bad@example.test", 550, "5.1.1", False),
        ("later@example.test", 451, "4.3.0", False),
    ]
    assert server.messages == [MESSAGE]
    assert conn.sock is not None and conn.messages_sent == 1  # ready for the next message
    conn.close()
    server.wait_finished()
    assert server.errors == []


def test_bdat_goes_out_with_mail_and_rcpt_in_one_flight(
        scripted: Scripted, connect: Connect) -> None:
    server = scripted(partial_refusal_script("pipelining+bdat"))
    conn = connect(server)
    send_mail(conn, SENDER, RCPTS, MESSAGE)
    conn.close()
    server.wait_finished()
    lines = server.transcript()
    first_reply = next(i for i, (who, line) in enumerate(lines) if line.startswith("250 2.1.0"))
    before = [line for who, line in lines[:first_reply] if who in "C*"][1:]  # after EHLO
    assert [line.split(":")[0].upper() for line in before] == [
        "MAIL FROM", "RCPT TO", "RCPT TO", "RCPT TO", f"BDAT {len(MESSAGE)} LAST",
        f"BDAT {len(MESSAGE)} BYTES"]


def mail_refused_script(mode: str) -> list[Step]:
    refused = "550 5.7.1 sender refused"
    if mode == "lockstep":
        return [*greet(), mail(), S(refused), C("RSET"), S("250 2.0.0 ok")]
    ok, later = rcpt(RCPTS[0]), rcpt(RCPTS[2])
    if mode == "pipelining+data":
        return [*greet(*MODES[mode]), mail(), ok, later, C("DATA"),
                S(refused, "503 5.5.1 need MAIL", "503 5.5.1 need MAIL", "503 5.5.1 no rcpt"),
                C("RSET"), S("250 2.0.0 ok")]
    return [*greet(*MODES[mode]), mail(), ok, later, BDAT(last=True),
            S(refused, "503 5.5.1 need MAIL", "503 5.5.1 need MAIL", "503 5.5.1 no rcpt"),
            C("RSET"), S("250 2.0.0 ok")]


@pytest.mark.parametrize("mode", MODES)
def test_mail_refused_refuses_every_recipient_then_rset(
        scripted: Scripted, mode: str, connect: Connect) -> None:
    server = scripted(mail_refused_script(mode))
    conn = connect(server)
    results = send_mail(conn, SENDER, (RCPTS[0], RCPTS[2]), MESSAGE)
    assert outcome(results) == [(RCPTS[0], 550, "5.7.1", False), (RCPTS[2], 550, "5.7.1", False)]
    assert conn.sock is not None  # RSET worked: still usable
    conn.close()
    server.wait_finished()
    assert server.errors == []


def all_refused_script(mode: str) -> list[Step]:
    bad, later = rcpt(RCPTS[1]), rcpt(RCPTS[2])
    if mode == "lockstep":  # no DATA at all when nobody is left
        return [*greet(), mail(), S("250 2.1.0 ok"), bad, S(RCPT_REPLIES[1]), later,
                S(RCPT_REPLIES[2]), C("RSET"), S("250 2.0.0 ok")]
    if mode == "pipelining+data":
        return [*greet(*MODES[mode]), mail(), bad, later, C("DATA"),
                S("250 2.1.0 ok", *RCPT_REPLIES[1:], "554 5.5.1 no valid recipients"),
                C("RSET"), S("250 2.0.0 ok")]
    return [*greet(*MODES[mode]), mail(), bad, later, BDAT(last=True),
            S("250 2.1.0 ok", *RCPT_REPLIES[1:], "503 5.5.1 no valid recipients"),
            C("RSET"), S("250 2.0.0 ok")]


@pytest.mark.parametrize("mode", MODES)
def test_all_recipients_refused_keeps_each_refusal_then_rset(scripted: Scripted,
                                                             mode: str, connect: Connect) -> None:
    server = scripted(all_refused_script(mode))
    conn = connect(server)
    results = send_mail(conn, SENDER, RCPTS[1:], MESSAGE)
    assert outcome(results) == [(RCPTS[1], 550, "5.1.1", False), (RCPTS[2], 451, "4.3.0", False)]
    assert conn.sock is not None
    conn.close()
    server.wait_finished()
    assert server.errors == []
    if mode != "pipelining+bdat":  # (a BDAT chunk is on the wire before the RCPT replies)
        assert server.messages == []


def test_354_after_every_recipient_was_refused_gets_a_lone_dot_not_the_body(
        scripted: Scripted, connect: Connect) -> None:
    """RFC 2920 3.1: a (broken) server that accepts DATA with no valid recipient must not
    be sent the message."""
    server = scripted([*greet("PIPELINING"), mail(), rcpt(RCPTS[1]), C("DATA"),
                       S("250 ok"), S("550 5.1.1 no such user"), S("354 go on"),
                       DATA(), S("554 5.5.1 no valid recipients"), C("RSET"), S("250 ok")])
    conn = connect(server)
    results = send_mail(conn, SENDER, RCPTS[1:2], MESSAGE)
    assert outcome(results) == [(RCPTS[1], 550, "5.1.1", False)]
    server.wait_finished()
    assert server.errors == []
    assert server.messages == [b""]  # an empty message: the body never left


# -- connection lost in the middle ---------------------------------------------------------

def test_drop_after_final_dot_is_deferred_and_ambiguous(
        scripted: Scripted, connect: Connect) -> None:
    server = scripted([*greet(), mail(), S("250 ok"), rcpt(RCPTS[0]), S("250 ok"), C("DATA"),
                       S("354 go on"), DATA(), CLOSE()])
    conn = connect(server)
    results = send_mail(conn, SENDER, RCPTS[:1], MESSAGE)
    assert outcome(results) == [(RCPTS[0], 451, "4.4.2", True)]
    assert "may have been delivered" in results[0].reply.text
    assert server.messages == [MESSAGE]
    assert conn.sock is None


@pytest.mark.parametrize("replies", [(), ("250 2.1.0 ok", "250 2.1.5 ok")],
                         ids=["no-reply-at-all", "envelope-answered"])
def test_drop_after_bdat_last_is_deferred_and_ambiguous(
        scripted: Scripted, replies: tuple[str, ...], connect: Connect) -> None:
    answers = [S(*replies)] if replies else []
    server = scripted([*greet("PIPELINING", "CHUNKING"), mail(), rcpt(RCPTS[0]),
                       BDAT(last=True), *answers, CLOSE()])
    conn = connect(server)
    results = send_mail(conn, SENDER, RCPTS[:1], MESSAGE)
    assert outcome(results) == [(RCPTS[0], 451, "4.4.2", True)]
    assert server.messages == [MESSAGE]
    assert conn.sock is None


def test_drop_before_data_is_deferred_not_ambiguous(scripted: Scripted, connect: Connect) -> None:
    server = scripted([*greet("PIPELINING"), mail(), rcpt(RCPTS[0]), C("DATA"),
                       S("250 ok", "250 ok"), CLOSE()])
    conn = connect(server)
    results = send_mail(conn, SENDER, RCPTS[:1], MESSAGE)
    assert outcome(results) == [(RCPTS[0], 451, "4.4.2", False)]
    assert conn.sock is None


@pytest.mark.parametrize("mode", MESSAGE_AFTER_A_REPLY)
def test_reused_connection_closed_before_any_reply_is_stale(scripted: Scripted,
                                                            mode: str, connect: Connect) -> None:
    # The server reads the next MAIL, then hangs up without a word: the race where the idle
    # connection passed its check and died just after. The message never left: stale.
    server = scripted([*greet(*MODES[mode]), *delivered_once(*MODES[mode]), mail(), CLOSE()])
    conn = connect(server)
    assert outcome(send_mail(conn, SENDER, RCPTS[:1], MESSAGE))[0][1] == 250
    with pytest.raises(StaleConnection) as caught:
        send_mail(conn, SENDER, RCPTS[:1], MESSAGE)
    assert caught.value.blame is Blame.CONNECTION
    assert conn.sock is None
    assert server.messages == [MESSAGE]


def test_reused_connection_closed_after_the_whole_bdat_flight_is_ambiguous_not_stale(
        scripted: Scripted, connect: Connect) -> None:
    """Issue #14: with PIPELINING and CHUNKING, MAIL, RCPT and BDAT LAST with the message
    leave in one write; a server that takes it all and dies before its first reply may have
    the message. Sent again at once as "stale", it was a duplicate nobody counted."""
    extensions = MODES["pipelining+bdat"]
    server = scripted([*greet(*extensions), *delivered_once(*extensions), mail(),
                       rcpt(RCPTS[0]), BDAT(last=True), CLOSE()])
    conn = connect(server)
    assert outcome(send_mail(conn, SENDER, RCPTS[:1], MESSAGE))[0][1] == 250
    results = send_mail(conn, SENDER, RCPTS[:1], MESSAGE)  # no StaleConnection raised
    assert outcome(results) == [(RCPTS[0], 451, "4.4.2", True)]
    assert "may have been delivered" in results[0].reply.text
    assert server.messages == [MESSAGE, MESSAGE]  # the server did take it
    assert conn.sock is None


@pytest.mark.parametrize("mode", MODES)
def test_reused_connection_answering_421_to_mail_is_stale(scripted: Scripted,
                                                          mode: str, connect: Connect) -> None:
    # The server's idle-timeout 421 crossed our MAIL on the wire: not a reply to this message.
    server = scripted([*greet(*MODES[mode]), *delivered_once(*MODES[mode]), *first_flight(mode),
                       S("421 4.4.2 idle timeout, closing"), WAIT_CLOSE()])
    conn = connect(server)
    assert outcome(send_mail(conn, SENDER, RCPTS[:1], MESSAGE))[0][1] == 250
    with pytest.raises(StaleConnection) as caught:
        send_mail(conn, SENDER, RCPTS[:1], MESSAGE)
    assert caught.value.reply.code == 421
    assert conn.sock is None


def test_new_connection_answering_421_to_mail_defers(scripted: Scripted, connect: Connect) -> None:
    server = scripted([*greet(), mail(), S("421 4.3.2 too many connections"), WAIT_CLOSE()])
    conn = connect(server)
    results = send_mail(conn, SENDER, RCPTS[:1], MESSAGE)
    assert outcome(results) == [(RCPTS[0], 421, "4.3.2", False)]


def test_new_connection_closed_before_any_reply_is_a_result_not_stale(
        scripted: Scripted, connect: Connect) -> None:
    server = scripted([*greet(), mail(), CLOSE()])
    conn = connect(server)
    results = send_mail(conn, SENDER, RCPTS[:1], MESSAGE)  # no StaleConnection raised
    assert outcome(results) == [(RCPTS[0], 451, "4.4.2", False)]


def test_is_alive_sees_a_close_or_a_421_while_idle(scripted: Scripted, connect: Connect) -> None:
    server = scripted([[*greet(), WAIT_CLOSE()],
                       [*greet(), CLOSE()],
                       [*greet(), S("421 4.4.2 idle too long"), WAIT_CLOSE()]])
    healthy, closed, told_off = (connect(server) for _ in range(3))
    server.wait_finished(1)  # the one the server closed
    for conn in (closed, told_off):  # until the close and the 421 are in the client's socket
        assert select.select([conn.sock], [], [], 2)[0]
    assert healthy.is_alive()
    assert not closed.is_alive()
    assert not told_off.is_alive()
    for conn in (healthy, closed, told_off):
        conn.close()


# -- what goes on the wire ------------------------------------------------------------------

DOTTY = b".first line starts with a dot\r\nthen\r\n.\r\n..two dots\r\n.\r\nend\r\n"


def test_dot_stuffing_on_the_wire(scripted: Scripted, connect: Connect) -> None:
    # Unstuffed, the lone "." would end the message early and the server's un-stuffing would
    # eat the leading dots: only a correctly stuffed body arrives intact.
    server = scripted([*greet(), *delivered_once()])
    conn = connect(server)
    results = send_mail(conn, SENDER, RCPTS[:1], DOTTY)
    assert outcome(results) == [(RCPTS[0], 250, None, False)]
    assert server.messages == [DOTTY]
    assert dot_stuff(DOTTY) == (b"..first line starts with a dot\r\nthen\r\n..\r\n...two dots\r\n"
                                b"..\r\nend\r\n")


def test_bdat_sends_the_message_unstuffed(scripted: Scripted, connect: Connect) -> None:
    server = scripted([*greet("PIPELINING", "CHUNKING"), *delivered_once("PIPELINING",
                                                                        "CHUNKING")])
    conn = connect(server)
    assert outcome(send_mail(conn, SENDER, RCPTS[:1], DOTTY))[0][1] == 250
    assert server.messages == [DOTTY]
    server.wait_finished()
    assert f"BDAT {len(DOTTY)} LAST" in server.client_lines()


def test_smtputf8_address_to_server_without_smtputf8_bounces_5_6_7_unsent(
        scripted: Scripted, connect: Connect) -> None:
    server = scripted([*greet("PIPELINING", "8BITMIME"), WAIT_CLOSE()])
    conn = connect(server)
    results = send_mail(conn, SENDER, ("jos\u00e9@example.test",), MESSAGE, smtputf8=True)
    assert outcome(results) == [("jos\u00e9@example.test", 553, "5.6.7", False)]
    assert results[0].reply.permanent
    assert conn.sock is not None  # the connection is fine; only this message can't go here
    conn.close()
    server.wait_finished()
    assert sent_upper(server) == [f"EHLO {HELO}".upper()]  # not even MAIL


def test_smtputf8_address_to_server_with_smtputf8(scripted: Scripted, connect: Connect) -> None:
    server = scripted([*greet("SMTPUTF8"), C(f"MAIL FROM:<{SENDER}> SMTPUTF8"), S("250 ok"),
                       rcpt("jos\u00e9@example.test"), S("250 ok"), C("DATA"), S("354 go"),
                       DATA(), S("250 queued")])
    conn = connect(server)
    results = send_mail(conn, SENDER, ("jos\u00e9@example.test",), MESSAGE, smtputf8=True)
    assert outcome(results)[0][1] == 250
    server.wait_finished()
    assert server.errors == []


@pytest.mark.parametrize("eightbit", [True, False])
def test_size_and_body_8bitmime_parameters_when_offered(scripted: Scripted,
                                                        eightbit: bool, connect: Connect) -> None:
    body = " BODY=8BITMIME" if eightbit else ""
    server = scripted([*greet("SIZE 10485760", "8BITMIME"),
                       C(f"MAIL FROM:<{SENDER}> SIZE={len(MESSAGE)}{body}"), S("250 ok"),
                       rcpt(RCPTS[0]), S("250 ok"), C("DATA"), S("354 go"), DATA(),
                       S("250 queued")])
    conn = connect(server)
    results = send_mail(conn, SENDER, RCPTS[:1], MESSAGE, eightbit=eightbit)
    assert outcome(results)[0][1] == 250
    server.wait_finished()
    assert server.errors == []


def test_no_parameters_when_not_offered(scripted: Scripted, connect: Connect) -> None:
    server = scripted([*greet(), *delivered_once()])  # mail() matches MAIL FROM:<...> exactly
    conn = connect(server)
    results = send_mail(conn, SENDER, RCPTS[:1], MESSAGE, eightbit=True)
    assert outcome(results)[0][1] == 250
    server.wait_finished()
    assert server.errors == []


def test_discarded_ehlo_keywords_are_not_used(scripted: Scripted, connect: Connect) -> None:
    """smtp.discard_ehlo_keywords: PIPELINING and CHUNKING offered, but discarded, so the
    transaction goes in lock step (one command, one reply) with DATA, not BDAT."""
    server = scripted([*greet("PIPELINING", "CHUNKING", "8BITMIME"), *delivered_once()])
    conn = connect(server, limits=ReplyLimits(discard_ehlo_keywords=frozenset({"pipelining",
                                                                           "chunking"})))
    assert not conn.has_extn("pipelining") and not conn.has_extn("chunking")
    assert conn.has_extn("8bitmime")
    results = send_mail(conn, SENDER, RCPTS[:1], MESSAGE)
    assert outcome(results) == [(RCPTS[0], 250, None, False)]
    server.wait_finished()
    assert server.errors == []  # the script's lock-step order was kept: no pipelined flight


def test_null_sender(scripted: Scripted, connect: Connect) -> None:
    server = scripted([*greet(), C("MAIL FROM:<>"), S("250 ok"), rcpt(RCPTS[0]), S("250 ok"),
                       C("DATA"), S("354 go"), DATA(), S("250 queued")])
    conn = connect(server)
    assert outcome(send_mail(conn, "", RCPTS[:1], MESSAGE))[0][1] == 250


@pytest.mark.parametrize("field", ["sender", "rcpt"])
def test_cr_lf_in_an_envelope_address_is_refused_unsent(
        scripted: Scripted, field: str, connect: Connect) -> None:
    server = scripted([*greet(), WAIT_CLOSE()])
    conn = connect(server)
    evil = "a@example.test>\r\nRCPT TO:<victim@example.test"
    sender, rcpts = (evil, RCPTS[:1]) if field == "sender" else (SENDER, (evil,))
    results = send_mail(conn, sender, rcpts, MESSAGE)
    assert [r.reply.code for r in results] == [501]
    conn.close()
    server.wait_finished()
    assert sent_upper(server) == [f"EHLO {HELO}".upper()]


def test_helo_when_the_server_does_not_speak_esmtp(scripted: Scripted, connect: Connect) -> None:
    server = scripted([S("220 old.test"), C(f"EHLO {HELO}"), S("502 5.5.1 what?"),
                       C(f"HELO {HELO}"), S("250 old.test"), *delivered_once()])
    conn = connect(server)
    assert not conn.does_esmtp
    assert outcome(send_mail(conn, SENDER, RCPTS[:1], MESSAGE))[0][1] == 250
    server.wait_finished()
    assert server.errors == []


# -- hostile or broken servers: errors, never a hang ----------------------------------------

def expect_connection_error(action: Callable[[], object], command: str,
                            enhanced: str) -> DeliveryError:
    started = time.monotonic()
    with pytest.raises(TransientError) as caught:
        action()
    assert time.monotonic() - started < 1.5  # no waiting for a timeout
    err = caught.value
    assert (err.command, err.reply.enhanced, err.blame) == (command, enhanced, Blame.CONNECTION)
    return err


def test_reply_with_more_than_max_reply_lines_is_a_protocol_error(scripted: Scripted) -> None:
    server = scripted([S("220 mx.test"), C(f"EHLO {HELO}"),
                       S(*["250-FEATURE"] * 10, "250 LAST"), WAIT_CLOSE()])
    conn = Connection(HELO, CLIENT_IP, FAST, ReplyLimits(max_reply_lines=5))
    conn.open(server.host, server.port)
    err = expect_connection_error(conn.hello, "EHLO", "4.5.0")
    assert "lines" in err.reply.text
    conn.close()


def test_reply_line_longer_than_max_line_length_is_a_protocol_error(scripted: Scripted) -> None:
    # The whole line, newline included, arrives in one read: it must still be measured.
    server = scripted([S("220 " + "x" * 1000), WAIT_CLOSE()])
    conn = Connection(HELO, CLIENT_IP, FAST, ReplyLimits(max_line_length=200))
    err = expect_connection_error(lambda: conn.open(server.host, server.port), "BANNER", "4.5.0")
    assert "longer than 200" in err.reply.text
    conn.close()


def test_endless_reply_line_is_a_protocol_error_not_a_hang(scripted: Scripted) -> None:
    server = scripted([INJECT(b"220 " + b"x" * 100_000), WAIT_CLOSE()])
    conn = Connection(HELO, CLIENT_IP, FAST, ReplyLimits(max_line_length=4096))
    expect_connection_error(lambda: conn.open(server.host, server.port), "BANNER", "4.5.0")
    conn.close()


def test_garbage_instead_of_a_reply_is_a_protocol_error(scripted: Scripted) -> None:
    server = scripted([INJECT(b"HTTP/1.1 400 Bad Request\r\n\r\n"), WAIT_CLOSE()])
    conn = Connection(HELO, CLIENT_IP, FAST, ReplyLimits())
    expect_connection_error(lambda: conn.open(server.host, server.port), "BANNER", "4.5.0")
    conn.close()


def test_silent_banner_times_out_naming_the_phase(scripted: Scripted) -> None:
    server = scripted([WAIT_CLOSE()])
    timeouts = Timeouts(**{**{f.name: 2.0 for f in fields(Timeouts)}, "banner": 0.3})
    conn = Connection(HELO, CLIENT_IP, timeouts, ReplyLimits())
    started = time.monotonic()
    with pytest.raises(TransientError) as caught:
        conn.open(server.host, server.port)
    assert 0.25 < time.monotonic() - started < 1.5
    err = caught.value
    assert err.command == "BANNER" and err.blame is Blame.CONNECTION
    assert err.reply.code == 451 and "timeout after 0.3s" in err.reply.text
    assert "BANNER" in str(err) and "BANNER" in err.reply.text  # the reply names it too
    conn.close()


def test_silence_after_the_final_dot_times_out_ambiguous(
        scripted: Scripted, connect: Connect) -> None:
    server = scripted([*greet(), mail(), S("250 ok"), rcpt(RCPTS[0]), S("250 ok"), C("DATA"),
                       S("354 go"), DATA(), WAIT_CLOSE()])
    timeouts = Timeouts(**{**{f.name: 2.0 for f in fields(Timeouts)}, "final_dot": 0.3})
    conn = connect(server, timeouts)
    results = send_mail(conn, SENDER, RCPTS[:1], MESSAGE)
    assert outcome(results) == [(RCPTS[0], 451, "4.4.2", True)]
    assert "DATA" in results[0].reply.text and "timeout" in results[0].reply.text


def test_bytes_injected_after_starttls_220_abort_before_the_handshake(
        scripted: Scripted, connect: Connect) -> None:
    # "220" and the injected reply in one write: a man in the middle's classic.
    server = scripted([*greet("STARTTLS"), C("STARTTLS"),
                       INJECT(b"220 2.0.0 go ahead\r\n250 injected\r\n"), WAIT_CLOSE()])
    conn = connect(server)
    context = TlsPolicy("required").plan("127.0.0.1").context
    assert context is not None
    with pytest.raises(TransientError) as caught:
        conn.starttls_upgrade(context, None)
    err = caught.value
    assert not isinstance(err, TlsError)
    assert (err.command, err.reply.enhanced, err.blame) == ("STARTTLS", "4.5.0", Blame.CONNECTION)
    assert "injection" in err.reply.text
    assert conn.tls_version is None
    conn.close()
    server.wait_finished()
    assert not any(line.startswith("TLS") for who, line in server.transcript() if who == "*")


# -- the connection is not an smtplib.SMTP ------------------------------------------------------

# smtplib's ways around the phases, the deadlines and the one error translation.
SMTPLIB_SHORTCUTS = ("sendmail", "send_message", "data", "starttls", "login", "auth", "mail",
                     "rcpt", "docmd", "ehlo", "helo", "rset", "noop", "quit", "connect",
                     "getreply", "send", "bdat")


def test_no_smtplib_method_bypasses_the_phases() -> None:
    """Regression (issue #12): Connection subclassed smtplib.SMTP, and its inherited
    sendmail(), data(), starttls(), login()... ran outside every phase and deadline, their
    failures untranslated. smtplib now serves it privately (EHLO, extensions, commands)."""
    assert not issubclass(Connection, smtplib.SMTP)
    conn = Connection(HELO, CLIENT_IP, FAST, ReplyLimits())
    assert [name for name in SMTPLIB_SHORTCUTS if hasattr(conn, name)] == []


def test_a_closed_connection_is_freed_without_the_cyclic_collector(scripted: Scripted) -> None:
    """The parts of a connection hold no reference back to it: the worker runs the cyclic
    collector seldom (engine.gctune), so a cycle would keep every retired connection (its
    buffers, its smtplib object, its timer) in memory until a full collection."""
    server = scripted([*greet("PIPELINING"), *delivered_once("PIPELINING"), C("QUIT"),
                       S("221 bye")])
    conn = open_connection(server)
    assert outcome(send_mail(conn, SENDER, RCPTS[:1], MESSAGE))[0][1] == 250
    conn.quit_quietly()
    server.wait_finished()
    ref = weakref.ref(conn)
    gc.disable()
    try:
        del conn
        assert ref() is None
    finally:
        gc.enable()
