"""The supervisor's group commit of results, in process (no worker is started): results held
for RESULTS_WINDOW are recorded before anything could hand their jobs out again."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from engine import config as config_mod
from engine import protocol
from engine import supervisor as supervisor_mod
from engine.job import Job
from engine.protocol import Attempt, Status
from engine.reply import Reply
from engine.supervisor import InFlight, Supervisor, WorkerHandle

IP2, IP3 = "127.0.0.2", "127.0.0.3"
RCPT = "r@example.test"


class _Proc:
    """Stands in for a worker's Popen: alive (returncode None) or exited."""

    def __init__(self, pid: int, returncode: int | None) -> None:
        self.pid = pid
        self.returncode = returncode

    def poll(self) -> int | None:
        return self.returncode


@pytest.fixture
def sup(tmp_path: Path) -> Iterator[Supervisor]:
    sockdir = tempfile.mkdtemp(prefix="me-")
    cfg = config_mod.from_dict({
        "ingest": f"ipc://{sockdir}/ingest", "events": f"ipc://{sockdir}/events",
        "control": f"ipc://{sockdir}/control", "run_dir": sockdir,
        "events_log": str(tmp_path / "events.jsonl"), "spool": str(tmp_path / "spool"),
        "ips": [{"address": IP2}, {"address": IP3}], "pools": {"default": [IP2, IP3]},
        "statsd": {"enabled": False},
    })
    supervisor = Supervisor(cfg, None)
    try:
        yield supervisor
    finally:
        supervisor.events.close()
        supervisor.spool.close()
        for sock in (supervisor.ingest, supervisor.pub, supervisor.control, supervisor.results,
                     *_OPEN, *(h.tasks for h in supervisor.workers.values())):
            if sock is not None:
                sock.close(linger=0)
        _OPEN.clear()
        supervisor.zctx.term()
        shutil.rmtree(sockdir, ignore_errors=True)


_OPEN: list[zmq.Socket] = []  # the test's own sockets, closed with the fixture


def _worker(sup: Supervisor, ip: str, returncode: int | None) -> tuple[WorkerHandle, zmq.Socket]:
    """A handle with a task socket whose other end the test reads."""
    handle = WorkerHandle(ip)
    handle.tasks = sup._bind(zmq.PUSH, sup._endpoint(f"test-{ip}"))
    pull = sup.zctx.socket(zmq.PULL)
    pull.connect(sup._endpoint(f"test-{ip}"))
    _OPEN.append(pull)
    pid = 10_000_000 + len(sup.workers)  # never a real process: nothing is signalled
    handle.proc = _Proc(pid, returncode)  # type: ignore[assignment]
    handle.stats = {"pid": pid}
    handle.started = time.monotonic()
    sup.workers[ip] = handle
    return handle, pull


