"""The supervisor's parts at their own surfaces, in process: the group commit of results,
intake into the spool, and dispatch to the workers with room (what a result means for its
recipient, `results.plan`, is tests/unit/test_results.py). Real ZeroMQ sockets and a real
spool; the workers are plain processes that stand in for them (nothing reads their tasks but
the test); real worker processes: tests/engine/test_workers.py.
"""
from __future__ import annotations

import json
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from engine import events, protocol, sockets
from engine.clock import EngineClock
from engine.dispatch import Dispatcher, InFlight
from engine.intake import Intake
from engine.job import Job
from engine.metrics import Metrics
from engine.protocol import Status
from engine.results import Results
from engine.spool import Spool
from engine.spoolhealth import SpoolHealth
from engine.supervisor import Supervisor
from engine.workers import WorkerHandle, Workers
from tests.support.statsd_catcher import StatsdCatcher
from tests.support.supervisor import IP2, IP3, NOW, RCPT, SCHEDULE, attempt, ipc_config

# -- the parts wired together, in process ------------------------------------------------


class Parts:
    """A spool, the workers' table, intake, dispatch and results, on real sockets."""

    def __init__(self, tmp: Path, sockdir: str, clock: EngineClock | None = None) -> None:
        self.cfg = ipc_config(tmp, sockdir)
        self.ctx = zmq.Context()
        self.spool = Spool(self.cfg.spool)
        self.published: list[events.Event] = []
        self.workers = Workers(self.ctx, self.cfg, None)
        self.statsd = StatsdCatcher()
        self.metrics = Metrics.create("127.0.0.1", self.statsd.port, "t", "supervisor")
        self.dispatcher = Dispatcher(self.cfg, self.spool, self.workers, self.published.append,
                                     self.metrics, clock=clock)
        self.ingest = sockets.bind(self.ctx, zmq.PULL, self.cfg.ingest)
        self.health = SpoolHealth(self.metrics)
        self.intake = Intake(self.ingest, self.cfg, self.spool, self.published.append,
                             self.metrics, self.health, clock=clock)
        pull = sockets.bind(self.ctx, zmq.PULL, self.workers.results_endpoint)
        self.results = Results(pull, self.spool, self.dispatcher, self.published.append,
                               self.workers.on_stats, SCHEDULE, self.metrics, self.health,
                               clock=clock)
        self.socks: list[zmq.Socket] = [self.ingest, pull]
        self.procs: list[subprocess.Popen[bytes]] = []

    def worker(self, ip: str, alive: bool) -> tuple[WorkerHandle, zmq.Socket]:
        return stand_in_worker(self.ctx, self.workers, ip, alive, self.socks, self.procs)

    def reporter(self) -> zmq.Socket:
        """A worker's end of the results socket."""
        sock = self.ctx.socket(zmq.PUSH)
        sock.connect(self.workers.results_endpoint)
        self.socks.append(sock)
        return sock

    def push(self, envelopes: list[dict[str, Any]]) -> None:
        """Jobs into the ingest socket; returns once the first can be read."""
        producer = self.ctx.socket(zmq.PUSH)
        producer.connect(self.cfg.ingest)
        self.socks.append(producer)
        for envelope in envelopes:
            producer.send_multipart([json.dumps(envelope).encode(), b"Subject: x\r\n\r\nhi\r\n"])
        assert self.ingest.poll(5000), "the jobs never reached the ingest socket"

    def answer(self, status: Status, job_id: str = "j", **fields: Any) -> Any:
        """A worker's result for the job's current hand-out."""
        return attempt(status, job_id=job_id,
                       handout=self.dispatcher.in_flight[job_id].handout, **fields)

    def report(self, *results: Any) -> None:
        """Results through a worker's end of the results socket, collected and recorded."""
        if not hasattr(self, "_reporter"):
            self._reporter = self.reporter()
        self._reporter.send(protocol.result_frame(list(results)))
        assert self.results.sock.poll(5000)
        self.results.collect()
        self.results.flush()

    def counted(self, metric: str) -> float:
        self.statsd.sync()
        return self.statsd.counter_sum(f"t.supervisor.all.{metric}")

    def names(self) -> list[str]:
        return [name for name, _ in self.published]

    def close(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait(10)
        for sock in [*self.socks, *(h.tasks for h in self.workers if h.tasks is not None)]:
            sock.close(linger=0)
        self.spool.close()
        self.metrics.close()
        self.statsd.stop()
        self.ctx.term()


def stand_in_worker(ctx: zmq.Context, workers: Workers, ip: str, alive: bool,
                    socks: list[zmq.Socket], procs: list[subprocess.Popen[bytes]],
                    ) -> tuple[WorkerHandle, zmq.Socket]:
    """A worker handle with a process behind it (alive, or exited) in `workers`, and the
    other end of its task socket, which only the test reads."""
    endpoint = sockets.ipc_endpoint(workers.cfg.run_dir, f"test-{ip}")
    handle = WorkerHandle(ip, tasks=sockets.bind(ctx, zmq.PUSH, endpoint))
    # As a real worker is ready only once it said hello: a task sent before the other end
    # has connected and finished ZeroMQ's handshake cannot go (the job would be parked).
    accepted = handle.tasks.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
    handle.proc = subprocess.Popen(["sleep", "60"] if alive else ["true"])
    procs.append(handle.proc)
    if not alive:
        handle.proc.wait(10)
    handle.stats = {"pid": handle.proc.pid}
    handle.started = time.monotonic()
    workers.handles[ip] = handle
    pull = ctx.socket(zmq.PULL)
    pull.connect(endpoint)
    socks.append(pull)
    assert accepted.poll(5000), "the stand-in worker's task socket never connected"
    handle.tasks.disable_monitor()
    accepted.close(linger=0)
    return handle, pull


@pytest.fixture
def parts(tmp_path: Path, sockdir: str) -> Iterator[Parts]:
    built = Parts(tmp_path, sockdir)
    yield built
    built.close()


def tasks(pull: zmq.Socket) -> list[str]:
    ids = []
    while pull.poll(200):
        ids.append(json.loads(pull.recv())["id"])
        pull.recv()
    return ids


def job_envelope(job_id: str, **fields: Any) -> dict[str, Any]:
    return {"id": job_id, "from": "s@example.test", "to": [RCPT], **fields}


def test_intake_hands_out_what_the_room_allows_and_keeps_the_rest_in_memory(
        parts: Parts) -> None:
    handle, pull = parts.worker(IP2, alive=True)
    handle.jobs.update(f"busy-{i}" for i in range(parts.cfg.limits.max_in_flight - 2))
    parts.push([job_envelope(f"j{i}") for i in range(5)])

    parts.dispatcher.offer(parts.intake.take())

    assert tasks(pull) == ["j0", "j1"]
    assert parts.dispatcher.unsent == 3 and parts.dispatcher.unsent_bytes > 0
    assert set(parts.dispatcher.in_flight) == {"j0", "j1"}
    assert parts.names() == ["queued"] * 5
    assert parts.spool.stats().jobs == 5


def test_a_job_expired_by_its_first_dispatch_is_not_kept_in_memory(parts: Parts) -> None:
    _, pull = parts.worker(IP2, alive=True)
    parts.push([job_envelope("brief", expires=1e-9)])

    parts.dispatcher.offer(parts.intake.take())

    assert parts.names() == ["queued", "expired"]
    assert parts.dispatcher.unsent == 0 and parts.dispatcher.unsent_bytes == 0
    assert parts.spool.stats().jobs == 0
    assert tasks(pull) == []


def test_a_job_for_an_ip_or_pool_the_engine_lacks_is_rejected_and_not_spooled(
        parts: Parts) -> None:
    parts.push([job_envelope("a", ip="127.0.0.9"), job_envelope("b", pool="nope"),
                job_envelope("c")])

    accepted = parts.intake.take()

    assert [p.job.id for p in accepted] == ["c"]
    errors = [json.loads(line)["error"] for name, line in parts.published if name == "rejected"]
    assert errors == ["ip 127.0.0.9 is not one of this engine's sending IPs",
                      "unknown pool 'nope' (configured: default)"]


def test_a_job_goes_to_the_least_busy_ready_worker_of_its_pool(parts: Parts) -> None:
    busy, busy_tasks = parts.worker(IP2, alive=True)
    busy.jobs.update({"x", "y"})
    _, idle_tasks = parts.worker(IP3, alive=True)
    parts.push([job_envelope("j")])

    parts.dispatcher.offer(parts.intake.take())

    assert tasks(idle_tasks) == ["j"] and tasks(busy_tasks) == []


def test_collected_results_are_recorded_together_by_one_commit(
        parts: Parts, monkeypatch: pytest.MonkeyPatch) -> None:
    handle, pull = parts.worker(IP2, alive=True)
    parts.push([job_envelope(f"j{i}") for i in range(3)])
    parts.dispatcher.offer(parts.intake.take())
    assert tasks(pull) == ["j0", "j1", "j2"]
    commits: list[int] = []
    record = parts.spool.record

    def counting(updates: Any, now: float | None = None) -> list[str]:
        commits.append(len(updates))
        return record(updates, now)

    monkeypatch.setattr(parts.spool, "record", counting)
    reporter = parts.reporter()
    for i in range(3):
        reporter.send(protocol.result_frame([parts.answer(Status.DELIVERED, f"j{i}")]))
        assert parts.results.sock.poll(5000)
        parts.results.collect()

    assert commits == [] and parts.results.held == 3  # collecting never records
    parts.results.flush()
    assert commits == [3] and parts.results.held == 0
    assert parts.names()[3:] == ["delivered"] * 3
    assert parts.dispatcher.in_flight == {} and handle.jobs == set()


def test_a_throttled_try_the_worker_sends_again_is_published_and_stays_in_flight(
        parts: Parts) -> None:
    """A recipient throttled and re-sent by the worker itself (engine.delivery) has two
    results: the throttled try (`retried`) gets its deferred event naming the trigger and
    keeps the job in flight; the delivery that follows ends it as usual."""
    handle, pull = parts.worker(IP2, alive=True)
    parts.push([job_envelope("j")])
    parts.dispatcher.offer(parts.intake.take())
    assert tasks(pull) == ["j"]
    reporter = parts.reporter()

    def report(result: Any) -> None:
        reporter.send(protocol.result_frame([result]))
        assert parts.results.sock.poll(5000)
        parts.results.collect()
        parts.results.flush()

    report(parts.answer(Status.DEFERRED, throttled=True, trigger="pushback", retried=True,
                        retry_at=time.time() + 0.5))
    deferred = json.loads(parts.published[-1][1])
    assert deferred["event"] == "deferred" and deferred["throttled"] is True
    assert deferred["trigger"] == "pushback" and deferred["attempt"] == 1
    assert "j" in parts.dispatcher.in_flight and handle.jobs == {"j"}  # not sent again
    report(parts.answer(Status.DELIVERED))
    delivered = json.loads(parts.published[-1][1])
    assert delivered["event"] == "delivered" and delivered["attempt"] == 1  # the try was free
    assert parts.dispatcher.in_flight == {} and handle.jobs == set()
    assert parts.spool.stats().jobs == 0


def test_results_are_due_after_the_window_or_once_a_group_waits(parts: Parts) -> None:
    parts.worker(IP2, alive=True)
    parts.push([job_envelope(f"j{i}") for i in range(3)])
    parts.dispatcher.offer(parts.intake.take())
    reporter = parts.reporter()
    held = Results(parts.results.sock, parts.spool, parts.dispatcher, parts.published.append,
                   parts.workers.on_stats, SCHEDULE, window=60.0, group=2)

    def report(job_id: str) -> None:
        reporter.send(protocol.result_frame([parts.answer(Status.DELIVERED, job_id)]))
        assert held.sock.poll(5000)
        held.collect()

    report("j0")
    assert held.due()  # nothing recorded for a window: a quiet spool waits for nothing
    held.flush()
    report("j1")
    assert not held.due() and 0 < held.wait_left() <= 60.0  # busy: wait for company
    report("j2")
    assert held.due()  # a group is waiting
    held.flush()
    assert parts.names().count("delivered") == 3


def test_a_result_in_the_socket_is_recorded_before_its_dead_workers_jobs_go_out_again(
        tmp_path: Path, sockdir: str) -> None:
    """Regression: a worker reported a delivery and died before the supervisor read it;
    handing its jobs to another worker first sent the message twice."""
    sup = Supervisor(ipc_config(tmp_path, sockdir), None)
    own: list[zmq.Socket] = []
    procs: list[subprocess.Popen[bytes]] = []
    try:
        dead, _ = stand_in_worker(sup.zctx, sup.workers, IP2, False, own, procs)
        _, other = stand_in_worker(sup.zctx, sup.workers, IP3, True, own, procs)
        sup.spool.accept([Job(id="j1", sender="s@example.test", rcpts=(RCPT,),
                              message=b"x\r\n")], time.time(), 3600.0)
        dead.jobs.add("j1")
        sup.dispatcher.in_flight["j1"] = InFlight(IP2, {}, NOW, time.time() + 3600, {RCPT: 0})
        reporter = sup.zctx.socket(zmq.PUSH)
        own.append(reporter)
        reporter.connect(sup.workers.results_endpoint)
        reporter.send(protocol.result_frame([attempt(Status.DELIVERED, job_id="j1")]))
        assert sup.results.sock.poll(5000)

        sup.tick()  # the result in the socket, then the dead worker, then what is due

        assert sup.events.counts["delivered"] == 1
        assert sup.spool.stats().jobs == 0  # recorded, so not due again...
        assert not other.poll(300)  # ...and not sent to the other worker
        assert sup.dispatcher.in_flight == {}
    finally:
        for sock in own:
            sock.close(linger=0)
        for proc in procs:
            proc.kill()
            proc.wait(10)
        sup.workers.handles.clear()
        sup.spool.close()
        sup.events.close()
        sup.zctx.destroy(linger=0)




# -- each hand-out has its own identity -------------------------------------------------


def test_a_late_delivery_counts_for_its_own_hand_out_and_the_second_copy_is_counted(
        parts: Parts) -> None:
    """Issue #14 (c): a dead worker's result that comes after its job went to another IP
    was credited to the new hand-out, whose message still went out, uncounted. Now the
    late delivery is recorded and published for the hand-out it answers, and the new
    hand-out's delivery of the same recipient is counted as a duplicate, not published
    twice."""
    first, first_tasks = parts.worker(IP2, alive=True)
    parts.push([job_envelope("j")])
    parts.dispatcher.offer(parts.intake.take())
    assert tasks(first_tasks) == ["j"]
    old = parts.answer(Status.DELIVERED)
    first.proc.kill()  # type: ignore[union-attr]
    first.proc.wait(10)  # type: ignore[union-attr]
    parts.dispatcher.forget(parts.workers.check(time.monotonic()))
    assert parts.counted("taken_back") == 1
    _, second_tasks = parts.worker(IP3, alive=True)
    parts.dispatcher.dispatch_due()
    assert tasks(second_tasks) == ["j"]
    new = parts.answer(Status.DELIVERED)
    assert new.handout != old.handout

    parts.report(old)  # late: the first worker's, read after the job went out again

    assert parts.names() == ["queued", "delivered"]
    assert "j" in parts.dispatcher.in_flight  # the second hand-out is still out
    assert parts.spool.stats().jobs == 0  # final: never handed out a third time
    parts.report(new)
    assert parts.names() == ["queued", "delivered"]  # one event per recipient
    assert parts.counted("duplicates") == 1
    assert parts.dispatcher.in_flight == {}


def test_a_late_deferral_of_a_hand_out_taken_back_changes_nothing(parts: Parts) -> None:
    first, first_tasks = parts.worker(IP2, alive=True)
    parts.push([job_envelope("j")])
    parts.dispatcher.offer(parts.intake.take())
    assert tasks(first_tasks) == ["j"]
    old = parts.answer(Status.DEFERRED)
    first.proc.kill()  # type: ignore[union-attr]
    first.proc.wait(10)  # type: ignore[union-attr]
    parts.dispatcher.forget(parts.workers.check(time.monotonic()))
    _, second_tasks = parts.worker(IP3, alive=True)
    parts.dispatcher.dispatch_due()
    assert tasks(second_tasks) == ["j"]

    parts.report(old)

    assert parts.names() == ["queued"] and "j" in parts.dispatcher.in_flight
    parts.report(parts.answer(Status.DELIVERED))
    assert parts.names() == ["queued", "delivered"]
    assert json.loads(parts.published[-1][1])["attempt"] == 1  # the old try never counted
    assert parts.counted("duplicates") == 0


def test_a_task_the_worker_cannot_read_is_taken_back_at_once(parts: Parts) -> None:
    """Issue #14 (b): an unreadable task stayed in flight until its worker exited."""
    handle, pull = parts.worker(IP2, alive=True)
    parts.push([job_envelope("j")])
    parts.dispatcher.offer(parts.intake.take())
    assert tasks(pull) == ["j"]
    handout = parts.dispatcher.in_flight["j"].handout
    reporter = parts.reporter()

    reporter.send(protocol.refused_frame([handout]))
    assert parts.results.sock.poll(5000)
    parts.results.collect()

    assert parts.dispatcher.in_flight == {} and handle.jobs == set()
    assert parts.counted("taken_back") == 1
    parts.dispatcher.dispatch_due()
    assert tasks(pull) == []  # passed over for a while, not handed out in a hot loop
    assert parts.spool.stats().rcpts_pending == 1  # still spooled


def test_a_hand_out_past_its_deadline_is_taken_back_and_goes_out_again(
        parts: Parts) -> None:
    """Issue #14 (b): a result the worker never sent left the job in flight for ever."""
    from engine.dispatch import handout_deadline
    handle, pull = parts.worker(IP2, alive=True)
    parts.push([job_envelope("j")])
    parts.dispatcher.offer(parts.intake.take())
    assert tasks(pull) == ["j"]
    first = parts.dispatcher.in_flight["j"].handout
    deadline = handout_deadline(parts.cfg)
    assert deadline > parts.cfg.smtp.timeouts.setup + parts.cfg.smtp.timeouts.transaction

    assert parts.dispatcher.take_back_overdue(time.monotonic() + deadline - 1) == []
    assert parts.dispatcher.take_back_overdue(time.monotonic() + deadline + 1) == ["j"]

    assert handle.jobs == set() and parts.counted("taken_back") == 1
    parts.dispatcher.dispatch_due()
    assert tasks(pull) == ["j"]
    assert parts.dispatcher.in_flight["j"].handout != first


# -- a spool that cannot be written ----------------------------------------------------


_WRITES = {sqlite3.SQLITE_INSERT, sqlite3.SQLITE_UPDATE, sqlite3.SQLITE_DELETE}


def _fill(spool: Spool) -> None:
    """Every write to the spool fails from now on (SQLite's authorizer refuses it), as on
    a full filesystem, where any write that needs a page fails; a real full filesystem is
    tests/engine/test_spool_faults.py."""
    spool._conn.set_authorizer(
        lambda action, *_: sqlite3.SQLITE_DENY if action in _WRITES else sqlite3.SQLITE_OK)


def _free(spool: Spool) -> None:
    spool._conn.set_authorizer(None)


def test_a_full_spool_pauses_intake_keeps_results_and_resumes_by_itself(
        parts: Parts, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue #14 (1): a full disk made the supervisor exit, in a crash loop under systemd."""
    monkeypatch.setattr("engine.spoolhealth.RETRY_AFTER", 0.0)
    handle, pull = parts.worker(IP2, alive=True)
    parts.push([job_envelope("sent")])
    parts.dispatcher.offer(parts.intake.take())
    assert tasks(pull) == ["sent"]
    delivered = parts.answer(Status.DELIVERED, "sent")
    _fill(parts.spool)
    big = "x" * 200_000

    parts.push([job_envelope("big", meta={"pad": big})])
    assert parts.intake.take() == []  # not durable: not acknowledged
    assert parts.names() == ["queued"]
    assert parts.counted("intake_refused") == 1 and parts.counted("spool_write_errors") == 1
    parts.report(delivered)  # the spool cannot record it: it waits, unpublished
    assert parts.results.held == 1 and parts.names() == ["queued"]
    assert "sent" in parts.dispatcher.in_flight  # not settled, so not handed out again
    assert parts.spool.stats().rcpts_pending == 1

    _free(parts.spool)
    parts.results.flush()
    assert parts.results.held == 0 and parts.names() == ["queued", "delivered"]
    assert parts.dispatcher.in_flight == {} and handle.jobs == set()
    parts.push([job_envelope("big", meta={"pad": big})])  # the producer sends it again
    assert [p.job.id for p in parts.intake.take()] == ["big"]
    assert parts.names() == ["queued", "delivered", "queued"]


def test_results_that_cannot_be_recorded_hold_back_new_work_once_too_many_wait(
        parts: Parts, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("engine.results.UNRECORDED_MAX", 2)
    monkeypatch.setattr("engine.spoolhealth.RETRY_AFTER", 0.0)
    _, pull = parts.worker(IP2, alive=True)
    parts.push([job_envelope(f"j{i}") for i in range(2)])
    parts.dispatcher.offer(parts.intake.take())
    assert tasks(pull) == ["j0", "j1"]
    _fill(parts.spool)
    reporter = parts.reporter()
    reporter.send(protocol.result_frame([parts.answer(Status.DELIVERED, "j0"),
                                         parts.answer(Status.DELIVERED, "j1")]))
    assert parts.results.sock.poll(5000)
    parts.results.collect()
    parts.results.flush()

    assert parts.results.full
    reporter.send(protocol.result_frame([parts.answer(Status.DEFERRED, "j0")]))
    assert parts.results.sock.poll(5000)
    parts.results.collect()
    assert parts.results.held == 2  # nothing more is read while full
    parts.dispatcher.held_back = parts.results.full
    assert parts.dispatcher.free_room() == 0

    _free(parts.spool)
    parts.results.flush()
    assert parts.names().count("delivered") == 2 and not parts.results.full
