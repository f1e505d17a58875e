"""Each duplicate window of issue #14, struck exactly (engine.crash) and accounted for.

A crash point (`MAILENGINE_CRASH_AT`, docs/SPOOL.md "Crash points") makes the real engine
SIGKILL itself at one named moment: no cleanup, as a power cut of that process. Each test
shows what that window costs: nothing is lost, and exactly the duplicates expected, each
counted where the engine can count it, bounded where it cannot (docs/SPOOL.md, "What a kill -9
does"). MAILENGINE_CRASH_ONCE keeps a restarted process (a worker the supervisor restarts
inherits the environment) from dying at the same point again.
"""
from __future__ import annotations

import collections
import random
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import zmq

from engine.intake import ROOM_BATCH
from engine.spool import Spool
from engine.testing.harness import LocalEngine
from engine.testing.sink import SinkServer
from tests.support.copies import received
from tests.support.statsd_catcher import StatsdCatcher
from tests.support.wait import until

IP = "127.0.0.2"
CAP = 4  # pool.max_connections for the test under load
PREFIX = "mailengine.supervisor.all."

Job = tuple[dict[str, Any], bytes]


def job(job_id: str) -> Job:
    rcpt = f"{job_id}@example.test"
    message = (f"From: <sender@example.test>\r\nTo: <{rcpt}>\r\nSubject: {job_id}\r\n"
               f"Message-ID: <{job_id}@example.test>\r\n\r\ncrash point test\r\n")
    return {"id": job_id, "from": "sender@example.test", "to": [rcpt]}, message.encode()


def crash_env(once: Path, at: str) -> dict[str, str]:
    once.mkdir(exist_ok=True)
    return {"MAILENGINE_CRASH_AT": at, "MAILENGINE_CRASH_ONCE": str(once)}


def settled(engine: LocalEngine, sink: SinkServer, ids: set[str]) -> collections.Counter[str]:
    """Until every id reached the sink and the engine has nothing left; the sink's counts."""
    def done() -> bool:
        if not ids <= received(sink).keys():
            return False
        figures = engine.status()
        return figures["spool"]["jobs"] == 0 and figures["in_flight"] == 0
    until(done, 60, f"{len(ids)} jobs delivered and recorded", engine.log_tail)
    return received(sink)


def died(engine: LocalEngine) -> int:
    """Until the supervisor has exited; its exit status (the harness forgets the process)."""
    proc = engine.proc
    assert proc is not None
    until(lambda: proc.poll() is not None, 60, "the supervisor to die", engine.log_tail)
    engine.proc = None
    return proc.returncode


def delivered(engine: LocalEngine, job_id: str) -> list[dict[str, Any]]:
    return [e for e in engine.events() if e["event"] == "delivered" and e["id"] == job_id]


def counter(catcher: StatsdCatcher, name: str) -> float:
    catcher.sync()
    return catcher.counter_sum(PREFIX + name)


def statsd(catcher: StatsdCatcher) -> dict[str, Any]:
    return {"statsd": {"enabled": True, "host": "127.0.0.1", "port": catcher.port,
                       "prefix": "mailengine"}}


class Producer(threading.Thread):
    """A producer in the background: re-sends every job until it sees `queued`."""

    def __init__(self, engine: LocalEngine, jobs: list[Job]) -> None:
        super().__init__(daemon=True)
        self.engine, self.jobs = engine, jobs
        self.accepted: bool | None = None

    def run(self) -> None:
        self.accepted = self.engine.push(self.jobs, timeout=90)


def test_a_supervisor_killed_after_the_commit_takes_the_resent_job_as_a_duplicate_sends_it_once(
        sink: SinkServer, local_engine: Callable[..., LocalEngine], tmp_path: Path) -> None:
    engine = local_engine(sink.port, ips=(IP,),
                          env=crash_env(tmp_path / "once", "after_spool_commit"))
    producer = Producer(engine, [job("commit-1")])
    producer.start()

    assert died(engine) == -signal.SIGKILL
    assert not [e for e in engine.events() if e["event"] == "queued"]  # never announced
    with Spool(engine.config["spool"]) as spool:
        assert [p.job.id for p in spool.due(time.time() + 1, 10)] == ["commit-1"]  # durable
    assert received(sink) == {}  # the crash came before the job was handed out

    engine.start()  # the producer, still waiting for `queued`, sends the job again
    producer.join(90)
    assert producer.accepted is True
    counts = settled(engine, sink, {"commit-1"})
    queued = [e for e in engine.events() if e["event"] == "queued"]
    assert queued and all(e["duplicate"] is True for e in queued)  # the spooled job, again
    assert counts == {"commit-1": 1}  # no duplicate at the receiver
    assert len(delivered(engine, "commit-1")) == 1


