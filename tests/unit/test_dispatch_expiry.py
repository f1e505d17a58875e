"""engine.dispatch's expiry of a job found due after its time ran out: each recipient's
`expired` event keeps its last refusal (reply and category), as a result that expires it
does (engine.results); one never refused says `message-expired`. Before, a job that came due
a moment after its expiry lost its refusal, and the same mailbox-full recipient ended
`quota-issues` or `message-expired` by timing alone."""
from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from engine import config as config_mod
from engine.clock import EngineClock
from engine.dispatch import Dispatcher
from engine.events import Event
from engine.job import Job
from engine.protocol import Status
from engine.reply import Reply
from engine.spool import RcptUpdate, Spool
from engine.workers import WorkerHandle, Workers

T0 = 1_800_000_000.0
FULL = Reply(452, "4.2.2", "Mailbox full")


class Frozen(EngineClock):
    def __init__(self, at: float) -> None:
        super().__init__()
        self.at = at

    def now(self) -> float:
        return self.at


@pytest.fixture
def child() -> Iterator[subprocess.Popen[bytes]]:
    """A live process to stand for a ready worker (its tasks never leave: the job expires)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait()


def test_an_expired_job_keeps_each_recipients_last_refusal(
        tmp_path: Path, child: subprocess.Popen[bytes]) -> None:
    cfg = config_mod.from_dict({"spool": str(tmp_path / "spool"), "statsd": {"enabled": False},
                                "run_dir": str(tmp_path / "run"),
                                "ips": [{"address": "127.0.0.2"}]})
    spool = Spool(cfg.spool)
    ctx = zmq.Context()
    try:
        workers = Workers(ctx, cfg, None)
        workers.handles["127.0.0.2"] = WorkerHandle("127.0.0.2", proc=child,
                                                     stats={"pid": child.pid})
        published: list[Event] = []
        clock = Frozen(T0 + 3600)  # past the job's 10 minutes
        dispatcher = Dispatcher(cfg, spool, workers, published.append, clock=clock)
        spool.accept([Job(id="j1", sender="s@example.test", rcpts=("full@a.test", "new@a.test"),
                          message=b"x\r\n", expires=600)], T0, 86400.0)
        spool.record([RcptUpdate("j1", "full@a.test", Status.DEFERRED, next_attempt=T0 + 60,
                                 reply=FULL)], T0)

        dispatcher.dispatch_due()

        got = {e["rcpt"]: (e["event"], e["code"], e["reply"], e["category"])
               for e in (json.loads(line) for _, line in published)}
        assert got == {"full@a.test": ("expired", 452, "Mailbox full", "quota-issues"),
                       "new@a.test": ("expired", 451,
                                      "message expired: not delivered within its time",
                                      "message-expired")}
        assert spool.stats().jobs == 0  # finished: nothing left to hand out
    finally:
        spool.close()
        ctx.term()
