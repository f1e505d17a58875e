"""The supervisor's parts in a test process: a config whose sockets are ipc endpoints in a
short temporary folder (the `sockdir` fixture), two sending IPs in one pool, a worker's
Attempt for one recipient, a stand-in worker whose tasks only the test reads, and `Parts`:
the supervisor's parts wired together in process (tests/conversation/test_supervisor_parts.py,
test_clock_steps.py)."""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import zmq

from engine import config as config_mod
from engine import events, protocol, sockets
from engine.clock import EngineClock
from engine.config import Config
from engine.dispatch import Dispatcher
from engine.intake import Intake
from engine.metrics import Metrics
from engine.protocol import Attempt, Status
from engine.reply import Reply
from engine.results import Results
from engine.spool import Pending, Spool
from engine.spoolhealth import SpoolHealth
from engine.workers import WorkerHandle, Workers
from tests.support.statsd_catcher import StatsdCatcher

IP2, IP3 = "127.0.0.2", "127.0.0.3"
RCPT = "r@example.test"
NOW = 1_800_000_000.0
SCHEDULE = (60.0, 300.0)


def attempt(status: Status, **fields: Any) -> Attempt:
    code = {Status.DELIVERED: 250, Status.BOUNCED: 550}.get(status, 451)
    return Attempt(**{"job_id": "j", "rcpt": RCPT, "status": status,
                      "reply": Reply(code, None, "text"), "ip": IP2, "ts": NOW, **fields})


def ipc_config(tmp: Path, sockdir: str) -> Config:
    return config_mod.from_dict({
        "ingest": f"ipc://{sockdir}/ingest", "events": f"ipc://{sockdir}/events",
        "control": f"ipc://{sockdir}/control", "run_dir": sockdir,
        "events_log": str(tmp / "events.jsonl"), "spool": str(tmp / "spool"),
        "ips": [{"address": IP2}, {"address": IP3}], "ip_pools": {"default": [IP2, IP3]},
        "statsd": {"enabled": False},
    })


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


def tasks(pull: zmq.Socket) -> list[str]:
    """The ids of the tasks waiting at a stand-in worker's end of its task socket: those
    that arrive until none has for half a second (on a loaded machine ZeroMQ's I/O thread
    can hold the rest of a batch longer than 200 ms; with a shorter quiet the last tasks
    of a batch were missed now and then)."""
    ids = []
    while pull.poll(500):
        ids.append(json.loads(pull.recv())["id"])
        pull.recv()
    return ids


def job_envelope(job_id: str, **fields: Any) -> dict[str, Any]:
    return {"id": job_id, "from": "s@example.test", "to": [RCPT], **fields}


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

    def take(self, count: int) -> list[Pending]:
        """`intake.take()` until `count` more jobs were answered (queued or rejected): what
        `push` sent may reach the ingest socket in more than one read, and a read takes
        what has come."""
        def answered() -> int:
            return sum(1 for name in self.names() if name in ("queued", "rejected"))
        start = answered()
        taken = self.intake.take()
        while answered() - start < count:
            assert self.ingest.poll(5000), f"{count} jobs never reached the ingest socket"
            taken += self.intake.take()
        return taken

    def hand_out(self, ip: str, envelope: dict[str, Any]) -> WorkerHandle:
        """A ready stand-in worker for `ip`, and the job of `envelope` accepted and handed
        to it (the test checks the hand-out)."""
        handle, pull = self.worker(ip, alive=True)
        self.push([envelope])
        self.dispatcher.offer(self.intake.take())
        assert tasks(pull) == [envelope["id"]]
        return handle

    def kill(self, handle: WorkerHandle) -> None:
        """The stand-in worker dies (kill -9); the supervisor sees it and takes its jobs
        back, as its housekeeping tick would."""
        assert handle.proc is not None
        handle.proc.kill()
        handle.proc.wait(10)
        self.dispatcher.forget(self.workers.check(time.monotonic()))

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
