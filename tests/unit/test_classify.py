"""engine.classify: every reply decision, one table or test each (no sockets).

Read with the module: each test names the decision and the cases that make it.
"""
from __future__ import annotations

import errno
import smtplib
import ssl

import pytest

from engine import classify
from engine.protocol import Status
from engine.reply import (
    Blame,
    DeliveryError,
    DescriptorsExhausted,
    PermanentError,
    ProtocolError,
    Reply,
    StaleConnection,
    TlsError,
    TransientError,
)


def r(code: int, enhanced: str | None = None, text: str = "text") -> Reply:
    return Reply(code, enhanced, text)


# -- the outcome ------------------------------------------------------------------------


@pytest.mark.parametrize(("code", "status"), [
    (250, Status.DELIVERED), (251, Status.DELIVERED),
    (421, Status.DEFERRED), (450, Status.DEFERRED), (451, Status.DEFERRED),
    (550, Status.BOUNCED), (554, Status.BOUNCED),
])
def test_status_of_a_reply(code: int, status: Status) -> None:
    assert classify.status(r(code)) is status


# -- push-back by behaviour, and blocks -------------------------------------------------


@pytest.mark.parametrize(("reply", "candidate"), [
    # a server's 4xx at the banner, MAIL or RCPT: may be push-back, whatever its words
    (r(421, None, "mx.example.net Service not available, closing transmission channel"), True),
    (r(421, "4.7.0", "Rate limited, slow down"), True),
    (r(450, "4.7.1", "Sender over quota for this period, try again later"), True),
    (r(451, "4.3.0", "Temporary local problem, try again later"), True),
    (r(450, None, "Try again later"), True),
    (r(452, "4.5.3", "Too many recipients"), True),
    # a server hanging up on us, as the engine words it
    (classify.translate(smtplib.SMTPServerDisconnected("Connection unexpectedly closed"),
                        "MAIL", 30.0).reply, True),
    (classify.translate(ConnectionResetError(104, "reset by peer"), "RCPT", 30.0).reply,
     True),
    # about the mailbox (4.2.x) or the address (4.1.x), not the pace
    (r(452, "4.2.2", "Mailbox full"), False),
    (r(450, "4.2.1", "Mailbox busy, try again later"), False),
    (r(450, "4.1.1", "Recipient address rejected: unverified address"), False),
    (r(451, "4.1.8", "Sender address rejected: Domain not found"), False),
    # greylisting, however it is worded or coded
    (r(450, "4.2.0", "Greylisted, please try again later"), False),
    (r(450, "4.7.1", "Recipient address rejected: Greylisted, see http://postgrey."
                     "schweikert.ch/help/example.test.html"), False),
    (r(451, None, "Greylisting in action, please come back later"), False),
    (r(450, None, "grey-listed, try again in 5 minutes"), False),
    (r(451, "4.7.1", "Please try again later (graylisted)"), False),
    # a permanent refusal is not a pace; a success is no refusal
    (r(550, "5.7.1", "Rate limited"), False),
    (r(554, None, "Transaction failed"), False),
    (r(250, "2.0.0", "ok"), False),
    # the engine's own failures: nothing the receiver said about our pace
    (classify.translate(TimeoutError("timed out"), "MAIL", 30.0).reply, False),
    (classify.translate(ConnectionRefusedError(), "CONNECT", 30.0).reply, False),
    (classify.translate(ssl.SSLError("bad record"), "TLS", 30.0).reply, False),
    (classify.dns_failed("example.net", "timeout", Blame.MESSAGE).reply, False),
    (classify.deadline_passed("transaction", 600.0, "DATA"), False),
    (classify.not_yet("example.net", "pace"), False),
    (classify.internal_error(ValueError("oops")), False),
    (Reply.local(451, "4.7.0", "Rate limited"), False),  # made here, whatever it says
])
def test_which_refusals_may_be_pushback(reply: Reply, candidate: bool) -> None:
    assert classify.refusal(reply) is candidate


