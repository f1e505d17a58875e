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

from engine import protocol
from engine.dispatch import InFlight
from engine.job import Job
from engine.protocol import Status
from engine.results import Results
from engine.spool import RcptUpdate, Spool
from engine.supervisor import Supervisor
from engine.workers import WorkerHandle
from tests.support.supervisor import (
    IP2,
    IP3,
    NOW,
    RCPT,
    SCHEDULE,
    Parts,
    attempt,
    ipc_config,
    job_envelope,
    stand_in_worker,
    tasks,
)


@pytest.fixture
def parts(tmp_path: Path, sockdir: str) -> Iterator[Parts]:
    built = Parts(tmp_path, sockdir)
    yield built
    built.close()


class InProcess:
    """A whole Supervisor in the test process, its workers stood in for (`worker`)."""

    def __init__(self, tmp: Path, sockdir: str) -> None:
        self.sup = Supervisor(ipc_config(tmp, sockdir), None)
        self.socks: list[zmq.Socket] = []
        self.procs: list[subprocess.Popen[bytes]] = []

    def worker(self, ip: str, alive: bool) -> tuple[WorkerHandle, zmq.Socket]:
        return stand_in_worker(self.sup.zctx, self.sup.workers, ip, alive, self.socks,
                               self.procs)

    def close(self) -> None:
        for sock in [*self.socks, *(h.tasks for h in self.sup.workers if h.tasks is not None)]:
            sock.close(linger=0)
        for proc in self.procs:
            proc.kill()
            proc.wait(10)
        self.sup.workers.handles.clear()
        self.sup.spool.close()
        self.sup.events.close()
        self.sup.zctx.destroy(linger=0)


@pytest.fixture
def in_process(tmp_path: Path, sockdir: str) -> Iterator[InProcess]:
    built = InProcess(tmp_path, sockdir)
    yield built
    built.close()


def test_intake_hands_out_what_the_room_allows_and_keeps_the_rest_in_memory(
        parts: Parts) -> None:
    handle, pull = parts.worker(IP2, alive=True)
    handle.jobs.update(f"busy-{i}" for i in range(parts.cfg.limits.max_in_flight - 2))
    parts.push([job_envelope(f"j{i}") for i in range(5)])

    parts.dispatcher.offer(parts.take(5))

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

    accepted = parts.take(3)

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
    parts.dispatcher.offer(parts.take(3))
    assert tasks(pull) == ["j0", "j1", "j2"]
    commits: list[int] = []
    record = parts.spool.record

    def counting(updates: Any, now: float | None = None, finals: Any = ()) -> list[str]:
        commits.append(len(updates))
        return record(updates, now, finals)

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


def test_the_meta_of_a_job_is_on_its_queued_and_delivered_events(parts: Parts) -> None:
    """The meta's JSON text is made once at intake (Job.meta_json) and carried in flight to
    the result's event: both events say what the producer sent."""
    meta = {"campaign": "caf\u00e9 \u2028", "n": 1.5, "tags": ["a", None], "q": "\"\x7f"}
    parts.worker(IP2, alive=True)
    parts.push([job_envelope("m", meta=meta)])
    parts.dispatcher.offer(parts.take(1))
    assert parts.dispatcher.in_flight["m"].meta_json == json.dumps(
        meta, separators=(",", ":"), ensure_ascii=False)
    parts.reporter().send(protocol.result_frame([parts.answer(Status.DELIVERED, "m")]))
    assert parts.results.sock.poll(5000)
    parts.results.collect()
    parts.results.flush()
    lines = {name: json.loads(line) for name, line in parts.published}
    assert lines["queued"]["meta"] == meta and lines["delivered"]["meta"] == meta


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
    parts.dispatcher.offer(parts.take(3))
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
        in_process: InProcess) -> None:
    """Regression: a worker reported a delivery and died before the supervisor read it;
    handing its jobs to another worker first sent the message twice."""
    sup = in_process.sup
    dead, _ = in_process.worker(IP2, False)
    _, other = in_process.worker(IP3, True)
    sup.spool.accept([Job(id="j1", sender="s@example.test", rcpts=(RCPT,),
                          message=b"x\r\n")], time.time(), 3600.0)
    dead.jobs.add("j1")
    sup.dispatcher.in_flight["j1"] = InFlight(IP2, {}, NOW, time.time() + 3600, {RCPT: 0})
    reporter = sup.zctx.socket(zmq.PUSH)
    in_process.socks.append(reporter)
    reporter.connect(sup.workers.results_endpoint)
    reporter.send(protocol.result_frame([attempt(Status.DELIVERED, job_id="j1")]))
    assert sup.results.sock.poll(5000)

    sup.tick()  # the result in the socket, then the dead worker, then what is due

    assert sup.events.counts["delivered"] == 1
    assert sup.spool.stats().jobs == 0  # recorded, so not due again...
    assert not other.poll(300)  # ...and not sent to the other worker
    assert sup.dispatcher.in_flight == {}




