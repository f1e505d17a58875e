"""What one SMTP connection carries from one transaction to the next.

After the 354, a transaction may hand its connection to the next caller waiting for it
(the pool's checkout, a `Holder`) with its message and final dot still to send. They wait
in the connection's `Handover`: the next holder sends them ahead of its own MAIL, RCPT and
DATA in one write (RFC 2920 3.1: message content may lead a pipelined group), then reads
the reply owed to the first transaction (`Connection.settle`) before its own, and hands
the first transaction its results (`Owed`). engine.smtp.transaction makes the hand-over;
engine.smtp.connection keeps the state and settles what is owed.

`Stopping` lives here too, below both: at the worker's drain deadline (SIGTERM) a
transaction, or the holder reading a reply owed to another, says what is left to report.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import gevent
from gevent.event import AsyncResult

from engine import classify
from engine.reply import Reply


@dataclass(frozen=True)
class RcptResult:
    rcpt: str
    reply: Reply
    ambiguous: bool = False  # no reply to the final dot: the server may have the message


class Holder(Protocol):
    """Whoever has the connection checked out (engine.pool's checkout)."""

    def pass_on(self) -> bool:
        """Give the connection to the next caller now, if one waits, although the reply to
        this transaction's final dot is still on the way; True if it did (the next holder
        reads that reply: `Connection.settle`)."""


class Handover:
    """What a connection carries from one transaction to the next: the transactions handed
    on before their final reply (the next holder reads it), and the last one's message and
    dot, which the next holder sends ahead of its own MAIL, RCPT and DATA, in the same write
    (`Connection.send_flight`). A connection holds one; it holds nothing of the connection."""

    __slots__ = ("owed", "unsent")

    def __init__(self) -> None:
        self.owed: deque[Owed] = deque()
        self.unsent = b""

    def hand_on(self, debt: Owed, payload: bytes) -> None:
        """`debt`'s transaction hands the connection on with `payload`, its message and
        dot, still to send (by the next holder's `Connection.send_flight`)."""
        self.unsent = payload
        self.owed.append(debt)

    def take_unsent(self) -> bytes:
        """The message and dot handed on last, for the next holder to write now, ahead of
        its own commands. From here on the server may have them (`Owed.sending`), whether
        the write then succeeds or not: a failed write may have handed all of them to the
        socket before it failed."""
        payload, self.unsent = self.unsent, b""
        if self.owed:
            self.owed[-1].sending = True  # the unsent message is the last one handed on's
        return payload

    def drop(self) -> None:
        """The connection closed: nothing more is sent, and the replies owed will never be
        read (each transaction owed gets a deferral, ambiguous if its message left)."""
        self.unsent = b""
        while self.owed:
            self.owed.popleft().lose()


class Owed:
    """A transaction that handed its connection on before its final reply: the next
    holder reads that reply (`Connection.settle`) while the transaction's own greenlet waits for the
    results."""

    __slots__ = ("rcpts", "read", "results", "sending")

    def __init__(self, rcpts: list[str], read: Callable[[], list[RcptResult]]) -> None:
        self.rcpts = rcpts
        self.read = read  # reads the reply; the results, or the failure turned into them
        self.results: AsyncResult = AsyncResult()
        # The next holder took the message and its dot to write (`Handover.take_unsent`):
        # until then the server cannot have them.
        self.sending = False

    def settle(self, results: list[RcptResult]) -> None:
        self.results.set(results)

    def lose(self, reply: Reply | None = None) -> None:
        """The reply will never be read: if the message left, it may or may not have been
        taken (ambiguous: `reply`, or classify.no_final_reply); if it never left, a plain
        deferral."""
        if not self.sending:
            self.results.set([RcptResult(r, classify.never_sent()) for r in self.rcpts])
            return
        self.results.set(no_final_reply(self.rcpts, reply))

    def settled(self) -> list[RcptResult] | None:
        """The results, if they are known already (never waits)."""
        if not self.results.ready():
            return None
        results: list[RcptResult] = self.results.get()
        return results

    def wait(self, timeout: float) -> list[RcptResult]:
        """The results, or (the next holder never read the reply in `timeout`: a bug)
        an ambiguous deferral."""
        try:
            results: list[RcptResult] = self.results.get(timeout=timeout)
        except gevent.Timeout:
            return no_final_reply(self.rcpts)
        return results


def no_final_reply(rcpts: list[str], reply: Reply | None = None) -> list[RcptResult]:
    """Each recipient's ambiguous deferral: `reply`, by default classify.no_final_reply."""
    reply = reply or classify.no_final_reply()
    return [RcptResult(r, reply, ambiguous=True) for r in rcpts]


class Stopping(gevent.GreenletExit):
    """Thrown into the delivery greenlets when the worker's drain deadline passes (SIGTERM):
    they end at once. A GreenletExit, so that no `except Exception` turns it into a result.

    A transaction it interrupts (engine.smtp.transaction) leaves on it what its recipients
    must still hear (`results`): the outcome, if the final reply came; an ambiguous
    deferral, if the end of the message was written and its reply had not come (the server
    may have it); else None: the server cannot have the message, nothing is reported and
    the recipients stay pending in the spool, no attempt counted."""

    results: list[RcptResult] | None = None
