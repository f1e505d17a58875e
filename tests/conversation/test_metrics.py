"""Metrics on a real UDP socket, in process: `Metrics.batched()` packs stats into few packets,
and the StatsD catcher the engine tests rely on reads what clients send."""
from __future__ import annotations

import socket
import time
from contextlib import closing
from typing import Any

import pytest

from engine import metrics
from tests.support.statsd_catcher import StatsdCatcher


@pytest.mark.timeout(10)
def test_batched_stats_go_packed_into_few_packets_at_flush() -> None:
    """`Metrics.batched()`: stats are held, then sent several to a packet (<= 512 bytes);
    the scheduler is asked once per batch, and a full batch goes at once."""
    with StatsdCatcher() as catcher, closing(
            metrics.Metrics.create(catcher.host, catcher.port, "t", "127.0.0.2")) as emitter:
        scheduled: list[Any] = []
        emitter.batched(scheduled.append)
        for i in range(20):
            emitter.timing("delivery_time", "example.com", float(i))
            emitter.incr("delivered", "example.com")
        assert len(scheduled) == 1  # one flush asked for the whole batch
        catcher.sync()  # whatever the batch sent so far has arrived
        assert catcher.packets == 0  # held until the flush
        scheduled[0]()
        deadline = time.monotonic() + 5
        while len(catcher.samples) < 40 and time.monotonic() < deadline:
            time.sleep(0.02)
        samples = catcher.samples
        assert [s.number for s in samples if s.kind == "timer"] == [float(i) for i in range(20)]
        assert sum(s.number for s in samples if s.kind == "counter") == 20
        assert {s.name for s in samples} == {"t.127_0_0_2.example_com.delivery_time",
                                             "t.127_0_0_2.example_com.delivered"}
        assert catcher.packets <= 4  # 40 stats of ~40 bytes: 512-byte packets
        # MAX_BATCH stats at once are sent without waiting for the scheduled flush.
        sent = catcher.packets
        for _ in range(metrics.Metrics.MAX_BATCH):
            emitter.incr("delivered", "example.com")
        deadline = time.monotonic() + 5
        while catcher.packets == sent and time.monotonic() < deadline:
            time.sleep(0.02)
        assert catcher.packets > sent and len(scheduled) == 2


def test_the_catcher_reads_multi_line_packets_sample_rates_and_gauge_deltas():
    with StatsdCatcher() as catcher, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as out:
        out.sendto(b"a.n:1|c\na.n:2|c|@0.5\na.t:3.5|ms\na.g:5|g\na.g:-2|g\nnot a metric",
                   ("127.0.0.1", catcher.port))
        out.sendto(b"a.g:7|g\na.g:+1|g", ("127.0.0.1", catcher.port))
        assert catcher.wait_for(lambda: catcher.packets == 2, timeout=5)
        assert catcher.counter_sum("a.n") == 5
        assert catcher.counter_sum("never.sent") == 0
        assert catcher.timers("a.t") == [3.5]
        assert catcher.gauge("a.g") == 8
        assert catcher.gauge("never.sent") is None
        assert catcher.names() == {"a.n", "a.t", "a.g"}
        assert catcher.bad_lines == ["not a metric"]