def _events(sup: Supervisor) -> list[dict[str, Any]]:
    sup.events.flush()
    with open(sup.cfg.events_log, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_a_held_final_result_is_recorded_before_its_dead_workers_jobs_go_out_again(
        sup: Supervisor) -> None:
    job = Job(id="j1", sender="s@example.test", rcpts=(RCPT,), message=b"x\r\n")
    now = time.time()
    sup.spool.accept([job], now, 3600.0)
    dead, _ = _worker(sup, IP2, returncode=-9)  # died after reporting its result
    _, other = _worker(sup, IP3, returncode=None)
    dead.jobs.add(job.id)
    sup.in_flight[job.id] = InFlight(IP2, {}, now, now + 3600.0, {RCPT: 0})
    # Collected, not recorded yet: waiting for the group commit.
    sup._results.append(Attempt(job_id=job.id, rcpt=RCPT, status=Status.DELIVERED,
                                reply=Reply(250, "2.0.0", "ok"), ip=IP2,
                                mx="mx.example.test", provider="other", ts=now))
    sup._results_since = time.monotonic()

    sup._tick()  # sees the dead worker, then hands out what is due

    assert [e["event"] for e in _events(sup)] == ["delivered"]
    assert sup.spool.stats().jobs == 0  # recorded, so not due again...
    with pytest.raises(zmq.Again):  # ...and not sent to the other worker
        other.recv(zmq.NOBLOCK)
    assert sup.in_flight == {}


def test_results_wait_for_the_window_then_share_one_commit(
        sup: Supervisor, monkeypatch: pytest.MonkeyPatch) -> None:
    now = time.time()
    jobs = [Job(id=f"j{i}", sender="s@example.test", rcpts=(RCPT,), message=b"x\r\n")
            for i in range(3)]
    sup.spool.accept(jobs, now, 3600.0)
    handle, _ = _worker(sup, IP2, returncode=None)
    commits: list[int] = []
    record = sup.spool.record

    def counting(updates: Any, now: float | None = None) -> list[str]:
        commits.append(len(updates))
        return record(updates, now)

    monkeypatch.setattr(sup.spool, "record", counting)
    results = sup.zctx.socket(zmq.PUSH)
    results.connect(sup._endpoint("results"))
    _OPEN.append(results)
    for j in jobs:
        handle.jobs.add(j.id)
        sup.in_flight[j.id] = InFlight(IP2, {}, now, now + 3600.0, {RCPT: 0})
        attempt = Attempt(job_id=j.id, rcpt=RCPT, status=Status.DELIVERED,
                          reply=Reply(250, "2.0.0", "ok"), ip=IP2, mx="mx.example.test",
                          provider="other", ts=now)
        results.send(protocol.result_frame([attempt]))
        deadline = time.monotonic() + 5
        while not sup.results.poll(10) and time.monotonic() < deadline:
            pass
        sup._collect()
    assert commits == [] and len(sup._results) == 3  # held, within the window
    assert time.monotonic() - sup._results_since < supervisor_mod.RESULTS_WINDOW * 50
    sup._flush_results()
    assert commits == [3]
    assert [e["id"] for e in _events(sup)] == ["j0", "j1", "j2"]
    assert sup.in_flight == {} and handle.jobs == set()
    assert os.path.exists(sup.spool.path)


def _push(sup: Supervisor, envelopes: list[dict[str, Any]]) -> None:
    """Send jobs to the ingest socket and wait until the supervisor can read them."""
    producer = sup.zctx.socket(zmq.PUSH)
    producer.connect(sup.cfg.ingest)
    _OPEN.append(producer)
    for envelope in envelopes:
        producer.send_multipart([json.dumps(envelope).encode(), b"Subject: x\r\n\r\nhi\r\n"])
    deadline = time.monotonic() + 5
    while not sup.ingest.poll(10) and time.monotonic() < deadline:
        pass


def _tasks(pull: zmq.Socket) -> list[str]:
    ids = []
    while pull.poll(200):
        ids.append(json.loads(pull.recv())["id"])
        pull.recv()
    return ids


@pytest.mark.timeout(30)
def test_intake_hands_out_what_the_room_allows_and_keeps_the_rest_in_memory(
        sup: Supervisor) -> None:
    handle, pull = _worker(sup, IP2, returncode=None)
    handle.jobs.update(f"busy-{i}" for i in range(sup.cfg.limits.max_in_flight - 2))
    _push(sup, [{"id": f"j{i}", "from": "s@example.test", "to": [RCPT]} for i in range(5)])

    sup._intake()

    assert _tasks(pull) == ["j0", "j1"]
    assert sorted(sup._unsent) == ["j2", "j3", "j4"]
    assert set(sup.in_flight) == {"j0", "j1"}
    assert [e["event"] for e in _events(sup)] == ["queued"] * 5


@pytest.mark.timeout(30)
def test_a_job_expired_by_its_first_dispatch_is_not_kept_in_memory(sup: Supervisor) -> None:
    _, pull = _worker(sup, IP2, returncode=None)
    _push(sup, [{"id": "brief", "from": "s@example.test", "to": [RCPT], "expires": 1e-9}])

    sup._intake()

    assert [e["event"] for e in _events(sup)] == ["queued", "expired"]
    assert sup._unsent == {} and sup._unsent_bytes == 0
    assert sup.spool.stats().jobs == 0
    assert _tasks(pull) == []