def test_a_bursts_first_jobs_go_out_before_the_rest_is_committed_each_durable_before_queued(
        sink: SinkServer, local_engine: Callable[..., LocalEngine], tmp_path: Path) -> None:
    """Issue #19 item 5, in the whole engine: 400 jobs pushed at once, and the supervisor
    struck right after the commit that brings the jobs it spooled to 100, before that
    batch's `queued`. By then the burst's first job had been handed out (the spool's mark;
    or it was delivered and recorded already) while most of the burst was not committed yet;
    every job with a `queued` event is in the spool, and the struck batch is there without
    one."""
    engine = local_engine(sink.port, ips=(IP,),
                          env=crash_env(tmp_path / "once", "after_spool_commit:100"))
    ids = [f"burst-{i}" for i in range(400)]
    ctx = zmq.Context()
    producer = ctx.socket(zmq.PUSH)
    producer.connect(str(engine.config["ingest"]))
    try:
        for job_id in ids:
            envelope, message = job(job_id)
            producer.send_json(envelope, zmq.SNDMORE)
            producer.send(message)
        assert died(engine) == -signal.SIGKILL
    finally:
        ctx.destroy(linger=0)

    queued = {e["id"] for e in engine.events() if e["event"] == "queued"}
    with Spool(engine.config["spool"]) as spool:
        spooled = {job_id for (job_id,) in spool.query("SELECT id FROM jobs")}
        finished = {job_id for (job_id,) in spool.query("SELECT id FROM finished")}
        handed_out = set(spool.handed_out())
    durable = spooled | finished
    assert queued and queued <= durable  # none announced before it was durable
    assert spooled - queued  # the struck batch: committed, never announced
    assert ids[0] in handed_out | finished  # the first job went out...
    # ...before the rest was committed: the struck batch (ROOM_BATCH at most) was the last.
    assert len(durable) < 100 + ROOM_BATCH and ids[-1] not in durable


def test_a_worker_killed_after_the_servers_2xx_sends_the_message_again_flagged_and_counted(
        sink: SinkServer, local_engine: Callable[..., LocalEngine], tmp_path: Path) -> None:
    """The worker reads the 250 to the final dot and dies before the result leaves it (the
    result is lost: no one can tell a delivery from a message never sent). The supervisor
    restarts it and sends the recipient again: the one duplicate at the receiver is the one
    re-send counted in `resent_after_loss`, its `delivered` event says `possible_duplicate`."""
    with StatsdCatcher() as catcher:
        engine = local_engine(sink.port, ips=(IP,), extra=statsd(catcher),
                              env=crash_env(tmp_path / "once", "after_final_reply"))
        first_pid = engine.status()["workers"][IP]["pid"]
        assert engine.push([job("reply-1")], timeout=30)
        counts = settled(engine, sink, {"reply-1"})

        worker = engine.status()["workers"][IP]
        assert worker["pid"] != first_pid and worker["restarts"] == 1
        assert (tmp_path / "once" / "after_final_reply").exists()  # it was the crash point
        assert counts == {"reply-1": 2}  # the dead worker's copy, and the re-send's
        [event] = delivered(engine, "reply-1")  # one outcome: the re-send's
        assert event["possible_duplicate"] is True
        assert event["attempt"] == 1  # the dead worker's attempt was never recorded
        assert counter(catcher, "resent_after_loss") == 1
        assert counter(catcher, "taken_back") == 1
        assert counter(catcher, "duplicates") == 0  # none the engine knows for certain


