"""Changing every host's queue with one command (engine.clusteradmin): `mailengine queue
--cluster suspend|resume|retry|delete` over two real engines on loopback, A (127.0.0.2,
control on ipc) and B (127.0.0.3, control on tcp with CURVE, as a host on another machine
has it), sharing a real redis-server; A's config lists both in `cluster.hosts`.

- `suspend PROVIDER` without --cluster: every IP of that host, the other host untouched;
- a block published in Redis (as a third host would: the key set here) is followed by both;
  `queue --cluster resume` ends it on both and lifts it from Redis: nobody follows it again;
- `suspend` holds the provider at every IP of both hosts; `retry --domain` makes both hosts'
  recipients due (they meet the suspension and wait again, untried); `delete --domain` asks
  once for the whole cluster (refused without a terminal nor --yes, naming each host's
  count; on a terminal, "n" does nothing anywhere), then with --yes ends them on both, each
  with its `expired` event;
- B stopped: a command is done on A, B is named NOT DONE, and the exit status is 1.
"""
from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.cli import mailengine, mailengine_on_terminal
from tests.support.cluster_hosts import A_IP, B_IP, operator_keys, two_hosts
from tests.support.control import CurveEngine
from tests.support.redis import RedisServer
from tests.support.wait import until

pytestmark = pytest.mark.timeout(180)

PROVIDER = "127.0.0.1"  # the sink's host: the MX of every domain here
KEY = f"mailengine:suspend:{PROVIDER}"


@pytest.fixture
def engines(tmp_path: Path,
            redis_server: RedisServer) -> Iterator[tuple[CurveEngine, CurveEngine]]:
    """A and B sharing the redis-server, A with 3 recipients waiting at wait.test, B with 5."""
    def cluster(name: str) -> dict[str, Any]:
        return {"redis": redis_server.url, "host": name, "poll": "300ms", "retry": "1s"}
    with two_hosts(operator_keys(tmp_path / "keys"), tmp_path, cluster) as hosts:
        yield hosts


def shaping(engine: CurveEngine, ip: str) -> dict[str, Any]:
    return engine.status()["workers"][ip]["shaping"].get(PROVIDER) or {}  # type: ignore[no-any-return]


def settled(config: str) -> dict[str, Any]:
    """The cluster's queue once nothing is in flight on either host."""
    view: dict[str, Any] = {}

    def quiet() -> bool:
        view.update(json.loads(mailengine("queue", "--cluster", "-c", config,
                                          "--json").stdout))
        return view["answered"] == 2 and view["totals"]["in_flight"] == 0
    until(quiet, timeout=30, what="nothing in flight on either host")
    return view


