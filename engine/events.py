"""Events: what happened to each job, published on ZeroMQ and appended to a JSON-lines log.

Every event has `event`, `id`, `ts` (Unix seconds) and `meta` (the producer's,
echoed). The PUB socket's topic is the event name, so a subscriber can follow
just `delivered` or `rejected`. The log file is for people and log shippers; the
spool, not this log, is the record the engine relies on, so events are
published only after the spool has the outcome.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from json.encoder import encode_basestring
from typing import IO, Any

import zmq

from engine import categories, logs, sockets
from engine.categories import Classifier
from engine.job import Job
from engine.protocol import Attempt, Status
from engine.reply import Reply

log = logging.getLogger("mailengine.events")

EVENT_NAMES = ("queued", "rejected", "delivered", "deferred", "bounced", "expired")
# The events that close a recipient: written to the spool with its outcome (engine.outbox).
FINAL_NAMES = frozenset(("delivered", "bounced", "expired"))
# The events of a refusal: they carry a `category` (engine.categories).
REFUSAL_NAMES = frozenset(("deferred", "bounced", "expired"))
# An event as published: its name (the PUB topic) and the JSON object, one line of text.
Event = tuple[str, str]
# One encoder for what is not formatted by hand (json.dumps with options builds one per call).
_ENCODE = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
# The frequent events are formatted by hand, the text _ENCODE would write for the same dict
# (tests/unit/test_events.py checks it): a dict and a pass of the encoder per event were a few
# per cent of the supervisor's CPU. Strings go through json's own C escaper.
_quote = encode_basestring
_TOPICS = {name: name.encode() for name in EVENT_NAMES}


class EventPublisher:
    """Publishes events on the PUB socket and appends them to the log; counts them.

    A log that cannot be written (a full disk, an I/O error) is no reason to stop: the file is
    let go, events go on to the subscribers, and `failing` stays set until engine.outbox puts
    the final events the log missed back into it (`repair`); the others are missing from the
    log (their subscribers had them)."""

    def __init__(self, socket: zmq.Socket | None, log_path: str = "") -> None:
        self.socket = socket
        self.counts: dict[str, int] = dict.fromkeys(EVENT_NAMES, 0)  # since start
        self._path = log_path
        self._log: IO[str] | None = None
        self.failing = False  # a write to the log failed, not yet repaired
        if log_path:
            os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
            self._log = _open_log(log_path)

    def publish(self, event: Event, to_log: bool = True) -> None:
        """Send `event` to the subscribers and (unless `to_log` is False: it is there
        already) append it to the log."""
        name, line = event
        if name in self.counts:
            self.counts[name] += 1
        if self.socket is not None:
            try:  # two sends with int flags: cheaper than send_multipart with pyzmq's enums
                self.socket.send(_TOPICS.get(name) or name.encode(), sockets.MORE_NOBLOCK)
                self.socket.send(line.encode(), sockets.NOBLOCK)
            except zmq.Again:  # no subscriber keeps up: PUB drops, the log still has it
                pass
        if self._log is not None and to_log:
            try:
                self._log.write(line + "\n")
            except OSError as err:
                self._fail(err)

    def flush(self) -> None:
        if self._log is not None:
            try:
                self._log.flush()
            except OSError as err:
                self._fail(err)

    @property
    def log_path(self) -> str | None:
        return self._path or None

    def _fail(self, err: OSError) -> None:
        """The log could not be written: let the file go (what its buffer held is lost to
        it), warn once, and write nothing more until `repair`."""
        if not self.failing:
            log.warning(logs.kv("events_log_unwritable", path=self._path, error=err,
                                effect="events go on to subscribers; final events are put"
                                       " back into the log once it can be written"))
        self.failing = True
        old, self._log = self._log, None
        if old is not None:
            with contextlib.suppress(OSError):
                old.close()  # flushes again, and fails again: the descriptor is closed anyway

    def repair(self, missing: Callable[[], list[str]]) -> int:
        """After `failing`: open the log again (its torn last line ended), append the lines
        `missing` says it lacks (the final events it missed, engine.outbox), and go on;
        returns how many. OSError if the log still cannot be written."""
        end_torn_line(self._path)
        self._log = _open_log(self._path)
        try:
            lines = missing()
            for line in lines:
                self._log.write(line + "\n")
            self._log.flush()
        except OSError as err:
            self._fail(err)
            raise
        self.failing = False
        log.warning(logs.kv("events_log_writable", path=self._path, restored=len(lines)))
        return len(lines)

    def sync(self) -> tuple[int, int] | None:
        """Flush the log and fsync it: what it holds survives a power cut. Returns where it
        stands, (inode, size), or None without a log."""
        if self.failing:  # lines went missing since: not a log to vouch for
            raise OSError(f"events log {self._path} failed and is not repaired yet")
        if self._log is None:
            return None
        try:
            self._log.flush()
            fd = self._log.fileno()
            os.fsync(fd)
            info = os.fstat(fd)
        except OSError as err:
            self._fail(err)
            raise
        return info.st_ino, info.st_size

    def close(self) -> None:
        if self._log is not None:
            with contextlib.suppress(OSError):  # a full disk: what the buffer held is lost to it
                self._log.close()
            self._log = None

    def reopen(self) -> None:
        """Go on in a new file at the log's path (logrotate renamed the file and sent
        SIGUSR1): events up to now are in the renamed file, the next in the new one.

        The old file is synced before it is closed, as `sync` would have (the outbox
        forgets events once the log holding them is synced, engine.outbox), and closed
        only once the new one is open: if either fails, events go on into the old file,
        under its new name, and nothing is lost."""
        if not self._path or self.failing:  # a failed log is opened again by `repair`
            return
        try:
            new = _open_log(self._path)
        except OSError as err:
            log.error(logs.kv("events_log_reopen_failed", path=self._path, error=err))
            return
        old = self._log
        if old is not None:
            try:
                old.flush()
                os.fsync(old.fileno())
            except OSError as err:
                new.close()
                log.error(logs.kv("events_log_reopen_failed", path=self._path, error=err))
                return
        self._log = new
        if old is not None:
            old.close()
        log.info(logs.kv("events_log_reopened", path=self._path))


def _open_log(path: str) -> IO[str]:
    """For appending (O_APPEND: every write at the end); long-lived, closed by the
    publisher."""
    return open(path, "a", encoding="utf-8")


def end_torn_line(path: str) -> None:
    """Regression (a kill -9 tore the events log): the supervisor may die halfway
    through writing a line; appending after it glued the next run's first event
    onto the fragment, and both were lost to every JSON-lines reader. Start the
    new run on a line of its own (the fragment stays, alone on its line)."""
    if not path:
        return
    try:
        with open(path, "rb+") as f:
            size = f.seek(0, os.SEEK_END)
            if size > 0:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    f.write(b"\n")
    except FileNotFoundError:
        pass


def queued(job: Job, duplicate: bool = False) -> Event:
    duplicate_field = ',"duplicate":true' if duplicate else ""
    return "queued", (f'{_head_text("queued", job.id, job.meta_json)},'
                      f'"rcpt_count":{len(job.rcpts)}{duplicate_field}}}')


def rejected(job_id: str | None, meta: Mapping[str, Any] | None, error: str) -> Event:
    event = {"event": "rejected", "id": job_id, "ts": _now(), "meta": dict(meta or {}),
             "error": error}
    return "rejected", _ENCODE(event)


def attempt_event(attempt: Attempt, status: Status, meta: Mapping[str, Any], number: int,
                  queued_ts: float, next_attempt: float | None = None,
                  possible_duplicate: bool = False,
                  classifier: Classifier = categories.SHIPPED,
                  meta_json: str | None = None) -> Event:
    """One recipient's attempt. `status` may differ from the worker's (deferred -> expired).
    `possible_duplicate`: sent again after a worker died without reporting it
    (engine.dispatch, `Dispatcher.forget`). A refusal (deferred, bounced, expired) gets the
    `category` `classifier` gives its reply (the config's: engine.categories). `meta_json`:
    `meta` as JSON text already (engine.job.Job.meta_json), not encoded again."""
    name = status.value
    reply = attempt.reply
    delay_ms = int(max(0.0, attempt.ts - queued_ts) * 1000)
    # One of a fixed list of plain words (engine.categories): no escaping needed.
    category = (f',"category":"{classifier.classify(reply, attempt.provider)}"'
                if name in REFUSAL_NAMES else "")
    head = (_head(name, attempt.job_id, meta) if meta_json is None
            else _head_text(name, attempt.job_id, meta_json))
    text = (f'{head},"rcpt":{_quote(attempt.rcpt)},'
            f'"ip":{_quote(attempt.ip)},"mx":{_optional(attempt.mx)},'
            f'"provider":{_quote(attempt.provider)},"code":{int(reply.code)},'
            f'"enhanced":{_quote(reply.status)},"reply":{_quote(reply.text)}{category},'
            f'"tls":{_optional(attempt.tls)},"conn_reused":{_bool(attempt.conn_reused)},'
            f'"attempt":{int(number)},"delay_ms":{delay_ms}')
    if next_attempt is not None:
        text += f',"next_attempt":{round(next_attempt, 3)!r}'
    if attempt.tls_policy is not None:  # the TLS policy that applied (engine.tlspolicy)
        verified = "null" if attempt.tls_verified is None else _bool(attempt.tls_verified)
        text += f',"tls_policy":{_quote(attempt.tls_policy)},"tls_verified":{verified}'
    if attempt.ambiguous:
        text += ',"ambiguous":true'
    if possible_duplicate:
        text += ',"possible_duplicate":true'
    if attempt.throttled:  # the provider pushed back: this try is not counted
        text += f',"throttled":true,"trigger":{_optional(attempt.trigger)}'
    return name, text + "}"


_CATEGORY_FIELD = ',"category":"'


def category_of(event: Event) -> str | None:
    """The `category` of a refusal's event (None for another event, or one written before
    events had categories), read from its text without decoding it: the supervisor counts
    them (metrics `*_category`) as it publishes.

    The field is the last of that name in the line: only `meta`, which comes first, may
    hold another, and no string value can hold `,"category":"` unescaped."""
    name, line = event
    if name not in REFUSAL_NAMES:
        return None
    at = line.rfind(_CATEGORY_FIELD)
    if at < 0:
        return None
    start = at + len(_CATEGORY_FIELD)
    found = line[start:line.find('"', start)]
    return found if found in categories.CATEGORIES else None


def set_aside(job_id: str, pending: Sequence[tuple[str, int]], meta: Mapping[str, Any],
              queued_ts: float, reason: str, now: float) -> list[Event]:
    """The final events of a spooled job that could not be decoded (engine.spool): a
    `bounced` per recipient it had left, saying why, so the producer's ledger closes; one
    with an empty `rcpt` when not even its recipients could be read. `pending`: (rcpt,
    attempts made)."""
    reply = Reply.local(554, "5.3.0", f"not delivered: its spool record could not be read"
                                      f" ({reason})")
    return [attempt_event(Attempt(job_id=job_id, rcpt=rcpt, status=Status.BOUNCED, reply=reply,
                                  ip="", ts=now), Status.BOUNCED, meta, attempts, queued_ts)
            for rcpt, attempts in pending or (("", 0),)]


def _head(name: str, job_id: str, meta: Mapping[str, Any]) -> str:
    """The fields every event starts with, the object left open."""
    return _head_text(name, job_id, _ENCODE(dict(meta)) if meta else "{}")


def _head_text(name: str, job_id: str, meta_json: str) -> str:
    """`_head` with the meta as JSON text already (Job.meta_json)."""
    return f'{{"event":"{name}","id":{_quote(job_id)},"ts":{_now()!r},"meta":{meta_json}'



def _now() -> float:
    return round(time.time(), 3)


def _optional(text: str | None) -> str:
    return "null" if text is None else _quote(text)


def _bool(value: bool) -> str:
    return "true" if value else "false"
