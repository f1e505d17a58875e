"""Whether the spool can be written: a full disk or an I/O error, and the way back.

A spool write can fail without the spool being damaged: the filesystem is full, or
the disk returned an I/O error. Nothing is lost by it (the failed transaction is
rolled back, and what was committed before stays), so the engine neither exits nor
stops delivering. While writes fail:

- intake stops reading the ingest socket: no job is acknowledged (`queued`) that is
  not durable, so producers keep their copy and send it again, and ZeroMQ's
  high-water mark pushes back on them (engine.intake);
- results that cannot be recorded wait in memory, in order, and are recorded (then
  published) when a write succeeds again; while too many wait, no new work is handed
  out (engine.results, engine.dispatch);
- every RETRY_AFTER seconds the next write is tried again (the next intake batch, or
  the results waiting): the first that succeeds ends the state.

`SpoolHealth` is the one record of that state: the parts report each write's outcome,
and it logs the change both ways (a warning, once each), counts the failures and
says, for `mailengine status` and the `spool_unwritable` gauge, whether writes fail.
"""
from __future__ import annotations

import logging
import time

from engine import logs
from engine.metrics import Metrics

log = logging.getLogger("mailengine.supervisor")

RETRY_AFTER = 1.0  # seconds between tries of a spool that could not be written


class SpoolHealth:
    """The outcome of the spool's last writes, shared by intake, results and dispatch."""

    def __init__(self, metrics: Metrics | None = None) -> None:
        self._metrics = metrics or Metrics(None, "supervisor")
        self.failing_since: float | None = None  # monotonic; None while writes succeed
        self.error = ""  # the last failure's message
        # When each part (intake, results...) may try again: one clock per part, so that
        # results failing again and again do not keep intake from ever trying.
        self._next_try: dict[str, float] = {}

    @property
    def writable(self) -> bool:
        return self.failing_since is None

    def may_write(self, part: str) -> bool:
        """Whether `part` may try a write now: always while writes succeed, else once per
        RETRY_AFTER (a write that fails costs little, but reading a batch of jobs off
        the ingest socket only to drop them does)."""
        return (self.failing_since is None
                or time.monotonic() >= self._next_try.get(part, 0.0))

    def wait_left(self, part: str) -> float:
        """Seconds until `part` may try a write again (0 while writes succeed)."""
        if self.failing_since is None:
            return 0.0
        return max(0.0, self._next_try.get(part, 0.0) - time.monotonic())

    def failed(self, part: str, error: Exception) -> None:
        """A write of `part` (intake, results, prune) failed; it tries again later."""
        now = time.monotonic()
        self._next_try[part] = now + RETRY_AFTER
        self.error = str(error)
        self._metrics.incr("spool_write_errors", "all")
        if self.failing_since is None:
            self.failing_since = now
            self._metrics.gauge("spool_unwritable", "all", 1)
            log.warning(logs.kv("spool_unwritable", failed=part, error=error,
                                effect="intake paused; delivery goes on; results wait"))

    def succeeded(self) -> None:
        """A write went through: intake resumes, waiting results are recorded."""
        if self.failing_since is None:
            return
        seconds = time.monotonic() - self.failing_since
        self.failing_since = None
        self.error = ""
        self._next_try.clear()
        self._metrics.gauge("spool_unwritable", "all", 0)
        log.warning(logs.kv("spool_writable", after_seconds=round(seconds, 1)))

    def state(self) -> dict[str, object]:
        """For `mailengine status`."""
        return {"writable": self.writable, "error": self.error or None,
                "failing_for": None if self.failing_since is None
                else round(time.monotonic() - self.failing_since, 1)}
