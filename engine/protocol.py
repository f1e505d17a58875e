"""What the supervisor and its workers say to each other (ZeroMQ over ipc).

Both sides import this module and nothing of each other: the supervisor never
loads the delivery code (smtplib, gevent), a worker never loads the spool.

Supervisor -> worker, a `Task`: two frames, a JSON header and the raw message.
Each hand-out of a job has a number of its own (`handout`), which the worker echoes
in every result of that task: the supervisor credits a result only to the hand-out
it answers (a late result of an earlier hand-out of the same job is not mistaken
for the current one's).
Worker -> supervisor: one JSON frame, `{"type": "result", "attempts": [...]}`
with the `Attempt`s reported within one turn of the worker's event loop (one or
more recipient domains, of one or more jobs), each an array in ATTEMPT_FIELDS
order; `{"type": "refused", "handouts": [...]}` for tasks the worker could not
read (the supervisor takes them back at once); or `{"type": "stats", ...}` once a
second; with TLS-RPT on, `{"type": "tlsrpt", "counts": [...], "rua": {...}}` once a second
when sessions were counted (engine.tlsrpt). Single frames, so greenlets of one worker can
share the PUSH socket.

Supervisor -> worker, on the same channel as the tasks, a `Hold`: one frame (a task has
two), the operator's suspension or resumption of one provider at that worker's IP
(`mailengine queue suspend|resume`, engine.queue_admin).
"""
from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from functools import cached_property
from json.encoder import encode_basestring_ascii
from typing import Any

from engine.reply import Reply


@dataclass(frozen=True)
class Task:
    """One delivery attempt of a job, as the supervisor hands it to a worker."""

    job_id: str
    sender: str
    rcpts: tuple[str, ...]
    message: bytes
    queued_ts: float
    smtputf8: bool = False
    eightbit: bool = False
    handout: int = 0  # this hand-out's number (the supervisor's), echoed in its results
    requiretls: bool = False  # the job requires TLS end to end (RFC 8689)
    # Those of `rcpts` the receiver refused before (a counted attempt, deferred): refused
    # again, they say nothing about the pace (engine.shaping.ProviderShaper.judge).
    tried: frozenset[str] = frozenset()
    dkim_domain: str | None = None  # the job's DKIM signing domain (engine.dkim), if it names one

    @cached_property
    def tls_optional(self) -> bool:
        """The message asks that the receiver's TLS policies be ignored: `TLS-Required: No`
        in its header (RFC 8689 5; engine.tlspolicy). Read once per task, when first asked,
        from the header block only."""
        return tls_required_no(self.message)


# RFC 8689 5: "TLS-Required:" [FWS] "No" CRLF; the field name in any case, folding allowed.
_TLS_REQUIRED_NO = re.compile(
    rb"^tls-required[ \t]*:(?:[ \t]|\r?\n[ \t])*no[ \t]*\r?$(?!\n[ \t])",
    re.IGNORECASE | re.MULTILINE)


def tls_required_no(message: bytes) -> bool:
    """Whether the header block of `message` (up to its first empty line) has the field
    `TLS-Required: No`. The body is never looked at."""
    # The first empty line, CRLF (every spooled message) or LF: the LF one is looked for
    # only before the CRLF one, so a message's body is not scanned (it was, to its end,
    # for every task: ~3% of the worker's CPU a message).
    end = message.find(b"\n\r\n")
    bare = message.find(b"\n\n", 0, end if end >= 0 else len(message))
    if bare >= 0:
        end = bare
    head = message[:end + 1] if end >= 0 else message
    # The field's name first, without the regex: most messages do not have it.
    if b"tls-required" not in head.lower():
        return False
    return _TLS_REQUIRED_NO.search(head) is not None


class Status(StrEnum):
    """What happened to one recipient: the vocabulary of workers, spool and events."""

    DELIVERED = "delivered"  # 2xx to the final dot (or BDAT LAST)
    DEFERRED = "deferred"  # transient failure: tried again later
    BOUNCED = "bounced"  # permanent failure: never tried again
    EXPIRED = "expired"  # still deferred when the job's time ran out

    @property
    def final(self) -> bool:
        return self is not Status.DEFERRED


