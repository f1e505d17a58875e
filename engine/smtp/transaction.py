"""One SMTP transaction: MAIL, RCPT and the message, in the fewest round trips allowed.

With PIPELINING and CHUNKING, MAIL, RCPT and `BDAT n LAST` with the message leave in a
single write (one round trip per message on a warm connection); with PIPELINING alone,
MAIL, RCPT and DATA share one write, and under load the reply to the message's final dot
is read by the connection's next holder, after its own MAIL, RCPT and DATA went out (RFC
2920 3.1: message content may lead a group), so a busy connection also carries one message
per round trip; otherwise one command at a time.

A `Transaction` says what to send, in which phase, and asks engine.classify what the
replies mean; the connection (engine.smtp.connection) does the reading and writing, and
its `Deadlines` (engine.smtp.deadlines) the timing. Before MAIL, an 8-bit message for a
server without 8BITMIME is converted to 7-bit (engine.downgrade), and an address that needs
SMTPUTF8 is refused by a server without it.

The hand-over (engine.smtp.handover): after the 354, a transaction may give its connection
to the next caller waiting for it (`Holder.pass_on`, the pool's checkout) with its message
and dot still to send; the next holder sends them ahead of its own commands in one write,
then reads the reply owed to the first transaction (`Connection.settle`) before its own.

`send_mail` is the layer's entry point: engine.delivery calls it on a pooled connection.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from engine import classify
from engine.downgrade import CannotConvert, to_7bit
from engine.reply import Blame, DeliveryError, Reply, TransientError
from engine.smtp.connection import Connection
from engine.smtp.handover import Owed, RcptResult, Stopping

# What a transaction mode returns: the results, or (handed on) the results to wait for.
_Mode = Callable[[bytes, list[bytes], bytes], "list[RcptResult] | Owed"]
# The message as it goes out and whether it was converted to 7-bit -> the message signed.
Sign = Callable[[bytes, bool], bytes]


def send_mail(conn: Connection, sender: str, rcpts: Sequence[str], message: bytes,
              smtputf8: bool = False, eightbit: bool = False,
              requiretls: bool = False, sign: Sign | None = None) -> list[RcptResult]:
    """Deliver one message to `rcpts` on `conn`; one result per recipient. `requiretls`:
    MAIL carries REQUIRETLS (RFC 8689; engine.connector made sure the server offers it).
    `sign`, if given, gets the message as it is about to go out (after any 7-bit
    conversion) and whether it was converted, and returns it signed (engine.dkim), or
    raises the DeliveryError that is the recipients' outcome.

    Raises StaleConnection when a reused connection fails before the server answered
    anything and before the end of the message was written (or with the server's 421
    farewell); any other connection failure becomes a transient result for every
    recipient (ambiguous once the end of the message was written: the server may have
    it). Killed with `Stopping`, leaves on it what the recipients must still hear.
    """
    return Transaction(conn, rcpts).run(sender, message, smtputf8, eightbit, requiretls, sign)


class Transaction:
    """One message to its recipients on `conn`, and how far it got (to judge a failure)."""

    __slots__ = ("conn", "data_sent", "debt", "mail", "outcome", "rcpts")

    def __init__(self, conn: Connection, rcpts: Sequence[str]) -> None:
        self.conn = conn
        self.rcpts = list(rcpts)
        self.mail: Reply | None = None  # the reply to MAIL, once the server gave it
        # The end of the message (its dot, the BDAT LAST chunk) was handed to the socket
        # (the write returned), or (handed on: `debt`) to the next holder to send.
        self.data_sent = False
        self.debt: Owed | None = None  # handed on before the final reply (`_pass_on`)
        self.outcome: list[RcptResult] | None = None  # the replies' results, once known

    def run(self, sender: str, message: bytes, smtputf8: bool,
            eightbit: bool, requiretls: bool = False,
            sign: Sign | None = None) -> list[RcptResult]:
        """Deliver the message; one result per recipient (see `send_mail`)."""
        try:
            return self._run(sender, message, smtputf8, eightbit, requiretls, sign)
        except Stopping as stop:
            stop.results = self._left_unanswered()
            raise

    def _run(self, sender: str, message: bytes, smtputf8: bool,
             eightbit: bool, requiretls: bool, sign: Sign | None) -> list[RcptResult]:
        conn = self.conn
        try:
            # RFC 6152 3. With SMTPUTF8 the message is not ours to convert: a server without
            # SMTPUTF8 refuses it in _mail_command (5.6.7); one with it takes 8-bit anyway.
            converted = eightbit and not smtputf8 and not conn.has_extn("8bitmime")
            if converted:
                message = _seven_bit(message)
            if sign is not None:  # after the conversion: the signature covers what is sent
                message = sign(message, converted)
            with conn.deadline("transaction", conn.timeouts.transaction):
                mail_cmd = self._mail_command(sender, len(message), smtputf8, eightbit,
                                              requiretls)
                rcpt_cmds = [b"RCPT TO:<" + _wire(r) + b">" for r in self.rcpts]
                results = self._mode()(mail_cmd, rcpt_cmds, message)
        except DeliveryError as err:
            results = self._failed(err)
        conn.messages_sent += 1
        conn.last_used = time.monotonic()
        if isinstance(results, Owed):  # handed on: the next holder reads our final reply
            return results.wait(conn.timeouts.transaction)
        return results

    def _left_unanswered(self) -> list[RcptResult] | None:
        """What the recipients must still hear when the worker stops this transaction
        (`Stopping`): the outcome if known; an ambiguous deferral if the end of the message
        was written (handed on: if the next holder began writing it) and no final reply
        came; else None (the server cannot have the message)."""
        if self.outcome is not None:
            return self.outcome
        debt = self.debt
        if debt is not None:
            if not debt.sending:  # still waiting in the hand-over: it never left
                return None
            return debt.settled() or self._stopped_unanswered()
        return self._stopped_unanswered() if self.data_sent else None

    def _stopped_unanswered(self) -> list[RcptResult]:
        reply = classify.stopped_before_final_reply()
        return [RcptResult(r, reply, ambiguous=True) for r in self.rcpts]

    def _mode(self) -> _Mode:
        """How the transaction goes out, by the extensions the server offers."""
        conn = self.conn
        if conn.has_extn("pipelining"):
            return self._pipelined_bdat if conn.has_extn("chunking") else self._pipelined_data
        return self._lockstep

    def _mail_command(self, sender: str, size: int, smtputf8: bool, eightbit: bool,
                      requiretls: bool = False) -> bytes:
        conn = self.conn
        params = []
        if conn.has_extn("size"):
            params.append(b"SIZE=%d" % size)
        if eightbit and conn.has_extn("8bitmime"):
            params.append(b"BODY=8BITMIME")
        if smtputf8:
            if not conn.has_extn("smtputf8"):
                raise classify.needs_smtputf8()
            params.append(b"SMTPUTF8")
        if requiretls:
            # Never without: the connector checked it, and a message that requires TLS
            # must not go to a server that would not pass the requirement on (RFC 8689 4.2.1).
            if not (conn.tls_verified and conn.has_extn("requiretls")):
                raise classify.requiretls_not_offered("the server")
            params.append(b"REQUIRETLS")
        return b" ".join([b"MAIL FROM:<" + _wire(sender) + b">", *params])

    def _send_lines(self, lines: Sequence[bytes], tail: bytes = b"") -> None:
        """The command lines, then `tail` (a message), in one write."""
        self.conn.send_flight(b"\r\n".join([*lines, tail]))  # "a\r\nb\r\n" + tail, a single copy

    def _answer(self, command: str) -> Reply:
        """The reply to MAIL, RCPT or the message, where success is 2xx only."""
        return classify.completion(self.conn.reply(), command)

    def _read_envelope(self, rcpt_count: int) -> tuple[Reply, list[Reply]]:
        """Read the replies to MAIL and each RCPT, in order."""
        conn = self.conn
        with conn.phase("MAIL", conn.timeouts.mail):
            mail = self._mail_reply()
        rcpt_replies = []
        for _ in range(rcpt_count):
            with conn.phase("RCPT", conn.timeouts.rcpt):
                rcpt_replies.append(self._answer("RCPT"))
        return mail, rcpt_replies

    def _mail_reply(self) -> Reply:
        """The reply to MAIL, the first of the transaction. A stale connection's farewell
        (classify.idle_farewell) fails before `mail` is set, so that `_failed` raises
        StaleConnection and the message goes out on a fresh connection."""
        mail = self._answer("MAIL")
        if classify.idle_farewell(mail, self.conn.messages_sent > 0):
            raise TransientError(mail, "MAIL", Blame.CONNECTION)
        self.mail = mail
        return mail

    # -- the three modes ---------------------------------------------------------------

    def _pipelined_bdat(self, mail_cmd: bytes, rcpt_cmds: list[bytes],
                        message: bytes) -> list[RcptResult]:
        conn = self.conn
        bdat = b"BDAT %d LAST\r\n" % len(message)
        with conn.phase("MAIL", conn.timeouts.data_block):
            self._send_lines([mail_cmd, *rcpt_cmds], bdat + message)
            self.data_sent = True
        mail, rcpt_replies = self._read_envelope(len(rcpt_cmds))
        with conn.phase("BDAT", conn.timeouts.final_dot):
            final = self._answer("BDAT")
        return self._results(mail, rcpt_replies, final)

    def _pipelined_data(self, mail_cmd: bytes, rcpt_cmds: list[bytes],
                        message: bytes) -> list[RcptResult] | Owed:
        conn = self.conn
        with conn.phase("MAIL", conn.timeouts.mail):
            self._send_lines([mail_cmd, *rcpt_cmds, b"DATA"])
        if conn.handover.owed:  # the previous transaction's final reply comes before ours
            conn.settle()
        mail, rcpt_replies = self._read_envelope(len(rcpt_cmds))
        with conn.phase("DATA", conn.timeouts.data):
            data = conn.reply()
        if not (mail.ok and any(r.ok for r in rcpt_replies)):
            if data.code == 354:
                # RFC 2920 3.1: a server that says 354 with no valid recipient gets an
                # empty message (a lone dot), never the body.
                with conn.phase("DATA", conn.timeouts.final_dot):
                    self._send_lines([b"."])
                    conn.reply()
            return self._results(mail, rcpt_replies, data if not mail.ok else rcpt_replies[0])
        refused = classify.data_refusal(data)
        if refused is not None:
            return self._results(mail, rcpt_replies, refused)
        payload = dot_stuff(message) + b".\r\n"
        debt = self._pass_on(mail, rcpt_replies, payload)
        if debt is not None:
            return debt
        self._send_message(payload)
        return self._final_results(mail, rcpt_replies)

    def _lockstep(self, mail_cmd: bytes, rcpt_cmds: list[bytes],
                  message: bytes) -> list[RcptResult]:
        conn = self.conn
        with conn.phase("MAIL", conn.timeouts.mail):
            self._send_lines([mail_cmd])
            mail = self._mail_reply()
        if not mail.ok:
            return self._results(mail, [], mail)
        rcpt_replies = []
        for cmd in rcpt_cmds:
            with conn.phase("RCPT", conn.timeouts.rcpt):
                self._send_lines([cmd])
                rcpt_replies.append(self._answer("RCPT"))
        if not any(r.ok for r in rcpt_replies):
            return self._results(mail, rcpt_replies, rcpt_replies[0])
        if conn.has_extn("chunking"):
            with conn.phase("BDAT", conn.timeouts.final_dot):
                conn.send_flight(b"BDAT %d LAST\r\n" % len(message) + message)
                self.data_sent = True
                final = self._answer("BDAT")
            return self._results(mail, rcpt_replies, final)
        with conn.phase("DATA", conn.timeouts.data):
            self._send_lines([b"DATA"])
            data = conn.reply()
        refused = classify.data_refusal(data)
        if refused is not None:
            return self._results(mail, rcpt_replies, refused)
        self._send_message(dot_stuff(message) + b".\r\n")
        return self._final_results(mail, rcpt_replies)

    # -- the message, its final reply, the hand-over -----------------------------------

    def _send_message(self, payload: bytes) -> None:
        """After the 354: the dot-stuffed message and its dot."""
        conn = self.conn
        with conn.phase("DATA", conn.timeouts.data_block):
            conn.send_flight(payload)
            self.data_sent = True

    def _pass_on(self, mail: Reply, rcpt_replies: list[Reply],
                 payload: bytes) -> Owed | None:
        """After the 354: hand the connection to a caller waiting for one, with our
        message and dot (`payload`) still to send; it sends them ahead of its own MAIL,
        RCPT and DATA, in one write (`Connection.send_flight`), and then reads our final
        reply before its own (`Connection.settle`). None if nobody waits (we send and read
        ourselves).

        One write, so that the server reads the dot and the next envelope together and
        answers them together: apart, a server with Nagle's algorithm on holds its second
        answer until our ACK of the first (see `Connection.ack_now`). Only here, after a
        354: the reply to the dot ends the transaction whatever it says (RFC 5321
        4.1.1.4), so the next MAIL never lands in a half-open one. The state is set after
        the hand-over: the new holder runs only once this greenlet yields, which it does
        not do before returning."""
        conn = self.conn
        holder = conn.holder
        if holder is None or not holder.pass_on():
            return None
        self.data_sent = True  # from now on the message may leave at any moment
        self.debt = debt = Owed(self.rcpts, lambda: self._owed_results(mail, rcpt_replies))
        conn.handover.hand_on(debt, payload)
        return debt

    def _final_results(self, mail: Reply, rcpt_replies: list[Reply]) -> list[RcptResult]:
        """The reply to the final dot, for every accepted recipient. No RSET after a
        refusal: the dot ended the transaction (RFC 5321 4.1.1.4)."""
        conn = self.conn
        with conn.phase("DATA", conn.timeouts.final_dot):
            final = self._answer("DATA")
        return self._results(mail, rcpt_replies, final, reset=False)

    def _owed_results(self, mail: Reply, rcpt_replies: list[Reply]) -> list[RcptResult]:
        """`_final_results`, read by the connection's next holder (`settle`)."""
        try:
            return self._final_results(mail, rcpt_replies)
        except DeliveryError as err:  # never stale: the server answered MAIL
            return self._failed(err)

    # -- outcomes ----------------------------------------------------------------------

    def _results(self, mail: Reply, rcpt_replies: list[Reply], final: Reply,
                 reset: bool = True) -> list[RcptResult]:
        """Per-recipient outcome (classify.recipient_replies). After a refusal, RSET
        (`reset`), unless the transaction is known to be over."""
        replies = classify.recipient_replies(mail, rcpt_replies, final, len(self.rcpts))
        self.outcome = results = list(map(RcptResult, self.rcpts, replies))
        if reset and (not final.ok or not mail.ok):
            self._reset_quietly()
        return results

    def _failed(self, err: DeliveryError) -> list[RcptResult]:
        """The transaction failed without replies to judge it by: what that means for each
        recipient (classify.failed_transaction, which raises StaleConnection when the
        message is to go out again on a fresh connection)."""
        conn = self.conn
        if err.blame is not Blame.MESSAGE:  # refused before anything was sent: usable
            conn.close()  # a connection-level failure leaves the session unusable
        reply, ambiguous = classify.failed_transaction(err, conn.messages_sent > 0,
                                                       self.mail, self.data_sent)
        return [RcptResult(r, reply, ambiguous) for r in self.rcpts]

    def _reset_quietly(self) -> None:
        """RSET after a failed transaction so the next one starts clean."""
        conn = self.conn
        try:
            with conn.phase("RSET", conn.timeouts.rset):
                conn.putcmd("RSET")
                if not conn.reply().ok:
                    conn.close()
        except DeliveryError:
            conn.close()


def dot_stuff(message: bytes) -> bytes:
    """RFC 5321 4.5.2: double a leading dot on every line. `message` ends with CRLF."""
    stuffed = message.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    return stuffed


def _seven_bit(message: bytes) -> bytes:
    """The 8-bit message converted to 7-bit for a server without 8BITMIME (engine.downgrade),
    or a refusal of the message (classify.cannot_convert), before MAIL."""
    try:
        return to_7bit(message)
    except CannotConvert as exc:
        raise classify.cannot_convert(str(exc)) from None


def _wire(value: str) -> bytes:
    """An address or parameter as it goes on the wire; refuses what could inject commands."""
    if "\r" in value or "\n" in value or "\0" in value:
        raise classify.unsafe_envelope()
    return value.encode("utf-8")
