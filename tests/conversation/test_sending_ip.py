"""A sending IP the host does not hold (issue #14, item 5), at the worker's and the
supervisor's surfaces: the delivery stack (tests/support/stack.py) sending from 192.0.2.7
(TEST-NET-1: the bind fails locally, nothing is sent) to a real sink on loopback, and the
supervisor's workers table and dispatch with stand-in workers. The whole engine, with an
address removed from a network namespace under it: tests/engine/test_sending_ip.py.
"""
from __future__ import annotations

import dataclasses
import errno
import json
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from engine import hostcheck
from engine.config import IpConfig, Route
from engine.job import parse_job
from engine.metrics import Metrics
from engine.mx import Resolver
from engine.protocol import Status
from engine.sendingip import RETRY_AFTER, SendingIp
from engine.spool import Pending
from engine.testing.sink import SinkServer
from tests.support.playbook import RCPTS
from tests.support.stack import Stack
from tests.support.statsd_catcher import StatsdCatcher
from tests.support.supervisor import IP2, IP3, Parts, job_envelope, tasks

NOT_HELD = "192.0.2.7"
GONE = OSError(errno.EADDRNOTAVAIL, "Cannot assign requested address")


def routed(sink: SinkServer) -> Resolver:
    return Resolver(routes={"example.test": Route(sink.host, sink.port)})


def counters(statsd: StatsdCatcher) -> set[str]:
    statsd.sync()
    return {name.rpartition(".")[2] for name in statsd.names("counter")}


class Host:
    """The host's addresses as a worker's bind tests see them: held until told otherwise."""

    def __init__(self) -> None:
        self.holds = True

    def bind_error(self, address: str) -> OSError | None:
        return None if self.holds else GONE


# -- the worker: its recipients go back to the spool, no attempt counted ------------------

def test_a_sending_ip_the_host_does_not_hold_sends_its_recipients_back_uncounted(
        plain_sink: SinkServer, stack: Callable[..., Stack]) -> None:
    with StatsdCatcher() as statsd:
        metrics = Metrics.create("127.0.0.1", statsd.port, "test", NOT_HELD)
        sender = stack(routed(plain_sink), ip=NOT_HELD, metrics=metrics)
        before = time.time()

        attempts = sender.deliver(RCPTS[:2])

        assert [(a.rcpt, a.status, a.attempted, a.reply.code, a.reply.enhanced)
                for a in attempts] == [(r, Status.DEFERRED, False, 451, "4.4.1")
                                       for r in RCPTS[:2]]
        assert attempts[0].reply.text.startswith("sending IP not held by this host:")
        assert all(before + RETRY_AFTER <= (a.retry_at or 0) <= time.time() + RETRY_AFTER
                   for a in attempts)
        assert sender.connector.sending_ip.down
        # The worker's trouble, not the destination's: its pool does not back off.
        assert [pool.failing() for pool in sender.pools] == [False]
        # Known down: the next task goes back at once, without a lookup or a connect.
        (again,) = sender.deliver(RCPTS[:1])
        assert (again.status, again.attempted) == (Status.DEFERRED, False)
        assert again.reply.text == hostcheck.describe(NOT_HELD, GONE)
        assert {"deferred", "connections_failed"} & counters(statsd) == set()
    assert plain_sink.connections == 0


def test_a_bind_refused_while_a_bind_test_works_is_an_ordinary_connect_failure(
        plain_sink: SinkServer, stack: Callable[..., Stack]) -> None:
    # EADDRNOTAVAIL at the connect, yet the host holds the IP (it came back meanwhile, or
    # the error meant something else): counted like any connect failure, never a loop of
    # uncounted returns to the spool.
    held = SendingIp(NOT_HELD, bind_error=Host().bind_error)
    sender = stack(routed(plain_sink), ip=NOT_HELD, sending_ip=held)

    (attempt,) = sender.deliver(RCPTS[:1])

    assert (attempt.status, attempt.attempted, attempt.reply.code) == (Status.DEFERRED, True,
                                                                       451)
    assert not held.down


