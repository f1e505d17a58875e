"""One outbound SMTP connection: `smtplib` with the parts a production MTA needs.

`Connection` subclasses `smtplib.SMTP` (gevent-patched in the worker) and keeps
its connect, EHLO parsing and command helpers, but replaces how replies are
read, so that

- a reply is bounded (line length, line count): a hostile server cannot make
  the worker buffer without end;
- commands can be pipelined (RFC 2920): several commands go out in one write
  and their replies are read back in order;
- STARTTLS refuses a server that sent bytes after its 220 (response injection:
  those bytes would otherwise be read as if they came over TLS);
- every phase has its own RFC 5321 timeout, a deadline for the whole phase (a
  server that drips one byte a second cannot stretch it), and `deadline()` bounds
  several phases together (opening a connection, one transaction), so a server
  that answers each step just in time cannot hold the connection for their sum;
- every failure becomes a `DeliveryError` carrying a reply and the command in
  flight (`_translate`, the one place that knows smtplib, socket and ssl
  exceptions).

A message goes out in the fewest round trips the server allows: with
PIPELINING and CHUNKING, MAIL, RCPT and `BDAT n LAST` with the message leave
in a single write (one round trip per message on a warm connection); with
PIPELINING alone, MAIL, RCPT and DATA share one write, and under load the
reply to the message's final dot is read by the connection's next holder, after
its own MAIL, RCPT and DATA went out (RFC 2920 3.1: message content may lead a
group), so a busy connection also carries one message per round trip; otherwise
one command at a time.
"""
from __future__ import annotations

import math
import select
import smtplib
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Protocol

import gevent
from gevent import monkey
from gevent.event import AsyncResult

from engine.config import Timeouts
from engine.downgrade import CannotConvert, to_7bit
from engine.memo import Memo
from engine.reply import Blame, DeliveryError, Reply, TransientError, error_for

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer


@dataclass(frozen=True)
class Limits:
    """Caps on what a server may send us, and what of it we ignore."""

    max_line_length: int = 4096
    max_reply_lines: int = 100
    discard_ehlo_keywords: frozenset[str] = frozenset()  # lower case, as smtplib keys them


# Linux's TCP_QUICKACK (None elsewhere: there the ACK is left to the system).
_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)
# Replies to EHLO that mean "I only speak HELO" (RFC 5321 4.1.4); others are final.
_EHLO_UNKNOWN = (500, 502, 504, 550)
# Characters of a reply's text that are kept: it travels into events, logs and the spool.
MAX_REPLY_TEXT = 1000
# One-line replies already parsed, by their raw line: a server says the same few ("250 2.1.0
# Ok") message after message, so a dict lookup replaces splitting, decoding and parsing.
# Reply is immutable, so sharing is safe; the memo is emptied when full (replies carrying a
# queue id never repeat and must not make it grow).
_REPLIES: Memo[bytes, Reply] = Memo(256)


class Holder(Protocol):
    """Whoever has the connection checked out (engine.pool's checkout)."""

    def pass_on(self, conn: Connection) -> bool:
        """Give `conn` to the next caller now, if one waits, although the reply to this
        transaction's final dot is still on the way; True if it did (see `settle`)."""


class ProtocolError(Exception):
    """The server broke the protocol: garbage, an oversized reply, injected bytes."""


class StaleConnection(TransientError):
    """A reused connection turned out dead before the server answered anything of
    this transaction: safe to send the message again on a fresh connection."""


@dataclass(frozen=True)
class RcptResult:
    rcpt: str
    reply: Reply
    ambiguous: bool = False  # no reply to the final dot: the server may have the message


