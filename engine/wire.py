"""The messages between the supervisor and its workers (ZeroMQ over ipc).

Supervisor -> worker, a task: two frames, a JSON header and the raw message.
Worker -> supervisor: one JSON frame, `{"type": "result", "attempts": [...]}`
with the attempts reported within one turn of the worker's event loop (one or more
recipient domains, of one or more jobs), each an array in ATTEMPT_FIELDS order, or
`{"type": "stats", ...}` once a second. Single frames, so greenlets of one worker can
share the PUSH socket.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from json.encoder import encode_basestring_ascii
from typing import Any

from engine.delivery import Task
from engine.outcome import Attempt, Status
from engine.reply import Reply


def task_frames(task: Task) -> list[bytes]:
    return [task_header(task.job_id, task.sender, task.rcpts, task.queued_ts, task.smtputf8,
                        task.eightbit), task.message]


def task_header(job_id: str, sender: str, rcpts: Sequence[str], queued_ts: float,
                smtputf8: bool, eightbit: bool) -> bytes:
    """A task's first frame, without building a Task (the supervisor sends many).

    The JSON object json.dumps would write (without its spaces), formatted by hand: the
    strings escaped by json's own C escaper, the float written as json writes it."""
    return (f'{{"id":{_quote(job_id)},"from":{_quote(sender)},'
            f'"to":[{",".join(map(_quote, rcpts))}],"queued_ts":{float.__repr__(queued_ts)},'
            f'"smtputf8":{_BOOL[smtputf8]},"eightbit":{_BOOL[eightbit]}}}').encode()


_quote = encode_basestring_ascii
_BOOL = {True: "true", False: "false"}


def task_from_frames(frames: list[bytes]) -> Task:
    header = json.loads(frames[0])
    return Task(job_id=header["id"], sender=header["from"], rcpts=tuple(header["to"]),
                message=frames[1], queued_ts=float(header["queued_ts"]),
                smtputf8=bool(header["smtputf8"]), eightbit=bool(header["eightbit"]))


# An attempt travels as a JSON array of its fields in this order, not as an object: no
# key to write and read again per field, which made decoding results ~2.5x slower.
ATTEMPT_FIELDS = ("job", "rcpt", "status", "code", "enhanced", "reply", "ip", "mx", "provider",
                  "tls", "conn_reused", "ambiguous", "ts", "throttled", "attempted", "retry_at")


def attempt_to_row(a: Attempt) -> list[Any]:
    return [a.job_id, a.rcpt, a.status.value, a.reply.code, a.reply.enhanced, a.reply.text,
            a.ip, a.mx, a.provider, a.tls, a.conn_reused, a.ambiguous, a.ts, a.throttled,
            a.attempted, a.retry_at]


_STATUS = {status.value: status for status in Status}


def attempt_from_row(row: Sequence[Any]) -> Attempt:
    """The inverse of attempt_to_row; ValueError or TypeError when `row` is not one."""
    (job_id, rcpt, status, code, enhanced, text, ip, mx, provider, tls, conn_reused, ambiguous,
     ts, throttled, attempted, retry_at) = row  # ValueError if the length differs
    return Attempt(job_id=job_id, rcpt=rcpt,
                   status=_STATUS.get(status) or Status(status),  # ValueError if unknown
                   reply=Reply(int(code), enhanced, text), ip=ip, mx=mx, provider=provider,
                   tls=tls, conn_reused=bool(conn_reused), ambiguous=bool(ambiguous),
                   ts=float(ts), throttled=bool(throttled), attempted=bool(attempted),
                   retry_at=None if retry_at is None else float(retry_at))


_ENCODE = json.JSONEncoder(separators=(",", ":")).encode


def result_frame(attempts: list[Attempt]) -> bytes:
    return _ENCODE({"type": "result",
                    "attempts": [attempt_to_row(a) for a in attempts]}).encode()


def stats_frame(ip: str, figures: dict[str, Any]) -> bytes:
    return json.dumps({"type": "stats", "ip": ip, **figures}).encode()


def decode(frame: bytes) -> dict[str, Any]:
    msg = json.loads(frame)
    if not isinstance(msg, dict) or "type" not in msg:
        raise ValueError("worker message without a type")
    return msg
