"""Hostile SMTP servers and the whole engine: with several hostile destinations at once
(tests/support/rawserver.py's behaviours, and a TLS handshake fed one byte at a time), the
worker keeps delivering to a healthy server meanwhile, and no hostile one holds a connection
past its deadline (in a gevent worker, where a TLS handshake fed one byte at a time is only
bounded by the `setup` deadline's gevent.Timeout).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import fields

import pytest

from engine.config import Timeouts
from engine.testing.harness import LocalEngine, final_outcomes, make_message
from engine.testing.sink import SinkServer
from tests.support.rawserver import (
    Behaviour,
    RawServer,
    dripping_banner,
    endless_multiline,
    silent,
    slow_steps_every,
    stops_reading_after_354,
    tls_dripper,
)

ENGINE_HOSTILES: dict[str, Behaviour] = {
    "silent": silent, "drip": dripping_banner, "slowsteps": slow_steps_every(2.8),
    "endless": endless_multiline, "tlsdrip": tls_dripper, "stopsreading": stops_reading_after_354,
}


@pytest.mark.timeout(90)
def test_engine_keeps_delivering_while_hostile_servers_hold_connections(
        raw: Callable[..., RawServer], sink: SinkServer,
        local_engine: Callable[..., LocalEngine]) -> None:
    servers = {name: raw(behaviour, rcvbuf=4096) for name, behaviour in ENGINE_HOSTILES.items()}
    slow = {**{f.name: "3s" for f in fields(Timeouts)}, "setup": "5s", "transaction": "5s"}
    engine = local_engine(sink.port, extra={
        "routes": {f"{name}.test": f"127.0.0.1:{s.port}" for name, s in servers.items()},
        "smtp": {"timeouts": slow, "tls": "opportunistic"},
        "retry": {"schedule": ["1h"]},
    })
    big = b"Subject: big\r\n\r\n" + (b"y" * 998 + b"\r\n") * 8000
    hostile_jobs = [({"id": f"h-{name}", "from": "s@example.test", "to": [f"x@{name}.test"]},
                     big if name == "stopsreading" else make_message(0, 500))
                    for name in servers]
    pushed = time.monotonic()
    assert engine.push(hostile_jobs)
    for server in servers.values():  # every hostile connection is open (and stuck)
        assert server.accepted.wait(10)
    healthy = [({"id": f"ok-{i}", "from": "s@example.test", "to": [f"u{i}@ok.test"]},
                make_message(i, 500)) for i in range(20)]
    assert engine.push(healthy)
    engine.wait_for(lambda evs: sum(e["event"] == "delivered" for e in evs) >= 20, timeout=10,
                    what="20 healthy deliveries")
    healthy_done = time.monotonic() - pushed
    events = engine.wait_for(
        lambda evs: {e["id"] for e in evs if e["event"] == "deferred"} >= {j["id"] for j, _ in
                                                                          hostile_jobs},
        timeout=30, what="a deferral for every hostile destination")
    hostile_done = time.monotonic() - pushed
    assert healthy_done < 3.0 + 1.0, "healthy mail waited behind hostile servers"
    assert hostile_done < 5.0 + 3.0, f"a hostile server held on for {hostile_done:.1f}s"
    assert not final_outcomes(e for e in events if e["id"].startswith("h-"))
    replies = {e["id"]: e["reply"] for e in events if e["event"] == "deferred"}
    assert "setup took longer than 5s" in replies["h-tlsdrip"]  # the gevent.Timeout backstop
    assert "setup took longer than 5s" in replies["h-slowsteps"]
    assert "timeout after 3s in BANNER" in replies["h-silent"]
    assert "timeout after 3s in BANNER" in replies["h-drip"]
    assert "100 lines" in replies["h-endless"]
    assert "timeout after 3s in DATA" in replies["h-stopsreading"]
    assert len(sink.messages) == 20