@dataclass(frozen=True, kw_only=True)
class Attempt:
    """One recipient's result of one delivery attempt, as the worker reports it."""

    job_id: str
    rcpt: str
    status: Status
    reply: Reply
    ip: str
    mx: str | None = None  # the MX host that answered, None when none was reached
    provider: str = ""
    tls: str | None = None  # e.g. "TLSv1.3"; None for plaintext or no connection
    conn_reused: bool = False
    ambiguous: bool = False  # connection lost after the final dot: may be a duplicate
    ts: float  # when the final reply came (Unix seconds)
    throttled: bool = False  # the provider pushed back: deferred, attempt not counted
    trigger: str | None = None  # why it was throttled: "rule:<name>", "pushback", "block"
    attempted: bool = True  # False: shaping said "not now" before any try
    retry_at: float | None = None  # when to try again, if shaping knows better than the schedule
    retried: bool = False  # throttled, and the worker sends it again itself: more results follow
    handout: int = 0  # the hand-out (Task.handout) this result answers
    tls_policy: str | None = None  # the TLS policy that applied (engine.tlspolicy)
    tls_verified: bool | None = None  # the session's certificate verified; None: no session


# -- tasks -------------------------------------------------------------------------------


def task_frames(task: Task) -> list[bytes]:
    return [task_header(task.job_id, task.sender, task.rcpts, task.queued_ts, task.smtputf8,
                        task.eightbit, task.handout, task.requiretls,
                        [r for r in task.rcpts if r in task.tried], task.dkim_domain),
            task.message]


def task_header(job_id: str, sender: str, rcpts: Sequence[str], queued_ts: float,
                smtputf8: bool, eightbit: bool, handout: int, requiretls: bool = False,
                tried: Sequence[str] = (), dkim_domain: str | None = None) -> bytes:
    """A task's first frame, without building a Task (the supervisor sends many).

    The JSON object json.dumps would write (without its spaces), formatted by hand: the
    strings escaped by json's own C escaper, the float written as json writes it.
    `requiretls`, `tried` (Task.tried) and `dkim_domain` are written only when set."""
    return (f'{{"id":{_quote(job_id)},"from":{_quote(sender)},'
            f'"to":[{",".join(map(_quote, rcpts))}],"queued_ts":{float.__repr__(queued_ts)},'
            f'"smtputf8":{_BOOL[smtputf8]},"eightbit":{_BOOL[eightbit]},'
            f'"handout":{handout}{_REQUIRETLS[requiretls]}'
            f'{_tried(tried)}{_dkim(dkim_domain)}}}').encode()


def _tried(rcpts: Sequence[str]) -> str:
    return f',"tried":[{",".join(map(_quote, rcpts))}]' if rcpts else ""


def _dkim(domain: str | None) -> str:
    return "" if domain is None else f',"dkim_domain":{_quote(domain)}'


_quote = encode_basestring_ascii
_BOOL = {True: "true", False: "false"}
_REQUIRETLS = {True: ',"requiretls":true', False: ""}


def task_from_frames(frames: list[bytes]) -> Task:
    """The inverse of task_frames; ValueError, KeyError, IndexError or TypeError when
    `frames` are not a task."""
    header = json.loads(frames[0])
    return Task(job_id=header["id"], sender=header["from"], rcpts=tuple(header["to"]),
                message=frames[1], queued_ts=float(header["queued_ts"]),
                smtputf8=bool(header["smtputf8"]), eightbit=bool(header["eightbit"]),
                handout=int(header["handout"]), requiretls=bool(header.get("requiretls")),
                tried=frozenset(map(str, header.get("tried", ()))),
                dkim_domain=_optional_str(header.get("dkim_domain")))


def _optional_str(value: object) -> str | None:
    return None if value is None else str(value)


def handout_of(frames: list[bytes]) -> int | None:
    """The hand-out number of frames that are not a readable task, if it can be found
    (so the supervisor can take that job back at once); None when it cannot."""
    try:
        header = json.loads(frames[0])
        return int(header["handout"])
    except (ValueError, KeyError, IndexError, TypeError):
        return None


# -- the operator's holds ------------------------------------------------------------------

HOLD_MAX = 366 * 86400.0  # seconds: the longest suspension an operator may ask for
PROVIDER_MAX = 253  # characters of a provider's name (a DNS name at most)


@dataclass(frozen=True)
class Hold:
    """Suspend sending to `provider` from the worker's IP for `seconds`; 0 resumes it
    (whatever suspended it: the operator, a throttle rule or a block). `lift`: a resume on
    every host of a cluster, which lifts the suspension in its Redis too."""

    provider: str
    seconds: float
    lift: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.provider, str) or not 0 < len(self.provider) <= PROVIDER_MAX \
                or not self.provider.isprintable() or " " in self.provider:
            raise ValueError(f"not a provider name: {self.provider!r}")
        if not 0.0 <= self.seconds <= HOLD_MAX:  # NaN fails too
            raise ValueError(f"hold seconds out of range: {self.seconds!r}")


