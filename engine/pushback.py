"""Recognising a provider's push-back by its behaviour, whatever its words.

The throttle rules (engine.classify.throttle_rule) know the large providers' wording; no list
knows every receiver's. So a provider that accepted mail from this sending IP a little while
ago (within `RECENT` seconds) and now refuses whole transactions with a 4xx (at the banner,
EHLO, MAIL or RCPT, or by closing the connection), `throttle.pushback_after` times in a row
with nothing accepted in between, is pushing back. What is not about the pace stays apart
(engine.classify.refusal): a mailbox that is full or busy (4.2.x), an address problem
(4.1.x), greylisting. And a refusal at first contact is not push-back: greylisting, or a
provider that never took mail from us, says nothing about our pace; nor is the refusal of a
recipient refused before (engine.delivery: Task.tried), which its own mailbox explains.

The first refusals of a run are not known to be push-back until the next one arrives: a
transaction refused first waits a moment (`verdict`) for the one after it, so that it, too,
is judged a throttle (sent again at the next turn) rather than an ordinary deferral.
"""
from __future__ import annotations

import math

from gevent.event import Event

RECENT = 60.0  # s: "accepted mail from this IP a little while ago"
HOLD = 2.0  # s: how long a first refusal waits for the verdict of the next transaction


class Pushback:
    """One sending IP x provider's run of refused transactions."""

    def __init__(self, after: int) -> None:
        self.after = max(1, after)  # refusals in a row that are push-back
        self.refused = 0  # transactions refused in a row
        self.recognised = 0  # push-backs recognised so far
        self._accepted_at = -math.inf
        self._next = Event()  # set by the next outcome, for a refusal waiting on its verdict

    def accepted(self, now: float) -> None:
        """A transaction accepted: the run of refusals is over."""
        self._accepted_at = now
        self.refused = 0
        self._outcome()

    def refusal(self, now: float) -> bool:
        """A transaction refused (a candidate: engine.classify.refusal). True when this
        refusal makes the provider's behaviour push-back."""
        if now - self._accepted_at > RECENT:
            self._outcome()
            return False  # first contact, or a long silence: nothing about our pace
        self.refused += 1
        pushing = self.refused >= self.after
        if self.refused == self.after:
            self.recognised += 1
        self._outcome()
        return pushing

    @property
    def pushing(self) -> bool:
        """The provider refuses now, as push-back (until something is accepted again)."""
        return self.refused >= self.after

    def verdict(self, timeout: float = HOLD) -> bool:
        """For a refusal that was not (yet) push-back: wait up to `timeout` for the next
        transaction's outcome; whether the provider is pushing back then."""
        if self.pushing:
            return True
        seen = self.recognised
        self._next.wait(timeout)
        return self.pushing or self.recognised > seen

    def _outcome(self) -> None:
        """Wake the refusals waiting for a verdict, and be ready for the next outcome."""
        waiting, self._next = self._next, Event()
        waiting.set()
