"""The spool's outbox (final events written with their outcomes, engine.outbox) and its
hand-out marks (jobs a worker may have sent, engine.dispatch)."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from engine import events
from engine.events import Event, EventPublisher
from engine.job import Job
from engine.metrics import Metrics
from engine.outbox import Outbox
from engine.protocol import Status
from engine.spool import RcptUpdate, Spool, SpoolError
from tests.support import ROOT

T0 = 1_700_000_000.0
DAY = 86400.0
A, B = "a@example.com", "b@example.net"


def job(job_id: str) -> Job:
    return Job(id=job_id, sender="s@example.com", rcpts=(A, B), message=b"Subject: x\r\n\r\nx\r\n")


def final(job_id: str, rcpt: str, n: int = 0) -> Event:
    return "delivered", json.dumps({"event": "delivered", "id": job_id, "rcpt": rcpt, "n": n})


@pytest.fixture
def spool_dir(tmp_path: Path) -> str:
    return str(tmp_path / "spool")


# -- the outbox in the spool ---------------------------------------------------------------

def test_final_events_are_stored_with_their_outcome_and_kept_across_a_reopen(
        spool_dir: str) -> None:
    with Spool(spool_dir) as spool:
        spool.accept([job("j1")], T0, DAY)
        spool.record([RcptUpdate("j1", A, Status.DELIVERED)], T0, [final("j1", A)])
        spool.record([RcptUpdate("j1", B, Status.DELIVERED)], T0, [final("j1", B)])
        assert spool.last_event_seq == 2
    with Spool(spool_dir) as spool:
        assert spool.unpublished() == [final("j1", A), final("j1", B)]
        assert spool.last_event_seq == 2  # numbering goes on after a restart
        spool.forget_published(1, (7, 1234))
        assert spool.unpublished() == [final("j1", B)]
        assert spool.log_mark() == (7, 1234)
        spool.forget_published(2, None)  # no events log: the mark stays as it was
        assert spool.unpublished() == [] and spool.log_mark() == (7, 1234)


def test_a_record_that_fails_stores_no_event_and_numbers_none(
        spool_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with Spool(spool_dir) as spool:
        spool.accept([job("j1")], T0, DAY)

        def fail(*args: object) -> list[str]:
            raise sqlite3.OperationalError("database or disk is full")
        monkeypatch.setattr(spool, "_settle", fail)
        with pytest.raises(SpoolError):
            spool.record([RcptUpdate("j1", A, Status.DELIVERED)], T0, [final("j1", A)])
        monkeypatch.undo()
        assert spool.unpublished() == [] and spool.last_event_seq == 0
        spool.record([RcptUpdate("j1", A, Status.DELIVERED)], T0, [final("j1", A, 2)])
        assert spool.unpublished() == [final("j1", A, 2)] and spool.last_event_seq == 1


# -- hand-out marks --------------------------------------------------------------------------

def test_hand_out_marks_name_the_pending_recipients_until_answered_or_finished(
        spool_dir: str) -> None:
    with Spool(spool_dir) as spool:
        spool.accept([job("j1"), job("j2"), job("j3")], T0, DAY)
        spool.mark_handed_out(["j1", "j2", "j3"])
        spool.record([RcptUpdate("j1", A, Status.DELIVERED)], T0)
        spool.record([RcptUpdate("j3", A, Status.DELIVERED), RcptUpdate("j3", B, Status.BOUNCED)],
                     T0)  # j3 finished: its mark goes with it
        assert spool.handed_out() == {"j1": frozenset({B}), "j2": frozenset({A, B})}
        spool.mark_handed_out([], done=["j2"])  # j2's hand-out has all its results
        assert spool.handed_out() == {"j1": frozenset({B})}
        spool.mark_handed_out(["j2"], done=["j2"])  # answered, and out again at once
        assert spool.handed_out().keys() == {"j1", "j2"}


MARK_AND_DIE = """
import os, signal, sys
from engine.job import Job
from engine.spool import Spool
spool = Spool(sys.argv[1])
spool.accept([Job(id="j1", sender="s@example.com", rcpts=("a@example.com",),
                  message=b"x\\r\\n")], 1.0e9, 86400)
