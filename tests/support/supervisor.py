"""The supervisor's parts in a test process: a config whose sockets are ipc endpoints in a
short temporary folder (the `sockdir` fixture), two sending IPs in one pool, a worker's
Attempt for one recipient, and a stand-in worker whose tasks only the test reads."""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import zmq

from engine import config as config_mod
from engine import sockets
from engine.config import Config
from engine.protocol import Attempt, Status
from engine.reply import Reply
from engine.workers import WorkerHandle, Workers

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