def test_the_ip_is_used_again_once_a_bind_test_finds_it_held(
        plain_sink: SinkServer, stack: Callable[..., Stack]) -> None:
    host = Host()
    sending_ip = SendingIp("127.0.0.2", bind_error=host.bind_error)
    changes: list[bool] = []
    sending_ip.on_change = lambda ip: changes.append(ip.down)
    sender = stack(routed(plain_sink), ip="127.0.0.2", sending_ip=sending_ip)
    host.holds = False
    assert sending_ip.check()

    (waiting,) = sender.deliver(RCPTS[:1])
    host.holds = True
    assert not sending_ip.check()
    (sent,) = sender.deliver(RCPTS[:1])

    assert (waiting.status, waiting.attempted) == (Status.DEFERRED, False)
    assert sent.status is Status.DELIVERED
    assert [m.peer[0] for m in plain_sink.wait_for(1)] == ["127.0.0.2"]
    assert changes == [True, False]


def test_idle_connections_are_dropped_at_once_when_the_ip_goes(
        plain_sink: SinkServer, stack: Callable[..., Stack]) -> None:
    sender = stack(routed(plain_sink), ip="127.0.0.2")
    assert [a.status for a in sender.deliver(RCPTS[:1])] == [Status.DELIVERED]
    assert sender.pools.open_connections == 1

    assert sender.pools.drop_idle() == 1

    assert sender.pools.open_connections == 0
    assert [pool.idle for pool in sender.pools] == [0]


# -- the supervisor: no new jobs for that worker, its pools' mail to the other IPs ---------

class Table(Parts):
    """The supervisor's parts (tests/support/supervisor.py) with stand-in workers whose
    stats the test sends; jobs go in as intake would hand them over."""

    def task_socket(self, ip: str) -> zmq.Socket:
        """A ready stand-in worker for `ip`: the test's end of its task socket."""
        return self.worker(ip, alive=True)[1]

    def stats(self, ip: str, **figures: object) -> bool:
        """A stats frame from the worker of `ip`; whether it made the worker take jobs."""
        handle = self.workers.get(ip)
        assert handle is not None and handle.proc is not None
        return self.workers.on_stats({"type": "stats", "ip": ip, "pid": handle.proc.pid,
                                      **figures})

    def offer(self, *envelopes: dict[str, Any]) -> None:
        jobs = [parse_job([json.dumps(e).encode(), b"Subject: x\r\n\r\nhi\r\n"], 10**6, 10)
                for e in envelopes]
        now = time.time()
        self.spool.accept(jobs, now, 3600.0)
        self.dispatcher.offer([Pending(job, now, now + 3600.0, job.rcpts,
                                       dict.fromkeys(job.rcpts, 0)) for job in jobs])


@pytest.fixture
def table(tmp_path: Path, sockdir: str) -> Iterator[Table]:
    built = Table(tmp_path, sockdir)
    yield built
    built.close()


def test_a_worker_whose_ip_is_down_gets_no_jobs_and_its_pools_mail_goes_elsewhere(
        table: Table, caplog: pytest.LogCaptureFixture) -> None:
    down_tasks, other_tasks = table.task_socket(IP2), table.task_socket(IP3)
    caplog.set_level(logging.INFO, logger="mailengine.supervisor")

    assert not table.stats(IP2, ip_down=True, ip_error="sending IP 127.0.0.2 is gone")
    table.offer(job_envelope("pooled"), job_envelope("pinned", ip=IP2))

    assert tasks(other_tasks) == ["pooled"] and tasks(down_tasks) == []
    assert table.dispatcher.free_room() == table.cfg.limits.max_in_flight - 1
    assert "event=sending_ip_down ip=127.0.0.2" in caplog.text
    assert "error=\"sending IP 127.0.0.2 is gone\"" in caplog.text

    assert table.stats(IP2, ip_down=False)  # back: it takes jobs again
    table.dispatcher.worker_ready()

    assert tasks(down_tasks) == ["pinned"]
    up = [r for r in caplog.records if "event=sending_ip_up" in r.getMessage()]
    assert [r.levelno for r in up] == [logging.WARNING]
    assert not table.stats(IP2, ip_down=False)  # said once


def test_a_reload_refuses_a_new_ip_the_host_does_not_hold_and_keeps_the_rest(
        table: Table, caplog: pytest.LogCaptureFixture) -> None:
    table.task_socket(IP2)
    table.task_socket(IP3)
    new = dataclasses.replace(table.cfg, ips=(*table.cfg.ips, IpConfig(NOT_HELD, "x.test")))
    caplog.set_level(logging.ERROR, logger="mailengine.supervisor")

    added, removed = table.workers.reconfigure(new)

    assert (added, removed) == (set(), set())
    assert sorted(h.ip for h in table.workers) == [IP2, IP3]
    assert table.workers.cfg is new
    assert f"event=reload_ip_refused ip={NOT_HELD}" in caplog.text
