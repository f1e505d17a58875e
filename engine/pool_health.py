"""What one destination tolerates now: a back-off after a failed connect, and a lowered
cap after "too many connections".

- A failed connect puts the destination in back-off for `connect_backoff` seconds:
  callers during the back-off fail fast with the same error, and afterwards the pool
  probes, one connect at a time, until one succeeds (`probing`): a dead destination
  never causes a reconnect storm.
- A 4xx at connect while other connections to it are open and working is its capacity,
  not an outage (classify.at_capacity): the pool's cap is lowered to what is open, for
  `connect_backoff` seconds, instead of failing every waiting caller.

engine.pool consults and feeds one `Health` per destination pool.
"""
from __future__ import annotations

from collections.abc import Callable

from engine import classify
from engine.config import PoolConfig
from engine.reply import DeliveryError


class Health:
    """One destination's back-off and capacity, on the pool's clock."""

    __slots__ = ("_cap", "_cap_until", "_clock", "_failed_until", "_settings", "failure",
                 "probing")

    def __init__(self, settings: PoolConfig, clock: Callable[[], float]) -> None:
        self._settings = settings
        self._clock = clock
        self.failure: DeliveryError | None = None  # the last failed connect's error
        self._failed_until = 0.0
        self.probing = False  # after a failure: one connect at a time until one works
        self._cap = settings.max_connections  # lowered while the server says "no more"
        self._cap_until = 0.0

    def failing(self) -> bool:
        """In back-off: a connect failed less than `connect_backoff` seconds ago."""
        return self.failure is not None and self._clock() < self._failed_until

    def raise_if_backing_off(self) -> None:
        """Fail fast, with the error that started the back-off."""
        err = self.failure
        if err is not None and self._clock() < self._failed_until:
            raise type(err)(err.reply, err.command, err.blame)

    def failed(self, err: DeliveryError) -> None:
        """A connect failed: back off, then probe."""
        self.failure = err
        self._failed_until = self._clock() + self._settings.connect_backoff
        self.probing = True

    def back(self) -> bool:
        """A connect worked; True if that ends the probing (the destination is back)."""
        if not self.probing:
            return False
        self.probing = False
        self.failure = None
        return True

    def max_connections(self) -> int:
        """The cap in force: `max_connections`, or less while lowered."""
        if self._clock() < self._cap_until:
            return min(self._cap, self._settings.max_connections)
        return self._settings.max_connections

    def at_capacity(self, err: DeliveryError, open_now: int) -> bool:
        """Whether a failed connect is the server's capacity (classify.at_capacity), with
        `open_now` connections open; if so, the cap is lowered to them for a while."""
        if not classify.at_capacity(err, open_now):
            return False
        self._cap = max(1, open_now)
        self._cap_until = self._clock() + self._settings.connect_backoff
        return True
