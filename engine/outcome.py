"""What happened to one recipient: the vocabulary shared by worker, spool and events."""
from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from engine.reply import Reply


class Status(StrEnum):
    DELIVERED = "delivered"  # 2xx to the final dot (or BDAT LAST)
    DEFERRED = "deferred"  # transient failure: tried again later
    BOUNCED = "bounced"  # permanent failure: never tried again
    EXPIRED = "expired"  # still deferred when the job's time ran out

    @property
    def final(self) -> bool:
        return self is not Status.DEFERRED


@dataclass(frozen=True)
class Attempt:
    """One recipient's result of one delivery attempt, as the worker reports it."""

    job_id: str
    rcpt: str
    status: Status
    reply: Reply
    ip: str
    mx: str | None  # the MX host that answered, None when none was reached
    provider: str
    tls: str | None  # e.g. "TLSv1.3"; None for plaintext or no connection
    conn_reused: bool
    ambiguous: bool  # connection lost after the final dot: may be a duplicate
    ts: float  # when the final reply came (Unix seconds)
    throttled: bool = False  # the reply matched a throttle rule: deferred, attempt not counted
    attempted: bool = True  # False: shaping said "not now" before any try
    retry_at: float | None = None  # when to try again, if shaping knows better than the schedule