@pytest.mark.parametrize(("reply", "blocked"), [
    (r(554, "5.7.1", "Service unavailable; Client host [192.0.2.10] blocked using "
                     "zen.spamhaus.org"), True),
    (r(554, None, "Service unavailable; Client host [192.0.2.10] blocked using Barracuda "
                  "Reputation, http://www.barracudanetworks.com/reputation/?ip=192.0.2.10"),
     True),
    (r(550, "5.7.1", "Mail from 192.0.2.10 refused, see http://www.spamcop.net/bl.shtml?"
                     "192.0.2.10 - listed at bl.spamcop.net"), True),
    (r(421, "4.7.0", "[192.0.2.10] is listed by Spamhaus"), True),  # a 4xx block too
    (r(550, "5.7.1", "Your IP address has been blocked"), True),
    (r(554, None, "The IP address 192.0.2.10 has been blocked"), True),
    (r(550, None, "Your mail server is blacklisted"), True),
    (r(421, "4.7.0", "Connection refused due to poor reputation"), True),
    # Microsoft's 5.7.606 to 5.7.649: a banned sending IP, whatever the text
    (r(550, "5.7.606", "Access denied, banned sending IP [192.0.2.10]"), True),
    (r(550, "5.7.649", "Access denied"), True),
    (r(550, "5.7.605", "Access denied"), False),
    (r(550, "5.7.650", "Access denied"), False),
    (r(550, "5.7.60", "Access denied"), False),
    # a block of the message, not of the IP
    (r(554, "5.7.1", "Message blocked as spam content"), False),
    (r(554, "5.7.1", "Message rejected: blocked because it contains a virus"), False),
    (r(550, "5.7.1", "Your account has been blocked"), False),
    # throttles and ordinary failures
    (r(421, "4.7.0", "Rate limited, slow down"), False),
    (r(421, None, "Too many connections from your IP"), False),
    (r(550, "5.1.1", "User unknown"), False),
    (r(250, "2.0.0", "ok"), False),
    (Reply.local(451, "4.4.4", "MX host mx.example.net is a prohibited destination: its IP "
                               "address is blocked"), False),  # made here: our own words
])
def test_which_refusals_say_the_sending_ip_is_blocked(reply: Reply, blocked: bool) -> None:
    assert classify.block(reply) is blocked


# -- inside a transaction ---------------------------------------------------------------


@pytest.mark.parametrize(("code", "helo"), [
    (500, True), (502, True), (504, True), (550, True),
    (250, False), (421, False), (451, False), (554, False),
])
def test_which_replies_to_ehlo_mean_say_helo(code: int, helo: bool) -> None:
    assert classify.speaks_helo_only(code) is helo


@pytest.mark.parametrize("code", [250, 251, 421, 451, 550, 554])
def test_a_reply_that_completes_or_refuses_is_the_answer(code: int) -> None:
    reply = r(code)
    assert classify.completion(reply, "RCPT") is reply


@pytest.mark.parametrize("code", [334, 354])
def test_a_3xx_where_only_2xx_is_success_is_a_protocol_error(code: int) -> None:
    with pytest.raises(ProtocolError, match=f"{code} reply to DATA"):
        classify.completion(r(code), "DATA")


@pytest.mark.parametrize(("reply", "reused", "farewell"), [
    (r(421, "4.4.2", "idle timeout"), True, True),  # the farewell crossing our MAIL
    (r(421, None, "closing"), True, True),
    (r(421, "4.4.2", "idle timeout"), False, False),  # a new connection: a real answer
    (r(421, "4.7.0", "rate limited"), True, False),  # policy, never a farewell
    (r(421, "4.7.28", "too fast"), True, False),
    (r(451, "4.3.0", "try later"), True, False),
    (r(250, "2.1.0", "ok"), True, False),
])
def test_a_stale_connections_farewell_or_a_real_421(reply: Reply, reused: bool,
                                                   farewell: bool) -> None:
    assert classify.idle_farewell(reply, reused) is farewell


def test_354_to_data_opens_the_message() -> None:
    assert classify.data_refusal(r(354)) is None


