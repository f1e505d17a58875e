"""Whether the host still holds a worker's sending IP, as the worker finds out at run time.

An address removed from its interface while the engine runs (a failover moved it, an
operator's `ip addr del`, a DHCP lease lost) makes every new connection from it fail at
its bind with EADDRNOTAVAIL. That is the worker's trouble, not the destination's nor the
message's: the connect's error is confirmed by a bind test (engine.hostcheck), the IP is
then *down*, its recipients go back to the spool with no attempt counted
(engine.delivery), and the worker says so in its stats frame (`ip_down`, `ip_error`):
the supervisor hands it no new work, a pool's mail goes to the pool's other IPs
(engine.dispatch), and mail for this IP alone waits in the spool.

While down, the worker tests the bind again every DOWN_RECHECK seconds, and reports the
IP up as soon as the host holds it again; while up, every UP_RECHECK seconds, so an idle
worker's IP that went away is seen too.
"""
from __future__ import annotations

import time
from collections.abc import Callable

from engine import hostcheck

DOWN_RECHECK = 1.0  # seconds between bind tests while the IP is down
UP_RECHECK = 10.0  # ...and while it is held
# Seconds before recipients sent back for a missing IP are due again: by then the
# supervisor knows (the worker told it at once) and hands them to another IP of the pool.
RETRY_AFTER = 2.0


class SendingIp:
    """One worker's sending IP: held or down, and since when; `on_change` hears each change."""

    def __init__(self, address: str, clock: Callable[[], float] = time.monotonic,
                 bind_error: Callable[[str], OSError | None] = hostcheck.bind_error) -> None:
        self.address = address
        self.error: str | None = None  # why it is down; None while the host holds it
        self.since = clock()  # when it went down or came back (monotonic)
        self.on_change: Callable[[SendingIp], None] | None = None
        self._clock = clock
        self._bind_error = bind_error
        self._checked = self.since

    @property
    def down(self) -> bool:
        return self.error is not None

    def check(self) -> bool:
        """A bind test now; the state follows it (`on_change` called on a change). True
        when the IP is down."""
        err = self._bind_error(self.address)
        self._checked = self._clock()
        self._set(None if err is None else hostcheck.describe(self.address, err))
        return self.down

    def check_due(self) -> None:
        """`check` when its time has come (DOWN_RECHECK while down, UP_RECHECK while held)."""
        every = DOWN_RECHECK if self.down else UP_RECHECK
        if self._clock() - self._checked >= every:
            self.check()

    def figures(self) -> dict[str, object]:
        """For the worker's stats frame: `ip_down`, and `ip_error` while it is."""
        if not self.down:
            return {"ip_down": False}
        return {"ip_down": True, "ip_error": self.error,
                "ip_down_for": round(self._clock() - self.since, 1)}

    def _set(self, error: str | None) -> None:
        if (error is None) == (self.error is None):
            self.error = error  # the same state (a newer reason, if down)
            return
        self.error = error
        self.since = self._clock()
        if self.on_change is not None:
            self.on_change(self)
