"""engine.salvage on real SQLite files: intact, a flipped byte in a page of the jobs table,
of an index, of a message's overflow page, a file cut short, no database at all."""
from __future__ import annotations

import hashlib
import os
import sqlite3
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from engine import salvage
from engine.job import Job
from engine.protocol import Status
from engine.reply import Reply
from engine.salvage import Findings, RowidRange
from engine.spool import RcptUpdate, Spool, SpoolDamaged, SpoolError
from tests.support.damage import (
    checkpoint,
    cut_last_page,
    flip_page_type,
    leaf_rowids,
    page_size,
    pages,
)

A, B = "a@example.com", "b@example.net"
MSG = b"Subject: s\r\n\r\n" + b"x" * 3000 + b"\r\n"
T0 = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC
STAMP = "20231114T221320Z"
DAY = 86400.0
N = 200  # jobs j000..j199; the first 50 with A delivered and B deferred
OK = Reply(250, "2.0.0", "ok")
LATER = Reply(451, "4.7.1", "try later")
ALL_IDS = [f"j{i:03}" for i in range(N)]


def job(job_id: str, message: bytes = MSG) -> Job:
    return Job(id=job_id, sender="s@example.com", rcpts=(A, B), message=message)


def sql(path: str, query: str, *params: object) -> list[tuple[object, ...]]:
    with closing(sqlite3.connect(path)) as conn:
        rows = conn.execute(query, params).fetchall()
        conn.commit()
        return rows


@pytest.fixture
def spool_dir(tmp_path: Path) -> str:
    return str(tmp_path / "spool")


@pytest.fixture
def path(spool_dir: str) -> Iterator[str]:
    """A spool of N jobs (50 partly done), 10 finished ids and a corrupt row, checkpointed:
    each page of the file is the only copy of what it holds."""
    db = os.path.join(spool_dir, "spool.db")
    with Spool(spool_dir) as s:
        s.accept([job(f"f{i}") for i in range(10)], T0, DAY)
        s.record([RcptUpdate(f"f{i}", r, Status.DELIVERED) for i in range(10) for r in (A, B)],
                 now=T0)
        s.accept([job("bad")], T0, DAY)
        sql(db, "UPDATE jobs SET envelope = 'not json' WHERE id = 'bad'")
        assert s.due(T0, 10) == []  # set aside in `corrupt`
        s.accept([job(i) for i in ALL_IDS], T0, DAY)
        s.record([u for i in ALL_IDS[:50] for u in (
            RcptUpdate(i, A, Status.DELIVERED, reply=OK),
            RcptUpdate(i, B, Status.DEFERRED, T0 + 60, LATER))], now=T0)
    checkpoint(db)
    yield db


def add_big_job(spool_dir: str, path: str) -> None:
    """One more job, whose 100 KB message spills into overflow pages at the file's end."""
    with Spool(spool_dir) as s:
        s.accept([job("big", b"y" * 100_000)], T0, DAY)
    checkpoint(path)


def ids_on_leaf(path: str, page: int) -> list[str]:
    """The ids of the jobs whose rows are on a leaf page of the jobs table."""
    rowids = leaf_rowids(path, page)
    marks = ",".join("?" * len(rowids))
    return sorted(str(i) for (i,) in sql(path, f"SELECT id FROM jobs WHERE rowid IN ({marks})",
                                         *rowids))


def pending_rcpts(path: str, ids: list[str]) -> list[tuple[str, str]]:
    marks = ",".join("?" * len(ids))
    return sorted((str(j), str(r)) for j, r in sql(
        path, f"SELECT job_id, rcpt FROM rcpts WHERE status = 'pending' AND job_id IN ({marks})",
        *ids))


def figures(found: Findings) -> tuple[int, int, int, int, int]:
    return (found.jobs_saved, found.rcpts_pending, found.rcpts_final, found.finished,
            found.corrupt)


def digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def due_ids(spool_dir: str) -> list[str]:
    with Spool(spool_dir) as s:
        return sorted(p.job.id for p in s.due(T0 + 60, 10_000))


# -- intact ------------------------------------------------------------------------------

