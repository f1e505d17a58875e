"""One outbound SMTP connection: the socket, its replies, and the session around transactions.

`Connection` opens a TCP connection from the sending IP, reads the banner, says EHLO (or
HELO), upgrades with STARTTLS, carries transactions (engine.smtp.transaction) and says QUIT.
It reads every reply itself, so that

- a reply is bounded (line length, line count: `ReplyLimits`): a hostile server cannot
  make the worker buffer without end;
- commands can be pipelined (RFC 2920): several commands go out in one write and their
  replies are read back in order;
- STARTTLS refuses a server that sent bytes after its 220 (response injection: those bytes
  would otherwise be read as if they came over TLS);
- every read and write happens within the time its phase has left (engine.smtp.deadlines),
  and every failure inside a phase becomes one `DeliveryError` carrying a reply and the
  command in flight (engine.classify.translate, the one place that knows smtplib, socket
  and ssl exceptions).

smtplib is used for what it is good at, EHLO and its parsing, the extensions, command
lines, through a private `smtplib.SMTP` whose reads and writes are the connection's
(`_Commands`). The connection is not an `smtplib.SMTP`: its `sendmail()`, `data()`,
`starttls()`, `login()` would bypass the phases and the one error translation.
"""
from __future__ import annotations

import math
import select
import smtplib
import socket
import ssl
import time
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

from engine import classify
from engine.config import Timeouts
from engine.memo import Memo
from engine.reply import DeliveryError, ProtocolError, Reply
from engine.smtp.deadlines import Deadline, Deadlines, Phase
from engine.smtp.handover import Handover, Holder, Stopping
from engine.text import cut

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer


@dataclass(frozen=True)
class ReplyLimits:
    """Caps on what a server may send us, and what of it we ignore."""

    max_line_length: int = 4096
    max_reply_lines: int = 100
    discard_ehlo_keywords: frozenset[str] = frozenset()  # lower case, as smtplib keys them


@dataclass(frozen=True)
class Keepalive:
    """TCP keepalive, in whole seconds: probes after `idle` seconds without traffic, one every
    `interval`; `count` unanswered ones and the kernel drops the connection. A peer gone
    without a FIN (host down, NAT state dropped) then shows as an error on the idle socket,
    which `is_alive` sees, instead of holding the next MAIL for its whole timeout."""

    idle: int
    interval: int
    count: int

    @classmethod
    def of(cls, idle: float, interval: float, count: int) -> Keepalive | None:
        """From the config's durations (rounded up); None when `idle` is 0 (off)."""
        if idle <= 0:
            return None
        return cls(max(1, math.ceil(idle)), max(1, math.ceil(interval)), count)


# Linux's TCP_QUICKACK (None elsewhere: there the ACK is left to the system).
_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)
# Linux's keepalive tuning (macOS has TCP_KEEPALIVE for the idle time: left at its default).
_KEEPALIVE_OPTIONS = tuple(getattr(socket, name, None)
                           for name in ("TCP_KEEPIDLE", "TCP_KEEPINTVL", "TCP_KEEPCNT"))
# Characters of a reply's text that are kept: it travels into events, logs and the spool.
MAX_REPLY_TEXT = 1000
# One-line replies already parsed, by their raw line: a server says the same few ("250 2.1.0
# Ok") message after message, so a dict lookup replaces splitting, decoding and parsing.
# Reply is immutable, so sharing is safe; the memo is emptied when full (replies carrying a
# queue id never repeat and must not make it grow).
_REPLIES: Memo[bytes, Reply] = Memo(256)