@pytest.mark.timeout(150)
def test_a_worker_killed_after_a_2xx_under_load_repeats_only_recipients_it_flagged(
        sink: SinkServer, local_engine: Callable[..., LocalEngine], tmp_path: Path) -> None:
    """The same window mid-run, on the Nth delivery, with connections open in parallel: every
    message the receiver got twice was counted (`resent_after_loss`) and its delivery flagged;
    flagged are also the dead worker's other jobs in flight, which it may not have sent."""
    n = 400
    seed = random.randrange(1 << 30)
    strike = random.Random(seed).randint(50, 300)
    jobs = [job(f"load-{i}") for i in range(n)]
    with StatsdCatcher() as catcher:
        engine = local_engine(sink.port, ips=(IP,),
                              extra={"pool": {"max_connections": CAP}, **statsd(catcher)},
                              env=crash_env(tmp_path / "once", f"after_final_reply:{strike}"))
        assert engine.push(jobs, timeout=60)
        counts = settled(engine, sink, {env["id"] for env, _ in jobs})
        resent = counter(catcher, "resent_after_loss")
        known = counter(catcher, "duplicates")

    twice = {job_id for job_id, c in counts.items() if c > 1}
    finals = [e for e in engine.events() if e["event"] == "delivered"]
    flagged = {e["id"] for e in finals if e.get("possible_duplicate")}
    print(f"\nseed={seed} crash at delivery {strike}: duplicates at the sink {len(twice)},"
          f" flagged deliveries {len(flagged)}, resent_after_loss {resent:.0f},"
          f" duplicates known {known:.0f}")
    assert set(counts) == {env["id"] for env, _ in jobs}  # nothing lost
    assert max(counts.values()) == 2
    assert twice  # the crash point's delivery, at least
    # Each duplicate counted: its re-send is flagged (or, for a result read after the job
    # went out again, known for certain: `duplicates`).
    assert len(twice - flagged) <= known
    assert len(flagged) <= resent
    assert collections.Counter(e["id"] for e in finals) == dict.fromkeys(counts, 1)


def test_a_supervisor_killed_between_reading_a_delivery_and_recording_it_flags_the_resend(
        sink: SinkServer, local_engine: Callable[..., LocalEngine], tmp_path: Path) -> None:
    """The supervisor read the worker's `delivered` and dies before the spool has it: after
    the restart the recipient is pending and goes out again. The spool had marked the job
    handed out (Spool.mark_handed_out, before its task left): the re-send is counted in
    `resent_after_loss` and its event says `possible_duplicate`. docs/SPOOL.md, "What a
    kill -9 does"."""
    with StatsdCatcher() as catcher:
        engine = local_engine(sink.port, ips=(IP,), extra=statsd(catcher),
                              env=crash_env(tmp_path / "once", "after_result_read"))
        assert engine.push([job("result-1")], timeout=30)

        assert died(engine) == -signal.SIGKILL
        assert received(sink) == {"result-1": 1}  # the server has it
        assert not delivered(engine, "result-1")  # never recorded, never announced
        with Spool(engine.config["spool"]) as spool:
            [pending] = spool.due(time.time() + 1, 10)
            assert spool.handed_out() == {"result-1": frozenset({"result-1@example.test"})}
        assert pending.job.id == "result-1" and pending.attempts == {"result-1@example.test": 0}

        engine.start()
        counts = settled(engine, sink, {"result-1"})
        assert counts == {"result-1": 2}  # exactly one duplicate: the one job in flight
        [event] = delivered(engine, "result-1")
        assert event["attempt"] == 1 and event["possible_duplicate"] is True
        assert counter(catcher, "resent_after_loss") == 1
    assert "event=handed_out_at_start jobs=1 rcpts=1" in engine.log_tail(100_000)
    engine.stop()
    with Spool(engine.config["spool"]) as spool:
        assert spool.handed_out() == {}  # recorded: the mark went with the job


def test_a_supervisor_killed_after_recording_a_delivery_publishes_its_event_at_the_restart(
        sink: SinkServer, local_engine: Callable[..., LocalEngine], tmp_path: Path) -> None:
    """The spool has the delivery and its event (the outbox), and the supervisor dies before
    publishing it: the restart publishes it, from the spool, and sends nothing again."""
    with StatsdCatcher() as catcher:
        engine = local_engine(sink.port, ips=(IP,), extra=statsd(catcher),
                              env=crash_env(tmp_path / "once", "after_results_recorded"))
        assert engine.push([job("outbox-1")], timeout=30)

        assert died(engine) == -signal.SIGKILL
        assert not delivered(engine, "outbox-1")  # recorded, never announced
        with Spool(engine.config["spool"]) as spool:
            assert spool.due(time.time() + 1, 10) == []  # final: nothing to send again
            [(name, line)] = spool.unpublished()
        assert name == "delivered" and '"outbox-1"' in line

        engine.start()
        until(lambda: delivered(engine, "outbox-1"), 30, "the delivered event, replayed",
              engine.log_tail)
        [event] = delivered(engine, "outbox-1")
        assert event["code"] == 250 and event["rcpt"] == "outbox-1@example.test"
        assert counter(catcher, "events_replayed") == 1
    assert received(sink) == {"outbox-1": 1}  # sent once
    assert "event=events_replayed events=1 already_logged=0" in engine.log_tail(100_000)
    engine.stop()
    with Spool(engine.config["spool"]) as spool:
        assert spool.unpublished() == []  # confirmed out
