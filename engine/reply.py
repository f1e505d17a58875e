"""SMTP replies and the engine's delivery errors.

Every outcome the engine reports carries a `Reply`: the server's code, its
enhanced status (RFC 3463) and text, or a reply the engine made up for a
failure that never reached a server (DNS, connect, timeout). Errors split into
transient (try again later) and permanent (bounce); anything the engine does not
understand counts as transient, so a bug never bounces mail.

`DeliveryError.blame` says whether the connection or the message is at fault:
a connection-level error sends the message to the next MX host, a
message-level one is the message's outcome.

These are the data and error types; the decisions taken on them (delivered,
deferred or bounced, a throttle, a stale connection, what an exception means)
are in engine.classify.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?=\s|$)")


@dataclass(frozen=True)
class Reply:
    """One SMTP reply: `code` 200-599, optional enhanced status, the text joined by newlines."""

    code: int
    enhanced: str | None
    text: str
    # Made up by the engine (a DNS failure, a timeout, a lost connection), not said by a
    # server: not a receiver's word on our pace (engine.classify.refusal). Not compared.
    made_here: bool = field(default=False, compare=False, repr=False)

    @classmethod
    def parse(cls, code: int, text: str) -> Reply:
        """Split a leading enhanced status code off `text`, if there is one."""
        m = _ENHANCED.match(text)
        if m:
            return cls(code, m.group(0), text[m.end():].strip())
        return cls(code, None, text.strip())

    @classmethod
    def local(cls, code: int, enhanced: str, text: str) -> Reply:
        """A reply made up by the engine for a failure that no server answered."""
        return cls(code, enhanced, text, made_here=True)

    # The RFC 5321 reply classes (4.2.1); engine.classify builds its decisions on them.

    @property
    def ok(self) -> bool:
        """Positive: 2xx (completed) or 3xx (go on, e.g. 354 to DATA)."""
        return 200 <= self.code < 400

    @property
    def transient(self) -> bool:
        """Transient negative, 4xx: try again later."""
        return not self.ok and not self.permanent

    @property
    def permanent(self) -> bool:
        """Permanent negative, 5xx: the same request will fail again."""
        return 500 <= self.code < 600

    @property
    def status(self) -> str:
        """The enhanced status, or one derived from the code's class."""
        return self.enhanced or f"{str(self.code)[0]}.0.0"

    def __str__(self) -> str:
        head = f"{self.code} {self.enhanced}" if self.enhanced else str(self.code)
        return f"{head} {self.text}".strip()


class Blame(Enum):
    CONNECTION = "connection"  # try the next MX host / a fresh connection
    MESSAGE = "message"  # this message's outcome, whatever host we try


class DeliveryError(Exception):
    """A failure with the reply that describes it and the command in flight."""

    def __init__(self, reply: Reply, command: str = "", blame: Blame = Blame.CONNECTION,
                 ambiguous: bool = False) -> None:
        super().__init__(str(reply))
        self.reply = reply
        self.command = command
        self.blame = blame
        # True when the server may have accepted the message although we saw no
        # reply to the final dot: a retry may deliver a duplicate.
        self.ambiguous = ambiguous

    @property
    def permanent(self) -> bool:
        return self.reply.permanent

    def __str__(self) -> str:
        where = f" after {self.command}" if self.command else ""
        return f"{self.reply}{where}"


class TransientError(DeliveryError):
    """Try again later."""


class PermanentError(DeliveryError):
    """Do not try again: bounce."""


class StaleConnection(TransientError):
    """A reused connection turned out dead before the server answered anything of
    this transaction: safe to send the message again on a fresh connection."""


class WorkerFault(TransientError):
    """The worker's own trouble, no fault of the destination nor of the message: no other
    address of the host is tried, the destination's pool does not back off, and no attempt
    is counted (engine.delivery says what the recipients do meanwhile)."""


class DescriptorsExhausted(WorkerFault):
    """The worker could not open a socket or file: out of file descriptors (EMFILE, the
    process's RLIMIT_NOFILE; ENFILE, the system's). The caller waits a moment and tries
    again."""


class SendingIpGone(WorkerFault):
    """A connect could not bind to the worker's sending IP: the host does not hold it (any
    more: EADDRNOTAVAIL). The recipients go back to the spool, and the supervisor hands
    the worker no work until the IP is back (engine.sendingip)."""


class TlsError(TransientError):
    """The TLS handshake (or a TLS record) failed."""


class ProtocolError(Exception):
    """The server broke the protocol: garbage, an oversized reply, injected bytes. Raised
    inside a phase and translated there (engine.classify.translate) into a TransientError."""


def error_for(reply: Reply, command: str = "", blame: Blame = Blame.CONNECTION,
              ambiguous: bool = False) -> DeliveryError:
    """The right error class for `reply`: permanent for 5xx, transient otherwise."""
    cls = PermanentError if reply.permanent else TransientError
    return cls(reply, command, blame, ambiguous)