class Connection(smtplib.SMTP):
    """An SMTP client connection bound to one source address."""

    def __init__(self, helo: str, source_ip: str, timeouts: Timeouts, limits: Limits) -> None:
        _check_helo(helo)
        super().__init__(host="", local_hostname=helo, timeout=timeouts.connect,
                         source_address=(source_ip, 0))
        self._phase_end = math.inf  # monotonic deadline of the phase in progress
        self._span: _Span | None = None  # the deadline() in force, if any
        self.timeouts = timeouts
        self.limits = limits
        self._rbuf = bytearray()
        self.command = ""  # the command in flight, for error reports
        self.peer: tuple[str, int] | None = None
        self.tls_version: str | None = None
        self.tls_verified: bool | None = None
        self.messages_sent = 0
        self.created = time.monotonic()
        self.last_used = self.created
        self._backstop_timer: gevent.Timeout | None = None  # reused by deadline(), see there
        # A flight was just sent: its reply cannot be there yet (see _wait_readable).
        self._awaiting = False
        self.holder: Holder | None = None  # set by the pool while checked out
        # Transactions handed on before their final reply: the next holder reads it.
        self._owed: deque[_Owed] = deque()
        # The last one's message and dot, which the next holder sends ahead of its own
        # MAIL, RCPT and DATA, in the same write (see _pass_on).
        self._unsent = b""

    # -- reading replies -------------------------------------------------

    def getreply(self) -> tuple[int, bytes]:
        """Read one (possibly multi-line) reply, within the configured caps.

        Same contract as smtplib's, so its `ehlo()`, `docmd()` and friends keep working.
        """
        return self._collect(self._readline())

    def _collect(self, line: bytes) -> tuple[int, bytes]:
        """The reply that starts with `line`: its code and its lines' text."""
        lines: list[bytes] = []
        while True:
            code, more, text = _split_reply_line(line)
            lines.append(text)
            if len(lines) > self.limits.max_reply_lines:
                raise ProtocolError(f"reply longer than {self.limits.max_reply_lines} lines")
            if not more:
                return code, b"\n".join(lines)
            line = self._readline()

    def reply(self) -> Reply:
        line = self._readline()
        reply = _REPLIES.get(line)  # only one-line replies are there (see _REPLIES)
        if reply is None:
            code, text = self._collect(line)
            reply = Reply.parse(code, _cut(text.decode("utf-8", "replace"), MAX_REPLY_TEXT))
            if line[3:4] != b"-":  # the whole reply was this one line
                _REPLIES.keep(line, reply)
        return reply

    def _readline(self) -> bytes:
        while True:
            end = self._rbuf.find(b"\n")
            # Measure a line that arrived whole in one read too, not only a partial one
            # (a 64 KiB read could otherwise hand over a line 16 times the cap).
            length = end if end >= 0 else len(self._rbuf)
            if length > self.limits.max_line_length:
                raise ProtocolError(f"reply line longer than {self.limits.max_line_length} bytes")
            if end >= 0:
                line = bytes(self._rbuf[:end + 1])
                del self._rbuf[:end + 1]
                return line
            if self.sock is None:
                raise smtplib.SMTPServerDisconnected("not connected")
            self._arm()  # each read gets only what is left of the phase, not a fresh timeout
            if self._awaiting:
                self._awaiting = False
                _wait_readable(self.sock)
            chunk = self.sock.recv(65536)
            if not chunk:
                self.close()
                raise smtplib.SMTPServerDisconnected("connection closed by server")
            self._rbuf += chunk

    def close(self) -> None:
        self._rbuf.clear()
        self._unsent = b""
        super().close()
        while self._owed:  # their replies will never be read
            self._owed.popleft().lose()

    def send(self, s: ReadableBuffer | str) -> None:
        """smtplib's writes (EHLO, STARTTLS, RSET, QUIT), within the phase's time."""
        if self.sock is not None:
            self._arm()  # here, not inside smtplib's send(): it reports any OSError as a hang-up
        super().send(s)

    def _live(self) -> socket.socket:
        """The socket, or the error smtplib raises for a closed connection."""
        if self.sock is None:
            raise smtplib.SMTPServerDisconnected("not connected")
        return self.sock

    # -- phases ---------------------------------------------------------------

    def phase(self, command: str, timeout: float) -> _Phase:
        """Run one protocol step within `timeout` seconds in all; translate any failure
        (`with conn.phase("MAIL", t): ...`; see `_Phase`)."""
        return _Phase(self, command, timeout)

    def _failed(self, exc: Exception, command: str, timeout: float) -> DeliveryError:
        """The single translation point: what a failure inside a phase becomes."""
        if self._span is not None and self._span.expired(exc):
            return TransientError(self._span.reply(command), command)
        return _translate(exc, command, timeout)

    def deadline(self, name: str, seconds: float) -> _Deadline:
        """Bound every phase inside to `seconds` in all ("setup", "transaction").

        Enforced through the socket timeouts (each read gets what is left), and in a
        gevent worker also by a `gevent.Timeout`, which interrupts what socket timeouts
        cannot (a TLS handshake fed one byte at a time). A nested deadline never
        extends an outer one. (`with conn.deadline("transaction", t): ...`; see `_Deadline`.)
        """
        return _Deadline(self, name, seconds)

    def _backstop(self, seconds: float) -> gevent.Timeout | None:
        """A stopped `gevent.Timeout` of `seconds` for a deadline, None without gevent.

        The last one is kept and used again: a transaction's deadline has the same length
        every time, and a new Timeout per message cost a timer allocation for nothing
        (a cancelled Timeout can be started again)."""
        if not monkey.is_module_patched("socket"):
            return None
        timer = self._backstop_timer
        if timer is None or timer.seconds != seconds or timer.pending:
            timer = self._backstop_timer = gevent.Timeout(seconds)
        return timer

    def _arm(self) -> None:
        """Give the socket what is left of the phase and of the deadline in force.

        Called right before each read and write (`_readline`, `_send`, `send`, the TLS
        handshake), not when a phase begins: most phases read a reply that came with
        the previous one, and need no timeout at all."""
        end = self._phase_end if self._span is None else min(self._phase_end, self._span.end)
        left = end - time.monotonic()
        if left <= 0:
            raise TimeoutError("deadline passed")
        if self.sock is not None and left != math.inf:
            self.sock.settimeout(left)

    def _left(self, timeout: float) -> float:
        """`timeout`, or less if the deadline in force comes sooner."""
        if self._span is None:
            return timeout
        return max(0.001, min(timeout, self._span.end - time.monotonic()))

    def open(self, address: str, port: int) -> Reply:
        """TCP connect from the source address and read the banner."""
        with self.phase("CONNECT", self.timeouts.connect):
            self.sock = socket.create_connection((address, port),
                                                 self._left(self.timeouts.connect),
                                                 self.source_address)
            # Each transaction leaves in one write; never hold a tail back for an ACK.
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.peer = (address, port)
        with self.phase("BANNER", self.timeouts.banner):
            return self.reply()

    def hello(self) -> Reply:
        """EHLO, falling back to HELO when the server does not speak ESMTP."""
        with self.phase("EHLO", self.timeouts.ehlo):
            code, text = self.ehlo()
            if code not in _EHLO_UNKNOWN:
                for keyword in self.limits.discard_ehlo_keywords:
                    self.esmtp_features.pop(keyword, None)
                return Reply.parse(code, text.decode("utf-8", "replace"))
            self.command = "HELO"
            code, text = self.helo()
            return Reply.parse(code, text.decode("utf-8", "replace"))

    def starttls_upgrade(self, context: ssl.SSLContext, server_hostname: str | None) -> Reply:
        """Send STARTTLS; on 220 do the handshake and EHLO again.

        Returns the server's reply to STARTTLS; a non-220 reply leaves the
        connection in plaintext and usable (RFC 3207: 454 means "continue").
        """
        with self.phase("STARTTLS", self.timeouts.starttls):
            self.putcmd("STARTTLS")
            reply = self.reply()
            if reply.code != 220:
                return reply
            # Bytes, not a hang-up: a server that closes after its 220 has failed TLS (the
            # handshake below says so and the host gets plaintext), it has not injected.
            if self._rbuf or _has_data(self.sock):
                raise ProtocolError("server sent data after its 220 reply to STARTTLS"
                                    " (response injection); connection aborted")
        with self.phase("TLS", self.timeouts.tls_handshake):
            sock = self._live()
            self._arm()
            self.sock = context.wrap_socket(sock, server_hostname=server_hostname)
            self.tls_version = self.sock.version()
            self.tls_verified = context.verify_mode == ssl.CERT_REQUIRED
        self.helo_resp = self.ehlo_resp = None
        self.esmtp_features = {}
        self.does_esmtp = False
        ehlo = self.hello()
        if not ehlo.ok:  # refused after the upgrade: no session to send mail in
            raise error_for(ehlo, "EHLO")
        return reply

    def is_alive(self) -> bool:
        """Cheap check before reuse: an idle SMTP connection must have nothing to read.

        Anything readable is EOF or an unsolicited reply (typically 421 on idle
        timeout): either way the connection is finished. No round trip spent.
        """
        if not self.reusable():
            return False
        try:
            return not _readable(self.sock)
        except (OSError, ValueError):
            return False

    def reusable(self) -> bool:
        """`is_alive` without its select(), for a connection handed straight from one
        transaction to the next (engine.pool): open, and nothing unread after the last reply.
        A server hanging up (or its 421) in those microseconds is seen at MAIL and retried
        on a fresh connection like any stale one (StaleConnection)."""
        if self.sock is None or self._rbuf:
            return False
        return not (isinstance(self.sock, ssl.SSLSocket) and self.sock.pending())

    @property
    def owes(self) -> bool:
        """An earlier transaction's final reply is still to be read (`settle`)."""
        return bool(self._owed)

    def settle(self) -> None:
        """Read the final replies owed to the transactions that handed this connection on
        (oldest first), and give each transaction its results.

        The holder calls it once its own commands are on the wire (a pipelined group may
        start with the message before it, RFC 2920 3.1: `_send` put it there), or before
        anything else it does with the connection (the message then goes alone). A failed
        read closes the connection: each transaction still owed then gets an ambiguous
        deferral (its message may have left, no reply came)."""
        if self._unsent:
            try:
                with self.phase("DATA", self.timeouts.data_block):
                    self._send(b"")
            except DeliveryError:
                self.close()  # the owed transactions get their ambiguous deferral
                return
        while self._owed:
            debt = self._owed.popleft()
            try:
                results = debt.read()
            except BaseException:  # killed while reading: the reply is lost to it
                debt.lose()
                raise
            self._ack_now()
            debt.settle(results)

    def _ack_now(self) -> None:
        """Acknowledge what was read at once, not up to 40 ms later (delayed ACK).

        A server that answers the handed-on dot and the next MAIL, RCPT and DATA in two
        writes (it read them apart, or it writes each reply as it goes), with Nagle's
        algorithm on (the default, and smtp-sink's), holds its second write until our ACK
        of the first. Measured while the two still left in separate writes, a delayed ACK
        stalled every message: one session to smtp-sink fell from ~3,300 to ~2,000
        messages/s instead of rising to ~4,600."""
        if _QUICKACK is not None and self.sock is not None:
            try:
                self.sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
            except OSError:  # closed meanwhile: the next read says so
                pass

    def quit_quietly(self) -> None:
        """QUIT if possible, close in any case; never raises."""
        try:
            if self.sock is not None:
                if self._owed:
                    self.settle()
                self.sock.settimeout(self.timeouts.quit)
                self.putcmd("QUIT")
                self.getreply()
        except Exception:  # the connection is being dropped: nothing to report
            pass
        finally:
            self.close()

    # -- the transaction -----------------------------------------------------

    def send_mail_tx(self, sender: str, rcpts: Sequence[str], message: bytes,
                     smtputf8: bool = False, eightbit: bool = False) -> list[RcptResult]:
        """Deliver one message to `rcpts`; one result per recipient.

        Raises StaleConnection when a reused connection fails before the server
        answered anything; any other connection failure becomes a transient
        result for every recipient (ambiguous if the message may have been taken).
        """
        pipelining = self.has_extn("pipelining")
        mode: Callable[[bytes, list[bytes], bytes, _TxState], list[RcptResult] | _Owed]
        if pipelining and self.has_extn("chunking"):
            mode = self._tx_pipelined_bdat
        elif pipelining:
            mode = self._tx_pipelined_data
        else:
            mode = self._tx_lockstep
        state = _TxState(rcpts)
        try:
            # RFC 6152 3. With SMTPUTF8 the message is not ours to convert: a server without
            # SMTPUTF8 refuses it in _mail_command (5.6.7); one with it takes 8-bit anyway.
            if eightbit and not smtputf8 and not self.has_extn("8bitmime"):
                message = _seven_bit(message)
            with self.deadline("transaction", self.timeouts.transaction):
                mail_cmd = self._mail_command(sender, len(message), smtputf8, eightbit)
                rcpt_cmds = [b"RCPT TO:<" + _wire(r) + b">" for r in rcpts]
                results = mode(mail_cmd, rcpt_cmds, message, state)
        except DeliveryError as err:
            results = self._failed_tx(err, rcpts, state)
        self.messages_sent += 1
        self.last_used = time.monotonic()
        if isinstance(results, _Owed):  # handed on: the next holder reads our final reply
            return results.wait(self.timeouts.transaction)
        return results

    def _mail_command(self, sender: str, size: int, smtputf8: bool, eightbit: bool) -> bytes:
        params = []
        if self.has_extn("size"):
            params.append(b"SIZE=%d" % size)
        if eightbit and self.has_extn("8bitmime"):
            params.append(b"BODY=8BITMIME")
        if smtputf8:
            if not self.has_extn("smtputf8"):
                raise error_for(Reply(553, "5.6.7", "address needs SMTPUTF8, which the server"
                                      " does not offer"), "MAIL", Blame.MESSAGE)
            params.append(b"SMTPUTF8")
        return b" ".join([b"MAIL FROM:<" + _wire(sender) + b">", *params])

    def _send_lines(self, lines: Sequence[bytes], tail: bytes = b"") -> None:
        """The command lines, then `tail` (a message), in one write."""
        self._send(b"\r\n".join([*lines, tail]))  # "a\r\nb\r\n" + tail, a single copy

    def _send(self, data: bytes) -> None:
        """Write all of `data`. One `send()` first: on a live connection a flight nearly
        always fits the socket buffer, and gevent's `sendall()` costs a getsockopt()
        syscall and a deadline computation per call; the rest, if any, by `sendall()`."""
        sock = self._live()
        self._arm()
        if self._unsent:  # a message handed on with the connection leads the group
            data = self._unsent + data
            self._unsent = b""
        sent = sock.send(data)
        if sent < len(data):
            sock.sendall(memoryview(data)[sent:])
        self._awaiting = True

    def _read_envelope(self, rcpt_count: int, state: _TxState) -> tuple[Reply, list[Reply]]:
        """Read the replies to MAIL and each RCPT, in order."""
        with self.phase("MAIL", self.timeouts.mail):
            mail = self._mail_reply(state)
        rcpt_replies = []
        for _ in range(rcpt_count):
            with self.phase("RCPT", self.timeouts.rcpt):
                rcpt_replies.append(self._answer("RCPT"))
        return mail, rcpt_replies

    def _mail_reply(self, state: _TxState) -> Reply:
        """The reply to MAIL, the first of the transaction.

        On a reused connection, a 421 here is almost always the server's idle-timeout
        farewell crossing our MAIL on the wire (sent before it read MAIL): the connection
        was stale, the message was not refused. Failing before `answered` is set makes
        `_failed_tx` raise StaleConnection, so the message goes out on a fresh connection.
        """
        mail = self._answer("MAIL")
        # A 4.7.x 421 ("4.7.0 rate limited") is policy: the answer to this MAIL, never an
        # idle farewell; retrying it at once on fresh connections would hammer a server
        # that just told us to slow down, and hide the throttle from the shaper.
        policy = (mail.enhanced or "").startswith("4.7.")
        if mail.code == 421 and self.messages_sent > 0 and not policy:
            raise TransientError(mail, "MAIL", Blame.CONNECTION)
        state.answered = True
        state.mail = mail
        return mail

    def _tx_pipelined_bdat(self, mail_cmd: bytes, rcpt_cmds: list[bytes], message: bytes,
                           state: _TxState) -> list[RcptResult]:
        bdat = b"BDAT %d LAST\r\n" % len(message)
        with self.phase("MAIL", self.timeouts.data_block):
            self._send_lines([mail_cmd, *rcpt_cmds], bdat + message)
            state.data_sent = True
        mail, rcpt_replies = self._read_envelope(len(rcpt_cmds), state)
        with self.phase("BDAT", self.timeouts.final_dot):
            final = self._answer("BDAT")
        return self._results(mail, rcpt_replies, final, state)

    def _tx_pipelined_data(self, mail_cmd: bytes, rcpt_cmds: list[bytes], message: bytes,
                           state: _TxState) -> list[RcptResult] | _Owed:
        with self.phase("MAIL", self.timeouts.mail):
            self._send_lines([mail_cmd, *rcpt_cmds, b"DATA"])
        if self._owed:  # the previous transaction's final reply comes before ours
            self.settle()
        mail, rcpt_replies = self._read_envelope(len(rcpt_cmds), state)
        with self.phase("DATA", self.timeouts.data):
            data = self.reply()
        if not (mail.ok and any(r.ok for r in rcpt_replies)):
            if data.code == 354:
                # RFC 2920 3.1: a server that says 354 with no valid recipient gets an
                # empty message (a lone dot), never the body.
                with self.phase("DATA", self.timeouts.final_dot):
                    self._send_lines([b"."])
                    self.reply()
            return self._results(mail, rcpt_replies, data if not mail.ok else rcpt_replies[0],
                                 state)
        refused = _refused_data(data)
        if refused is not None:
            return self._results(mail, rcpt_replies, refused, state)
        payload = dot_stuff(message) + b".\r\n"
        debt = self._pass_on(mail, rcpt_replies, state, payload)
        if debt is not None:
            return debt
        self._send_message(payload, state)
        return self._final_results(mail, rcpt_replies, state)

    def _pass_on(self, mail: Reply, rcpt_replies: list[Reply], state: _TxState,
                 payload: bytes) -> _Owed | None:
        """After the 354: hand the connection to a caller waiting for one, with our
        message and dot (`payload`) still to send; it sends them ahead of its own MAIL,
        RCPT and DATA, in one write (`_send`), and then reads our final reply before its
        own (`settle`). None if nobody waits (we send and read ourselves).

        One write, so that the server reads the dot and the next envelope together and
        answers them together: apart, a server with Nagle's algorithm on holds its second
        answer until our ACK of the first (see `_ack_now`). Only here, after a 354: the
        reply to the dot ends the transaction whatever it says (RFC 5321 4.1.1.4), so the
        next MAIL never lands in a half-open one. The state is set after the hand-over:
        the new holder runs only once this greenlet yields, which it does not do before
        returning."""
        holder = self.holder
        if holder is None or not holder.pass_on(self):
            return None
        self._unsent = payload
        state.data_sent = True  # from now on the message may leave at any moment
        debt = _Owed(state.rcpts, lambda: self._owed_results(mail, rcpt_replies, state))
        self._owed.append(debt)
        return debt

    def _final_results(self, mail: Reply, rcpt_replies: list[Reply],
                       state: _TxState) -> list[RcptResult]:
        """The reply to the final dot, for every accepted recipient. No RSET after a
        refusal: the dot ended the transaction (RFC 5321 4.1.1.4)."""
        with self.phase("DATA", self.timeouts.final_dot):
            final = self._answer("DATA")
        return self._results(mail, rcpt_replies, final, state, reset=False)

    def _owed_results(self, mail: Reply, rcpt_replies: list[Reply],
                      state: _TxState) -> list[RcptResult]:
        """`_final_results`, read by the connection's next holder (`settle`)."""
        try:
            return self._final_results(mail, rcpt_replies, state)
        except DeliveryError as err:  # never stale: the server answered MAIL
            return self._failed_tx(err, state.rcpts, state)

    def _tx_lockstep(self, mail_cmd: bytes, rcpt_cmds: list[bytes], message: bytes,
                     state: _TxState) -> list[RcptResult]:
        with self.phase("MAIL", self.timeouts.mail):
            self._send_lines([mail_cmd])
            mail = self._mail_reply(state)
        if not mail.ok:
            return self._results(mail, [], mail, state)
        rcpt_replies = []
        for cmd in rcpt_cmds:
            with self.phase("RCPT", self.timeouts.rcpt):
                self._send_lines([cmd])
                rcpt_replies.append(self._answer("RCPT"))
        if not any(r.ok for r in rcpt_replies):
            return self._results(mail, rcpt_replies, rcpt_replies[0], state)
        if self.has_extn("chunking"):
            with self.phase("BDAT", self.timeouts.final_dot):
                self._send(b"BDAT %d LAST\r\n" % len(message) + message)
                state.data_sent = True
                final = self._answer("BDAT")
        else:
            with self.phase("DATA", self.timeouts.data):
                self._send_lines([b"DATA"])
                data = self.reply()
            refused = _refused_data(data)
            if refused is not None:
                return self._results(mail, rcpt_replies, refused, state)
            self._send_message(dot_stuff(message) + b".\r\n", state)
            return self._final_results(mail, rcpt_replies, state)
        return self._results(mail, rcpt_replies, final, state)

    def _send_message(self, payload: bytes, state: _TxState) -> None:
        """After the 354: the dot-stuffed message and its dot."""
        with self.phase("DATA", self.timeouts.data_block):
            self._send(payload)
            state.data_sent = True

    def _answer(self, command: str) -> Reply:
        """The reply to MAIL, RCPT or the message, where success is 2xx only (RFC 5321
        4.2.1, 4.3.2). Regression (fuzzing found it): a "354" after the message counted
        as delivered; a 3xx here is a protocol error, never a success."""
        reply = self.reply()
        if 300 <= reply.code < 400:
            raise ProtocolError(f"{reply.code} reply to {command}, where only 2xx is success")
        return reply

    def _results(self, mail: Reply, rcpt_replies: list[Reply], final: Reply,
                 state: _TxState, reset: bool = True) -> list[RcptResult]:
        """Per-recipient outcome: a refused MAIL or RCPT, else the final reply. After a
        refusal, RSET (`reset`), unless the transaction is known to be over."""
        results = []
        for i, rcpt in enumerate(state.rcpts):
            if not mail.ok:
                reply = mail
            elif not rcpt_replies[i].ok:
                reply = rcpt_replies[i]
            else:
                reply = final
            results.append(RcptResult(rcpt, reply))
        if reset and (not final.ok or not mail.ok):
            self._reset_quietly()
        return results

    def _failed_tx(self, err: DeliveryError, rcpts: Sequence[str],
                   state: _TxState) -> list[RcptResult]:
        """The transaction failed without replies to judge it by; say what that means."""
        if err.blame is Blame.MESSAGE:  # refused before anything was sent
            return [RcptResult(r, err.reply) for r in rcpts]
        self.close()  # a connection-level failure leaves the session unusable
        if self.messages_sent > 0 and not state.answered:
            raise StaleConnection(err.reply, err.command, Blame.CONNECTION) from err
        if state.mail is not None and not state.mail.ok:
            # Regression (a pipelined MAIL answered "421 rate limited", then the server
            # hung up, as servers do after a 421): the refusal is the outcome. The
            # server took nothing, so the loss is neither ambiguous nor the reply.
            return [RcptResult(r, state.mail) for r in rcpts]
        ambiguous = state.data_sent
        reply = err.reply
        if ambiguous:
            reply = Reply(451, "4.4.2", f"{err.reply.text}; the message may have been"
                                        " delivered (no reply to the final dot)")
        return [RcptResult(r, reply, ambiguous) for r in rcpts]

    def _reset_quietly(self) -> None:
        """RSET after a failed transaction so the next one starts clean."""
        try:
            with self.phase("RSET", self.timeouts.rset):
                self.putcmd("RSET")
                if not self.reply().ok:
                    self.close()
        except DeliveryError:
            self.close()


