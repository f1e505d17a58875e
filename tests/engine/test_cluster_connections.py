"""Two engines, one Redis, one provider's connections shared (issue #18 item 2): real
`mailengine run` processes sending from 127.0.0.2 and .3, each allowed 4 connections of
its own to the receiver, with `cluster_connections: 2` for the two together. The receiver
(aiosmtpd) counts the connections open at once from both: never more than 2, and every
job is delivered once, from both IPs. Connections retire every 20 messages, so the slots
go back and forth between the hosts through Redis many times meanwhile."""
from __future__ import annotations

import collections
from collections.abc import Callable
from pathlib import Path

import pytest

from engine.testing.harness import LocalEngine
from engine.testing.sink import SinkServer
from tests.support.cluster_engines import finals, job, sharing_engines
from tests.support.redis import RedisServer
from tests.support.wait import until

IPS = ("127.0.0.2", "127.0.0.3")
JOBS = 150  # per engine


@pytest.mark.timeout(180)
def test_two_engines_never_hold_more_connections_than_the_cluster_limit_together(
        local_engine: Callable[..., LocalEngine], redis_server: RedisServer) -> None:
    sink = SinkServer(tls=False)
    try:
        engines = sharing_engines(local_engine, sink.port, redis_server, IPS, provider={
            "cluster_connections": 2, "max_connections": 4, "max_messages": 20})
        for i, engine in enumerate(engines):
            assert engine.push([job(f"h{i}-{n}", n, size=2000) for n in range(JOBS)])

        until(lambda: len(finals(engines)) >= 2 * JOBS, timeout=120,
              what="every job delivered",
              detail=lambda: "\n".join(e.log_tail(10) for e in engines))
        assert sink.max_concurrent <= 2, sink.summary()
        final = finals(engines)
        assert all(e["event"] == "delivered" for e in final.values())
        by_rcpt = collections.Counter(r for m in sink.messages for r in m.rcpt_tos)
        assert len(by_rcpt) == 2 * JOBS and max(by_rcpt.values()) == 1
        by_ip = collections.Counter(e["ip"] for e in final.values())
        assert by_ip == {IPS[0]: JOBS, IPS[1]: JOBS}, by_ip
        # Both engines wanted more than the cluster's two: the limit did the refusing.
        logs = [Path(engine.log_path).read_text() for engine in engines]
        assert any("event=cluster_connections_full" in log for log in logs), \
            "\n".join(e.log_tail(10) for e in engines)
        assert sink.connections > 2 * JOBS // 20  # retired every 20 messages at most
    finally:
        sink.stop()
