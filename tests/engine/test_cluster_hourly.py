"""Two engines, one Redis, one hourly budget (issue #18, `cluster_hourly`): real `mailengine
run` processes sending from 127.0.0.2 and .3, each with its own spool, sharing a real
redis-server on loopback, and a receiver that counts. With `cluster_hourly: 30` for the
provider and 50 jobs pushed (25 to each), the receiver gets 30 in the hour, never more, from
both hosts; the other 20 wait in their spools without an attempt, due when the hour frees,
with the 451 4.4.5 that names the provider and the cluster hourly limit."""
from __future__ import annotations

import collections
import json
import sqlite3
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from engine.testing.harness import LocalEngine, make_message
from engine.testing.sink import SinkServer
from tests.support.redis import RedisServer, need_redis
from tests.support.wait import until

IPS = ("127.0.0.2", "127.0.0.3")
PROVIDER = "127.0.0.1"  # an IP literal route: its own provider
BUDGET = 30  # messages per hour, the two hosts together
JOBS = 25  # per host


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    need_redis()
    with RedisServer() as server:
        yield server


def job(job_id: str, index: int) -> tuple[dict[str, Any], bytes]:
    return ({"id": job_id, "from": "sender@example.test", "to": [f"{job_id}@a.test"]},
            make_message(index, 1000))


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


@pytest.mark.timeout(180)
def test_two_engines_share_an_hourly_budget_never_above_it_together(
        local_engine: Callable[..., LocalEngine], redis_server: RedisServer) -> None:
    sink = SinkServer(tls=False)
    try:
        engines = [local_engine(sink.port, ips=(ip,), route=None, extra={
            "routes": {"a.test": PROVIDER},
            "cluster": {"redis": redis_server.url, "host": f"host{i}"},
            "shaping": {"providers": {PROVIDER: {"cluster_hourly": BUDGET}}}})
            for i, ip in enumerate(IPS)]
        # Blocks lapse at the end of their minute (Redis's); one that lapses with some of
        # it held by a worker whose mail is all sent stays counted: the test keeps within
        # one minute, so that the whole budget is seen used (it is never exceeded anyway).
        until(lambda: time.time() % 60 < 40, timeout=25, what="a minute with 20 s left")
        for engine, prefix in zip(engines, ("a", "b"), strict=True):
            assert engine.push([job(f"{prefix}-{i}", i) for i in range(JOBS)])

        def held_back() -> bool:
            """Every job past the budget is in a spool again, none in flight."""
            rows = [row for engine in engines for row in pending(engine)]
            return len(rows) == 2 * JOBS - BUDGET and all(
                not engine.status()["in_flight"] for engine in engines)
        until(held_back, timeout=60, what="the jobs past the budget held back",
              detail=lambda: (len(sink.messages), [(len(pending(e)), e.status()["in_flight"])
                                                   for e in engines],
                              [e.log_tail(10) for e in engines]))

        by_ip = collections.Counter(m.peer[0] for m in sink.messages)
        assert sum(by_ip.values()) == BUDGET, by_ip  # the budget, never more
        assert set(by_ip) == set(IPS), by_ip  # from both hosts
        now = time.time()
        for engine, ip in zip(engines, IPS, strict=True):
            for attempts, next_attempt, row in pending(engine):
                assert attempts == 0, row  # waiting for the budget is not an attempt
                assert next_attempt > now + 55 * 60, row  # when the hour frees
                assert f"not sent yet: {PROVIDER} cluster hourly limit" in row, row
            state = engine.status()["workers"][ip]["shaping"][PROVIDER]
            assert state["cluster_hourly"] == BUDGET
        client: Any = redis_server.client()
        counted = client.hgetall(f"mailengine:hourly:{PROVIDER}")
        assert sum(int(n) for n in counted.values()) == BUDGET, counted
    finally:
        sink.stop()
