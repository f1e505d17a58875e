"""systemd's notify protocol: the supervisor tells the service manager it is up, alive, stopping.

Under `Type=notify`, systemd hands the service an AF_UNIX datagram socket in
$NOTIFY_SOCKET (sd_notify(3)). A message is one datagram of `KEY=value` lines:

- `READY=1`: up. `systemctl start` returns, and units ordered after the engine
  start, only now: for the engine, once its sockets are bound and its workers
  started (jobs are taken from then on);
- `WATCHDOG=1`: alive. With `WatchdogSec=`, systemd passes the interval in
  $WATCHDOG_USEC; a service silent for longer is taken for hung: systemd sends it
  SIGABRT (`WatchdogSignal=`), and `Restart=on-failure` starts it again. The
  supervisor pings from its loop, every half of the interval, so pings stop when
  the loop stops turning;
- `RELOADING=1`: a SIGHUP's reload of the config begins; `READY=1` again when it
  is applied (`systemctl status` shows "reloading" meanwhile). MONOTONIC_USEC goes
  with it, as systemd 253's `Type=notify-reload` requires;
- `STOPPING=1`: draining (systemd stops watching then);
- `STATUS=...`: one line of figures, shown by `systemctl status`.

A few lines over a socket, so no dependency (python3-systemd's `daemon.notify`
sends the same datagrams). Not under systemd (no $NOTIFY_SOCKET), every call
does nothing. The variables are taken out of the environment, as sd_notify's
`unset_environment` does: the workers the supervisor spawns cannot speak for it
(`NotifyAccess=main` would ignore them anyway).
"""
from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any

from engine import logs
from engine.text import cut

log = logging.getLogger("mailengine.sdnotify")

STATUS_EVERY = 10.0  # seconds between STATUS= lines while the loop turns
SEND_TIMEOUT = 1.0  # seconds a message may wait for room in the manager's queue


class Notifier:
    """Messages to the service manager at `address` (None: not under systemd).

    `watchdog`: seconds the manager waits for a ping (None: no watchdog). `status`:
    makes the STATUS= line, called at most every STATUS_EVERY seconds.
    """

    def __init__(self, address: str | None, watchdog: float | None = None,
                 status: Callable[[], str] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.address = address
        self.watchdog = watchdog
        self._status = status
        self._clock = clock
        self._sock: socket.socket | None = None
        self._last_ping = self._last_status = clock()
        self._failing = False

    @classmethod
    def from_env(cls, environ: MutableMapping[str, str] | None = None,
                 status: Callable[[], str] | None = None) -> Notifier:
        """The notifier systemd asks for in the environment, whose variables it removes.

        With a watchdog, Python's faulthandler is enabled: the SIGABRT systemd sends
        when the watchdog fires then prints where each thread was (the hung step) to
        standard error, that is the journal, before the process dies.
        """
        env = os.environ if environ is None else environ
        address = notify_address(env.pop("NOTIFY_SOCKET", ""))
        watchdog = watchdog_seconds(env.pop("WATCHDOG_USEC", ""), env.pop("WATCHDOG_PID", ""),
                                    os.getpid())
        if address is not None and watchdog is not None:
            with contextlib.suppress(OSError, ValueError):  # standard error without a file
                faulthandler.enable()
        return cls(address, watchdog if address is not None else None, status)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def ready(self) -> None:
        """READY=1, with a first ping (the watchdog counts from the start) and a status."""
        if self.address is None:
            return
        now = self._clock()
        self._last_ping = self._last_status = now
        self.send("READY=1", *(("WATCHDOG=1",) if self.watchdog else ()),
                  f"STATUS={self._status_text()}")

    def tick(self) -> None:
        """From each turn of the loop: a ping when half the watchdog's interval has
        passed since the last; a status line with it, or after STATUS_EVERY seconds."""
        if self.address is None:
            return
        now = self._clock()
        lines = []
        if self.watchdog is not None and now - self._last_ping >= self.watchdog / 2:
            self._last_ping = now
            lines.append("WATCHDOG=1")
        if self._status is not None and (lines or now - self._last_status >= STATUS_EVERY):
            self._last_status = now
            lines.append(f"STATUS={self._status_text()}")
        if lines:
            self.send(*lines)

    def reloading(self) -> None:
        """RELOADING=1: the config is being read again; `ready()` when it is applied."""
        if self.address is not None:
            usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading the config")

    def stopping(self, status: str) -> None:
        """STOPPING=1: the drain begins (no more pings; systemd stops watching)."""
        if self.address is not None:
            self.send("STOPPING=1", f"STATUS={one_line(status)}")

    def send(self, *lines: str) -> bool:
        """One datagram; False if it could not be sent (logged once until one is)."""
        if self.address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._sock.settimeout(SEND_TIMEOUT)
            self._sock.sendto("\n".join(lines).encode("utf-8", "replace"), self.address)
        except OSError as err:
            if not self._failing:
                log.warning(logs.kv("notify_failed", socket=self.address.replace("\0", "@"),
                                    message=lines[0], error=err))
            self._failing = True
            return False
        self._failing = False
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _status_text(self) -> str:
        """The status line; never an exception (a figure that cannot be read says so:
        the loop's own reads deal with a failing spool)."""
        if self._status is None:
            return "running"
        try:
            return one_line(self._status())
        except Exception as err:  # a status line must not stop the engine
            return one_line(f"figures unavailable: {err}")


def notify_address(value: str) -> str | None:
    """The socket address in $NOTIFY_SOCKET: a path, or `@name` for Linux's abstract
    namespace (a leading NUL); None when unset or of a kind this does not speak (vsock)."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    return None


def watchdog_seconds(usec: str, pid: str, own_pid: int) -> float | None:
    """The watchdog's interval from $WATCHDOG_USEC, None if there is none or it is meant
    for another process ($WATCHDOG_PID, as sd_watchdog_enabled(3) reads it)."""
    try:
        interval = int(usec)
        if pid and int(pid) != own_pid:
            return None
    except ValueError:
        return None
    return interval / 1e6 if interval > 0 else None


def status_line(figures: Mapping[str, Any]) -> str:
    """The STATUS= line from the figures `mailengine status` shows (engine.control)."""
    spool = figures["spool"]
    workers = figures["workers"].values()
    counts = figures["events"]
    parts = [f"spool {spool['rcpts_pending']} recipients pending"
             f" ({spool['rcpts_deferred']} deferred)",
             f"{figures['in_flight']} jobs in flight",
             f"workers {sum(1 for w in workers if w['ready'])}/{len(workers)} ready",
             ", ".join(f"{name} {counts.get(name, 0)}"
                       for name in ("delivered", "deferred", "bounced"))]
    if not spool.get("writable", True):
        parts.insert(0, "SPOOL NOT WRITABLE")
    return "; ".join(parts)


def one_line(text: str) -> str:
    """A status is one line of text: line breaks would start other assignments."""
    return cut(" ".join(text.split()), 200)