def hold_frame(hold: Hold) -> bytes:
    return _ENCODE({"type": "hold", "provider": hold.provider, "seconds": hold.seconds,
                    **({"lift": True} if hold.lift else {})}).encode()


def hold_from_frame(frame: bytes) -> Hold:
    """The inverse of hold_frame; ValueError, KeyError or TypeError when it is not one."""
    msg = json.loads(frame)
    if not isinstance(msg, dict) or msg.get("type") != "hold":
        raise ValueError("not a hold message")
    return Hold(msg["provider"], float(msg["seconds"]), msg.get("lift") is True)


# -- results -----------------------------------------------------------------------------

# An attempt travels as a JSON array of its fields in this order, not as an object: no
# key to write and read again per field, which made decoding results ~2.5x slower.
ATTEMPT_FIELDS = ("job", "rcpt", "status", "code", "enhanced", "reply", "ip", "mx", "provider",
                  "tls", "conn_reused", "ambiguous", "ts", "throttled", "attempted", "retry_at",
                  "trigger", "retried", "handout", "tls_policy", "tls_verified")


def attempt_to_row(a: Attempt, handout: int | None = None) -> list[Any]:
    """`a` as a row; `handout`, when given, instead of a.handout (the worker's delivery
    code does not know the hand-out: the worker adds it here)."""
    return [a.job_id, a.rcpt, a.status.value, a.reply.code, a.reply.enhanced, a.reply.text,
            a.ip, a.mx, a.provider, a.tls, a.conn_reused, a.ambiguous, a.ts, a.throttled,
            a.attempted, a.retry_at, a.trigger, a.retried,
            a.handout if handout is None else handout, a.tls_policy, a.tls_verified]


_STATUS = {status.value: status for status in Status}


def attempt_from_row(row: Sequence[Any]) -> Attempt:
    """The inverse of attempt_to_row; ValueError or TypeError when `row` is not one."""
    (job_id, rcpt, status, code, enhanced, text, ip, mx, provider, tls, conn_reused, ambiguous,
     ts, throttled, attempted, retry_at, trigger, retried, handout, tls_policy,
     tls_verified) = row  # ValueError: length
    return Attempt(job_id=job_id, rcpt=rcpt,
                   status=_STATUS.get(status) or Status(status),  # ValueError if unknown
                   reply=Reply(int(code), enhanced, text), ip=ip, mx=mx, provider=provider,
                   tls=tls, conn_reused=bool(conn_reused), ambiguous=bool(ambiguous),
                   ts=float(ts), throttled=bool(throttled), attempted=bool(attempted),
                   retry_at=None if retry_at is None else float(retry_at),
                   trigger=None if trigger is None else str(trigger), retried=bool(retried),
                   handout=int(handout),
                   tls_policy=None if tls_policy is None else str(tls_policy),
                   tls_verified=None if tls_verified is None else bool(tls_verified))


_ENCODE = json.JSONEncoder(separators=(",", ":")).encode


def result_frame(attempts: list[Attempt]) -> bytes:
    return rows_frame([attempt_to_row(a) for a in attempts])


def rows_frame(rows: list[list[Any]]) -> bytes:
    """A result frame of attempts already made rows (attempt_to_row)."""
    return _ENCODE({"type": "result", "attempts": rows}).encode()


def refused_frame(handouts: list[int]) -> bytes:
    """Tasks the worker could not read: the supervisor takes those jobs back."""
    return _ENCODE({"type": "refused", "handouts": handouts}).encode()


def stats_frame(ip: str, figures: dict[str, Any]) -> bytes:
    return json.dumps({"type": "stats", "ip": ip, **figures}).encode()


def tlsrpt_frame(ip: str, rows: list[list[Any]], rua: dict[str, list[str]]) -> bytes:
    """TLS-RPT's session counts (engine.tlsrpt.rows): `[domain, policy, result, detail,
    count]` rows, and each domain's rua URIs."""
    return _ENCODE({"type": "tlsrpt", "ip": ip, "counts": rows, "rua": rua}).encode()


def decode(frame: bytes) -> dict[str, Any]:
    """A worker's frame; ValueError when it is not a JSON object with a type."""
    msg = json.loads(frame)
    if not isinstance(msg, dict) or "type" not in msg:
        raise ValueError("worker message without a type")
    return msg
