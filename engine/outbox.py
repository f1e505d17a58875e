"""The outbox: no final event is lost to a crash between the spool's commit and its publishing.

A recipient's final outcome (delivered, bounced, expired) and the event that announces it are
written to the spool in one transaction (`Spool.record(..., finals=)`), then published at once
(the PUB socket, the events log). A kill -9 between the two used to leave the recipient
final with no event, and nothing would ever publish it: the producer's ledger stayed open.

Each event stays in the spool's `outbox` table until the events log holding it is fsynced
(`confirm`, every housekeeping turn and at the stop): then the rows are deleted, and where the
log stood is remembered. At the next start (`replay`), the rows still there are published
again; those the log already has after that mark (written before the kill, not yet
confirmed) are sent to the subscribers only, so the log holds each line once.

A subscriber may therefore see a final event twice across a crash of the supervisor
(identical lines: same `ts`): it keeps the first (docs/EVENTS.md).
"""
from __future__ import annotations

import logging
import os

from engine import logs
from engine.events import EventPublisher
from engine.metrics import Metrics
from engine.spool import Spool

log = logging.getLogger("mailengine.supervisor")

# Of the events log, `replay` reads what came after the mark; without one (a rotated log, a
# spool from before the outbox), at most its last TAIL_MAX bytes.
TAIL_MAX = 64 * 1024 * 1024


class Outbox:
    """The spool's outbox and the publisher it feeds."""

    def __init__(self, spool: Spool, publisher: EventPublisher, metrics: Metrics) -> None:
        self._spool = spool
        self._publisher = publisher
        self._metrics = metrics

    def replay(self) -> int:
        """At start: publish the events a crash left unconfirmed; returns how many."""
        left = self._spool.unpublished()
        if not left:
            return 0
        logged = _lines_since(self._publisher.log_path, self._spool.log_mark())
        already = 0
        for name, line in left:
            in_log = line in logged
            already += in_log
            self._publisher.publish((name, line), to_log=not in_log)
        self._metrics.incr("events_replayed", "all", len(left))
        log.warning(logs.kv("events_replayed", events=len(left), already_logged=already))
        self.confirm()
        return len(left)

    def confirm(self) -> None:
        """The events published so far are in the synced log: their rows go. A log that
        failed meanwhile (a full disk) first gets back the final events it missed (from
        the rows); while it cannot be written, or synced, the rows stay for the next turn."""
        upto = self._spool.last_event_seq
        try:
            if self._publisher.failing:
                self._publisher.repair(self._missing_from_log)
            log_at = self._publisher.sync()
        except OSError as err:
            if not self._publisher.failing:  # else said once already (events_log_unwritable)
                log.warning(logs.kv("events_log_sync_failed", error=err))
            return
        self._spool.forget_published(upto, log_at)

    def _missing_from_log(self) -> list[str]:
        """The outbox's events the log does not hold after the last confirm's mark."""
        logged = _lines_since(self._publisher.log_path, self._spool.log_mark())
        return [line for _, line in self._spool.unpublished() if line not in logged]


def _lines_since(path: str | None, mark: tuple[int, int] | None) -> set[str]:
    """The lines of the events log after `mark` (inode, size) when it is still the same
    file, at most its last TAIL_MAX bytes. Small: the outbox is emptied every few seconds,
    so the log gained little since the mark."""
    if path is None:
        return set()
    try:
        with open(path, "rb") as f:
            info = os.fstat(f.fileno())
            start = max(0, info.st_size - TAIL_MAX)
            if mark is not None and mark[0] == info.st_ino and mark[1] <= info.st_size:
                start = max(start, mark[1])
            f.seek(start)
            data = f.read(TAIL_MAX)  # bounded: a device (/dev/full) reads for ever
    except FileNotFoundError:
        return set()
    return {line.decode("utf-8", "replace") for line in data.split(b"\n") if line}
