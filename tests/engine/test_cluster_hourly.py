"""Two engines, one Redis, one hourly budget (issue #18, `cluster_hourly`): real `mailengine
run` processes sending from 127.0.0.2 and .3, each with its own spool, sharing a real
redis-server on loopback, and a receiver that counts. With `cluster_hourly: 30` for the
provider and 50 jobs from one producer spread over both, the receiver gets at most 30 in
the hour, from both hosts; the rest waits in the spools without an attempt, due when the
hour frees, with the 451 4.4.5 that names the provider and the cluster hourly limit; and
once the hosts are idle, Redis counts exactly what was sent (the blocks' remainders
returned); `mailengine status` shows the budget in its cluster block.
"""
from __future__ import annotations

import collections
import json
import sqlite3
import time
from collections.abc import Callable
from typing import Any

import pytest

from engine.testing.harness import LocalEngine
from engine.testing.sink import SinkServer
from tests.support.cli import mailengine
from tests.support.cluster_engines import PROVIDER, job, push_to_all, sharing_engines
from tests.support.redis import RedisServer
from tests.support.wait import until

IPS = ("127.0.0.2", "127.0.0.3")
BUDGET = 30  # messages per hour, the two hosts together
JOBS = 50


def pending(engine: LocalEngine) -> list[tuple[int, float, str]]:
    """(attempts, next attempt, last reply) of every recipient the spool holds pending."""
    db = sqlite3.connect(f"file:{engine.config['spool']}/spool.db?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT * FROM rcpts WHERE status = 'pending'")
        names = [d[0] for d in rows.description]
        found = [dict(zip(names, row, strict=True)) for row in rows.fetchall()]
    finally:
        db.close()
    return [(int(r["attempts"]), float(r["next_attempt"]), json.dumps(r)) for r in found]


@pytest.mark.timeout(300)
def test_two_engines_share_an_hourly_budget_never_above_it_together(
        local_engine: Callable[..., LocalEngine], redis_server: RedisServer) -> None:
    sink = SinkServer(tls=False)
    try:
        engines = sharing_engines(local_engine, sink.port, redis_server, IPS,
                                  provider={"cluster_hourly": BUDGET})
        # One producer, its PUSH socket connected to both: ZeroMQ deals the jobs round.
        tally = push_to_all(engines, [job(f"j-{i}", i) for i in range(JOBS)])
        assert tally.exit_status() == 0, tally.lines("")
        client: Any = redis_server.client()

        def counted() -> int:
            return sum(int(n) for n in client.hgetall(f"mailengine:hourly:{PROVIDER}").values())

        def held_back() -> bool:
            """Every job not delivered is in a spool again, due when the hour frees (a
            message refused while another host held a block of that minute came back
            once the block was returned, a minute later at most), none in flight."""
            rows = [row for engine in engines for row in pending(engine)]
            return len(rows) + len(sink.messages) == JOBS and all(
                due > time.time() + 55 * 60 for _, due, _ in rows) and all(
                not engine.status()["in_flight"] for engine in engines)
        until(held_back, timeout=180, what="the jobs past the budget held back",
              detail=lambda: (len(sink.messages), [(len(pending(e)), e.status()["in_flight"])
                                                   for e in engines],
                              [e.log_tail(10) for e in engines]))

        by_ip = collections.Counter(m.peer[0] for m in sink.messages)
        assert sum(by_ip.values()) == BUDGET, by_ip  # the budget, never more
        assert set(by_ip) == set(IPS), by_ip  # from both hosts
        assert counted() == BUDGET
        now = time.time()
        for engine, ip in zip(engines, IPS, strict=True):
            for attempts, next_attempt, row in pending(engine):
                assert attempts == 0, row  # waiting for the budget is not an attempt
                assert next_attempt > now + 55 * 60, row  # when the hour frees
                assert f"not sent yet: {PROVIDER} cluster hourly limit" in row, row

            def state(engine: LocalEngine = engine, ip: str = ip) -> dict[str, Any]:
                worker = engine.status()["workers"].get(ip, {})
                return dict(worker.get("shaping", {}).get(PROVIDER, {}))
            until(lambda: state().get("cluster_hourly") == BUDGET, timeout=10,
                  what="the worker's figures", detail=state)  # (sent every few seconds)

        # `mailengine status` (text) says the host's link to Redis and the budget's row.
        shown = mailengine("status", "-c", engines[0].config_path)
        assert shown.returncode == 0, shown.stderr
        lines = shown.stdout.splitlines()
        assert "cluster: host host0; Redis shared (supervisor), workers: 1 shared" in lines
        row = next(line for line in lines if f"hourly {BUDGET}" in line)
        assert row.split()[:4] == [IPS[0], PROVIDER, "hourly", str(BUDGET)], row
        assert row.split()[-1] in ("1", "2"), row  # the workers it saw share the budget
    finally:
        sink.stop()