class _Phase:
    """The context manager behind `Connection.phase`.

    A plain class rather than a generator-based `@contextmanager`: a phase is entered
    4-5 times per message, and a generator, its wrapper object and the `throw()` into
    it cost several times what these two methods do. Same semantics: entering sets
    the command in flight and the phase's deadline (a deadline already passed fails
    here, translated; the socket is armed at each read and write); leaving clears the
    deadline, lets a `DeliveryError` and non-`Exception`s (`gevent.Timeout`,
    `GreenletExit`) through as they are, and translates any other exception
    (`Connection._failed`).
    """

    __slots__ = ("command", "conn", "timeout")

    def __init__(self, conn: Connection, command: str, timeout: float) -> None:
        self.conn = conn
        self.command = command
        self.timeout = timeout

    def __enter__(self) -> None:
        conn = self.conn
        conn.command = self.command
        now = time.monotonic()
        conn._phase_end = now + self.timeout
        span = conn._span
        if self.timeout <= 0 or (span is not None and span.end <= now):
            conn._phase_end = math.inf
            passed = TimeoutError("deadline passed")
            raise conn._failed(passed, self.command, self.timeout) from passed
        # The socket is armed right before its I/O (`Connection._arm`), not here.

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.conn._phase_end = math.inf
        if isinstance(exc, Exception) and not isinstance(exc, DeliveryError):
            raise self.conn._failed(exc, self.command, self.timeout) from exc
        # None: nothing to translate; a DeliveryError or a BaseException propagates as is


