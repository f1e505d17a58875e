"""engine.events: the hand-formatted events are the JSON the dict encoder would write."""
from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

import pytest

from engine import categories, events
from engine.job import Job
from engine.protocol import Attempt, Status
from engine.reply import Reply

_REFERENCE = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
TS = 1795849218.4142926

TRICKY_META: list[Mapping[str, Any]] = [
    {}, {"campaign": "spring", "n": 3, "x": [1.5, None, True], "deep": {"é": "\u2028"}},
    {"q": 'a"b\\c\n\x00\ud800'},
]
TRICKY_TEXT = ["loop-1", 'a"b\\c\u00e9\u2028\x7f\x01', "ü@例.jp", ""]


def _reference_attempt(attempt: Attempt, status: Status, meta: Mapping[str, Any], number: int,
                       queued_ts: float, next_attempt: float | None, ts: float,
                       possible_duplicate: bool = False) -> str:
    """The event as a dict through json, as the engine wrote it before formatting by hand."""
    event: dict[str, Any] = {"event": status.value, "id": attempt.job_id, "ts": ts,
                             "meta": dict(meta)}
    event.update({
        "rcpt": attempt.rcpt, "ip": attempt.ip, "mx": attempt.mx, "provider": attempt.provider,
        "code": attempt.reply.code, "enhanced": attempt.reply.status,
        "reply": attempt.reply.text})
    if status.value in ("deferred", "bounced", "expired"):
        event["category"] = categories.SHIPPED.classify(attempt.reply, attempt.provider)
    event.update({
        "tls": attempt.tls, "conn_reused": attempt.conn_reused,
        "attempt": number, "delay_ms": int(max(0.0, attempt.ts - queued_ts) * 1000),
    })
    if next_attempt is not None:
        event["next_attempt"] = round(next_attempt, 3)
    if attempt.tls_policy is not None:
        event["tls_policy"] = attempt.tls_policy
        event["tls_verified"] = attempt.tls_verified
    if attempt.ambiguous:
        event["ambiguous"] = True
    if possible_duplicate:
        event["possible_duplicate"] = True
    if attempt.throttled:
        event["throttled"] = True
        event["trigger"] = attempt.trigger
    return _REFERENCE(event)


@pytest.fixture
def frozen_clock(monkeypatch: pytest.MonkeyPatch) -> float:
    monkeypatch.setattr(events.time, "time", lambda: TS)
    return round(TS, 3)


@pytest.mark.parametrize("meta", TRICKY_META)
@pytest.mark.parametrize("text", TRICKY_TEXT)
@pytest.mark.parametrize("status", list(Status))
@pytest.mark.parametrize("flags", [(None, None, False, False, None, None, None),
                                   ("mx.example.net", "TLSv1.3", True, True, 1795849300.12345,
                                    "mta-sts", True),
                                   ("mx.example.net", None, True, False, None, "opportunistic",
                                    False),
                                   (None, None, False, True, None, "requiretls", None)])
def test_attempt_event_is_the_json_of_its_fields(
        frozen_clock: float, meta: Mapping[str, Any], text: str, status: Status,
        flags: tuple[str | None, str | None, bool, bool, float | None, str | None,
                     bool | None]) -> None:
    mx, tls, reused, odd, next_attempt, tls_policy, tls_verified = flags
    attempt = Attempt(job_id=f"job-{text}", rcpt=f"{text}@example.com", status=status,
                      reply=Reply(451 if odd else 250, "4.7.1" if odd else None, f"ok {text}"),
                      ip="192.0.2.1", mx=mx, provider=text or "other", tls=tls,
                      conn_reused=reused, ambiguous=odd, ts=TS + 1.5, throttled=odd,
                      trigger=f"rule:{text}" if odd else None, tls_policy=tls_policy,
                      tls_verified=tls_verified)
    name, line = events.attempt_event(attempt, status, meta, 3, TS - 2.25, next_attempt, odd)
    assert name == status.value
    assert line == _reference_attempt(attempt, status, meta, 3, TS - 2.25, next_attempt,
                                      frozen_clock, odd)
    assert json.loads(line)["event"] == status.value
    # The meta's text made once per job (Job.meta_json, carried by InFlight): the same line.
    meta_json = Job(id="j", sender="", rcpts=("r@example.com",), message=b"x\r\n",
                    meta=meta).meta_json
    assert events.attempt_event(attempt, status, meta, 3, TS - 2.25, next_attempt, odd,
                                meta_json=meta_json) == (name, line)


@pytest.mark.parametrize("status", list(Status))
def test_a_refusal_carries_its_category_and_the_supervisor_reads_it_back(
        frozen_clock: float, status: Status) -> None:
    """`category_of` finds the event's own category, not one the producer's meta holds."""
    reply = Reply(550, "5.1.1", 'no such user, "category":"other"')
    attempt = Attempt(job_id="j", rcpt="a@example.com", status=status, reply=reply,
                      ip="192.0.2.1", provider="google", ts=TS)
    meta = {"x": 1, "category": "blocklisted"}
    event = events.attempt_event(attempt, status, meta, 1, TS)
    decoded = json.loads(event[1])
    if status.value in events.REFUSAL_NAMES:
        assert decoded["category"] == "bad-mailbox"
        assert events.category_of(event) == "bad-mailbox"
    else:
        assert "category" not in decoded
        assert events.category_of(event) is None
    assert decoded["meta"] == meta
    # An event spooled before events had categories (replayed from the outbox): none.
    assert events.category_of(("bounced", '{"event":"bounced","meta":{},"code":550}')) is None


def test_the_expired_and_set_aside_events_have_their_categories(frozen_clock: float) -> None:
    (aside,) = events.set_aside("j", [("a@example.com", 2)], {}, TS, "bad json", TS)
    assert json.loads(aside[1])["category"] == "other"
    assert events.category_of(aside) == "other"


@pytest.mark.parametrize("meta", TRICKY_META)
@pytest.mark.parametrize("text", TRICKY_TEXT[:2])
@pytest.mark.parametrize("duplicate", [False, True])
def test_queued_event_is_the_json_of_its_fields(
        frozen_clock: float, meta: Mapping[str, Any], text: str, duplicate: bool) -> None:
    job = Job(id=f"id-{text}", sender="s@example.com", rcpts=("a@example.com", "b@example.com"),
              message=b"x\r\n", meta=meta)
    expected: dict[str, Any] = {"event": "queued", "id": job.id, "ts": frozen_clock,
                                "meta": dict(meta), "rcpt_count": 2}
    if duplicate:
        expected["duplicate"] = True
    assert events.queued(job, duplicate) == ("queued", _REFERENCE(expected))


def test_rejected_event_echoes_what_was_read(frozen_clock: float) -> None:
    name, line = events.rejected(None, None, 'recipient 1 \'bob@\' has an "empty" domain')
    assert name == "rejected"
    assert json.loads(line) == {"event": "rejected", "id": None, "ts": frozen_clock, "meta": {},
                                "error": 'recipient 1 \'bob@\' has an "empty" domain'}


def test_publisher_appends_one_line_per_event(tmp_path: Any) -> None:
    log = tmp_path / "events.jsonl"
    publisher = events.EventPublisher(None, str(log))
    job = Job(id="j1", sender="", rcpts=("a@example.com",), message=b"x\r\n")
    publisher.publish(events.queued(job))
    publisher.publish(events.rejected("j2", {"k": "v"}, "no"))
    publisher.close()
    lines = log.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["event"] for line in lines] == ["queued", "rejected"]
    assert abs(json.loads(lines[0])["ts"] - time.time()) < 60