class Connection:
    """An SMTP client connection bound to one source address."""

    def __init__(self, helo: str, source_ip: str, timeouts: Timeouts,
                 limits: ReplyLimits, keepalive: Keepalive | None = None) -> None:
        _check_helo(helo)
        self.keepalive = keepalive
        self._smtp = _Commands(self, helo)
        self.source_address = (source_ip, 0)
        self.sock: socket.socket | None = None
        self._deadlines = Deadlines()
        self.timeouts = timeouts
        self.limits = limits
        self._rbuf = bytearray()
        self.peer: tuple[str, int] | None = None
        self.tls_version: str | None = None
        self.tls_verified: bool | None = None
        self.messages_sent = 0
        self.created = time.monotonic()
        self.last_used = self.created
        # A flight was just sent: its reply cannot be there yet (see _wait_readable).
        self._awaiting = False
        self.holder: Holder | None = None  # set by the pool while checked out
        # Transactions handed on before their final reply, and the message and dot the
        # next holder sends first (engine.smtp.transaction).
        self.handover = Handover()

    # -- reading replies -------------------------------------------------

    def reply(self) -> Reply:
        """Read one (possibly multi-line) reply, within the configured caps."""
        line = self._readline()
        reply = _REPLIES.get(line)  # only one-line replies are there (see _REPLIES)
        if reply is None:
            code, text = self._collect(line)
            reply = Reply.parse(code, cut(text.decode("utf-8", "replace"), MAX_REPLY_TEXT))
            if line[3:4] != b"-":  # the whole reply was this one line
                _REPLIES.keep(line, reply)
        return reply

    def _getreply(self) -> tuple[int, bytes]:
        """`reply()` as smtplib's `getreply()` has it: the code and the lines' text."""
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

    # -- writing ----------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Write all of `data` (a flight of commands, a message). One `send()` first: on a
        live connection a flight nearly always fits the socket buffer, and gevent's
        `sendall()` costs a getsockopt() syscall and a deadline computation per call; the
        rest, if any, by `sendall()`."""
        sock = self._live()
        self._arm()
        sent = sock.send(data)
        if sent < len(data):
            sock.sendall(memoryview(data)[sent:])
        self._awaiting = True

    def putcmd(self, command: str) -> None:
        """One command line (smtplib's), e.g. RSET, within the phase's time."""
        self._smtp.putcmd(command)

    def _send_command(self, s: ReadableBuffer | str) -> None:
        """smtplib's writes (EHLO, HELO, STARTTLS, RSET, QUIT), as smtplib's `send()` does
        them, within the phase's time."""
        sock = self.sock
        if sock is None:
            raise smtplib.SMTPServerDisconnected("please run connect() first")
        self._arm()  # before sendall(), not inside its `try`: a deadline is not a hang-up
        data = s.encode("ascii") if isinstance(s, str) else s
        try:
            sock.sendall(data)
        except OSError as exc:
            self.close()
            raise smtplib.SMTPServerDisconnected("Server not connected") from exc

    def _live(self) -> socket.socket:
        """The socket, or the error smtplib raises for a closed connection."""
        if self.sock is None:
            raise smtplib.SMTPServerDisconnected("not connected")
        return self.sock

    def close(self) -> None:
        self._rbuf.clear()
        sock = self.sock
        self.sock = None
        if sock is not None:
            sock.close()
        self.handover.drop()  # nothing more is sent; the replies owed are never read

    # -- time -------------------------------------------------------------

    def phase(self, command: str, timeout: float) -> Phase:
        """Run one protocol step within `timeout` seconds in all; translate any failure
        (`with conn.phase("MAIL", t): ...`; engine.smtp.deadlines)."""
        return Phase(self._deadlines, command, timeout)

    def deadline(self, name: str, seconds: float) -> Deadline:
        """Bound every phase inside to `seconds` in all ("setup", "transaction"): enforced
        through the socket timeouts, and in a gevent worker also by a `gevent.Timeout`.
        A nested deadline never extends an outer one (engine.smtp.deadlines)."""
        return Deadline(self._deadlines, name, seconds, self)

    @property
    def command(self) -> str:
        """The command in flight, for error reports."""
        return self._deadlines.command

    def _arm(self) -> None:
        """Give the socket what is left of the phase and of the deadline in force; called
        right before each read and write (`_readline`, `write`, `_send_command`, the TLS
        handshake)."""
        left = self._deadlines.left()
        if self.sock is not None and left != math.inf:
            self.sock.settimeout(left)

    # -- the session --------------------------------------------------------

    def open(self, address: str, port: int) -> Reply:
        """TCP connect from the source address and read the banner."""
        with self.phase("CONNECT", self.timeouts.connect):
            self.sock = socket.create_connection((address, port),
                                                 self._deadlines.within(self.timeouts.connect),
                                                 self.source_address)
            # Each transaction leaves in one write; never hold a tail back for an ACK.
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.keepalive is not None:
                _keep_alive(self.sock, self.keepalive)
            self.peer = (address, port)
        with self.phase("BANNER", self.timeouts.banner):
            return self.reply()

    def hello(self) -> Reply:
        """EHLO, falling back to HELO when the server does not speak ESMTP."""
        with self.phase("EHLO", self.timeouts.ehlo):
            code, text = self._smtp.ehlo()
            if not classify.speaks_helo_only(code):
                for keyword in self.limits.discard_ehlo_keywords:
                    self._smtp.esmtp_features.pop(keyword, None)
                return Reply.parse(code, text.decode("utf-8", "replace"))
            self._deadlines.command = "HELO"
            code, text = self._smtp.helo()
            return Reply.parse(code, text.decode("utf-8", "replace"))

    def has_extn(self, name: str) -> bool:
        """Whether the server offered the extension `name` in its EHLO reply."""
        return name.lower() in self._smtp.esmtp_features

    @property
    def does_esmtp(self) -> bool:
        """Whether the server answered EHLO (not only HELO)."""
        return bool(self._smtp.does_esmtp)

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
        self._smtp.forget_ehlo()
        ehlo = self.hello()
        if not ehlo.ok:  # refused after the upgrade: no session to send mail in
            raise classify.turned_away(ehlo, "EHLO")
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

    def answers(self, timeout: float) -> bool:
        """Whether the server answers an RSET with 250 within `timeout` seconds: the bounded
        check of a connection that has been idle a while, before reuse (engine.pool). A
        half-open connection (the peer gone without a FIN) passes `is_alive`: the kernel
        has nothing to report until keepalive gives up, and only a round trip tells. RSET,
        as Postfix checks a cached session: harmless between transactions. A failure
        leaves the connection closed."""
        try:
            with self.phase("RSET", timeout):
                self.putcmd("RSET")
                if self.reply().code == 250:
                    return True
        except DeliveryError:
            pass
        self.close()
        return False

    def reusable(self) -> bool:
        """`is_alive` without its select(), for a connection handed straight from one
        transaction to the next (engine.pool): open, and nothing unread after the last reply.
        A server hanging up (or its 421) in those microseconds is seen at MAIL and retried
        on a fresh connection like any stale one (StaleConnection)."""
        if self.sock is None or self._rbuf:
            return False
        return not (isinstance(self.sock, ssl.SSLSocket) and self.sock.pending())

    def quit_quietly(self) -> None:
        """QUIT if possible, close in any case; never raises."""
        try:
            if self.sock is not None:
                if self.handover.owed:
                    self.settle()
                self.sock.settimeout(self.timeouts.quit)  # (closed by settle: we are done)
                self.putcmd("QUIT")
                self._getreply()
        except Exception:  # the connection is being dropped: nothing to report
            pass
        finally:
            self.close()

    # -- what transactions leave behind (engine.smtp.handover) -------------------------

    def send_flight(self, data: bytes) -> None:
        """Write `data` in one flight, led by a handed-on message and its dot if one waits."""
        handover = self.handover
        if handover.unsent:  # a message handed on with the connection leads the group
            data = handover.take_unsent() + data
        self.write(data)

    @property
    def owes(self) -> bool:
        """An earlier transaction's final reply is still to be read (`settle`)."""
        return bool(self.handover.owed)

    def settle(self) -> None:
        """Read the final replies owed to the transactions that handed this connection on
        (oldest first), and give each transaction its results.

        The holder calls it once its own commands are on the wire (a pipelined group may
        start with the message before it, RFC 2920 3.1: `send_flight` put it there), or
        before anything else it does with the connection (the message then goes alone). A
        failed read closes the connection: each transaction still owed then gets an
        ambiguous deferral (its message may have left, no reply came)."""
        handover = self.handover
        if handover.unsent:
            try:
                with self.phase("DATA", self.timeouts.data_block):
                    self.send_flight(b"")
            except DeliveryError:
                self.close()  # the owed transactions get their ambiguous deferral
                return
        while handover.owed:
            debt = handover.owed.popleft()
            try:
                results = debt.read()
            except BaseException as exc:  # killed while reading: the reply is lost to it
                debt.lose(classify.stopped_before_final_reply()
                          if isinstance(exc, Stopping) else None)
                raise
            self.ack_now()
            debt.settle(results)

    def ack_now(self) -> None:
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


class _Commands(smtplib.SMTP):
    """smtplib for what it is good at: EHLO and HELO, the parsing of the extensions, command
    lines. Never connected itself: its reads and writes are the connection's (bounded, within
    the phase's time), and the connection never exposes its other methods.

    It refers to its connection weakly: a cycle would leave every closed connection to the
    cyclic garbage collector, which the worker runs seldom (engine.gctune)."""

    def __init__(self, conn: Connection, helo: str) -> None:
        super().__init__(local_hostname=helo)
        self._conn: Connection = weakref.proxy(conn)

    def getreply(self) -> tuple[int, bytes]:
        return self._conn._getreply()

    def send(self, s: ReadableBuffer | str) -> None:
        self._conn._send_command(s)

    def close(self) -> None:
        self._conn.close()

    def forget_ehlo(self) -> None:
        """After STARTTLS: what the server said before counts no more (RFC 3207 4.2)."""
        self.helo_resp = self.ehlo_resp = None
        self.esmtp_features = {}
        self.does_esmtp = False


def _check_helo(helo: str) -> None:
    """The EHLO name goes on the wire as is: config checks its syntax; this is the last
    guard against a name that could end the command line early."""
    if not helo or not helo.isascii() or not helo.isprintable() or " " in helo:
        raise ValueError(f"EHLO name must be printable ASCII without spaces: {helo!r}")


def _keep_alive(sock: socket.socket, keepalive: Keepalive) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    values = (keepalive.idle, keepalive.interval, keepalive.count)
    for option, value in zip(_KEEPALIVE_OPTIONS, values, strict=True):
        if option is not None:
            sock.setsockopt(socket.IPPROTO_TCP, option, value)


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
