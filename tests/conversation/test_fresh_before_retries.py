"""Fresh mail is not starved by a deferral window ending (issue #19): when a backlog of
retries comes due at once, they take at most `limits.retry_share` of a worker's slots, and
jobs accepted after them go out first, while the backlog is still pending.

Before, `Spool.due` handed out the oldest next attempt first and the retries could hold
every one of a worker's `max_in_flight` slots (each waiting there for its provider's turn):
fresh mail to a healthy destination waited behind the whole window (bench/queue_scale.py
--window). The spool and ZeroMQ are real; the worker is a stand-in whose tasks the test
reads (tests/support/supervisor.py)."""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.job import Job
from engine.protocol import Status
from engine.reply import Reply
from engine.spool import RcptUpdate
from tests.support.supervisor import IP2, RCPT, Parts, attempt, job_envelope, tasks

SLOTS = 20  # limits.max_in_flight
BACKLOG = 200  # retries due together
DEFER = Reply(451, "4.7.1", "try later")


@pytest.fixture
def parts(tmp_path: Path, sockdir: str) -> Iterator[Parts]:
    built = Parts(tmp_path, sockdir)
    limits = dataclasses.replace(built.cfg.limits, max_in_flight=SLOTS, retry_share=0.5)
    built.cfg = built.dispatcher.cfg = built.intake.cfg = dataclasses.replace(
        built.cfg, limits=limits)
    yield built
    built.close()


def deferred_backlog(parts: Parts) -> list[str]:
    """BACKLOG jobs accepted ten minutes ago and deferred once, all due a second ago (the
    window ending), in the order the spool hands them out."""
    now = time.time()
    ids = [f"wait-{i:04d}" for i in range(BACKLOG)]
    parts.spool.accept([Job(id=i, sender="s@example.test", rcpts=(RCPT,), message=b"x\r\n")
                        for i in ids], now - 600, 86400.0)
    parts.spool.record([RcptUpdate(i, RCPT, Status.DEFERRED, next_attempt=now - 1,
                                   reply=DEFER) for i in ids], now - 540)
    return ids


def deliver(parts: Parts, job_ids: list[str]) -> None:
    parts.report(*(attempt(Status.DELIVERED, job_id=i,
                           handout=parts.dispatcher.in_flight[i].handout) for i in job_ids))


def test_fresh_jobs_go_out_while_a_backlog_of_retries_is_due(parts: Parts) -> None:
    _, pull = parts.worker(IP2, alive=True)
    backlog = deferred_backlog(parts)

    # The window ends: the retries take their share of the slots, no more.
    parts.dispatcher.dispatch_due()
    assert tasks(pull) == backlog[:SLOTS // 2]
    assert parts.dispatcher.retries_in_flight() == SLOTS // 2
    assert parts.dispatcher.free_room() == SLOTS // 2
    parts.dispatcher.dispatch_due()  # another turn: still no more retries
    assert tasks(pull) == []

    # Fresh mail accepted now finds the rest of the room at once.
    fresh = [f"fresh-{i}" for i in range(SLOTS // 2 + 5)]
    parts.push([job_envelope(i) for i in fresh])
    parts.dispatcher.offer(parts.intake.take(parts.dispatcher.free_room()))
    assert tasks(pull) == fresh[:SLOTS // 2]
    assert parts.dispatcher.unsent == 5  # no room left: kept in memory

    # Five retries end: the room they free goes to the fresh jobs still waiting, though
    # the backlog's next attempts are older.
    deliver(parts, backlog[:5])
    parts.dispatcher.dispatch_due()
    assert tasks(pull) == fresh[SLOTS // 2:]
    assert parts.dispatcher.unsent == 0

    # Once the fresh mail is out, the backlog has its share again, in its order.
    deliver(parts, fresh[:5])
    parts.dispatcher.dispatch_due()
    assert tasks(pull) == backlog[SLOTS // 2:SLOTS // 2 + 5]
    assert parts.dispatcher.retries_in_flight() == SLOTS // 2
    assert parts.spool.stats().rcpts_pending == BACKLOG - 5 + len(fresh) - 5


def test_with_a_share_of_one_retries_may_fill_every_slot(parts: Parts) -> None:
    limits = dataclasses.replace(parts.cfg.limits, retry_share=1.0)
    parts.dispatcher.cfg = dataclasses.replace(parts.cfg, limits=limits)
    _, pull = parts.worker(IP2, alive=True)
    backlog = deferred_backlog(parts)

    parts.dispatcher.dispatch_due()

    assert tasks(pull) == backlog[:SLOTS]
    assert parts.dispatcher.free_room() == 0


def test_first_attempts_read_back_from_the_spool_take_the_first_attempts_room(
        parts: Parts) -> None:
    """After a restart nothing is held in memory: a first attempt the spool hands out
    does not count against the retries' share, and the turn goes on to the next page."""
    _, pull = parts.worker(IP2, alive=True)
    spooled = [f"spooled-{i:02d}" for i in range(15)]
    parts.spool.accept([Job(id=i, sender="s@example.test", rcpts=(RCPT,), message=b"x\r\n")
                        for i in spooled], time.time() - 3600, 86400.0)
    backlog = deferred_backlog(parts)

    parts.dispatcher.dispatch_due()

    assert tasks(pull) == spooled + backlog[:SLOTS - len(spooled)]
    assert parts.dispatcher.free_room() == 0
    assert parts.dispatcher.retries_in_flight() == SLOTS - len(spooled)
