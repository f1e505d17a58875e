"""engine.protocol: the frames between the supervisor and its workers."""
from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest

from engine import protocol
from engine.protocol import Attempt, Status, Task, tls_required_no
from engine.reply import Reply


@pytest.mark.parametrize(("job_id", "sender", "rcpts", "queued_ts"), [
    ("loop-1", "bench@mailengine.test", ("user1@example.test",), 1795849218.4142926),
    ('a"b\\c\u00e9\u2028', "", ("ü@例.jp", '"x y"@example.com', "z@[IPv6:2001:db8::1]"), 12.5),
    ("x", "s@x.y", ("r@x.y",), 0.0),
])
@pytest.mark.parametrize("smtputf8", [False, True])
@pytest.mark.parametrize("eightbit", [False, True])
def test_task_frames_round_trip_as_json(job_id: str, sender: str, rcpts: tuple[str, ...],
                                        queued_ts: float, smtputf8: bool,
                                        eightbit: bool) -> None:
    task = Task(job_id, sender, rcpts, b"Subject: x\r\n\r\nbody\r\n", queued_ts, smtputf8,
                eightbit, handout=2**40 + 7)
    frames = protocol.task_frames(task)
    # The header is plain JSON, exactly what json.dumps would give (spaces aside).
    assert json.loads(frames[0]) == {"id": job_id, "from": sender, "to": list(rcpts),
                                     "queued_ts": queued_ts, "smtputf8": smtputf8,
                                     "eightbit": eightbit, "handout": 2**40 + 7}
    assert frames[0].isascii()
    assert protocol.task_from_frames(frames) == task


def test_a_task_that_requires_tls_says_so_and_only_then() -> None:
    task = Task("j", "s@x.y", ("r@x.y",), b"x\r\n", 1.5, requiretls=True)
    frames = protocol.task_frames(task)
    assert json.loads(frames[0])["requiretls"] is True
    assert protocol.task_from_frames(frames) == task
    assert "requiretls" not in json.loads(protocol.task_frames(replace(task, requiretls=False))[0])



def test_a_task_names_the_recipients_refused_before_and_only_then() -> None:
    task = Task("j", "s@x.y", ("a@x.y", "b@x.y", "c@x.y"), b"x\r\n", 1.5,
                tried=frozenset({"c@x.y", "a@x.y"}))
    frames = protocol.task_frames(task)
    assert json.loads(frames[0])["tried"] == ["a@x.y", "c@x.y"]  # in the task's order
    assert protocol.task_from_frames(frames) == task
    assert "tried" not in json.loads(protocol.task_frames(replace(task, tried=frozenset()))[0])


def test_a_task_carries_the_jobs_dkim_domain_only_when_it_names_one() -> None:
    task = Task("j", "s@x.y", ("a@x.y",), b"x\r\n", 1.5, dkim_domain="example.org")
    frames = protocol.task_frames(task)
    assert json.loads(frames[0])["dkim_domain"] == "example.org"
    assert protocol.task_from_frames(frames) == task
    assert "dkim_domain" not in json.loads(
        protocol.task_frames(replace(task, dkim_domain=None))[0])

@pytest.mark.parametrize("status", list(Status))
def test_result_frame_round_trip(status: Status) -> None:
    attempt = Attempt(job_id="job-1", rcpt="a@example.com", status=status,
                      reply=Reply(451, "4.7.1", "slow \"down\""), ip="192.0.2.1",
                      provider="gmail", tls="TLSv1.3", conn_reused=True, ts=1795849218.25,
                      throttled=True, attempted=False, retry_at=1795849300.0,
                      trigger="rule:421", retried=True, handout=12)
    tls_policy = replace(attempt, tls_policy="mta-sts", tls_verified=True)
    msg = protocol.decode(protocol.result_frame([attempt, attempt, tls_policy]))
    assert msg["type"] == "result"
    assert [protocol.attempt_from_row(a) for a in msg["attempts"]] == [attempt, attempt,
                                                                         tls_policy]
    assert len(msg["attempts"][0]) == len(protocol.ATTEMPT_FIELDS)


def test_the_worker_adds_the_handout_to_the_row() -> None:
    """The delivery code does not know the hand-out; the worker adds it to each row."""
    assert protocol.attempt_from_row(protocol.attempt_to_row(
        Attempt(job_id="j", rcpt="a@example.com", status=Status.DELIVERED,
                reply=Reply(250, None, "ok"), ip="192.0.2.1", ts=1.0), 99)).handout == 99


@pytest.mark.parametrize(("frames", "handout"), [
    ([b'{"id": "j", "handout": 5}', b"msg"], 5),  # readable number, unreadable task
    ([b'{"id": "j"}'], None), ([b"\xff"], None), ([], None), ([b"[1]"], None),
])
def test_the_handout_of_an_unreadable_task(frames: list[bytes], handout: int | None) -> None:
    with pytest.raises((ValueError, KeyError, IndexError, TypeError)):
        protocol.task_from_frames(frames)
    assert protocol.handout_of(frames) == handout


def _row() -> list[Any]:
    return protocol.attempt_to_row(Attempt(job_id="j", rcpt="a@example.com",
                                           status=Status.DELIVERED, reply=Reply(250, None, "ok"),
                                           ip="192.0.2.1", mx="mx", provider="other", ts=1.0))


def test_unknown_status_is_a_value_error() -> None:
    row = _row()
    row[protocol.ATTEMPT_FIELDS.index("status")] = "lost"
    with pytest.raises(ValueError):
        protocol.attempt_from_row(row)


@pytest.mark.parametrize("row", [_row()[:-1], [*_row(), None], {"job": "j"}, "abc"])
def test_a_row_of_the_wrong_shape_is_a_value_or_type_error(row: Any) -> None:
    with pytest.raises((ValueError, TypeError)):
        protocol.attempt_from_row(row)


@pytest.mark.parametrize(("message", "found"), [
    (b"From: a@b.test\r\nTLS-Required: No\r\n\r\nbody\r\n", True),
    (b"tls-required:no\r\nSubject: x\r\n\r\n", True),  # any case, no space
    (b"Subject: x\r\nTLS-Required:\r\n  No \r\n\r\n", True),  # folded
    (b"Subject: x\nTLS-Required: No\n\nbody\n", True),  # bare LF
    (b"TLS-Required: No", True),  # a header without a body
    (b"Subject: x\r\n\r\nTLS-Required: No\r\n", False),  # in the body: not a header field
    (b"TLS-Required: Nope\r\n\r\n", False),
    (b"TLS-Required: No\r\n more\r\n\r\n", False),  # its value is "No more"
    (b"X-TLS-Required: No\r\n\r\n", False),
    (b"Subject: TLS-Required: No\r\n\r\n", False),
    # The first empty line ends the header block, whichever its line ending.
    (b"Subject: x\n\nTLS-Required: No\r\n\r\n", False),
    (b"Subject: x\r\nTLS-Required: No\r\n\r\nbody\n\nmore\r\n", True),
])
def test_tls_required_no_is_read_from_the_header_block_only(message: bytes,
                                                            found: bool) -> None:
    assert tls_required_no(message) is found
    task = Task("j", "s@x.test", ("r@y.test",), message, 0.0)
    assert task.tls_optional is found and task.tls_optional is found  # cached
    assert task == Task("j", "s@x.test", ("r@y.test",), message, 0.0)  # fields only