class _Deadline:
    """The context manager behind `Connection.deadline` (a class, not a generator, for
    the same reason as `_Phase`: one per message). Entering sets the span in force
    (the outer one if it ends sooner) and starts the gevent backstop; leaving stops it,
    restores the outer span, and turns the backstop's firing into a TransientError
    naming the deadline, after closing the connection (interrupted mid-step, the session
    is unusable)."""

    __slots__ = ("backstop", "conn", "name", "outer", "seconds", "span")

    def __init__(self, conn: Connection, name: str, seconds: float) -> None:
        self.conn = conn
        self.name = name
        self.seconds = seconds

    def __enter__(self) -> None:
        conn = self.conn
        self.outer = outer = conn._span
        span = _Span(self.name, self.seconds, time.monotonic() + self.seconds)
        if outer is not None and outer.end < span.end:
            span = outer
        self.span = conn._span = span
        self.backstop = backstop = conn._backstop(self.seconds)
        if backstop is not None:
            backstop.start()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        conn = self.conn
        backstop = self.backstop
        if backstop is not None:
            backstop.cancel()
        conn._span = self.outer
        if exc is not None and exc is backstop:
            conn.close()
            raise TransientError(self.span.reply(conn.command), conn.command) from None


class _Span:
    """A deadline over several phases: its name, length and end (monotonic)."""

    __slots__ = ("end", "name", "seconds")

    def __init__(self, name: str, seconds: float, end: float) -> None:
        self.name = name
        self.seconds = seconds
        self.end = end

    def expired(self, exc: BaseException) -> bool:
        """`exc` is a timeout that this deadline, not the phase's own, caused."""
        return isinstance(exc, (socket.timeout, TimeoutError)) and \
            time.monotonic() >= self.end - 0.01

    def reply(self, command: str) -> Reply:
        where = f" (in {command})" if command else ""
        return Reply(451, "4.4.2", f"{self.name} took longer than {self.seconds:g}s{where}")


