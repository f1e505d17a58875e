"""engine.spool: durability, duplicates, per-recipient progress, corrupt rows."""
from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from engine import spoolfile
from engine.events import Event
from engine.job import Job
from engine.protocol import Status
from engine.reply import Reply
from engine.spool import Pending, RcptUpdate, SetAside, Spool, SpoolDamaged, SpoolError, SpoolStats
from tests.support import ROOT
from tests.support.damage import checkpoint, flip_page_type, pages

REPO = ROOT
A, B, C = "a@example.com", "b@example.net", "c@example.org"
MSG = b"Subject: hello\r\n\r\nhi\r\n"
T0 = 1_700_000_000.0
DAY = 86400.0
OK = Reply(250, "2.0.0", "ok")
LATER = Reply(451, "4.7.1", "try later")


def job(job_id: str, rcpts: tuple[str, ...] = (A, B), **kw: object) -> Job:
    return Job(id=job_id, sender="s@example.com", rcpts=rcpts, message=MSG, **kw)  # type: ignore[arg-type]


def ids(jobs: list[Job] | list[Pending]) -> list[str]:
    return [j.id if isinstance(j, Job) else j.job.id for j in jobs]


@pytest.fixture
def spool_dir(tmp_path: Path) -> str:
    return str(tmp_path / "spool")


@pytest.fixture
def spool(spool_dir: str) -> Iterator[Spool]:
    with Spool(spool_dir) as s:
        yield s


def sql(spool_dir: str, query: str, *params: object) -> list[tuple[object, ...]]:
    """Run `query` on the spool file directly, as an operator (or a disk fault) would."""
    with closing(sqlite3.connect(os.path.join(spool_dir, "spool.db"))) as conn:
        rows = conn.execute(query, params).fetchall()
        conn.commit()
        return rows


# -- opening -------------------------------------------------------------------