def test_one_command_changes_every_hosts_queue_and_names_a_host_that_did_not(
        engines: tuple[CurveEngine, CurveEngine], redis_server: RedisServer) -> None:
    a, b = engines
    config = a.config_path
    each = ((a, A_IP), (b, B_IP))

    # A block a third host met, published as it would: both follow it within a poll.
    redis = redis_server.client()
    until_ts = float(redis.time()[0]) + 600  # type: ignore[attr-defined]
    redis.set(KEY, f"{until_ts:.6f}|mta-c/127.0.0.4|block", px=600_000)  # type: ignore[attr-defined]
    for engine, ip in each:
        until(lambda e=engine, i=ip: shaping(e, i).get("suspended_for", 0) > 500, timeout=10,
              what=f"{ip} follows the block")
    resumed = mailengine("queue", "--cluster", "-c", config, "resume", PROVIDER)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    lines = resumed.stdout.splitlines()
    assert lines[0].startswith(f"mta-a: {PROVIDER} resumed at {A_IP}; ")
    assert lines[1].startswith(f"mta-b: {PROVIDER} resumed at {B_IP}; ")
    assert lines[2] == f"cluster: {PROVIDER} resumed on 2 of 2 hosts"
    for engine, ip in each:
        until(lambda e=engine, i=ip: shaping(e, i).get("suspended_for") == 0, timeout=10,
              what=f"{ip} resumed")
    assert redis.get(KEY) is None  # type: ignore[attr-defined]  # lifted: nobody sets it again
    time.sleep(1.0)  # three polls of each worker: none follows nor sets it again
    assert redis.get(KEY) is None  # type: ignore[attr-defined]
    assert all(shaping(e, i)["suspended_for"] == 0 and shaping(e, i)["followed"] == 1
               for e, i in each)
    assert "event=provider_suspension_lifted" in Path(a.log_path).read_text() + \
        Path(b.log_path).read_text()

    # Without --cluster, and without an IP: every sending IP of this host alone.
    alone = mailengine("queue", "-c", config, "suspend", PROVIDER, "--for", "10m")
    assert alone.returncode == 0, alone.stderr
    assert alone.stdout.strip() == (f"{A_IP} x {PROVIDER} suspended for 10m (`mailengine"
                                    " queue resume` lifts it)")
    until(lambda: shaping(a, A_IP).get("held") is True, timeout=10, what="A held")
    assert shaping(b, B_IP).get("held") is False

    # Suspended at every IP of both hosts; a retry there meets it and waits again, untried.
    held = mailengine("queue", "--cluster", "-c", config, "suspend", PROVIDER, "--for", "30m")
    assert held.returncode == 0, held.stdout + held.stderr
    assert held.stdout.splitlines() == [
        f"mta-a: {PROVIDER} suspended for 30m at {A_IP}",
        f"mta-b: {PROVIDER} suspended for 30m at {B_IP}",
        f"cluster: {PROVIDER} suspended on 2 of 2 hosts"]
    for engine, ip in each:
        until(lambda e=engine, i=ip: shaping(e, i).get("held") is True, timeout=10,
              what=f"{ip} held")
    retried = mailengine("queue", "--cluster", "-c", config, "retry", "--domain", "wait.test")
    assert retried.returncode == 0, retried.stdout + retried.stderr
    assert retried.stdout.splitlines() == [
        "mta-a: domain wait.test: 3 recipients of 3 jobs due now",
        "mta-b: domain wait.test: 5 recipients of 5 jobs due now",
        "cluster: 8 recipients of 8 jobs due now on 2 of 2 hosts"]
    view = settled(config)
    assert view["totals"]["rcpts"] == 8

    # A delete asks once for the whole cluster: no terminal and no --yes, refused.
    asked = mailengine("queue", "--cluster", "-c", config, "delete", "--domain", "wait.test")
    assert asked.returncode == 2, asked.stdout + asked.stderr
    assert asked.stderr.strip() == (
        "mailengine queue: 8 jobs (8 recipients) at domain wait.test on 2 hosts (mta-a 3 jobs,"
        " mta-b 5 jobs) match; add --yes to delete them all")
    # On a terminal: asked once, "n": nothing done on either host.
    status, said = mailengine_on_terminal(b"n\n", "queue", "--cluster", "-c", config,
                                          "delete", "--domain", "wait.test")
    assert (status, said) == (1, "delete 8 jobs (8 recipients) at domain wait.test on 2 hosts"
                                 " (mta-a 3 jobs, mta-b 5 jobs)? [y/N] mailengine queue:"
                                 " nothing done\n")
    assert settled(config)["totals"]["rcpts"] == 8
    deleted = mailengine("queue", "--cluster", "-c", config, "delete", "--domain",
                         "wait.test", "--yes", "--json")
    assert deleted.returncode == 0, deleted.stdout + deleted.stderr
    done = json.loads(deleted.stdout)
    assert (done["done"], done["listed"], done["totals"]["rcpts"]) == (2, 2, 8)
    assert (done["hosts"]["mta-a"]["rcpts"], done["hosts"]["mta-b"]["rcpts"]) == (3, 5)
    for engine, count in ((a, 3), (b, 5)):
        engine.wait_for(lambda evs, n=count: sum(e["event"] == "expired" for e in evs) == n,
                        timeout=20, what="each recipient's expired event")

    # B down: done on A, B named, exit status 1.
    b.stop(timeout=20)
    partial = mailengine("queue", "--cluster", "-c", config, "resume", PROVIDER,
                         "--timeout", "1s")
    assert partial.returncode == 1, partial.stdout + partial.stderr
    assert partial.stdout.splitlines()[-1] == f"cluster: {PROVIDER} resumed on 1 of 2 hosts"
    assert "mailengine queue: host mta-b NOT DONE: no answer from tcp://127.0.0.1:" \
        in partial.stderr
    assert partial.stderr.splitlines()[-1] == ("mailengine queue: not done on mta-b: run it"
                                               " again once they answer")
    until(lambda: shaping(a, A_IP).get("held") is False, timeout=10, what="A resumed")

