"""engine.spool's kept counts (`Spool.stats`: jobs, recipients pending, deferred), kept as the
spool changes rather than counted, compared with a full count of the file after every step
of a random mix of what changes it: intake (duplicates included), results of every kind
(repeated, unknown, for a recipient final already), expiry, the operator's bounce, a job set
aside, a failed transaction; and after a kill -9 and an edit of the file, at the next open."""
from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import pytest

from engine.job import Job
from engine.protocol import Status
from engine.reply import Reply
from engine.spool import RcptUpdate, Spool, SpoolError, SpoolStats
from tests.support import ROOT

T0 = 1_700_000_000.0
DAY = 86400.0
MSG = b"Subject: x\r\n\r\nx\r\n"
LATER = Reply(451, "4.7.1", "later")


def counted(spool: Spool) -> SpoolStats:
    """What `stats` must say, counted from the file."""
    [(jobs, oldest)] = spool.query("SELECT COUNT(*), MIN(queued_ts) FROM jobs")
    [(pending, deferred)] = spool.query(
        "SELECT COUNT(*), COALESCE(SUM(attempts > 0), 0) FROM rcpts WHERE status = 'pending'")
    return SpoolStats(jobs, pending, deferred, oldest)


def rcpts_of(n: int, rng: random.Random) -> tuple[str, ...]:
    return tuple(f"r{rng.randrange(6)}@d{rng.randrange(3)}.test" for _ in range(n))


def a_step(spool: Spool, rng: random.Random, step: int) -> None:
    """One random change: a batch accepted, or a batch of results recorded."""
    now = T0 + step
    if rng.random() < 0.35:
        jobs = [Job(id=f"j{rng.randrange(60)}", sender="s@example.com",
                    rcpts=rcpts_of(rng.randrange(1, 4), rng), message=MSG)
                for _ in range(rng.randrange(1, 6))]
        spool.accept(jobs, now, DAY)
        return
    held = spool.query("SELECT job_id, rcpt FROM rcpts")
    if not held:
        return
    updates = []
    for _ in range(rng.randrange(1, 8)):
        job_id, rcpt = rng.choice(held)
        if rng.random() < 0.1:
            rcpt = "unknown@d0.test"
        status = rng.choice([Status.DEFERRED, Status.DEFERRED, Status.DELIVERED,
                             Status.BOUNCED, Status.EXPIRED])
        updates.append(RcptUpdate(job_id, rcpt, status, reply=LATER,
                                  next_attempt=now + 60 if status is Status.DEFERRED else None,
                                  count_attempt=rng.random() < 0.7))
    spool.record(updates, now)


@pytest.mark.parametrize("seed", range(6))
def test_the_kept_counts_are_the_file_s_after_every_change(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    with Spool(str(tmp_path / "spool")) as spool:
        for step in range(150):
            a_step(spool, rng, step)
            assert spool.stats() == counted(spool), f"seed {seed}, step {step}"
    with Spool(str(tmp_path / "spool")) as spool:  # counted again at the open
        assert spool.stats() == counted(spool)


def test_a_job_set_aside_leaves_the_counts(tmp_path: Path) -> None:
    directory = str(tmp_path / "spool")
    with Spool(directory) as spool:
        spool.accept([Job(id=f"j{i}", sender="s@example.com", rcpts=("a@x.test", "b@x.test"),
                          message=MSG) for i in range(3)], T0, DAY)
        spool.record([RcptUpdate("j1", "a@x.test", Status.DEFERRED, next_attempt=T0,
                                 reply=LATER)], T0)
        # A damaged envelope, written behind the spool's back (the counts do not change).
        with closing(sqlite3.connect(os.path.join(directory, "spool.db"))) as conn:
            conn.execute("UPDATE jobs SET envelope = '{not json' WHERE id = 'j1'")
            conn.commit()
        assert len(spool.due(T0, 10)) == 2
        assert spool.stats() == counted(spool) == SpoolStats(2, 4, 0, T0)


def test_a_failed_write_leaves_the_counts_as_they_were(tmp_path: Path) -> None:
    with Spool(str(tmp_path / "spool")) as spool:
        spool.accept([Job(id="j", sender="s@example.com", rcpts=("a@x.test", "b@x.test"),
                          message=MSG)], T0, DAY)
        before = spool.stats()
        unbindable = Reply(451, None, object())  # type: ignore[arg-type]
        with pytest.raises(SpoolError):  # counted, then the UPDATE fails: rolled back
            spool.record([RcptUpdate("j", "a@x.test", Status.DELIVERED),
                          RcptUpdate("j", "b@x.test", Status.DEFERRED, next_attempt=T0,
                                     reply=unbindable)], T0)
        assert spool.stats() == before == counted(spool)


CHILD = """
import os, random, signal, sys
sys.path.insert(0, {root!r})
from tests.unit.test_spool_counts import a_step
from engine.job import Job
from engine.spool import Spool
spool = Spool({directory!r})
rng = random.Random(7)
for step in range(200):
    a_step(spool, rng, step)
spool.accept([Job(id="k", sender="s@example.com", rcpts=("a@x.test", "b@x.test"),
                  message=b"x")], 0.0, 1e12)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_after_a_kill_9_and_an_edit_of_the_file_the_open_counts_again(tmp_path: Path) -> None:
    directory = str(tmp_path / "spool")
    child = subprocess.run([sys.executable, "-c", CHILD.format(root=str(ROOT),
                                                               directory=directory)],
                           timeout=8, capture_output=True)
    assert child.returncode == -signal.SIGKILL, child.stderr
    with Spool(directory) as spool:
        assert spool.stats() == counted(spool) and spool.stats().jobs > 0
    with closing(sqlite3.connect(os.path.join(directory, "spool.db"))) as conn:
        conn.execute("DELETE FROM rcpts WHERE rowid % 2 = 0")  # an operator's sqlite3 shell
        conn.commit()
    with Spool(directory) as spool:
        assert spool.stats() == counted(spool)
