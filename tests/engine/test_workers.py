"""engine.workers with real worker processes (`mailengine-worker`, started as the supervisor
starts them) that refuse a bad config and exit: each is restarted with growing back-off,
and the jobs it held are due again once. The other parts of the supervisor, in process:
tests/conversation/test_supervisor_parts.py.
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import zmq

from engine.workers import Workers
from tests.support.supervisor import IP2, ipc_config


@pytest.mark.timeout(60)
def test_a_worker_that_keeps_dying_is_restarted_with_growing_backoff(
        tmp_path: Path, sockdir: str) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("ips: [\n")  # real workers start, refuse this config and exit
    ctx = zmq.Context()
    workers = Workers(ctx, ipc_config(tmp_path, sockdir), str(bad))
    try:
        workers.add(IP2)
        handle = workers.get(IP2)
        assert handle is not None
        handle.jobs.add("j1")
        for number, backoff in enumerate((0.5, 1.0, 2.0)):
            assert handle.proc is not None
            assert handle.proc.wait(30) == 2  # a config error
            now = time.monotonic()
            lost = workers.check(now)
            # due again, once; its results may be lost (the worker did not exit 0)
            assert lost == ({"j1": True} if number == 0 else {})
            assert handle.proc is None and handle.restart_at - now == backoff
            assert handle.tasks is None  # what was queued for it died with its socket
            workers.check(handle.restart_at)  # its time has come: started again
            assert handle.proc is not None and handle.generation == number + 2
        assert handle.failures == 3
    finally:
        for handle in workers:
            if handle.proc is not None:
                handle.proc.kill()
                handle.proc.wait(10)
            if handle.tasks is not None:
                handle.tasks.close(linger=0)
        ctx.term()
