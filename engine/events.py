"""Events: what happened to each job, published on ZeroMQ and appended to a JSON-lines log.

Every event has `event`, `id`, `ts` (Unix seconds) and `meta` (the producer's,
echoed). The PUB socket's topic is the event name, so a subscriber can follow
just `delivered` or `rejected`. The log file is for people and log shippers; the
spool, not this log, is the record the engine relies on, so events are
published only after the spool has the outcome.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from typing import IO, Any

import zmq

from engine.job import Job
from engine.outcome import Attempt, Status

EVENT_NAMES = ("queued", "rejected", "delivered", "deferred", "bounced", "expired")
# One encoder for every event (json.dumps with options builds one per call).
_ENCODE = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
_NOBLOCK = int(zmq.NOBLOCK)
_MORE_NOBLOCK = int(zmq.SNDMORE) | int(zmq.NOBLOCK)


class EventPublisher:
    def __init__(self, socket: zmq.Socket | None, log_path: str = "") -> None:
        self._socket = socket
        self._log: IO[str] | None = None
        if log_path:
            os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
            self._log = open(log_path, "a", encoding="utf-8")  # long-lived: closed in close()

    def publish(self, event: dict[str, Any]) -> None:
        line = _ENCODE(event)
        if self._socket is not None:
            try:  # two sends with int flags: cheaper than send_multipart with pyzmq's enums
                self._socket.send(event["event"].encode(), _MORE_NOBLOCK)
                self._socket.send(line.encode(), _NOBLOCK)
            except zmq.Again:  # no subscriber keeps up: PUB drops, the log still has it
                pass
        if self._log is not None:
            self._log.write(line + "\n")

    def flush(self) -> None:
        if self._log is not None:
            self._log.flush()

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


def queued(job: Job, duplicate: bool = False) -> dict[str, Any]:
    event = _base("queued", job.id, job.meta)
    event["rcpt_count"] = len(job.rcpts)
    if duplicate:
        event["duplicate"] = True
    return event


def rejected(job_id: str | None, meta: Mapping[str, Any] | None, error: str) -> dict[str, Any]:
    event = _base("rejected", job_id, meta)
    event["error"] = error
    return event


def attempt_event(attempt: Attempt, status: Status, meta: Mapping[str, Any], number: int,
                  queued_ts: float, next_attempt: float | None = None) -> dict[str, Any]:
    """One recipient's attempt. `status` may differ from the worker's (deferred -> expired)."""
    event = _base(status.value, attempt.job_id, meta)
    event.update({
        "rcpt": attempt.rcpt, "ip": attempt.ip, "mx": attempt.mx, "provider": attempt.provider,
        "code": attempt.reply.code, "enhanced": attempt.reply.status,
        "reply": attempt.reply.text, "tls": attempt.tls, "conn_reused": attempt.conn_reused,
        "attempt": number, "delay_ms": int(max(0.0, attempt.ts - queued_ts) * 1000),
    })
    if next_attempt is not None:
        event["next_attempt"] = round(next_attempt, 3)
    if attempt.ambiguous:
        event["ambiguous"] = True
    if attempt.throttled:
        event["throttled"] = True  # the provider pushed back: this try is not counted
    return event


def _base(name: str, job_id: str | None, meta: Mapping[str, Any] | None) -> dict[str, Any]:
    return {"event": name, "id": job_id, "ts": round(time.time(), 3), "meta": dict(meta or {})}