class _Owed:
    """A transaction that handed its connection on before its final reply: the next
    holder reads that reply (`Connection.settle`) while the transaction's own greenlet
    waits for the results."""

    __slots__ = ("rcpts", "read", "results")

    def __init__(self, rcpts: list[str], read: Callable[[], list[RcptResult]]) -> None:
        self.rcpts = rcpts
        self.read = read  # reads the reply; the results, or the failure turned into them
        self.results: AsyncResult = AsyncResult()

    def settle(self, results: list[RcptResult]) -> None:
        self.results.set(results)

    def lose(self) -> None:
        """The reply will never be read: the message may or may not have been taken."""
        self.results.set(_no_final_reply(self.rcpts))

    def wait(self, timeout: float) -> list[RcptResult]:
        """The results, or (the next holder never read the reply in `timeout`: a bug)
        an ambiguous deferral."""
        try:
            results: list[RcptResult] = self.results.get(timeout=timeout)
        except gevent.Timeout:
            return _no_final_reply(self.rcpts)
        return results


def _no_final_reply(rcpts: list[str]) -> list[RcptResult]:
    reply = Reply(451, "4.4.2", "connection lost before the reply to the final dot; the"
                                " message may have been delivered")
    return [RcptResult(r, reply, ambiguous=True) for r in rcpts]