# -- each hand-out has its own identity -------------------------------------------------


def test_a_late_delivery_counts_for_its_own_hand_out_and_the_second_copy_is_counted(
        parts: Parts) -> None:
    """Issue #14 (c): a dead worker's result that comes after its job went to another IP
    was credited to the new hand-out, whose message still went out, uncounted. Now the
    late delivery is recorded and published for the hand-out it answers, and the new
    hand-out's delivery of the same recipient is counted as a duplicate, not published
    twice."""
    first = parts.hand_out(IP2, job_envelope("j"))
    old = parts.answer(Status.DELIVERED)
    parts.kill(first)
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


def test_what_a_killed_worker_had_not_reported_goes_again_flagged_and_counted(
        parts: Parts) -> None:
    """Issue #14, item 10: a worker killed after the server's 2xx takes the result with it.
    Each recipient it had not reported is sent again, counted (`resent_after_loss`) and its
    event flagged `possible_duplicate`: no one can tell which of them the server has. One it
    reported is not sent again."""
    other = "q@example.test"
    first = parts.hand_out(IP2, job_envelope("j", to=[RCPT, other]))
    parts.report(parts.answer(Status.DELIVERED))  # RCPT reported; `other` not, then a kill
    parts.kill(first)
    _, second_tasks = parts.worker(IP3, alive=True)
    parts.dispatcher.dispatch_due()
    assert tasks(second_tasks) == ["j"]
    assert parts.dispatcher.in_flight["j"].resent == {other}
    parts.report(parts.answer(Status.DELIVERED, rcpt=other))

    first_outcome, second_outcome = (json.loads(line) for _, line in parts.published[1:])
    assert (first_outcome["rcpt"], "possible_duplicate" in first_outcome) == (RCPT, False)
    assert (second_outcome["rcpt"], second_outcome["possible_duplicate"]) == (other, True)
    assert parts.counted("resent_after_loss") == 1


def test_a_resent_recipient_that_went_back_untried_is_still_flagged_when_it_goes(
        parts: Parts) -> None:
    """Regression (bench/cluster.py, a copy delivered twice unflagged): the flag was on the
    first hand-out after the loss only. When that hand-out went back to the spool untried
    (shaping's "not now": a cluster pace beyond max_wait after a restart with a backlog, no
    event), the next one, the first that could make a second copy, went unflagged."""
    first = parts.hand_out(IP2, job_envelope("j"))
    parts.kill(first)
    _, second_tasks = parts.worker(IP3, alive=True)
    parts.dispatcher.dispatch_due()
    assert tasks(second_tasks) == ["j"]
    assert parts.dispatcher.in_flight["j"].resent == {RCPT}
    parts.report(parts.answer(Status.DEFERRED, attempted=False, retry_at=time.time() - 1))
    assert parts.names() == ["queued"]  # untried: no event
    parts.dispatcher.dispatch_due()
    assert tasks(second_tasks) == ["j"]
    assert parts.dispatcher.in_flight["j"].resent == {RCPT}
    parts.report(parts.answer(Status.DELIVERED))

    assert json.loads(parts.published[-1][1])["possible_duplicate"] is True
    assert parts.counted("resent_after_loss") == 1  # one recipient, counted once


