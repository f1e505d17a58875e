"""Opening a retiring connection's replacement ahead (finding 3) in the whole engine: its
worker is gevent-patched, so connects run alongside transactions, here behind the
benchmarks' latency proxy (50 ms away). The order and counts of it in process are
tests/conversation/test_pool_ahead.py.
"""
from __future__ import annotations

import time
from typing import Any

import pytest

from engine.testing.harness import final_outcomes, make_message
from engine.testing.sink import SinkServer

DOMAIN = "example.test"


@pytest.mark.timeout(120)
def test_whole_engine_at_50ms_rtt_no_message_waits_for_a_connect_after_the_first(
        sink: SinkServer, local_engine: Any) -> None:
    """The headline's case in small: 50 ms away, STARTTLS (~6 RTT to open a connection),
    2 connections allowed, `max_messages` 2, a message every 0.6 s. Each connection's
    replacement is opened while it carries its last message, so every message after the
    first takes ~1 RTT, none the ~7 of a connect; the destination never sees more than 2
    connections, and none has to wait for a free one (the proxy counts until the close
    reaches the server)."""
    from bench.latency_proxy import ProxyProcess

    with ProxyProcess((sink.host, sink.port), 0.05, max_connections=2,
                      over_limit="queue") as proxy:
        engine = local_engine(proxy.port, extra={"pool": {"max_connections": 2,
                                                          "max_messages": 2}})
        count = 12
        for i in range(count):
            env = {"id": f"job-{i}", "from": "sender@example.test", "to": [f"u{i}@{DOMAIN}"]}
            assert engine.push([(env, make_message(i, 2000, rcpt=env["to"][0]))])
            if i == 0:  # the first connection is open before the stream begins
                engine.wait_final(1, timeout=10)
            time.sleep(0.6)  # > a connect (~6 RTT, 0.3-0.4 s) with room to spare
        finals = final_outcomes(engine.wait_final(count, timeout=30))
        assert engine.stop(timeout=30) == 0
        stats = proxy.stop()
    assert {e["event"] for e in finals.values()} == {"delivered"}
    delays = [finals[(f"job-{i}", f"u{i}@{DOMAIN}")]["delay_ms"] for i in range(count)]
    assert delays[0] >= 300  # the first message waits for the first connection
    # ~55 ms each; a message that waited for a connect costs ~350 ms, and without opening
    # ahead every other one does (5 of these 11). One slow message is let pass: a loaded
    # machine can delay a message by itself, never half of them.
    assert sum(d >= 250 for d in delays[1:]) <= 1, delays
    assert len({m.conn_id for m in sink.messages}) == count // 2  # 2 messages each
    assert stats["max_concurrent"] <= 2 and stats["queued"] == 0, stats
    assert sink.max_concurrent <= 2
    sink.wait_idle(timeout=5)
    assert sink.active == 0  # the engine stopped: no connection left open