class _TxState:
    """How far a transaction got, to judge a failure."""

    def __init__(self, rcpts: Sequence[str]) -> None:
        self.rcpts = list(rcpts)
        self.answered = False  # the server replied to MAIL
        self.mail: Reply | None = None  # that reply
        self.data_sent = False  # the whole message and its terminator are on the wire


def _refused_data(reply: Reply) -> Reply | None:
    """None if the reply to DATA opens the message (354), else the refusal (the outcome).

    Regression (fuzzing found it): a server answering 250 to DATA had the recipients
    reported delivered, although the body was never sent. Only 354 opens the body;
    another success code is a protocol error, a refusal is the outcome."""
    if reply.code == 354:
        return None
    if reply.ok:
        raise TransientError(Reply(451, "4.5.0", f"protocol error: {reply.code} reply to"
                                   " DATA, where 354 was expected"), "DATA")
    return reply


def dot_stuff(message: bytes) -> bytes:
    """RFC 5321 4.5.2: double a leading dot on every line. `message` ends with CRLF."""
    stuffed = message.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    return stuffed


def _seven_bit(message: bytes) -> bytes:
    """The 8-bit message converted to 7-bit for a server without 8BITMIME (engine.downgrade),
    or a refusal of the message: 554 5.6.3 for every recipient, before MAIL."""
    try:
        return to_7bit(message)
    except CannotConvert as exc:
        raise error_for(Reply(554, "5.6.3", "8-bit message, the server does not offer"
                              f" 8BITMIME, and conversion to 7-bit is not possible: {exc}"),
                        "MAIL", Blame.MESSAGE) from None


