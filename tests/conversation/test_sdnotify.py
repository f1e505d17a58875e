"""engine.sdnotify.Notifier against a real AF_UNIX datagram socket standing in for systemd's:
one datagram per message, the pings at half the watchdog's interval, the status with them,
STOPPING=1, and a socket that goes away (the engine goes on, and says so once)."""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from engine.sdnotify import STATUS_EVERY, Notifier
from tests.support.notify import NotifySocket

Make = Callable[..., Notifier]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def manager(sockdir: str) -> Iterator[NotifySocket]:
    listener = NotifySocket(os.path.join(sockdir, "notify"))
    yield listener
    listener.close()


@pytest.fixture
def make() -> Iterator[Make]:
    """A factory: `make(address, **options)` -> a Notifier, its socket closed at teardown."""
    made: list[Notifier] = []

    def one(address: str | None, **options: Any) -> Notifier:
        made.append(Notifier(address, **options))
        return made[-1]

    yield one
    for notifier in made:
        notifier.close()


def test_ready_is_one_datagram_with_a_first_ping_and_the_status(manager: NotifySocket,
                                                                make: Make) -> None:
    make(manager.path, watchdog=120.0, status=lambda: "spool 0 pending").ready()
    notice = manager.receive(0)
    assert notice is not None and notice.pid == os.getpid()
    assert notice.fields == {"READY": "1", "WATCHDOG": "1", "STATUS": "spool 0 pending"}
    assert manager.receive(0) is None


def test_the_abstract_namespace_is_reached_too(sockdir: str) -> None:
    listener = NotifySocket(f"@{sockdir}/abstract")
    notifier = Notifier.from_env({"NOTIFY_SOCKET": listener.path})
    try:
        notifier.ready()
        notice = listener.receive(0)
        assert notice is not None and "READY=1" in notice
    finally:
        notifier.close()
        listener.close()


def test_pings_come_every_half_of_the_watchdog_with_the_status(manager: NotifySocket,
                                                               make: Make) -> None:
    clock = Clock()
    turns = iter(range(1, 100))
    notifier = make(manager.path, watchdog=2.0, status=lambda: f"turn {next(turns)}",
                    clock=clock)
    clock.now += 0.99
    notifier.tick()
    assert manager.receive(0) is None  # too early
    clock.now += 0.01
    notifier.tick()
    notice = manager.receive(0)
    assert notice is not None and notice.fields == {"WATCHDOG": "1", "STATUS": "turn 1"}
    clock.now += 0.5
    notifier.tick()
    assert manager.receive(0) is None  # half the interval counts from the last ping
    clock.now += 0.5
    notifier.tick()
    notice = manager.receive(0)
    assert notice is not None and notice.fields == {"WATCHDOG": "1", "STATUS": "turn 2"}


def test_without_a_watchdog_the_status_comes_every_few_seconds(manager: NotifySocket,
                                                               make: Make) -> None:
    clock = Clock()
    notifier = make(manager.path, status=lambda: "figures", clock=clock)
    clock.now += STATUS_EVERY - 0.1
    notifier.tick()
    assert manager.receive(0) is None
    clock.now += 0.1
    notifier.tick()
    notice = manager.receive(0)
    assert notice is not None and notice.fields == {"STATUS": "figures"}


def test_stopping_says_what_the_drain_waits_for(manager: NotifySocket, make: Make) -> None:
    make(manager.path, watchdog=1.0).stopping("draining:\n3 jobs in flight")
    notice = manager.receive(0)
    assert notice is not None
    assert notice.fields == {"STOPPING": "1", "STATUS": "draining: 3 jobs in flight"}


def test_figures_that_cannot_be_read_are_a_status_not_an_exception(manager: NotifySocket,
                                                                   make: Make) -> None:
    def broken() -> str:
        raise OSError("disk I/O error")

    make(manager.path, status=broken).ready()
    notice = manager.receive(0)
    assert notice is not None
    assert notice.fields == {"READY": "1", "STATUS": "figures unavailable: disk I/O error"}


def test_a_socket_gone_is_logged_once_and_sending_resumes_when_it_is_back(
        sockdir: str, make: Make, caplog: pytest.LogCaptureFixture) -> None:
    path = os.path.join(sockdir, "notify")
    clock = Clock()
    notifier = make(path, watchdog=1.0, clock=clock)
    caplog.set_level(logging.WARNING, "mailengine.sdnotify")
    notifier.ready()
    for _ in range(3):
        clock.now += 0.5
        notifier.tick()
    failures = [r.getMessage() for r in caplog.records]
    assert len(failures) == 1 and failures[0].startswith("event=notify_failed")
    assert f"socket={path}" in failures[0] and 'message="READY=1"' in failures[0]
    listener = NotifySocket(path)
    try:
        clock.now += 0.5
        notifier.tick()
        notice = listener.receive(0)
        assert notice is not None and "WATCHDOG=1" in notice
    finally:
        listener.close()
    clock.now += 0.5
    notifier.tick()  # gone again: logged again
    assert len(caplog.records) == 2
