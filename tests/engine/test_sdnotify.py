"""The real engine under a stand-in for systemd's notify socket (a real AF_UNIX datagram socket
in $NOTIFY_SOCKET, with the sender's pid from the kernel, as `NotifyAccess=main` checks it):
READY=1 once its sockets are bound and its workers started, WATCHDOG=1 from its loop every
half of $WATCHDOG_USEC, a STATUS= line, STOPPING=1 when it drains and no ping after; the
workers do not inherit the socket. And what the watchdog's SIGABRT leaves in the log."""
from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from engine.testing.harness import LocalEngine, make_message
from engine.testing.sink import SinkServer
from tests.support.notify import NotifySocket
from tests.support.wait import until

Engine = Callable[..., LocalEngine]
WATCHDOG_USEC = 1_000_000  # pings every 0.5 s
JOBS = 200


def jobs(count: int) -> list[tuple[dict[str, Any], bytes]]:
    return [({"id": f"j{i}", "from": "s@example.org", "to": [f"r{i}@example.test"]},
             make_message(i, 500, "s@example.org", f"r{i}@example.test"))
            for i in range(count)]


@pytest.fixture
def manager(sockdir: str) -> Iterator[NotifySocket]:
    listener = NotifySocket(os.path.join(sockdir, "notify"))
    yield listener
    listener.close()


def environ_of(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as f:
        pairs = [item.partition(b"=") for item in f.read().split(b"\0") if item]
    return {key.decode(): value.decode(errors="replace") for key, _, value in pairs}


def test_ready_watchdog_status_and_stopping_come_from_the_supervisor(
        local_engine: Engine, plain_sink: SinkServer, manager: NotifySocket) -> None:
    engine = local_engine(plain_sink.port, start=False,
                          env={"NOTIFY_SOCKET": manager.path, "WATCHDOG_USEC": str(WATCHDOG_USEC)})
    started = time.monotonic()
    engine.start()
    assert engine.proc is not None
    supervisor = engine.proc.pid
    seen = manager.until("READY=1", 10)
    ready = seen[-1]
    assert ready.pid == supervisor
    assert "WATCHDOG=1" in ready and ready.fields["STATUS"].startswith("spool 0 recipients")
    workers = [w["pid"] for w in engine.status()["workers"].values()]
    assert workers and all(pid is not None for pid in workers)
    for pid in workers:  # taken out of the environment before they were spawned
        assert not {"NOTIFY_SOCKET", "WATCHDOG_USEC"} & environ_of(pid).keys()

    # Many turns of the loop (every job and result wakes it), pings only every half
    # interval, each with the figures; they go on while the loop turns.
    assert engine.push(jobs(JOBS))
    engine.wait_final(JOBS)
    while (queued := manager.receive(0)) is not None:  # sent during the deliveries
        seen.append(queued)
    for _ in range(3):
        seen += manager.until("WATCHDOG=1", 5)
    assert f"delivered {JOBS}" in seen[-1].fields["STATUS"]
    assert "workers 1/1 ready" in seen[-1].fields["STATUS"]

    assert engine.stop() == 0
    seconds = time.monotonic() - started  # at least as long as the engine ran
    seen += manager.until("STOPPING=1", 5)
    assert {notice.pid for notice in seen} == {supervisor}
    pings = sum(1 for notice in seen if "WATCHDOG=1" in notice)
    assert 4 <= pings <= seconds / (WATCHDOG_USEC / 2e6) + 1, (pings, seconds)
    assert seen[-1].fields["STATUS"].startswith("draining: ")
    # The drain is not the loop: no ping after STOPPING=1.
    while (late := manager.receive(0)) is not None:
        assert "WATCHDOG=1" not in late


def test_without_a_notify_socket_the_engine_sends_nothing_and_runs(
        local_engine: Engine, plain_sink: SinkServer, manager: NotifySocket) -> None:
    """WATCHDOG_USEC alone (no NOTIFY_SOCKET): nobody to tell; and a watchdog meant for
    another process (WATCHDOG_PID) is not this engine's."""
    engine = local_engine(plain_sink.port,
                          env={"WATCHDOG_USEC": str(WATCHDOG_USEC), "WATCHDOG_PID": "1"})
    assert engine.push(jobs(1))
    engine.wait_final(1)
    assert engine.stop() == 0
    assert manager.receive(0) is None


def test_the_watchdogs_sigabrt_prints_where_the_supervisor_was(
        local_engine: Engine, plain_sink: SinkServer, manager: NotifySocket) -> None:
    """What systemd does when the watchdog fires: SIGABRT to the main process. The journal
    gets the supervisor's Python stack (faulthandler, on with a watchdog), and its workers
    die with it."""
    engine = local_engine(plain_sink.port,
                          env={"NOTIFY_SOCKET": manager.path, "WATCHDOG_USEC": "120000000"})
    manager.until("READY=1", 10)
    workers = [w["pid"] for w in engine.status()["workers"].values()]
    assert engine.proc is not None
    engine.proc.send_signal(signal.SIGABRT)
    assert engine.proc.wait(20) == -signal.SIGABRT
    engine.proc = None
    with open(engine.log_path, encoding="utf-8", errors="replace") as f:
        log = f.read()
    assert "Fatal Python error: Aborted" in log
    assert "engine/supervisor.py" in log.split("Fatal Python error: Aborted")[1]
    until(lambda: not any(_alive(pid) for pid in workers), 10, "the workers to exit")


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_reload_says_reloading_then_ready(
        local_engine: Engine, plain_sink: SinkServer, manager: NotifySocket) -> None:
    """SIGHUP (`systemctl reload`): RELOADING=1 with MONOTONIC_USEC (systemd 253's
    notify-reload needs it) when the reload begins, READY=1 once the new config applies."""
    engine = local_engine(plain_sink.port, start=False, env={"NOTIFY_SOCKET": manager.path})
    engine.start()
    manager.until("READY=1", 10)
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    engine.reload()
    reloading = manager.until("RELOADING=1", 10)[-1]
    assert before <= int(reloading.fields["MONOTONIC_USEC"])
    assert int(reloading.fields["MONOTONIC_USEC"]) <= \
        time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    manager.until("READY=1", 10)
    until(lambda: "event=reloaded " in engine.log_tail(50), 10, "the reload's log line")