def test_the_jobs_of_a_worker_that_exited_0_go_again_unflagged(parts: Parts) -> None:
    """A worker exits 0 only after its drain, having reported every recipient whose message
    it wrote (the others were never sent): nothing of it is a possible duplicate. A reload
    replaces every worker so: flagging their jobs would cry wolf."""
    first = parts.hand_out(IP2, job_envelope("j"))
    first.proc.kill()  # type: ignore[union-attr]
    first.proc.wait(10)  # type: ignore[union-attr]
    first.proc = subprocess.Popen(["true"])  # stands in for the drained worker's exit 0
    first.proc.wait(10)
    parts.dispatcher.forget(parts.workers.check(time.monotonic()))
    _, second_tasks = parts.worker(IP3, alive=True)
    parts.dispatcher.dispatch_due()
    assert tasks(second_tasks) == ["j"]
    parts.report(parts.answer(Status.DELIVERED))

    assert "possible_duplicate" not in json.loads(parts.published[-1][1])
    assert parts.counted("resent_after_loss") == 0


def test_a_late_deferral_of_a_hand_out_taken_back_changes_nothing(parts: Parts) -> None:
    first = parts.hand_out(IP2, job_envelope("j"))
    old = parts.answer(Status.DEFERRED)
    parts.kill(first)
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
    parts.dispatcher.offer(parts.take(2))
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


def test_a_job_that_cannot_be_decoded_ends_with_a_final_event_per_recipient(
        in_process: InProcess, tmp_path: Path) -> None:
    """Issue #14 (3): a spooled row that could not be decoded was set aside and only
    logged, so the producer never heard of its recipients again."""
    sup = in_process.sup
    _, pull = in_process.worker(IP2, True)
    sup.spool.accept([Job(id="bad", sender="s@example.test", rcpts=(RCPT, "b@example.test"),
                          message=b"x\r\n", meta={"k": "v"})], time.time(), 3600.0)
    sup.spool.record([RcptUpdate("bad", "b@example.test", Status.DELIVERED)])
    with sqlite3.connect(sup.spool.path) as conn:  # the envelope no longer decodes
        conn.execute("UPDATE jobs SET envelope = json_set(envelope, '$.to', json('[1]'))")

    sup.dispatcher.dispatch_due()
    sup.events.flush()

    assert tasks(pull) == []
    finals = [json.loads(line) for line in
              (tmp_path / "events.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [(e["event"], e["rcpt"], e["code"], e["enhanced"]) for e in finals] == [
        ("bounced", RCPT, 554, "5.3.0")]  # the one recipient not final yet
    assert "spool record could not be read" in finals[0]["reply"]
    assert finals[0]["meta"] == {"k": "v"}
    assert sup.spool.stats().jobs == 0


def test_a_spool_damaged_under_the_running_engine_stops_it_with_exit_2(
        tmp_path: Path, sockdir: str, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A page of the spool's file that goes bad while the engine runs: not a passing write
    failure to wait out (engine.spoolhealth), but a stop, with the commands that recover it,
    and exit status 2 (systemd does not restart it into the same failure)."""
    from tests.support.damage import checkpoint, flip_page_type, pages
    sup = Supervisor(ipc_config(tmp_path, sockdir), None)
    sup.spool.accept([Job(id=f"j{i:03}", sender="s@example.test", rcpts=(RCPT,),
                          message=b"x" * 3000) for i in range(100)], time.time(), 3600.0)
    checkpoint(sup.spool.path)
    leaves = [n for n, kind in pages(sup.spool.path, "jobs") if kind == "leaf"]
    flip_page_type(sup.spool.path, leaves[len(leaves) // 2])
    sup.spool._conn.execute("PRAGMA shrink_memory")  # its pages read from the file again
    own: list[zmq.Socket] = []
    procs: list[subprocess.Popen[bytes]] = []
    stand_in_worker(sup.zctx, sup.workers, IP2, True, own, procs)
    monkeypatch.setattr(sup.workers, "add", lambda ip: None)  # the stand-in is its worker
    try:
        assert sup.run() == 2  # the first `due` reads the damaged page
    finally:
        for sock in own:
            sock.close(linger=0)
    err = capsys.readouterr().err
    assert "is damaged" in err and "mailengine spool salvage" in err
    assert procs[0].wait(10) is not None  # its worker was stopped
