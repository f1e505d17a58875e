"""A worker out of file descriptors (issue #14): the real worker process, its RLIMIT_NOFILE
lowered under it (prlimit) to a few descriptors more than it holds, and many more messages at
once than that leaves sockets for. Connects fail with EMFILE; the worker waits and tries
again, counts `fd_exhausted`, says so in a warning, and delivers everything: no crash, no
deferral, no attempt counted for it.
"""
from __future__ import annotations

import os
import resource
from collections.abc import Callable

import pytest

from engine.testing.harness import LocalEngine, final_outcomes, make_message
from engine.testing.sink import SinkServer
from tests.support.statsd_catcher import StatsdCatcher

IP = "127.0.0.2"
JOBS = 200
SPARE = 6  # descriptors the worker may open beyond those it holds when ready


def _open_descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _fd_exhausted(statsd: StatsdCatcher) -> float:
    return sum(statsd.counter_sum(name) for name in statsd.names("counter")
               if name.endswith(".fd_exhausted"))


@pytest.mark.timeout(120)
@pytest.mark.skipif(not hasattr(resource, "prlimit"), reason="needs Linux prlimit")
def test_a_worker_out_of_descriptors_waits_and_delivers_everything(
        plain_sink: SinkServer, local_engine: Callable[..., LocalEngine]) -> None:
    with StatsdCatcher() as statsd:
        engine = local_engine(plain_sink.port, ips=(IP,), extra={
            "statsd": {"enabled": True, "host": "127.0.0.1", "port": statsd.port},
            "pool": {"max_connections": 50},
            "throttle": {"slow_start": False},
        })
        pid = engine.status()["workers"][IP]["pid"]
        limit = _open_descriptors(pid) + SPARE
        hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)[1]
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit, hard))
        jobs = [({"id": f"fd-{i}", "from": "s@example.test", "to": [f"r{i}@example.test"]},
                 make_message(i, 2000)) for i in range(JOBS)]
        assert engine.push(jobs)
        events = engine.wait_final(JOBS, timeout=90)
        finals = final_outcomes(events)
        assert {e["event"] for e in finals.values()} == {"delivered"}
        assert [e for e in events if e["event"] == "deferred"] == []  # no attempt counted
        assert engine.status()["workers"][IP]["pid"] == pid  # the same worker: no crash
        assert statsd.wait_for(lambda: _fd_exhausted(statsd) > 0, timeout=5)
        assert "event=fd_exhausted" in engine.log_tail(400)
        assert len(plain_sink.messages) == JOBS