def test_an_intact_spool_checks_healthy_and_is_copied_whole(spool_dir: str, path: str) -> None:
    found = salvage.check(spool_dir)
    assert found.healthy and found.problems == [] and not found.lost_anything
    assert figures(found) == (N, 2 * N - 50, 50, 10, 1)

    saved = salvage.salvage(spool_dir, now=T0)
    assert figures(saved) == (N, 2 * N - 50, 50, 10, 1) and not saved.lost_anything
    assert saved.damaged_copy == f"{path}.damaged-{STAMP}"
    assert sql(saved.damaged_copy, "SELECT COUNT(*) FROM jobs") == [(N,)]  # kept as it was
    assert not os.path.exists(f"{path}.salvage-new")
    assert sql(path, "SELECT status, attempts, next_attempt, code, enhanced, reply FROM rcpts"
                     " WHERE job_id = 'j000' ORDER BY rcpt") == [
        ("delivered", 1, None, 250, "2.0.0", "ok"), ("pending", 1, T0 + 60, 451, "4.7.1",
                                                     "try later")]
    assert sql(path, "SELECT id, reason FROM corrupt") == [("bad", sql(
        saved.damaged_copy, "SELECT reason FROM corrupt")[0][0])]
    with Spool(spool_dir) as s:
        assert s.accept([job("f3")], T0 + 1, DAY) == []  # still known as finished
        [first] = [p for p in s.due(T0 + 60, 10_000) if p.job.id == "j000"]
        assert first.job == job("j000") and first.rcpts == (B,) and first.attempts == {B: 1}
    assert due_ids(spool_dir) == ALL_IDS


# -- a flipped byte ------------------------------------------------------------------------

