"""Waiting on the event itself, with a deadline: a condition polled (`until`; `yielding_until`
while the greenlets of this process run), or a ZeroMQ socket's monitor event
(`socket_event`)."""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

import zmq
from zmq.utils.monitor import recv_monitor_message

T = TypeVar("T")

HANDSHAKE_ENDS = {zmq.EVENT_HANDSHAKE_SUCCEEDED, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL,
                  zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_AUTH}


def until(check: Callable[[], T], timeout: float, what: str,
          detail: Callable[[], Any] | None = None, interval: float = 0.05) -> T:
    """The first true value of `check()`, polled every `interval` seconds; TimeoutError
    naming `what` (and `detail()`, say a log tail) after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            more = f":\n{detail()}" if detail is not None else ""
            raise TimeoutError(f"timed out waiting for {what}{more}")
        time.sleep(interval)
    return value


def yielding_until(check: Callable[[], object], timeout: float, what: str) -> float:
    """Yield to gevent (the greenlets that make `check()` come true) every 10 ms until it
    does: the seconds it took; TimeoutError naming `what` after `timeout` seconds."""
    import gevent  # here: a test process that never waits on greenlets loads no hub

    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"timed out waiting for {what}")
        gevent.sleep(0.01)
    return time.monotonic() - started


def socket_event(monitor: zmq.Socket, until: set[int]) -> int:
    """The first of the events `until` on the ZeroMQ socket `monitor` watches (10 s at most)."""
    while monitor.poll(10_000):
        event: int = recv_monitor_message(monitor)["event"]
        if event in until:
            return event
    raise AssertionError(f"no socket event {sorted(until)} within 10 s")
