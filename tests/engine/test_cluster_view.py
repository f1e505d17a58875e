"""One view of several engines (issue #18 item 5): `mailengine status --cluster` and
`mailengine queue --cluster` over the hosts of `cluster.hosts`, with two real engines on
loopback: A (127.0.0.2, control on ipc) and B (127.0.0.3, control on tcp with CURVE, as a
host on another machine has it). A's config lists both; the operator's key pair is A's
control.curve.client_key, B's public key the entry's curve_server_key.

- both answer: one line each with its figures (workers, spool, events), and the totals;
  the queue's rows of both hosts, each with its host; exit status 0;
- B stopped: shown unreachable, the others still shown, exit status 1, within the
  time-out (no hang).
No Redis: the view needs none.
"""
from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from engine import auth
from engine.testing.harness import LocalEngine, make_message
from engine.testing.sink import SinkServer
from tests.support.cli import mailengine
from tests.support.control import CurveEngine, free_tcp_endpoint

pytestmark = pytest.mark.timeout(120)

A_IP, B_IP = "127.0.0.2", "127.0.0.3"


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, str]:
    if not zmq.has("curve"):
        pytest.skip("this libzmq has no CURVE (zmq.has('curve') is False)")
    base = tmp_path / "keys"
    (base / "operators").mkdir(parents=True)
    auth.keygen("b-control", str(base))
    auth.keygen("operator", str(base / "private"))
    shutil.copy(base / "private" / "operator.key", base / "operators")
    return {"secret": str(base / "b-control.key_secret"), "public": str(base / "b-control.key"),
            "operators": str(base / "operators"),
            "operator": str(base / "private" / "operator.key_secret")}


@pytest.fixture
def engines(keys: dict[str, str], tmp_path: Path) -> Iterator[tuple[CurveEngine, CurveEngine]]:
    """A and B running, each with jobs delivered and recipients waiting (deferred, the
    next try 10 minutes away)."""
    slow = {"retry": {"schedule": [600]}}
    with SinkServer(rcpt_rules={"defer": "452 4.2.2 mailbox full"}) as sink:
        b = CurveEngine(str(tmp_path / "b"), sink.port, ips=(B_IP,), extra={**slow, "control": {
            "endpoint": free_tcp_endpoint(), "curve": {
                "enabled": True, "server_secret_key": keys["secret"],
                "allowed_clients": keys["operators"]}}})
        b.client = auth.CurveClient.from_files(keys["public"], keys["operator"])
        a = CurveEngine(str(tmp_path / "a"), sink.port, ips=(A_IP,), extra=slow)
        a.config["control"] = {"endpoint": a.config["control"],
                               "curve": {"client_key": keys["operator"]}}
        a.config["cluster"] = {"hosts": [
            {"name": "mta-a", "control": a.config["control"]["endpoint"]},
            {"name": "mta-b", "control": b.config["control"]["endpoint"],
             "curve_server_key": keys["public"]}]}
        a.write_config()
        try:
            for engine, count in ((a, 3), (b, 5)):
                engine.start()
                assert engine.push(jobs(engine, count), timeout=30)
                engine.wait_for(lambda evs, n=count: sum(
                    e["event"] in ("delivered", "deferred") for e in evs) >= 2 * n,
                    timeout=30, what="every recipient tried")
            yield a, b
        finally:
            for engine in (a, b):
                engine.stop(timeout=20)
                engine.cleanup()


def jobs(engine: LocalEngine, count: int) -> list[tuple[dict[str, Any], bytes]]:
    """`count` jobs of two recipients: one delivered, one deferred (at wait.test)."""
    name = Path(engine.workdir).name
    return [({"id": f"{name}-{i}-{time.time_ns()}", "from": "sender@example.test",
              "to": [f"user{i}@example.test", f"defer{i}@wait.test"]},
             make_message(i, 800)) for i in range(count)]


def test_status_and_queue_of_the_cluster_show_every_host_and_one_that_is_down(engines):
    a, b = engines
    config = a.config_path

    shown = mailengine("status", "--cluster", "-c", config, "--json")
    assert shown.returncode == 0, shown.stderr
    view = json.loads(shown.stdout)
    assert (view["answered"], view["listed"]) == (2, 2)
    hosts = view["hosts"]
    assert set(hosts["mta-a"]["workers"]) == {A_IP}
    assert set(hosts["mta-b"]["workers"]) == {B_IP}
    assert hosts["mta-a"]["events"]["delivered"] == 3
    assert hosts["mta-b"]["events"]["delivered"] == 5
    assert view["totals"]["delivered"] == 8
    assert view["totals"]["rcpts_deferred"] == 8
    assert view["totals"]["workers_alive"] == 2

    text = mailengine("status", "--cluster", "-c", config)
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0] == "cluster: 2 of 2 hosts answered"
    row = {line.split()[0]: line.split() for line in lines[4:]}
    assert row["mta-a"][1:4] == ["up", "1/1", "3"]  # state, workers, jobs
    assert row["mta-b"][1:4] == ["up", "1/1", "5"]
    assert row["total"][1:5] == ["2/2", "up", "2/2", "8"]

    queue = mailengine("queue", "--cluster", "-c", config)
    assert queue.returncode == 0, queue.stderr
    assert queue.stdout.splitlines()[0].startswith("8 recipients waiting for 1 domain on 2"
                                                   " of 2 hosts")
    rows = [line.split() for line in queue.stdout.splitlines() if "wait.test" in line]
    assert sorted((r[0], r[1], r[4]) for r in rows) == [("mta-a", A_IP, "3"),
                                                        ("mta-b", B_IP, "5")]
    merged = json.loads(mailengine("queue", "--cluster", "-c", config, "--json").stdout)
    assert merged["totals"]["rcpts"] == 8

    b.stop(timeout=20)
    started = time.monotonic()
    down = mailengine("status", "--cluster", "-c", config, "--timeout", "1s")
    took = time.monotonic() - started
    assert down.returncode == 1, down.stdout + down.stderr
    assert "cluster: 1 of 2 hosts answered" in down.stdout
    assert any(line.split()[:2] == ["mta-b", "UNREACHABLE"] for line in down.stdout.splitlines())
    assert "mta-b: no answer from tcp://127.0.0.1:" in down.stdout
    assert took < 6, f"{took:.1f}s for a 1s time-out"  # the interpreter's start included
    queue_down = mailengine("queue", "--cluster", "-c", config, "--timeout", "1s", "--json")
    assert queue_down.returncode == 1
    partial = json.loads(queue_down.stdout)
    assert partial["answered"] == 1 and "error" in partial["hosts"]["mta-b"]
    assert partial["totals"]["rcpts"] == 3
