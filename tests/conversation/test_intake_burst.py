"""A burst at intake (issue #19, item 5): the first jobs are committed and handed out before
the rest of the burst is even read, and each is durable before its `queued`.

The supervisor's parts in process (tests/support/supervisor.py: a real spool, a stand-in
worker's real task socket); the ingest socket is an inproc PULL, so every job a test pushes
is waiting in it when intake reads (over ipc, ZeroMQ's I/O thread moves them meanwhile).
Whether a job was durable when its `queued` went out is asked of a second connection to the
spool file, which sees only what was committed.
"""
from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from engine import events
from engine.intake import FIRST_BATCH, INTAKE_BATCH, Intake
from engine.spoolfile import readonly_uri
from tests.support.supervisor import IP2, Parts, job_envelope, tasks

MESSAGE = b"Subject: burst\r\n\r\nhi\r\n"


class Burst:
    """Parts, and an Intake on an inproc socket whose `queued` events note whether the
    spool had their job committed when they were published."""

    def __init__(self, parts: Parts) -> None:
        self.parts = parts
        endpoint = "inproc://burst-ingest"
        pull = parts.ctx.socket(zmq.PULL)
        pull.setsockopt(zmq.RCVHWM, 0)
        pull.bind(endpoint)
        self.producer = parts.ctx.socket(zmq.PUSH)
        self.producer.setsockopt(zmq.SNDHWM, 0)
        self.producer.connect(endpoint)
        parts.socks += [pull, self.producer]
        # Another connection to the file (read-only, no lock): it sees commits only.
        self.reader = sqlite3.connect(readonly_uri(parts.spool.path), uri=True)
        self.queued: list[tuple[str, bool]] = []  # (job id, committed when published)
        self.intake = Intake(pull, parts.cfg, parts.spool, self._publish, parts.metrics,
                             parts.health)

    def _publish(self, event: events.Event) -> None:
        name, line = event
        if name == "queued":
            job_id = json.loads(line)["id"]
            committed = bool(self.reader.execute("SELECT 1 FROM jobs WHERE id = ?",
                                                 (job_id,)).fetchall())
            self.queued.append((job_id, committed))
        self.parts.published.append(event)

    def push(self, tag: str, count: int) -> list[str]:
        ids = [f"{tag}-{i}" for i in range(count)]
        for job_id in ids:  # inproc: in the ingest socket once send returns
            self.producer.send_multipart([json.dumps(job_envelope(job_id)).encode(), MESSAGE])
        return ids

    def spooled(self) -> set[str]:
        return {row[0] for row in self.reader.execute("SELECT id FROM jobs")}

    def close(self) -> None:
        self.reader.close()


@pytest.fixture
def burst(tmp_path: Path, sockdir: str) -> Iterator[Burst]:
    parts = Parts(tmp_path, sockdir)
    built = Burst(parts)
    yield built
    built.close()
    parts.close()


def test_a_bursts_first_jobs_are_handed_out_before_the_rest_is_committed(
        burst: Burst) -> None:
    """Regression (issue #19): the ingest socket was drained up to 1,000 jobs and all of
    them committed before the first was handed out: the worker sat idle for 0.3-0.45 s at
    the start of a burst."""
    _, worker = burst.parts.worker(IP2, alive=True)
    ids = burst.push("b", 300)
    dispatcher = burst.parts.dispatcher

    dispatcher.offer(burst.intake.take(dispatcher.free_room()))

    first = ids[:FIRST_BATCH]
    assert tasks(worker) == first  # handed out, in order...
    assert burst.spooled() == set(first)  # ...while the rest of the burst is not committed
    assert burst.queued == [(job_id, True) for job_id in first]  # each durable before

    sizes = []
    while len(burst.queued) < len(ids):
        taken = burst.intake.take(dispatcher.free_room())
        dispatcher.offer(taken)
        sizes.append(len(taken))
    assert sizes == [64, 128, 76]  # the worker has room: ROOM_BATCH at most
    assert burst.queued == [(job_id, True) for job_id in ids]
    assert tasks(worker) == ids[FIRST_BATCH:]


def test_batches_grow_while_the_workers_are_full_and_start_small_after_a_pause(
        burst: Burst) -> None:
    """Once no worker has room, what is read waits in memory anyway: the batches double
    while the burst lasts, past ROOM_BATCH, so that each commit takes many jobs; after the
    socket was found empty, the next burst's first batch is small again."""
    ids = burst.push("full", 1000)
    sizes = []
    while len(burst.queued) < len(ids):
        sizes.append(len(burst.intake.take(room=0)))
    assert sizes == [32, 64, 128, 256, 512, 8]
    assert burst.queued == [(job_id, True) for job_id in ids]

    later = burst.push("later", 2 * INTAKE_BATCH)
    assert len(burst.intake.take(room=0)) == FIRST_BATCH
    while len(burst.queued) < len(ids) + len(later):
        assert len(burst.intake.take(room=0)) <= INTAKE_BATCH
    assert burst.spooled() >= set(later)
