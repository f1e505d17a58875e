"""A damaged spool, as an operator meets it: `mailengine run` refuses it with one clear
error and exit status 2 (systemd does not restart it), `mailengine spool check` says what
is readable, `mailengine spool salvage` puts the readable rest in place, and the engine
then delivers exactly that."""
from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

from engine.job import Job
from engine.spool import Spool
from engine.testing.harness import LocalEngine, final_outcomes, make_message
from engine.testing.sink import SinkServer
from tests.support.cli import mailengine
from tests.support.damage import checkpoint, flip_page_type, leaf_rowids, pages

JOBS = 60


def spool_of(engine: LocalEngine) -> tuple[str, str]:
    directory = str(engine.config["spool"])
    return directory, os.path.join(directory, "spool.db")


def fill(directory: str) -> list[str]:
    """JOBS jobs of one recipient each, checkpointed into the file; their ids."""
    jobs = [Job(id=f"j{i:03}", sender="sender@example.test", rcpts=(f"r{i}@example.test",),
                message=make_message(i, size=3000, rcpt=f"r{i}@example.test"))
            for i in range(JOBS)]
    with Spool(directory) as spool:
        spool.accept(jobs, time.time(), 86400)
    checkpoint(os.path.join(directory, "spool.db"))
    return [job.id for job in jobs]


def damage_a_jobs_page(path: str) -> list[str]:
    """Flip a byte of a middle page of the jobs table; the ids of the jobs on it."""
    leaves = [n for n, kind in pages(path, "jobs") if kind == "leaf"]
    page = leaves[len(leaves) // 2]
    rowids = leaf_rowids(path, page)
    with closing(sqlite3.connect(path)) as conn:  # read before the damage
        ids = sorted(conn.execute(
            f"SELECT id FROM jobs WHERE rowid IN ({','.join(map(str, rowids))})").fetchall())
    flip_page_type(path, page)
    return [str(job_id) for (job_id,) in ids]


def test_a_damaged_spool_is_refused_checked_salvaged_and_what_was_saved_is_delivered(
        sink: SinkServer, local_engine: Callable[..., LocalEngine]) -> None:
    engine = local_engine(sink.port, start=False)
    directory, path = spool_of(engine)
    ids = fill(directory)
    lost = damage_a_jobs_page(path)
    assert 0 < len(lost) < JOBS

    run = mailengine("run", "-c", engine.config_path, timeout=30)
    assert run.returncode == 2, run.stderr
    assert (f"mailengine: spool {path} is damaged (database disk image is malformed):"
            f" run 'mailengine spool check -c {engine.config_path}' to see what is readable"
            f" and 'mailengine spool salvage -c {engine.config_path}' to recover it"
            ) in run.stderr
    assert f"event=spool_damaged path={path}" in run.stderr and "Traceback" not in run.stderr

    check = mailengine("spool", "check", "-c", engine.config_path)
    assert check.returncode == 1, check.stderr
    assert check.stdout.startswith(f"spool {path}: damaged\n")
    saved = JOBS - len(lost)
    assert f"readable: {saved} jobs, with {saved} recipients pending" in check.stdout
    assert [line[len("lost job: "):] for line in check.stdout.splitlines()
            if line.startswith("lost job: ")] == lost

    salvaged = mailengine("spool", "salvage", "-c", engine.config_path)
    assert salvaged.returncode == 1, salvaged.stderr  # something lost, the rest in place
    assert f"lost: {len(lost)} jobs, {len(lost)} recipients" in salvaged.stdout
    kept = min(name for name in os.listdir(directory) if name.startswith("spool.db.damaged-"))
    assert f"the damaged file is kept as {os.path.join(directory, kept)}\n" in salvaged.stdout
    assert mailengine("spool", "check", "--spool", directory).returncode == 0

    engine.start()
    finals = final_outcomes(engine.wait_final(JOBS - len(lost), timeout=60))
    assert {job_id for job_id, _ in finals} == set(ids) - set(lost)
    assert {e["event"] for e in finals.values()} == {"delivered"}
    assert engine.stop(timeout=20) == 0
    assert len(sink.messages) == JOBS - len(lost)


def test_check_reads_beside_a_running_engine_and_salvage_refuses_to(
        sink: SinkServer, local_engine: Callable[..., LocalEngine]) -> None:
    engine = local_engine(sink.port)
    directory, path = spool_of(engine)

    check = mailengine("spool", "check", "-c", engine.config_path)
    assert (check.returncode, check.stdout.splitlines()[0]) == (0, f"spool {path}: ok")
    refused = mailengine("spool", "salvage", "-c", engine.config_path)
    assert refused.returncode == 2
    assert refused.stderr == (f"mailengine spool salvage: spool {directory} is in use by"
                              " another process\n")
    assert engine.push([({"id": "after", "from": "s@example.test", "to": ["r@example.test"]},
                         make_message(1))])  # undisturbed
    assert [e["event"] for e in final_outcomes(engine.wait_final(1)).values()] == ["delivered"]


def test_usage_errors_exit_2_with_one_line(tmp_path: Path) -> None:
    empty = os.path.join(str(tmp_path), "empty")
    os.makedirs(empty)
    for command in ("check", "salvage"):
        done = mailengine("spool", command, "--spool", empty)
        assert (done.returncode, done.stderr) == (
            2, f"mailengine spool {command}: no spool in {empty} (no spool.db)\n")
        bad = mailengine("spool", command, "-c", os.path.join(empty, "none.yaml"))
        assert bad.returncode == 2 and len(bad.stderr.splitlines()) == 1, bad.stderr
    assert mailengine("spool").returncode == 2
