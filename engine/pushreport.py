"""What `mailengine push` tells its user: progress while it runs, one summary at the end.

The summary stays a few lines whatever the number of jobs: accepted; rejected, counted
by reason with the first few ids of each; not acknowledged, a count and the first few
ids; and, when pushing to several hosts, how many each host accepted. Progress is a tqdm
bar on a terminal (answered of total, the rate, the time left, and the counts accepted and
rejected), and a plain line every PLAIN_EVERY seconds otherwise (a log, a pipe: no
carriage returns).
"""
from __future__ import annotations

import itertools
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, TextIO

from tqdm import tqdm

FIRST_IDS = 5  # ids shown per reason, and of the jobs not acknowledged
MAX_REASONS = 20  # distinct rejection reasons kept; the rest are counted together
PLAIN_EVERY = 5.0  # seconds between progress lines when standard error is not a terminal
BAR_EVERY = 0.2  # seconds between redraws of the bar, at most
OTHER = "other reasons"


@dataclass
class Reason:
    count: int = 0
    first_ids: list[str] = field(default_factory=list)

    def add(self, job_id: str) -> None:
        self.count += 1
        if len(self.first_ids) < FIRST_IDS:
            self.first_ids.append(job_id)


@dataclass
class Tally:
    """The outcome of a push, in memory bounded by MAX_REASONS x FIRST_IDS."""
    total: int
    accepted: int = 0
    rejected: dict[str, Reason] = field(default_factory=dict)
    unacknowledged: Reason = field(default_factory=Reason)
    stopped: str | None = None  # why reading the sources stopped, if it did
    hosts: list[str] = field(default_factory=list)  # each host's ingest, when several
    by_host: dict[str, int] = field(default_factory=dict)  # accepted, by host's ingest

    @property
    def rejected_count(self) -> int:
        return sum(r.count for r in self.rejected.values())

    @property
    def answered(self) -> int:
        return self.accepted + self.rejected_count

    def accept(self, host: str) -> None:
        """A job acknowledged (`queued`, or `queued` as a duplicate) by `host`."""
        self.accepted += 1
        self.by_host[host] = self.by_host.get(host, 0) + 1

    def reject(self, reason: str, job_id: str) -> None:
        if reason not in self.rejected and len(self.rejected) >= MAX_REASONS:
            reason = OTHER
        self.rejected.setdefault(reason, Reason()).add(job_id)

    def unanswered(self, first_ids: Iterable[str], count: int) -> None:
        self.unacknowledged.count = count
        self.unacknowledged.first_ids = list(itertools.islice(first_ids, FIRST_IDS))

    def exit_status(self) -> int:
        if self.stopped is not None:
            return 2
        return 0 if self.accepted == self.total else 1

    def lines(self, ingest: str) -> list[str]:
        """The summary: a first line of counts, then a line per reason."""
        lines = [f"{self.accepted} of {self.total} accepted, {self.rejected_count} rejected,"
                 f" {self.unacknowledged.count} not acknowledged"]
        for reason, seen in sorted(self.rejected.items(), key=lambda kv: -kv[1].count):
            lines.append(f"  rejected {seen.count}: {reason} ({_ids(seen)})")
        if self.unacknowledged.count:
            lines.append(f"  not acknowledged {self.unacknowledged.count}: is the engine"
                         f" running, at {ingest}? ({_ids(self.unacknowledged)})")
        if self.stopped is not None:
            lines.append(f"  stopped reading: {self.stopped}")
        if len(self.hosts) > 1:
            lines.extend(f"  accepted by {host}: {self.by_host.get(host, 0)}"
                         for host in self.hosts)
        return lines


def _ids(reason: Reason) -> str:
    more = reason.count - len(reason.first_ids)
    return ", ".join(reason.first_ids) + (f" and {more} more" if more > 0 else "")


class Progress:
    """A bar on a terminal, plain lines otherwise; nothing when `enabled` is False."""

    def __init__(self, stream: TextIO, enabled: bool, waiting_for: str) -> None:
        self.stream = stream
        self.enabled = enabled
        self.terminal = stream.isatty()
        self.waiting_for = waiting_for
        self._last_line = time.monotonic()
        self._bar: tqdm[Any] | None = None

    def show(self, tally: Tally) -> None:
        if not self.enabled or tally.total < 2:
            return
        if self.terminal:
            self._draw(tally)
        elif time.monotonic() - self._last_line >= PLAIN_EVERY:
            self._last_line = time.monotonic()
            self.stream.write(f"mailengine push: {self._line(tally)}\n")
            self.stream.flush()

    def _draw(self, tally: Tally) -> None:
        """The bar, made at the first call; tqdm redraws it at most every BAR_EVERY s."""
        bar = self._bar
        if bar is None:
            bar = self._bar = self._new_bar(tally.total)
        if tally.answered > bar.n:
            bar.set_postfix(accepted=tally.accepted, rejected=tally.rejected_count,
                            refresh=False)
            bar.update(tally.answered - bar.n)

    def _new_bar(self, total: int) -> tqdm[Any]:
        return tqdm(total=total, file=self.stream, unit="job", desc="mailengine push",
                    postfix=f"waiting for the engine at {self.waiting_for}",
                    mininterval=BAR_EVERY, dynamic_ncols=True, leave=True)

    def _line(self, tally: Tally) -> str:
        if tally.answered == 0:
            return (f"0 of {tally.total} answered so far; waiting for the engine at"
                    f" {self.waiting_for}")
        return (f"{tally.answered} of {tally.total} answered ({tally.accepted} accepted,"
                f" {tally.rejected_count} rejected)")

    def end(self, tally: Tally) -> None:
        """The bar's last state, left on its line."""
        if self._bar is not None:
            self._draw(tally)
            self._bar.close()
            self._bar = None