@pytest.mark.parametrize("code", [451, 452, 554])
def test_a_refusal_of_data_is_the_outcome(code: int) -> None:
    reply = r(code)
    assert classify.data_refusal(reply) is reply


def test_another_success_to_data_is_a_protocol_error_not_a_delivery() -> None:
    with pytest.raises(TransientError) as caught:
        classify.data_refusal(r(250))
    assert (caught.value.reply.code, caught.value.reply.enhanced) == (451, "4.5.0")
    assert caught.value.command == "DATA"


def test_a_refused_mail_refuses_every_recipient() -> None:
    mail = r(550, "5.7.1", "sender refused")
    assert classify.recipient_replies(mail, [], r(250), 3) == [mail, mail, mail]


def test_each_recipient_gets_its_refusal_or_the_final_reply() -> None:
    ok, unknown, later, final = r(250), r(550, "5.1.1"), r(451, "4.3.0"), r(250, "2.0.0")
    replies = classify.recipient_replies(ok, [ok, unknown, later, ok], final, 4)
    assert replies == [final, unknown, later, final]


# The transaction failed with `err` (a connection error unless said otherwise): what each
# recipient gets. Columns: reused, mail reply, data sent -> (code, enhanced, ambiguous).
LOST = TransientError(r(451, "4.4.2", "connection lost in DATA"), "DATA")


@pytest.mark.parametrize(("reused", "mail", "data_sent", "expected"), [
    (False, None, False, (451, "4.4.2", False)),  # a new connection: the failure itself
    (True, r(250), False, (451, "4.4.2", False)),  # answered MAIL: not stale
    (True, r(421, "4.7.0"), False, (421, "4.7.0", False)),  # the refusal is the outcome
    (False, r(550, "5.7.1"), True, (550, "5.7.1", False)),
    (False, r(250), True, (451, "4.4.2", True)),  # no reply to the final dot: ambiguous
    (True, r(250), True, (451, "4.4.2", True)),
    # Issue #14: reused, the whole BDAT flight written, lost before any reply: not stale
    (True, None, True, (451, "4.4.2", True)),
])
def test_what_a_failed_transaction_means(reused: bool, mail: Reply | None, data_sent: bool,
                                         expected: tuple[int, str, bool]) -> None:
    reply, ambiguous = classify.failed_transaction(LOST, reused, mail, data_sent)
    assert (reply.code, reply.enhanced, ambiguous) == expected
    if ambiguous:
        assert reply.text.startswith(LOST.reply.text) and "may have been delivered" in reply.text


def test_a_reused_connection_failing_before_mail_was_answered_is_stale() -> None:
    with pytest.raises(StaleConnection) as caught:
        classify.failed_transaction(LOST, True, None, False)
    assert caught.value.blame is Blame.CONNECTION and caught.value.__cause__ is LOST


def test_a_reused_connections_farewell_crossing_a_whole_bdat_flight_is_stale() -> None:
    """The server's 421 (an idle farewell, judged by idle_farewell) came before it read our
    commands: it cannot have the message, written or not."""
    farewell = TransientError(r(421, "4.4.2", "idle timeout"), "MAIL")
    with pytest.raises(StaleConnection):
        classify.failed_transaction(farewell, True, None, True)


def test_a_421_of_our_own_is_no_farewell_once_the_message_is_written() -> None:
    """Only the server's own reply can say it read nothing; a loss the engine worded (a
    hang-up, a timeout) after the message was written stays ambiguous."""
    ours = TransientError(Reply.local(421, "4.4.2", "made here"), "MAIL")
    assert classify.failed_transaction(ours, True, None, True)[1] is True


def test_a_failure_the_message_is_to_blame_for_is_the_outcome_even_reused() -> None:
    err = classify.needs_smtputf8()
    assert classify.failed_transaction(err, True, None, False) == (err.reply, False)


def test_no_final_reply_is_deferred() -> None:
    reply = classify.no_final_reply()
    assert (reply.code, reply.enhanced) == (451, "4.4.2")
    assert classify.status(reply) is Status.DEFERRED