def _check_helo(helo: str) -> None:
    """The EHLO name goes on the wire as is: config checks its syntax; this is the last
    guard against a name that could end the command line early."""
    if not helo or not helo.isascii() or not helo.isprintable() or " " in helo:
        raise ValueError(f"EHLO name must be printable ASCII without spaces: {helo!r}")


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _wire(value: str) -> bytes:
    """An address or parameter as it goes on the wire; refuses what could inject commands."""
    if "\r" in value or "\n" in value or "\0" in value:
        raise error_for(Reply(501, "5.1.3", "CR, LF or NUL in an envelope field refused"),
                        "MAIL", Blame.MESSAGE)
    return value.encode("utf-8")


def _split_reply_line(line: bytes) -> tuple[int, bool, bytes]:
    """'250-text' -> (250, True, b'text'); anything else is a protocol error."""
    code = line[:3]
    sep = line[3:4]
    if len(code) != 3 or not code.isdigit() or sep not in (b"-", b" ", b"\r", b"\n", b""):
        raise ProtocolError(f"malformed reply line {line[:40]!r}")
    value = int(code)
    if not 200 <= value <= 599:
        raise ProtocolError(f"reply code {value} out of range")
    return value, sep == b"-", line[4:].strip()


def _readable(sock: socket.socket | None) -> bool:
    if sock is None:
        return False
    readable, _, _ = select.select([sock], [], [], 0)
    return bool(readable)