spool.mark_handed_out(["j1"])
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_mark_written_without_fsync_survives_a_kill_9(spool_dir: str) -> None:
    """The marks skip the fsync (engine.spool `_write_unsynced`): the page cache keeps them
    when the process dies, which is the crash they are for."""
    proc = subprocess.run([sys.executable, "-c", MARK_AND_DIE, spool_dir], timeout=30,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == -signal.SIGKILL
    with Spool(spool_dir) as spool:
        assert spool.handed_out() == {"j1": frozenset({A})}
        (sync,) = spool._conn.execute("PRAGMA synchronous").fetchone()
        assert sync == 2  # FULL again for everything else


# -- replay at start -------------------------------------------------------------------------

def outbox(spool: Spool, log_path: Path) -> tuple[Outbox, EventPublisher]:
    publisher = EventPublisher(None, str(log_path))
    return Outbox(spool, publisher, Metrics(None, "supervisor")), publisher


def log_lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_replay_publishes_what_a_crash_left_and_logs_each_line_once(
        spool_dir: str, tmp_path: Path) -> None:
    log_path = tmp_path / "events.jsonl"
    with Spool(spool_dir) as spool:
        spool.accept([job("j1"), job("j2")], T0, DAY)
        box, publisher = outbox(spool, log_path)
        spool.record([RcptUpdate("j1", A, Status.DELIVERED)], T0, [final("j1", A)])
        publisher.publish(final("j1", A))
        box.confirm()  # j1/A is out, and the log synced: its row goes
        assert spool.unpublished() == []
        # Then the crash: j1/B's event reached the log, j2/A's did not.
        spool.record([RcptUpdate("j1", B, Status.DELIVERED)], T0, [final("j1", B)])
        spool.record([RcptUpdate("j2", A, Status.DELIVERED)], T0, [final("j2", A)])
        publisher.publish(final("j1", B))
        publisher.close()  # what the kill leaves: the lines written so far
    with Spool(spool_dir) as spool:
        box, publisher = outbox(spool, log_path)
        assert box.replay() == 2
        assert publisher.counts["delivered"] == 2  # both went to the subscribers
        publisher.close()
        assert [json.loads(x)["rcpt"] for x in log_lines(log_path)] == [A, B, A]
        assert [json.loads(x)["id"] for x in log_lines(log_path)] == ["j1", "j1", "j2"]
        assert spool.unpublished() == []
        box2, publisher2 = outbox(spool, log_path)
        assert box2.replay() == 0  # confirmed: nothing a second time
        publisher2.close()


def test_replay_after_the_log_was_rotated_writes_every_event_to_the_new_log(
        spool_dir: str, tmp_path: Path) -> None:
    log_path = tmp_path / "events.jsonl"
    with Spool(spool_dir) as spool:
        spool.accept([job("j1")], T0, DAY)
        box, publisher = outbox(spool, log_path)
        box.confirm()  # the mark: this file, empty
        spool.record([RcptUpdate("j1", A, Status.DELIVERED)], T0, [final("j1", A)])
        publisher.publish(final("j1", A))
        publisher.close()
    log_path.rename(tmp_path / "events.jsonl.1")  # logrotate, then the crash
    with Spool(spool_dir) as spool:
        box, publisher = outbox(spool, log_path)
        assert box.replay() == 1
        publisher.close()
    assert log_lines(log_path) == [final("j1", A)[1]]


def test_set_aside_events_bounce_each_recipient_left_with_the_reason() -> None:
    [(name, line)] = events.set_aside("j9", ((B, 3),), {"k": 1}, T0, "bad envelope JSON", T0 + 5)
    event = json.loads(line)
    assert name == "bounced" and event["event"] == "bounced"
    assert (event["id"], event["rcpt"], event["attempt"], event["meta"]) == ("j9", B, 3, {"k": 1})
    assert (event["code"], event["enhanced"]) == (554, "5.3.0")
    assert "bad envelope JSON" in event["reply"]
    [(_, nobody)] = events.set_aside("j9", (), {}, T0, "unreadable", T0)
    assert json.loads(nobody)["rcpt"] == ""  # not even its recipients could be read


# -- a log that cannot be written ------------------------------------------------------------

@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_full_log_is_let_go_and_gets_its_final_events_back_once_writable(
        spool_dir: str, tmp_path: Path) -> None:
    """/dev/full answers every write with ENOSPC: the log of a full disk. Nothing raises; the
    rows stay while the log fails; once it can be written, the final events it missed are
    appended and the rows go."""
    log_path = tmp_path / "events.jsonl"
    with Spool(spool_dir) as spool:
        spool.accept([job("j1"), job("j2")], T0, DAY)
        box, publisher = outbox(spool, log_path)
        spool.record([RcptUpdate("j1", A, Status.DELIVERED)], T0, [final("j1", A)])
        publisher.publish(final("j1", A))
        box.confirm()  # in the log, synced: gone from the spool
        publisher.close()
        log_path.rename(tmp_path / "kept.jsonl")
        log_path.symlink_to("/dev/full")
        box, publisher = outbox(spool, log_path)
        spool.record([RcptUpdate("j1", B, Status.DELIVERED)], T0, [final("j1", B)])
        publisher.publish(final("j1", B))
        publisher.publish(("queued", '{"event":"queued","id":"j3"}'))
        publisher.flush()  # ENOSPC: let go, no exception
        assert publisher.failing
        box.confirm()  # cannot be repaired yet: the row stays
        assert spool.unpublished() == [final("j1", B)]
        spool.record([RcptUpdate("j2", A, Status.DELIVERED)], T0, [final("j2", A)])
        publisher.publish(final("j2", A))  # not written while failing
        log_path.unlink()
        (tmp_path / "kept.jsonl").rename(log_path)  # space again: the old file is back
        box.confirm()
        assert not publisher.failing and spool.unpublished() == []
        publisher.publish(final("j2", B))
        publisher.close()
    lines = log_lines(log_path)
    assert lines == [final("j1", A)[1], final("j1", B)[1], final("j2", A)[1], final("j2", B)[1]]