def test_directory_is_private_and_db_is_wal_full(spool: Spool, spool_dir: str) -> None:
    assert stat.S_IMODE(os.stat(spool_dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(spool.path).st_mode) == 0o600
    assert sql(spool_dir, "PRAGMA journal_mode") == [("wal",)]
    assert spool._conn.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL


def test_a_new_spool_has_large_pages_and_checkpoints_by_bytes(spool: Spool) -> None:
    conn = spool._conn
    assert conn.execute("PRAGMA page_size").fetchone() == (spoolfile.PAGE_BYTES,)
    assert conn.execute("PRAGMA wal_autocheckpoint").fetchone() == (
        spoolfile.WAL_CHECKPOINT_BYTES // spoolfile.PAGE_BYTES,)


def test_a_spool_made_with_small_pages_keeps_them_and_its_jobs(spool_dir: str) -> None:
    os.makedirs(spool_dir, mode=0o700)
    with closing(sqlite3.connect(os.path.join(spool_dir, "spool.db"))) as conn:
        conn.execute("PRAGMA page_size = 4096")
        conn.execute("PRAGMA journal_mode = WAL")
    with Spool(spool_dir) as s:
        s.accept([job("j1")], T0, DAY)
    with Spool(spool_dir) as s:
        assert s._conn.execute("PRAGMA page_size").fetchone() == (4096,)
        assert s._conn.execute("PRAGMA wal_autocheckpoint").fetchone() == (
            spoolfile.WAL_CHECKPOINT_BYTES // 4096,)
        assert ids(s.due(T0, 10)) == ["j1"]


def test_second_opener_is_refused_while_held(spool: Spool, spool_dir: str) -> None:
    with pytest.raises(SpoolError, match="in use"):
        Spool(spool_dir)
    spool.close()
    Spool(spool_dir).close()


def test_newer_schema_version_is_refused(spool_dir: str) -> None:
    Spool(spool_dir).close()
    sql(spool_dir, "PRAGMA user_version = 99")
    with pytest.raises(SpoolError, match="schema version 99, newer"):
        Spool(spool_dir)
    sql(spool_dir, "PRAGMA user_version = 1")
    Spool(spool_dir).close()  # the refusal released the lock


def test_reopen_after_close_keeps_everything(spool_dir: str) -> None:
    with Spool(spool_dir) as s:
        s.accept([job("j1"), job("j2", (C,), meta={"k": [1, "x"]}, ip="203.0.113.10")], T0, DAY)
        s.record([RcptUpdate("j1", A, Status.DELIVERED, reply=OK),
                  RcptUpdate("j1", B, Status.DEFERRED, T0 + 60, LATER)], now=T0)
        s.record([RcptUpdate("j2", C, Status.BOUNCED)], now=T0)
    with Spool(spool_dir) as s:
        assert s.stats() == SpoolStats(jobs=1, rcpts_pending=1, rcpts_deferred=1,
                                       oldest_queued_ts=T0)
        assert s.due(T0 + 59, 10) == []
        [p] = s.due(T0 + 60, 10)
        assert p.job == job("j1") and p.rcpts == (B,) and p.attempts == {B: 1}
        assert s.accept([job("j2", (C,))], T0 + 1, DAY) == []  # finished is remembered


def test_message_and_envelope_round_trip(spool: Spool) -> None:
    original = Job(id="rt", sender="", rcpts=(A, C), message=b"\xc3\xa9t\xc3\xa9\r\n",
                   pool="default", meta={"campaign": 7}, expires=3600.0, eightbit=True)
    spool.accept([original], T0, DAY)
    [p] = spool.due(T0, 1)
    assert p.job == original
    assert (p.queued_ts, p.expires_ts) == (T0, T0 + 3600.0)


# -- accepting -------------------------------------------------------------------

def test_accept_returns_new_jobs_in_order(spool: Spool) -> None:
    assert ids(spool.accept([job("x"), job("y"), job("z")], T0, DAY)) == ["x", "y", "z"]
    assert spool.stats() == SpoolStats(jobs=3, rcpts_pending=6, rcpts_deferred=0,
                                       oldest_queued_ts=T0)


def test_duplicate_within_batch_is_dropped(spool: Spool) -> None:
    got = spool.accept([job("x"), job("y"), job("x", (C,))], T0, DAY)
    assert ids(got) == ["x", "y"]
    [p, _] = spool.due(T0, 10)
    assert p.job.rcpts == (A, B)  # the first one wins


def test_duplicate_of_held_job_is_dropped(spool: Spool) -> None:
    spool.accept([job("x")], T0, DAY)
    assert ids(spool.accept([job("x"), job("y")], T0 + 5, DAY)) == ["y"]
    assert spool.stats().jobs == 2


def test_duplicate_of_recently_finished_job_is_dropped(spool: Spool) -> None:
    spool.accept([job("x", (A,))], T0, DAY)
    assert spool.record([RcptUpdate("x", A, Status.DELIVERED)], now=T0 + 10) == ["x"]
    assert spool.accept([job("x")], T0 + 10 + DAY, DAY) == []  # window edge: still a duplicate
    assert ids(spool.accept([job("x")], T0 + 11 + DAY, DAY)) == ["x"]  # window passed


def test_prune_finished_forgets_old_ids(spool: Spool) -> None:
    spool.accept([job("old", (A,)), job("new", (A,))], T0, DAY)
    spool.record([RcptUpdate("old", A, Status.BOUNCED)], now=T0)
    spool.record([RcptUpdate("new", A, Status.BOUNCED)], now=T0 + 100)
    assert spool.prune_finished(T0 + DAY + 50) == 1
    assert spool.prune_finished(T0 + DAY + 50) == 0
    with closing(sqlite3.connect(spool.path)) as conn:
        assert conn.execute("SELECT id FROM finished").fetchall() == [("new",)]


def test_accept_refuses_job_without_recipients_and_writes_nothing(spool: Spool) -> None:
    with pytest.raises(ValueError, match="no recipients"):
        spool.accept([job("ok"), job("empty", ())], T0, DAY)
    assert spool.stats().jobs == 0


def test_expiry_is_max_age_unless_job_says(spool: Spool) -> None:
    spool.accept([job("default"), job("own", expires=600.0)], T0, 7200.0)
    got = {p.job.id: p.expires_ts for p in spool.due(T0, 10)}
    assert got == {"default": T0 + 7200.0, "own": T0 + 600.0}


def test_expired_recipients_finish_the_job(spool: Spool) -> None:
    spool.accept([job("x")], T0, 600.0)
    spool.record([RcptUpdate("x", A, Status.DELIVERED),
                  RcptUpdate("x", B, Status.DEFERRED, T0 + 500)], now=T0)
    [p] = spool.due(T0 + 500, 10)
    assert p.expires_ts == T0 + 600.0 and p.rcpts == (B,)
    gone = spool.record([RcptUpdate("x", B, Status.EXPIRED, count_attempt=False)], now=T0 + 700)
    assert gone == ["x"]
    assert spool.stats() == SpoolStats(0, 0, 0, None)


# -- recording -------------------------------------------------------------------

def test_final_status_is_never_overwritten(spool: Spool) -> None:
    spool.accept([job("x")], T0, DAY)
    assert spool.record([RcptUpdate("x", A, Status.DELIVERED, reply=OK)], now=T0) == []
    # A late duplicate result (a restarted worker's) must not resurrect A.
    spool.record([RcptUpdate("x", A, Status.DEFERRED, T0 + 1, LATER),
                  RcptUpdate("x", A, Status.BOUNCED)], now=T0)
    [p] = spool.due(T0 + 10, 10)
    assert p.rcpts == (B,)
    assert spool.stats().rcpts_pending == 1
    with closing(sqlite3.connect(spool.path)) as conn:
        row = conn.execute("SELECT status, code, enhanced, reply, attempts FROM rcpts"
                           " WHERE rcpt = ?", (A,)).fetchone()
    assert row == ("delivered", 250, "2.0.0", "ok", 1)


def test_unknown_job_or_rcpt_is_ignored(spool: Spool) -> None:
    spool.accept([job("x")], T0, DAY)
    got = spool.record([RcptUpdate("nope", A, Status.DELIVERED),
                        RcptUpdate("x", C, Status.DELIVERED),
                        RcptUpdate("x", A, Status.DELIVERED)], now=T0)
    assert got == []
    assert spool.stats().rcpts_pending == 1


def test_job_moves_to_finished_when_every_rcpt_is_final(spool: Spool) -> None:
    spool.accept([job("x"), job("y", (C,))], T0, DAY)
    assert spool.record([RcptUpdate("x", A, Status.DELIVERED)], now=T0) == []
    done = spool.record([RcptUpdate("y", C, Status.DELIVERED),
                         RcptUpdate("x", B, Status.BOUNCED),
                         RcptUpdate("x", B, Status.DELIVERED)], now=T0 + 1)
    assert done == ["y", "x"]
    assert spool.record([RcptUpdate("x", B, Status.DELIVERED)], now=T0 + 2) == []  # once only
    with closing(sqlite3.connect(spool.path)) as conn:
        assert conn.execute("SELECT COUNT(*) FROM jobs").fetchone() == (0,)
        assert conn.execute("SELECT COUNT(*) FROM rcpts").fetchone() == (0,)
        assert conn.execute("SELECT id, ts FROM finished ORDER BY id").fetchall() == [
            ("x", T0 + 1), ("y", T0 + 1)]


def test_a_large_mixed_batch_settles_each_job(spool: Spool, spool_dir: str) -> None:
    # `record` settles a batch set-based, in chunks of ids: more jobs than one chunk, some
    # finished, some deferred (due again at their earliest recipient), some untouched.
    jobs = [job(f"m{i}", (A, B)) for i in range(1200)]
    spool.accept(jobs, T0, DAY)
    updates = []
    for i in range(1200):
        if i % 3 == 0:  # finished
            updates += [RcptUpdate(f"m{i}", A, Status.DELIVERED, reply=OK),
                        RcptUpdate(f"m{i}", B, Status.BOUNCED)]
        elif i % 3 == 1:  # one final, one deferred
            updates += [RcptUpdate(f"m{i}", A, Status.DELIVERED),
                        RcptUpdate(f"m{i}", B, Status.DEFERRED, T0 + 100 + i, LATER)]
    updates.append(RcptUpdate("nobody", A, Status.DELIVERED))
    done = spool.record(updates, now=T0 + 1)
    assert done == [f"m{i}" for i in range(0, 1200, 3)]
    assert spool.stats() == SpoolStats(jobs=800, rcpts_pending=1200, rcpts_deferred=400,
                                       oldest_queued_ts=T0)
    due_times = dict(sql(spool_dir, "SELECT id, next_attempt FROM jobs"))  # type: ignore[arg-type]
    assert all(due_times[f"m{i}"] == T0 + 100 + i for i in range(1, 1200, 3))
    assert all(due_times[f"m{i}"] == T0 for i in range(2, 1200, 3))
    assert len(sql(spool_dir, "SELECT id FROM finished")) == 400
    assert [p.job.id for p in spool.due(T0 + 101, 1000)] == (  # by (next_attempt, id)
        [*sorted(f"m{i}" for i in range(2, 1200, 3)), "m1"])


@pytest.mark.parametrize("extra", [{}, {"meta": {"k": "v\u00e9"}}, {"ip": "203.0.113.10"},
                                   {"pool": "bulk"}, {"expires": 60.0},
                                   {"meta": {"k": "v", "n": [1, 2.5]}}, {"meta": {"k": "\x7f"}},
                                   # regression: lost from the stored envelope when no other
                                   # optional field was set (a retry went without REQUIRETLS)
                                   {"requiretls": True}, {"dkim_domain": "mail.example.org"}])
def test_stored_envelope_is_the_json_of_envelope_json(spool: Spool, spool_dir: str,
                                                     extra: dict[str, object]) -> None:
    import json

    from engine.job import envelope_json
    original = job('q"\\\u00e9', (A, "\u00fc@b\u00fccher.example"), smtputf8=True, **extra)
    spool.accept([original], T0, DAY)
    [(text,)] = sql(spool_dir, "SELECT envelope FROM jobs")
    assert text == json.dumps(envelope_json(original), separators=(",", ":"))
    [p] = spool.due(T0 + 1, 1)
    assert p.job == original


def test_attempts_count_unless_told_not_to(spool: Spool) -> None:
    spool.accept([job("x")], T0, DAY)
    spool.record([RcptUpdate("x", A, Status.DEFERRED, T0 + 10, LATER),
                  RcptUpdate("x", B, Status.DEFERRED, T0 + 10, count_attempt=False)], now=T0)
    assert spool.stats() == SpoolStats(1, 2, 1, T0)
    spool.record([RcptUpdate("x", A, Status.DEFERRED, T0 + 20),
                  RcptUpdate("x", B, Status.DEFERRED, T0 + 20, count_attempt=False)], now=T0)
    [p] = spool.due(T0 + 20, 10)
    assert p.attempts == {A: 2, B: 0}


def test_deferred_needs_next_attempt() -> None:
    with pytest.raises(ValueError, match="next_attempt"):
        RcptUpdate("x", A, Status.DEFERRED)


# -- handing out -------------------------------------------------------------------

def test_due_orders_by_next_attempt_and_limits(spool: Spool) -> None:
    spool.accept([job("late"), job("early"), job("mid")], T0, DAY)
    spool.record([RcptUpdate("late", A, Status.DEFERRED, T0 + 30),
                  RcptUpdate("late", B, Status.DEFERRED, T0 + 30),
                  RcptUpdate("early", A, Status.DEFERRED, T0 + 10),
                  RcptUpdate("mid", B, Status.DEFERRED, T0 + 20),
                  RcptUpdate("mid", A, Status.DELIVERED)], now=T0)
    assert ids(spool.due(T0 + 5, 10)) == ["early"]  # its B was never tried: due at T0
    assert spool.next_due() == T0
    spool.record([RcptUpdate("early", B, Status.DELIVERED)], now=T0)
    assert spool.next_due() == T0 + 10
    assert spool.due(T0 + 9, 10) == []
    assert ids(spool.due(T0 + 100, 10)) == ["early", "mid", "late"]
    assert ids(spool.due(T0 + 100, 2)) == ["early", "mid"]
    assert ids(spool.due(T0 + 20, 10)) == ["early", "mid"]


def test_due_returns_only_the_rcpts_that_are_due(spool: Spool) -> None:
    spool.accept([job("x", (A, B, C))], T0, DAY)
    spool.record([RcptUpdate("x", B, Status.DEFERRED, T0 + 60)], now=T0)
    [p] = spool.due(T0 + 1, 10)
    assert p.job.rcpts == (A, B, C) and p.rcpts == (A, C) and p.attempts == {A: 0, C: 0}
    [p] = spool.due(T0 + 60, 10)
    assert p.rcpts == (A, B, C) and p.attempts == {A: 0, B: 1, C: 0}


def test_due_skips_in_flight_ids_and_still_fills_the_limit(spool: Spool) -> None:
    spool.accept([job(f"j{i}") for i in range(6)], T0, DAY)
    got = spool.due(T0, 3, skip={"j0", "j2", "j3"})
    assert sorted(ids(got)) == ["j1", "j4", "j5"]
    assert spool.due(T0, 3, skip=frozenset(f"j{i}" for i in range(6))) == []


def test_due_takes_known_jobs_from_the_caller_and_reads_the_others(spool: Spool) -> None:
    spool.accept([job("a"), job("b"), job("c")], T0, DAY)
    held = Pending(job("b"), T0, T0 + DAY, (A, B), {A: 0, B: 0})
    got = spool.due(T0, 10, known={"b": held, "gone": held})
    assert ids(got) == ["a", "b", "c"]  # the spool's order; unknown ids are ignored
    assert got[1] is held and got[0] == spool.due(T0, 1)[0]


def test_next_due_is_none_when_empty(spool: Spool) -> None:
    assert spool.next_due() is None
    assert spool.stats() == SpoolStats(0, 0, 0, None)


# -- corrupt rows -------------------------------------------------------------------

@pytest.mark.parametrize(("envelope", "reason"), [
    ("{not json", "bad envelope JSON"),
    ("[1, 2]", "JSON list, not an object"),
    ('{"id": "j1", "from": "s@example.com", "to": ["not an address"]}', "bad envelope"),
    (b"\xff\xfe garbage", "bad envelope JSON"),
])
def test_corrupt_row_is_set_aside_reported_and_skipped(spool_dir: str, envelope: str | bytes,
                                                       reason: str) -> None:
    reported: list[SetAside] = []
    told: list[list[Event]] = []
    with Spool(spool_dir, on_corrupt=lambda job, finals: (reported.append(job),
                                                          told.append(finals))) as s:
        s.accept([job("j0"), job("j1"), job("j2")], T0, DAY)
        s.record([RcptUpdate("j1", A, Status.DELIVERED)], now=T0)
        sql(spool_dir, "UPDATE jobs SET envelope = CAST(? AS TEXT) WHERE id = 'j1'", envelope)
        assert ids(s.due(T0, 10)) == ["j0", "j2"]
        assert len(reported) == 1 and reported[0].job_id == "j1" and reason in reported[0].reason
        assert reported[0].pending == ((B, 0),)  # what a final event is owed for
        assert reported[0].queued_ts == T0
        assert ids(s.due(T0, 10)) == ["j0", "j2"]  # keeps working, reported once
        assert len(reported) == 1
        assert s.stats() == SpoolStats(2, 4, 0, T0)
        # Its final event, in the outbox with the setting aside, and told to the caller.
        [[(name, line)]] = told
        assert s.unpublished() == [(name, line)]
        event = json.loads(line)
        assert (name, event["id"], event["rcpt"], event["code"]) == ("bounced", "j1", B, 554)
        assert reported[0].reason in event["reply"]
    rows = sql(spool_dir, "SELECT id, reason, message, rcpts FROM corrupt")
    assert rows == [("j1", reported[0].reason, MSG, f"{A} delivered 1\n{B} pending 0")]


def test_a_set_aside_job_keeps_the_meta_it_can_read(spool_dir: str) -> None:
    reported: list[SetAside] = []
    with Spool(spool_dir, on_corrupt=lambda job, _: reported.append(job)) as s:
        s.accept([job("j1")], T0, DAY)
        sql(spool_dir, "UPDATE jobs SET envelope = ? WHERE id = 'j1'",
            '{"id": "j1", "from": "s@example.com", "to": ["bad"], "meta": {"k": 1}}')
        assert s.due(T0, 10) == []
    assert reported[0].meta == {"k": 1} and reported[0].pending == ((A, 0), (B, 0))


def test_corrupt_row_does_not_shrink_the_batch(spool_dir: str) -> None:
    with Spool(spool_dir) as s:
        s.accept([job(f"j{i}") for i in range(4)], T0, DAY)
        sql(spool_dir, "UPDATE jobs SET envelope = 'x' WHERE id IN ('j0', 'j1')")
        assert ids(s.due(T0, 2)) == ["j2", "j3"]


def test_job_due_with_nothing_due_is_repaired_not_looped(spool: Spool, spool_dir: str) -> None:
    spool.accept([job("x")], T0, DAY)
    spool.record([RcptUpdate("x", A, Status.DEFERRED, T0 + 50),
                  RcptUpdate("x", B, Status.DEFERRED, T0 + 60)], now=T0)
    sql(spool_dir, "UPDATE jobs SET next_attempt = 0")  # out of step with its rcpts
    assert spool.due(T0, 10) == []
    assert spool.next_due() == T0 + 50


# -- a damaged file -----------------------------------------------------------------------

def hundred_jobs(spool_dir: str) -> str:
    """A spool of 100 jobs, checkpointed (a page of the file is the only copy); its path."""
    with Spool(spool_dir) as s:
        s.accept([Job(id=f"j{i:03}", sender="s@example.com", rcpts=(A,), message=b"x" * 3000)
                  for i in range(100)], T0, DAY)
    path = os.path.join(spool_dir, "spool.db")
    checkpoint(path)
    return path


def damage_a_jobs_page(path: str) -> None:
    leaves = [n for n, kind in pages(path, "jobs") if kind == "leaf"]
    flip_page_type(path, leaves[len(leaves) // 2])


def test_a_damaged_file_is_refused_at_open_untouched_and_unlocked(spool_dir: str) -> None:
    path = hundred_jobs(spool_dir)
    damage_a_jobs_page(path)
    before = Path(path).read_bytes()
    with pytest.raises(SpoolDamaged, match="malformed") as raised:
        Spool(spool_dir)
    assert raised.value.path == path and "malformed" in raised.value.reason
    assert isinstance(raised.value, SpoolError)  # callers that handle SpoolError still do
    assert Path(path).read_bytes() == before  # checked read-only: left for salvage as found
    os.close(spoolfile.lock(spool_dir))  # the refusal released the lock


def test_a_page_damaged_under_an_open_spool_raises_spool_damaged_not_an_empty_due(
        spool_dir: str) -> None:
    path = hundred_jobs(spool_dir)
    reported: list[SetAside] = []
    with Spool(spool_dir, on_corrupt=lambda job, _: reported.append(job)) as s:
        damage_a_jobs_page(path)  # after the open-time check
        with pytest.raises(SpoolDamaged, match="malformed") as raised:
            s.due(T0, 1000)
        assert raised.value.path == path
    assert reported == []  # not taken for a corrupt row and set aside
    assert sql(spool_dir, "SELECT COUNT(*) FROM corrupt") == [(0,)]


# -- crash safety -------------------------------------------------------------------

CHILD = """
import sys, time
from engine.job import Job
from engine.protocol import Status
from engine.spool import RcptUpdate, Spool

spool = Spool(sys.argv[1])
prefix, n = sys.argv[2], 0
print("ready", flush=True)
while True:
    batch = [Job(id=f"{prefix}-{n + k}", sender="s@example.com",
                 rcpts=("a@example.com", "b@example.net"), message=b"x" * 5000 + b"\\r\\n")
             for k in range(50)]
    n += 50
    accepted = spool.accept(batch, time.time(), 3600)
    sys.stdout.write("".join(f"A {j.id}\\n" for j in accepted))
    sys.stdout.flush()
    spool.record([RcptUpdate(j.id, "a@example.com", Status.DELIVERED) for j in accepted])
    sys.stdout.write("".join(f"D {j.id}\\n" for j in accepted))
    sys.stdout.flush()
"""


def run_and_kill(spool_dir: str, prefix: str, delay: float) -> list[str]:
    """Run CHILD, SIGKILL it `delay` seconds after its first commit; its complete lines."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, spool_dir, prefix],
                            stdout=subprocess.PIPE, env=env)
    assert proc.stdout is not None
    lines: list[str] = []
    with proc, proc.stdout:
        assert proc.stdout.readline() == b"ready\n"
        # Drain concurrently, so the child is killed while working, not blocked on a full pipe.
        reader = threading.Thread(target=lambda: lines.extend(
            raw.decode() for raw in proc.stdout  # type: ignore[union-attr]
            if raw.endswith(b"\n")))
        reader.start()
        deadline = time.monotonic() + 10
        while not lines and time.monotonic() < deadline:  # a slow machine's first commit
            time.sleep(0.005)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        reader.join()
    assert proc.returncode == -signal.SIGKILL
    return lines


def test_kill_9_loses_no_accepted_job_and_resends_no_delivered_rcpt(spool_dir: str) -> None:
    rng = random.Random()
    for round_ in range(3):
        delay = rng.uniform(0.0, 0.4)
        lines = run_and_kill(spool_dir, f"r{round_}", delay)
        accepted = {line.split()[1] for line in lines if line.startswith("A ")}
        delivered = {line.split()[1] for line in lines if line.startswith("D ")}
        assert accepted, f"child accepted nothing in {delay:.3f}s"
        with Spool(spool_dir) as s:
            held = {p.job.id: p.rcpts for p in s.due(time.time() + 1, 10**6)}
        missing = accepted - held.keys()
        assert not missing, f"lost {len(missing)} accepted jobs after kill at {delay:.3f}s"
        resent = [i for i in delivered if held[i] != ("b@example.net",)]
        assert not resent, f"delivered rcpt due again after kill at {delay:.3f}s: {resent[:5]}"
