"""A sending IP the host does not hold (issue #14, item 5), with the real engine.

At start and at check-config: refused, exit status 2, one line naming the IP (192.0.2.7,
TEST-NET-1: the bind fails locally and nothing is sent). At a reload: that IP alone is
refused. At run time: a network namespace of the test's own (tests/support/netns.py) holds
10.254.0.2 on its loopback; the engine, its sink and its StatsD catcher run inside it, the
address is removed under the running engine and added back.
"""
from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from engine.testing.harness import LocalEngine, final_outcomes, make_message
from engine.testing.sink import SinkServer
from tests.support import ROOT
from tests.support.netns import Netns, unusable
from tests.support.statsd_catcher import StatsdCatcher
from tests.support.wait import until

IP2, IP3, NOT_HELD = "127.0.0.2", "127.0.0.3", "192.0.2.7"
MOVING = "10.254.0.2"  # on the namespace's loopback, removed and added back by the test
NOT_HELD_LINE = ("mailengine: sending IP 192.0.2.7 (ips[1]) is not an address of this host:"
                 " bind failed: Cannot assign requested address")


def job(job_id: str, **fields: Any) -> tuple[dict[str, Any], bytes]:
    rcpt = f"{job_id}@example.test"
    return ({"id": job_id, "from": "sender@example.test", "to": [rcpt], **fields},
            make_message(0, 1000, rcpt=rcpt))


def mailengine(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "engine.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


# -- at start, at check-config, at a reload ---------------------------------------------

def test_check_config_and_run_refuse_an_ip_this_host_does_not_hold(
        sink: SinkServer, local_engine: Callable[..., LocalEngine]) -> None:
    engine = local_engine(sink.port, start=False, ips=(IP2, NOT_HELD))

    checked = mailengine("check-config", "-q", "-c", engine.config_path)
    run = mailengine("run", "-c", engine.config_path)

    assert (checked.returncode, checked.stdout, checked.stderr) == (2, "", NOT_HELD_LINE + "\n")
    assert run.returncode == 2
    assert run.stderr.splitlines()[-1] == NOT_HELD_LINE
    assert "event=start_failed" in run.stderr and "192.0.2.7" in run.stderr
    assert not Path(engine.config["spool"]).exists()  # refused before anything was made
    assert mailengine("check-config", "-q", "--no-host-check", "-c",
                      engine.config_path).returncode == 0


def test_a_reload_refuses_a_new_ip_this_host_does_not_hold_and_applies_the_rest(
        sink: SinkServer, local_engine: Callable[..., LocalEngine]) -> None:
    engine = local_engine(sink.port, ips=(IP2,))
    engine.config["ips"] += [{"address": IP3, "helo": "mta-127-0-0-3.test"},
                             {"address": NOT_HELD, "helo": "mta-192-0-2-7.test"}]

    engine.reload()

    until(lambda: "event=reloaded" in engine.log_tail(200), 20, "the reload", engine.log_tail)
    assert "event=reload_ip_refused ip=192.0.2.7" in engine.log_tail(200)
    figures = engine.wait_ready()
    assert set(figures["workers"]) == {IP2, IP3}
    assert engine.push([job("via-3", ip=IP3)])
    (final,) = final_outcomes(engine.wait_final(1, timeout=30)).values()
    assert (final["event"], final["ip"]) == ("delivered", IP3)


# -- at run time: the address removed under the running engine, then added back ---------

@pytest.fixture
def netns() -> Iterator[Netns]:
    why = unusable()
    if why is not None:
        pytest.skip(why)
    with Netns() as namespace:
        namespace.ip("addr", "add", f"{MOVING}/32", "dev", "lo")
        yield namespace


def delivered(engine: LocalEngine, ids: set[str], timeout: float = 30) -> dict[str, Any]:
    """Until each job of `ids` is delivered; their delivered events by id."""
    events = engine.wait_for(lambda evs: ids <= {e["id"] for e in evs
                                                 if e["event"] == "delivered"}, timeout,
                             f"{len(ids)} jobs delivered")
    return {e["id"]: e for e in events if e["event"] == "delivered" and e["id"] in ids}


@pytest.mark.timeout(120)
def test_an_ip_removed_at_run_time_costs_no_attempt_and_its_pool_goes_on_without_it(
        netns: Netns, tmp_path: Path, local_engine: Callable[..., LocalEngine]) -> None:
    with netns.entered():
        sink, statsd = SinkServer(tls=False), StatsdCatcher()
    with sink, statsd:
        engine = local_engine(sink.port, ips=(IP2, MOVING), python=netns.python(tmp_path),
                              extra={"statsd": {"enabled": True, "host": "127.0.0.1",
                                                "port": statsd.port, "prefix": "t"},
                                     "pool": {"idle_timeout": "1s"}})
        gauge = "t.10_254_0_2.all.ip_down"
        # Both IPs send; their connections close (idle_timeout) while the address is held.
        assert engine.push([job("first-2", ip=IP2), job("first-moving", ip=MOVING)])
        assert delivered(engine, {"first-2", "first-moving"})["first-moving"]["ip"] == MOVING
        until(lambda: engine.status()["workers"][MOVING]["connections_open"] == 0, 10,
              "the idle connections closed", engine.log_tail)
        assert statsd.wait_for(lambda: statsd.gauge(gauge) == 0)

        netns.ip("addr", "del", f"{MOVING}/32", "dev", "lo")
        pooled = {f"pooled-{i}" for i in range(20)}
        assert engine.push([job("waits", ip=MOVING), *(job(i) for i in sorted(pooled))])

        # The pool's other IP delivers everything, each at its first counted attempt.
        sent = delivered(engine, pooled)
        assert {(e["ip"], e["attempt"]) for e in sent.values()} == {(IP2, 1)}
        assert statsd.wait_for(lambda: statsd.gauge(gauge) == 1)
        moving = engine.status()["workers"][MOVING]
        assert moving["ip_down"] and MOVING in moving["ip_error"]
        assert "event=sending_ip_down ip=10.254.0.2" in engine.log_tail(200)
        assert "WARNING" in next(line for line in engine.log_tail(200).splitlines()
                                 if "event=sending_ip_down" in line)
        assert {e["event"] for e in engine.events() if e["id"] == "waits"} == {"queued"}

        netns.ip("addr", "add", f"{MOVING}/32", "dev", "lo")

        waited = delivered(engine, {"waits"})["waits"]
        assert (waited["ip"], waited["attempt"]) == (MOVING, 1)
        assert statsd.wait_for(lambda: statsd.gauge(gauge) == 0)
        assert "event=sending_ip_up ip=10.254.0.2" in engine.log_tail(200)
        assert not engine.status()["workers"][MOVING]["ip_down"]
        # No attempt was counted for the recipients the missing address sent back.
        assert [e for e in engine.events() if e["event"] == "deferred"] == []
        assert {m.peer[0] for m in sink.messages} == {IP2, MOVING}