def test_a_flipped_byte_in_a_jobs_page_loses_the_jobs_on_it_and_only_them(
        spool_dir: str, path: str) -> None:
    leaves = [n for n, kind in pages(path, "jobs") if kind == "leaf"]
    page = leaves[len(leaves) // 2]
    rowids = leaf_rowids(path, page)
    on_page = ids_on_leaf(path, page)
    lost_rcpts = pending_rcpts(path, on_page)
    assert on_page and len(on_page) == len(rowids)
    flip_page_type(path, page)

    with pytest.raises(SpoolDamaged, match="malformed") as raised:
        Spool(spool_dir)
    assert raised.value.path == path
    found = salvage.check(spool_dir)
    assert not found.healthy and found.problems
    assert found.jobs_lost == on_page and found.rcpts_lost == lost_rcpts
    assert found.unreadable == {"jobs": [RowidRange(rowids[0], rowids[-1])]}
    assert found.jobs_saved == N - len(on_page)

    saved = salvage.salvage(spool_dir, now=T0)
    assert figures(saved) == figures(found) and saved.jobs_lost == on_page
    assert due_ids(spool_dir) == sorted(set(ALL_IDS) - set(on_page))


def test_a_flipped_byte_in_an_index_page_loses_nothing(spool_dir: str, path: str) -> None:
    (root, _), *_ = pages(path, "jobs_due")
    flip_page_type(path, root)

    with pytest.raises(SpoolDamaged):
        Spool(spool_dir)
    found = salvage.check(spool_dir)
    assert found.problems and not found.healthy  # the integrity check sees the index
    assert not found.lost_anything and figures(found) == (N, 2 * N - 50, 50, 10, 1)

    saved = salvage.salvage(spool_dir, now=T0)
    assert not saved.lost_anything and figures(saved) == (N, 2 * N - 50, 50, 10, 1)
    assert due_ids(spool_dir) == ALL_IDS  # the index built anew
    assert salvage.check(spool_dir).healthy


def test_a_job_whose_message_cannot_be_read_is_lost_not_written(spool_dir: str,
                                                                path: str) -> None:
    add_big_job(spool_dir, path)
    first_overflow = next(n for n, kind in pages(path, "jobs") if kind == "overflow")
    flip_page_type(path, first_overflow)  # the chain's pointer to its next page
    with pytest.raises(sqlite3.DatabaseError, match="malformed"):
        sql(path, "SELECT message FROM jobs WHERE id = 'big'")
    assert sql(path, "SELECT envelope FROM jobs WHERE id = 'big'")  # the envelope reads

    saved = salvage.salvage(spool_dir, now=T0)
    assert saved.jobs_lost == ["big"] and saved.rcpts_lost == [("big", A), ("big", B)]
    assert figures(saved) == (N, 2 * N - 50, 50, 10, 1)
    assert sql(path, "SELECT COUNT(*) FROM jobs WHERE id = 'big'") == [(0,)]
    assert due_ids(spool_dir) == ALL_IDS


def test_a_damaged_jobs_root_loses_every_job_and_names_them(spool_dir: str, path: str) -> None:
    (root, kind), *_ = pages(path, "jobs")
    assert kind == "internal"
    flip_page_type(path, root)

    saved = salvage.salvage(spool_dir, now=T0)
    assert saved.jobs_lost == sorted(ALL_IDS)  # named by the indexes and the recipients
    assert len(saved.rcpts_lost) == 2 * N - 50  # the pending ones; the final 50 were done
    assert figures(saved) == (0, 0, 0, 10, 1)
    assert due_ids(spool_dir) == []


# -- cut short, or no database at all ----------------------------------------------------------

def test_a_spool_cut_short_loses_the_jobs_of_its_last_page(spool_dir: str, path: str) -> None:
    add_big_job(spool_dir, path)
    last, kind = pages(path, "jobs")[-1]
    assert last == os.path.getsize(path) // page_size(path) and kind == "leaf"  # as built
    on_page = ids_on_leaf(path, last)
    assert "big" in on_page
    cut_last_page(path)

    with pytest.raises(SpoolDamaged, match="malformed"):
        Spool(spool_dir)
    saved = salvage.salvage(spool_dir, now=T0)
    assert saved.jobs_lost == on_page
    assert saved.rcpts_lost == [(i, r) for i in on_page for r in (A, B)]
    assert saved.jobs_saved == N + 1 - len(on_page)
    assert due_ids(spool_dir) == sorted({*ALL_IDS, "big"} - set(on_page))


def test_a_file_that_is_no_database_is_refused_and_nothing_is_readable(spool_dir: str,
                                                                      path: str) -> None:
    with open(path, "r+b") as f:
        f.write(b"\0" * 100)  # the header

    with pytest.raises(SpoolDamaged, match="not a database"):
        Spool(spool_dir)
    found = salvage.check(spool_dir)
    assert found.problems == ["file is not a database"] and found.lost_anything
    assert figures(found) == (0, 0, 0, 0, 0)
    assert found.unreadable["jobs"] == [RowidRange(1, None)]


# -- what salvage refuses, and a dry run -------------------------------------------------------

def test_salvage_refuses_a_spool_an_engine_holds(spool_dir: str, path: str) -> None:
    before = digest(path)
    with Spool(spool_dir), pytest.raises(SpoolError, match="in use"):
        salvage.salvage(spool_dir, now=T0)
    assert digest(path) == before
    assert not [f for f in os.listdir(spool_dir) if "damaged" in f or "salvage" in f]
    assert salvage.check(spool_dir).healthy  # check reads while held


def test_a_dry_run_reports_and_changes_nothing(spool_dir: str, path: str) -> None:
    leaves = [n for n, kind in pages(path, "jobs") if kind == "leaf"]
    flip_page_type(path, leaves[1])
    before = digest(path)

    dry = salvage.salvage(spool_dir, dry_run=True, now=T0)
    assert dry.jobs_lost and dry.damaged_copy is None
    assert digest(path) == before and not any(".damaged-" in f for f in os.listdir(spool_dir))
    done = salvage.salvage(spool_dir, now=T0)
    assert figures(done) == figures(dry) and done.jobs_lost == dry.jobs_lost


def test_no_spool_is_an_error_not_an_empty_spool(spool_dir: str) -> None:
    os.makedirs(spool_dir)
    with pytest.raises(SpoolError, match="no spool"):
        salvage.check(spool_dir)
    with pytest.raises(SpoolError, match="no spool"):
        salvage.salvage(spool_dir)
    assert not os.path.exists(os.path.join(spool_dir, "spool.db"))


def test_the_report_names_what_is_lost(spool_dir: str, path: str) -> None:
    found = Findings(jobs_saved=3, rcpts_pending=4, rcpts_final=1, jobs_lost=["j7"],
                     rcpts_lost=[("j7", A)], unreadable={"jobs": [RowidRange(5, 9)]},
                     problems=["Page 4: btreeInitPage() returns error code 11", "x"])
    assert salvage.check_report(found, spool_dir) == [
        f"spool {path}: damaged",
        "integrity check: Page 4: btreeInitPage() returns error code 11 (and 1 more problems)",
        "readable: 3 jobs, with 4 recipients pending and 1 final; 0 finished job ids"
        " (duplicate detection); 0 corrupt rows; 0 final events not yet published",
        "lost: 1 jobs, 1 recipients (pending, or in an unknown state)",
        "unreadable 5 rows of jobs: rowids 5-9",
        "lost job: j7",
        f"lost recipient: j7 {A}"]
