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
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.cli import mailengine
from tests.support.cluster_hosts import A_IP, B_IP, operator_keys, two_hosts
from tests.support.control import CurveEngine

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def engines(tmp_path: Path) -> Iterator[tuple[CurveEngine, CurveEngine]]:
    with two_hosts(operator_keys(tmp_path / "keys"), tmp_path) as hosts:
        yield hosts


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
