"""What the limits leased from the cluster's Redis share: a cluster rate's turns
(engine.cluster_rate) and an hourly budget's blocks (engine.cluster_hourly).

- **One lease in flight** (`InFlight`): a worker asks Redis for one batch at a time; the
  messages that need one meanwhile wait for its answer and take from it, so a burst of
  messages costs one round trip, not one each, and the batch is sized for all of them
  (`waiting`).
- **Rejoining** (`Rejoining`): back from fallback (Redis unreachable, engine.cluster), a
  worker keeps to its fallback share a while. The others may still be alone, sending
  what Redis does not know of (a rate's turns on their own schedules; a budget's
  messages, counted there only at their next lease), and Redis's figures (an empty
  Redis's above all) make the first worker back look alone: taking what Redis offers
  then sends more than the limit. The guard ends once as many workers lease as it last
  saw, or after its `window` (the others' retry, and what they were given alone).

Worker side: waiting for the lease in flight uses gevent.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

from gevent.event import Event


class InFlight:
    """The lease one limit has in flight, if any, and the messages waiting for it."""

    def __init__(self) -> None:
        self._done: Event | None = None  # set when the lease in flight is answered
        self.waiting = 0  # messages waiting for it

    @property
    def busy(self) -> bool:
        return self._done is not None

    def join(self) -> bool:
        """Wait for the lease in flight, if any (what it leases is for this message too):
        whether there was one."""
        done = self._done
        if done is None:
            return False
        self.waiting += 1
        try:
            done.wait()
        finally:
            self.waiting -= 1
        return True

    @contextmanager
    def leasing(self) -> Iterator[None]:
        """This message leases: the others join it until it is answered (or fails)."""
        done = self._done = Event()
        try:
            yield
        finally:
            self._done = None
            done.set()


class Rejoining:
    """Whether a worker is back from fallback and keeps to its fallback share (`share`):
    from its first lease Redis answers after a fallback for `window` seconds, or until as
    many workers lease as it last saw before."""

    def __init__(self, window: float) -> None:
        self.window = window
        self.until = -math.inf  # rejoining until then (the worker's clock)
        self.alone = False  # its last lease went unanswered: in fallback
        self.share = 0.0  # its share in fallback (of the rate, of the budget): kept rejoining
        self._seen = 0  # the workers it last saw share the limit, when Redis went

    def fell_back(self, share: float) -> None:
        """A lease Redis did not answer: the worker goes on alone, at `share`."""
        self.alone, self.share = True, share

    def active(self, now: float) -> bool:
        """Alone until now (rejoining if Redis answers this lease), or rejoining."""
        return self.alone or now < self.until

    def answered(self, now: float, members: int, seen: int) -> None:
        """Redis answered a lease: `members` lease now; `seen`: as many as the worker knew
        of before this answer (those it saw before Redis went, if it was alone)."""
        if self.alone:  # back from fallback: the others may not be yet
            self.alone = False
            self.until = now + self.window
            self._seen = seen
        if members >= self._seen:  # all it last saw lease again: Redis holds all
            self.until = -math.inf
