"""engine.sdnotify, what it reads and writes (no sockets): the notify socket's address and the
watchdog's interval from systemd's variables, and the STATUS= line. What it sends over a real
socket: tests/conversation/test_sdnotify.py; from the running engine:
tests/engine/test_sdnotify.py."""
from __future__ import annotations

from typing import Any

import pytest

from engine import sdnotify


@pytest.mark.parametrize(("value", "address"), [
    ("/run/systemd/notify", "/run/systemd/notify"),
    ("@/org/freedesktop/systemd1/notify/123", "\0/org/freedesktop/systemd1/notify/123"),
    ("", None),
    ("@", None),
    ("vsock:2:1234", None),  # systemd in a VM telling its host: not ours to speak
    ("relative/path", None),
])
def test_notify_address(value: str, address: str | None) -> None:
    assert sdnotify.notify_address(value) == address


@pytest.mark.parametrize(("usec", "pid", "seconds"), [
    ("120000000", "", 120.0),
    ("120000000", "4242", 120.0),  # our pid
    ("120000000", "1", None),  # the watchdog is meant for another process
    ("400000", "", 0.4),
    ("0", "", None),
    ("", "", None),
    ("soon", "", None),
    ("120000000", "x", None),
])
def test_watchdog_seconds(usec: str, pid: str, seconds: float | None) -> None:
    assert sdnotify.watchdog_seconds(usec, pid, own_pid=4242) == seconds


def test_from_env_takes_the_variables_out_of_the_environment() -> None:
    """The workers the supervisor spawns afterwards inherit none of them."""
    env = {"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_PID": "1", "HOME": "/"}
    notifier = sdnotify.Notifier.from_env(env)
    assert env == {"HOME": "/"}
    assert notifier.enabled and notifier.address == "/run/systemd/notify"
    assert notifier.watchdog is None  # WATCHDOG_PID named another process


def test_not_under_systemd_nothing_is_enabled() -> None:
    notifier = sdnotify.Notifier.from_env({"WATCHDOG_USEC": "1000000"})
    assert not notifier.enabled and notifier.watchdog is None
    assert notifier.send("READY=1") is False


def figures(writable: bool = True, ready: tuple[bool, ...] = (True, False)) -> dict[str, Any]:
    return {"spool": {"jobs": 120, "rcpts_pending": 340, "rcpts_deferred": 12,
                      "writable": writable},
            "in_flight": 85,
            "events": {"queued": 5012, "rejected": 3, "delivered": 4870, "deferred": 40,
                       "bounced": 12, "expired": 0},
            "workers": {f"203.0.113.{i}": {"ready": r} for i, r in enumerate(ready)}}


def test_status_line_is_the_figures_an_operator_looks_at_first() -> None:
    assert sdnotify.status_line(figures()) == (
        "spool 340 recipients pending (12 deferred); 85 jobs in flight;"
        " workers 1/2 ready; delivered 4870, deferred 40, bounced 12")


def test_status_line_leads_with_an_unwritable_spool() -> None:
    assert sdnotify.status_line(figures(writable=False)).startswith("SPOOL NOT WRITABLE; ")


def test_a_status_is_one_line() -> None:
    """A line break would start another assignment in the datagram."""
    assert sdnotify.one_line("draining:\n3 jobs\r\nREADY=1") == "draining: 3 jobs READY=1"
    assert len(sdnotify.one_line("x" * 1000)) <= 203