@pytest.mark.parametrize(("command", "text"), [
    ("MAIL", "transaction took longer than 2.5s (in MAIL)"),
    ("", "transaction took longer than 2.5s"),
])
def test_a_deadline_that_passed(command: str, text: str) -> None:
    assert classify.deadline_passed("transaction", 2.5, command) == r(451, "4.4.2", text)


@pytest.mark.parametrize(("err", "code", "enhanced"), [
    (classify.cannot_convert("8-bit header"), 554, "5.6.3"),
    (classify.needs_smtputf8(), 553, "5.6.7"),
    (classify.unsafe_envelope(), 501, "5.1.3"),
])
def test_the_messages_own_faults_bounce_at_any_host(err: DeliveryError, code: int,
                                                    enhanced: str) -> None:
    assert isinstance(err, PermanentError)
    assert (err.reply.code, err.reply.enhanced, err.blame, err.command) == (
        code, enhanced, Blame.MESSAGE, "MAIL")


# -- opening a connection ---------------------------------------------------------------


@pytest.mark.parametrize(("code", "kind"), [(421, TransientError), (554, PermanentError)])
def test_turned_away_at_the_door_is_the_connections_fault(code: int,
                                                          kind: type[DeliveryError]) -> None:
    err = classify.turned_away(r(code), "BANNER")
    assert type(err) is kind
    assert (err.blame, err.command) == (Blame.CONNECTION, "BANNER")


@pytest.mark.parametrize(("err", "enhanced", "command"), [
    (classify.tls_not_offered("mx.test"), "4.7.4", "EHLO"),
    (classify.tls_refused("mx.test", r(454, "4.7.0", "not now")), "4.7.5", "STARTTLS"),
    (classify.prohibited_destination("mx.test", "10.0.0.1 is private"), "4.4.4", "CONNECT"),
])
def test_connection_refusals_of_our_own_defer(err: DeliveryError, enhanced: str,
                                              command: str) -> None:
    assert type(err) is TransientError
    assert (err.reply.code, err.reply.enhanced, err.blame, err.command) == (
        451, enhanced, Blame.CONNECTION, command)
    assert "mx.test" in err.reply.text


@pytest.mark.parametrize(("err", "open_connections", "capacity"), [
    (TransientError(r(421, "4.7.0", "too many connections")), 2, True),
    (TransientError(r(421, "4.7.0", "too many connections")), 0, False),  # an outage
    (TransientError(r(451, "4.4.1", "connection refused")), 1, True),
    (PermanentError(r(554, "5.7.1", "go away")), 3, False),
])
def test_a_failed_connect_at_the_servers_capacity(err: DeliveryError, open_connections: int,
                                                  capacity: bool) -> None:
    assert classify.at_capacity(err, open_connections) is capacity


# -- across a domain's MX hosts ---------------------------------------------------------


def test_a_5xx_at_every_host_defers_never_bounces() -> None:
    reply = classify.refused_at_every_host(r(554, "5.7.1", "blocked"))
    assert (reply.code, reply.enhanced) == (451, "4.4.0")
    assert reply.text == "no MX host would take the mail; last said: 554 5.7.1 blocked"


def test_a_4xx_at_every_host_is_the_last_hosts_reply() -> None:
    last = r(421, "4.3.2", "busy")
    assert classify.refused_at_every_host(last) is last


def test_not_yet_is_a_deferral_naming_the_provider() -> None:
    assert classify.not_yet("gmail", "is paced") == r(451, "4.4.5",
                                                       "not sent yet: gmail is paced for this IP")
    # a cluster-wide limit is every host's, not this IP's
    assert classify.not_yet("yahoo", "cluster hourly limit of pool bulk") == r(
        451, "4.4.5", "not sent yet: yahoo cluster hourly limit of pool bulk")


def test_a_bug_of_ours_defers_with_its_text_cut() -> None:
    reply = classify.internal_error(KeyError("x" * 500))
    assert (reply.code, reply.enhanced) == (451, "4.3.0")
    assert reply.text.startswith("internal error: KeyError: ") and len(reply.text) == 300


