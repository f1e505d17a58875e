"""The time limits on one connection: each phase's own timeout, and deadlines over several.

Every protocol step runs in a *phase* (`Deadlines.phase`): CONNECT, BANNER, EHLO, MAIL,
RCPT, DATA... each with its RFC 5321 timeout, a deadline for the whole phase, so that a
server that drips one byte a second cannot stretch it. A *deadline* (`Deadlines.deadline`)
bounds several phases together, opening a connection ("setup") or one transaction
("transaction"), so that a server answering each step just in time cannot hold the
connection for their sum.

Both are enforced through the socket's timeout: right before each read and write the
connection asks `Deadlines.left` what is left of the phase and of the deadline in force, and
gives that to the socket (no fresh timeout per read). In a gevent worker a deadline also
starts a `gevent.Timeout`, the backstop, which interrupts what socket timeouts cannot (a TLS
handshake fed one byte at a time).

A failure inside a phase leaves it as the engine's error (`Deadlines.failed`): the
deadline's own reply if the deadline ran out, else engine.classify's translation of the
exception.

The context managers are plain classes rather than generator-based `@contextmanager`s:
a phase is entered 4-5 times per message, and a generator, its wrapper object and the
`throw()` into it cost several times what their two methods do.
"""
from __future__ import annotations

import math
import socket
import time
from types import TracebackType
from typing import Protocol

import gevent
from gevent import monkey

from engine import classify
from engine.reply import DeliveryError, Reply, TransientError


class Closable(Protocol):
    """What a deadline ends when its backstop fires: the connection."""

    def close(self) -> None: ...


class Deadlines:
    """The limits in force on one connection, and the command in flight (for error
    reports). A connection holds one; it holds nothing of the connection."""

    __slots__ = ("_timer", "command", "phase_end", "span")

    def __init__(self) -> None:
        self.phase_end = math.inf  # monotonic deadline of the phase in progress
        self.span: Span | None = None  # the deadline() in force, if any
        self.command = ""  # the command in flight, for error reports
        self._timer: gevent.Timeout | None = None  # reused by deadline(), see _backstop

    def phase(self, command: str, timeout: float) -> Phase:
        """Run one protocol step within `timeout` seconds in all; translate any failure
        (`with deadlines.phase("MAIL", t): ...`; see `Phase`)."""
        return Phase(self, command, timeout)

    def deadline(self, name: str, seconds: float, conn: Closable) -> Deadline:
        """Bound every phase inside to `seconds` in all ("setup", "transaction"); `conn`
        is closed if the backstop fires. A nested deadline never extends an outer one
        (see `Deadline`)."""
        return Deadline(self, name, seconds, conn)

    def left(self) -> float:
        """Seconds left of the phase and of the deadline in force (inf: no limit); raises
        TimeoutError when none is left. Asked right before each read and write, not when
        a phase begins: most phases read a reply that came with the previous one, and
        need no timeout at all."""
        span = self.span
        end = self.phase_end if span is None else min(self.phase_end, span.end)
        left = end - time.monotonic()
        if left <= 0:
            raise TimeoutError("deadline passed")
        return left

    def within(self, timeout: float) -> float:
        """`timeout`, or less if the deadline in force comes sooner."""
        if self.span is None:
            return timeout
        return max(0.001, min(timeout, self.span.end - time.monotonic()))

    def failed(self, exc: Exception, command: str, timeout: float) -> DeliveryError:
        """What a failure inside a phase becomes: the deadline's reply if the deadline in
        force, not the phase's own timeout, ran out; else classify's translation."""
        span = self.span
        if span is not None and span.expired(exc):
            return TransientError(span.reply(command), command)
        return classify.translate(exc, command, timeout)

    def _backstop(self, seconds: float) -> gevent.Timeout | None:
        """A stopped `gevent.Timeout` of `seconds` for a deadline, None without gevent.

        The last one is kept and used again: a transaction's deadline has the same length
        every time, and a new Timeout per message cost a timer allocation for nothing
        (a cancelled Timeout can be started again)."""
        if not monkey.is_module_patched("socket"):
            return None
        timer = self._timer
        if timer is None or timer.seconds != seconds or timer.pending:
            timer = self._timer = gevent.Timeout(seconds)
        return timer


class Phase:
    """The context manager behind `Deadlines.phase`.

    Entering sets the command in flight and the phase's deadline (a deadline already
    passed fails here, translated; the socket is armed at each read and write); leaving
    clears the deadline, lets a `DeliveryError` and non-`Exception`s (`gevent.Timeout`,
    `GreenletExit`) through as they are, and translates any other exception
    (`Deadlines.failed`).
    """

    __slots__ = ("command", "deadlines", "timeout")

    def __init__(self, deadlines: Deadlines, command: str, timeout: float) -> None:
        self.deadlines = deadlines
        self.command = command
        self.timeout = timeout

    def __enter__(self) -> None:
        deadlines = self.deadlines
        deadlines.command = self.command
        now = time.monotonic()
        deadlines.phase_end = now + self.timeout
        span = deadlines.span
        if self.timeout <= 0 or (span is not None and span.end <= now):
            deadlines.phase_end = math.inf
            passed = TimeoutError("deadline passed")
            raise deadlines.failed(passed, self.command, self.timeout) from passed
        # The socket is armed right before its I/O (`Deadlines.left`), not here.

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.deadlines.phase_end = math.inf
        if isinstance(exc, Exception) and not isinstance(exc, DeliveryError):
            raise self.deadlines.failed(exc, self.command, self.timeout) from exc
        # None: nothing to translate; a DeliveryError or a BaseException propagates as is


class Deadline:
    """The context manager behind `Deadlines.deadline` (a class, not a generator, for the
    same reason as `Phase`: one per message). Entering sets the span in force (the outer
    one if it ends sooner) and starts the gevent backstop; leaving stops it, restores the
    outer span, and turns the backstop's firing into a TransientError naming the deadline,
    after closing the connection (interrupted mid-step, the session is unusable)."""

    __slots__ = ("backstop", "conn", "deadlines", "name", "outer", "seconds", "span")

    def __init__(self, deadlines: Deadlines, name: str, seconds: float,
                 conn: Closable) -> None:
        self.deadlines = deadlines
        self.name = name
        self.seconds = seconds
        self.conn = conn

    def __enter__(self) -> None:
        deadlines = self.deadlines
        self.outer = outer = deadlines.span
        span = Span(self.name, self.seconds, time.monotonic() + self.seconds)
        if outer is not None and outer.end < span.end:
            span = outer
        self.span = deadlines.span = span
        self.backstop = backstop = deadlines._backstop(self.seconds)
        if backstop is not None:
            backstop.start()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        deadlines = self.deadlines
        backstop = self.backstop
        if backstop is not None:
            backstop.cancel()
        deadlines.span = self.outer
        if exc is not None and exc is backstop:
            self.conn.close()
            command = deadlines.command
            raise TransientError(self.span.reply(command), command) from None


class Span:
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
        return classify.deadline_passed(self.name, self.seconds, command)
