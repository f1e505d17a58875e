"""Waiting out a worker short of file descriptors (EMFILE, ENFILE).

Every new SMTP connection needs a socket, and a DNS lookup one more. A worker at its
RLIMIT_NOFILE (or a machine at its file-max) cannot open them; that is no fault of the
destination nor of the message, and sockets come free as connections close. So a connect or
lookup that fails so (`reply.DescriptorsExhausted`, made by engine.classify) is not an
attempt: the delivery waits `BACKOFF` seconds or so and tries again (engine.delivery), taking
an idle connection if one came back meanwhile. Each wait counts the `fd_exhausted` metric;
the warning log line says so at most once every `WARN_EVERY` seconds, with how many waits
there were since. A delivery waits so for at most `WAIT_MAX` seconds: then its recipients go
back to the spool without an attempt (engine.delivery), rather than hold their task past the
supervisor's hand-out deadline, which would hand the job out again while it still waits here.
"""
from __future__ import annotations

import logging
import random
import resource
import time
from collections.abc import Callable

import gevent

from engine import logs
from engine.metrics import Metrics
from engine.reply import DescriptorsExhausted

log = logging.getLogger("mailengine.worker")

# Seconds a connect or lookup waits before trying again: long enough for a few transactions
# to end and close or give back their connections, short next to any SMTP timeout. Spread
# by a random half, so that a thousand waiting greenlets do not retry in one loop turn.
BACKOFF = 0.2
WARN_EVERY = 10.0
WAIT_MAX = 30.0  # seconds one delivery waits for descriptors before it gives its task back


class Descriptors:
    """One worker's waits for file descriptors: counted, logged (rate-limited), spread."""

    def __init__(self, metrics: Metrics, clock: Callable[[], float] = time.monotonic) -> None:
        self._metrics = metrics
        self._clock = clock
        self.waits = 0  # since the start
        self._unlogged = 0  # since the last warning
        self._warned_at = -WARN_EVERY

    def now(self) -> float:
        """This clock's time: where a delivery's wait starts (`wait`'s `since`)."""
        return self._clock()

    def wait(self, provider: str, err: DescriptorsExhausted, since: float) -> None:
        """After `err`: count it, warn now and then, and sleep a short while; `err` again
        when the delivery has waited since `since` (this clock) for WAIT_MAX already."""
        if self._clock() - since >= WAIT_MAX:
            log.warning(logs.kv("fd_wait_gave_up", provider=provider,
                                seconds=round(self._clock() - since, 1),
                                effect="recipients back to the spool, no attempt"))
            raise err
        self.waits += 1
        self._unlogged += 1
        self._metrics.incr("fd_exhausted", provider)
        now = self._clock()
        if now - self._warned_at >= WARN_EVERY:
            soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
            log.warning(logs.kv("fd_exhausted", provider=provider, waits=self._unlogged,
                                limit=soft, error=err.reply.text))
            self._warned_at = now
            self._unlogged = 0
        gevent.sleep(BACKOFF * (0.5 + random.random()))