# -- the MX lookup ----------------------------------------------------------------------


@pytest.mark.parametrize(("err", "code", "enhanced"), [
    (classify.no_such_domain("nx.test"), 550, "5.1.2"),
    (classify.no_mx_or_address("bare.test"), 550, "5.1.2"),
    (classify.null_mx("none.test"), 556, "5.1.10"),
    (classify.invalid_domain("bad..test"), 550, "5.1.2"),
])
def test_a_domain_that_cannot_take_mail_bounces(err: PermanentError, code: int,
                                                enhanced: str) -> None:
    assert (err.reply.code, err.reply.enhanced, err.blame) == (code, enhanced, Blame.MESSAGE)


@pytest.mark.parametrize("blame", [Blame.MESSAGE, Blame.CONNECTION])
def test_a_failed_dns_lookup_defers_blaming_whom_the_caller_says(blame: Blame) -> None:
    err = classify.dns_failed("example.test", "timed out", blame)
    assert type(err) is TransientError and err.blame is blame
    assert err.reply == r(451, "4.4.3", "DNS lookup for example.test failed: timed out")


def test_an_mx_host_without_address_moves_on_to_the_next() -> None:
    err = classify.no_address("mx.test")
    assert type(err) is TransientError and err.blame is Blame.CONNECTION
    assert (err.reply.code, err.reply.enhanced) == (451, "4.4.4")


# -- exceptions -------------------------------------------------------------------------


@pytest.mark.parametrize(("exc", "command", "kind", "enhanced", "text"), [
    (ssl.SSLError("bad record"), "MAIL", TlsError, "4.7.5", "TLS failure: "),
    (ConnectionResetError("reset"), "TLS", TlsError, "4.7.5", "TLS failure: reset"),
    (TimeoutError("timed out"), "RCPT", TransientError, "4.4.2", "timeout after 2s in RCPT"),
    (TimeoutError(), "", TransientError, "4.4.2", "timeout after 2s"),
    (ConnectionRefusedError(), "CONNECT", TransientError, "4.4.1", "connection refused"),
    (smtplib.SMTPServerDisconnected("gone"), "DATA", TransientError, "4.4.2",
     "connection lost in DATA: gone"),
    (ConnectionResetError("reset"), "MAIL", TransientError, "4.4.2",
     "connection lost in MAIL: reset"),
    (EOFError(), "EHLO", TransientError, "4.4.2", "connection lost in EHLO: EOFError"),
    (ProtocolError("garbage"), "BANNER", TransientError, "4.5.0", "protocol error: garbage"),
    (OSError("no route"), "CONNECT", TransientError, "4.4.1", "network error: no route"),
    (ValueError("oops"), "MAIL", TransientError, "4.3.0", "internal error: ValueError: oops"),
    # The worker's descriptors, not the server: waited out, even in the TLS handshake.
    (OSError(errno.EMFILE, "Too many open files"), "CONNECT", DescriptorsExhausted, "4.3.0",
     "out of file descriptors in CONNECT: [Errno 24]"),
    (OSError(errno.ENFILE, "File table overflow"), "TLS", DescriptorsExhausted, "4.3.0",
     "out of file descriptors in TLS: [Errno 23]"),
])
def test_translate_an_exception_into_a_deferral(exc: BaseException, command: str,
                                                kind: type[DeliveryError], enhanced: str,
                                                text: str) -> None:
    err = classify.translate(exc, command, 2.0)
    assert type(err) is kind
    assert (err.reply.code, err.reply.enhanced, err.command, err.blame) == (
        451, enhanced, command, Blame.CONNECTION)
    assert err.reply.text.startswith(text)


def test_an_exception_in_a_few_words() -> None:
    assert classify.short(ValueError()) == "ValueError"
    assert classify.short(ValueError("x" * 300)) == "x" * 200 + "..."
    assert classify.short(ValueError("short")) == "short"
