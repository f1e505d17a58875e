"""What one SMTP connection carries from one transaction to the next.

After the 354, a transaction may hand its connection to the next caller waiting for it
(the pool's checkout, a `Holder`) with its message and final dot still to send. They wait
in the connection's `Handover`: the next holder sends them ahead of its own MAIL, RCPT and
DATA in one write (RFC 2920 3.1: message content may lead a pipelined group), then reads
the reply owed to the first transaction (`Connection.settle`) before its own, and hands
the first transaction its results (`Owed`). engine.smtp.transaction makes the hand-over;
engine.smtp.connection keeps the state and settles what is owed.
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

    def drop(self) -> None:
        """The connection closed: nothing more is sent, and the replies owed will never be
        read (each transaction owed gets an ambiguous deferral)."""
        self.unsent = b""
        while self.owed:
            self.owed.popleft().lose()


class Owed:
    """A transaction that handed its connection on before its final reply: the next
    holder reads that reply (`Connection.settle`) while the transaction's own greenlet waits for the
    results."""

    __slots__ = ("rcpts", "read", "results")

    def __init__(self, rcpts: list[str], read: Callable[[], list[RcptResult]]) -> None:
        self.rcpts = rcpts
        self.read = read  # reads the reply; the results, or the failure turned into them
        self.results: AsyncResult = AsyncResult()

    def settle(self, results: list[RcptResult]) -> None:
        self.results.set(results)

    def lose(self) -> None:
        """The reply will never be read: the message may or may not have been taken."""
        self.results.set(no_final_reply(self.rcpts))

    def wait(self, timeout: float) -> list[RcptResult]:
        """The results, or (the next holder never read the reply in `timeout`: a bug)
        an ambiguous deferral."""
        try:
            results: list[RcptResult] = self.results.get(timeout=timeout)
        except gevent.Timeout:
            return no_final_reply(self.rcpts)
        return results


def no_final_reply(rcpts: list[str]) -> list[RcptResult]:
    reply = classify.no_final_reply()
    return [RcptResult(r, reply, ambiguous=True) for r in rcpts]
