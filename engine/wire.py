"""The messages between the supervisor and its workers (ZeroMQ over ipc).

Supervisor -> worker, a task: two frames, a JSON header and the raw message.
Worker -> supervisor: one JSON frame, `{"type": "result", ...}` with the
attempts reported within one turn of the worker's event loop (one or more
recipient domains, of one or more jobs), or `{"type": "stats", ...}` once a
second. Single frames, so greenlets of one worker can share the PUSH socket.
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


def attempt_to_dict(a: Attempt) -> dict[str, Any]:
    return {"job": a.job_id, "rcpt": a.rcpt, "status": a.status.value, "code": a.reply.code,
            "enhanced": a.reply.enhanced, "reply": a.reply.text, "ip": a.ip, "mx": a.mx,
            "provider": a.provider, "tls": a.tls, "conn_reused": a.conn_reused,
            "ambiguous": a.ambiguous, "ts": a.ts, "throttled": a.throttled,
            "attempted": a.attempted, "retry_at": a.retry_at}


_STATUS = {status.value: status for status in Status}


def attempt_from_dict(d: dict[str, Any]) -> Attempt:
    status = _STATUS.get(d["status"]) or Status(d["status"])  # ValueError if unknown
    return Attempt(job_id=d["job"], rcpt=d["rcpt"], status=status,
                   reply=Reply(int(d["code"]), d["enhanced"], d["reply"]), ip=d["ip"],
                   mx=d["mx"], provider=d["provider"], tls=d["tls"],
                   conn_reused=bool(d["conn_reused"]), ambiguous=bool(d["ambiguous"]),
                   ts=float(d["ts"]), throttled=bool(d.get("throttled", False)),
                   attempted=bool(d.get("attempted", True)),
                   retry_at=None if d.get("retry_at") is None else float(d["retry_at"]))


def result_frame(attempts: list[Attempt]) -> bytes:
    return json.dumps({"type": "result",
                       "attempts": [attempt_to_dict(a) for a in attempts]}).encode()


def stats_frame(ip: str, figures: dict[str, Any]) -> bytes:
    return json.dumps({"type": "stats", "ip": ip, **figures}).encode()


def decode(frame: bytes) -> dict[str, Any]:
    msg = json.loads(frame)
    if not isinstance(msg, dict) or "type" not in msg:
        raise ValueError("worker message without a type")
    return msg