def _wait_readable(sock: socket.socket) -> None:
    """Before the first read after sending a flight: wait until the socket is readable.

    The server cannot have answered yet, so a recv() now fails with EAGAIN, and gevent
    then waits exactly so (same watcher, same timeout, same socket.timeout): twice per
    message a syscall and an exception for nothing. A gevent plaintext socket only
    (`_wait` and `_read_event` are gevent's, in every version we support); TLS keeps
    its own buffering, and a blocking socket waits in recv() anyway."""
    wait = getattr(sock, "_wait", None)
    if wait is not None and not isinstance(sock, ssl.SSLSocket):
        wait(sock._read_event)  # type: ignore[attr-defined]


def _has_data(sock: socket.socket | None) -> bool:
    """Bytes are waiting to be read (end of file is not data); never blocks."""
    if not _readable(sock):
        return False
    assert sock is not None
    try:
        return bool(sock.recv(1, socket.MSG_PEEK))
    except OSError:  # reset: not injected data; the TLS handshake will fail and say why
        return False


def _translate(exc: BaseException, command: str, timeout: float) -> DeliveryError:
    """smtplib, socket, ssl and timeout errors -> the engine's errors (the only place)."""
    if isinstance(exc, ssl.SSLError) or command == "TLS":  # any handshake failure
        return TlsError(Reply(451, "4.7.5", f"TLS failure: {_short(exc)}"), command)
    # The reply text names the phase: it is all that reaches the recipient's event.
    where = f" in {command}" if command else ""
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return TransientError(Reply(451, "4.4.2", f"timeout after {timeout:g}s{where}"), command)
    if isinstance(exc, ConnectionRefusedError):
        return TransientError(Reply(451, "4.4.1", "connection refused"), command)
    if isinstance(exc, (smtplib.SMTPServerDisconnected, ConnectionError, EOFError)):
        return TransientError(Reply(451, "4.4.2", f"connection lost{where}: {_short(exc)}"),
                              command)
    if isinstance(exc, ProtocolError):
        return TransientError(Reply(451, "4.5.0", f"protocol error: {_short(exc)}"), command)
    if isinstance(exc, OSError):
        return TransientError(Reply(451, "4.4.1", f"network error: {_short(exc)}"), command)
    # A bug of ours must never bounce mail: unknown means transient.
    return TransientError(Reply(451, "4.3.0", f"internal error: {type(exc).__name__}: "
                                              f"{_short(exc)}"), command)


class TlsError(TransientError):
    """The TLS handshake (or a TLS record) failed."""


def _short(exc: BaseException, limit: int = 200) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= limit else text[:limit] + "..."
