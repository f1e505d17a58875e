"""Per-provider gauges sent when they change, and otherwise refreshed slowly.

A worker holds a shaper per provider it sent to, ten thousand after a burst to as many
domains, until `shaping.forget_after` (engine.shaping_idle). Its gauges (`allowed_rate`,
`suspended`) sent for every one of them every second were up to 20,000 StatsD lines a second
from one worker, nearly all repeating the value before: a StatsD server keeps a gauge's last
value until it is sent again (etsy statsd flushes it every interval while `deleteGauges` is
off, its default; statsd_exporter holds it while the mapping's `ttl` is 0, as shipped).

So a provider's gauge goes out at the report after its value changed, and otherwise once
every REFRESH seconds, for a StatsD server restarted meanwhile (it knows every gauge again
within REFRESH) and for a graph whose window holds no change. Each provider's refresh falls
at its own point of the REFRESH cycle (a hash of its name), so N providers held unchanged
cost about N / REFRESH refreshes a second, never a burst of N at once. A provider forgotten
(`forget`: forgotten idle) is forgotten here too: nothing more is sent for it, and made anew
it is sent at once.

Nor is every provider looked at every second: a report is given the rows of those that may
have changed (engine.shaping: the active ones), and visits the others only when their
refresh falls due, from a wheel of SLOTS slots by their point of the cycle. A report looks
at the active providers and about N / SLOTS of the rest (two slots' worth at most, the one
it left off in and the one it reaches), not at all N held.
"""
from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Iterable, Sequence

from engine.metrics import Metrics

# Seconds between two sends of a gauge that did not change. A minute: at 10,000 providers
# two gauges each make ~330 lines a second (from 20,000); a restarted StatsD server, or a
# graph over the last minute, sees each one; the shipped StatsD and statsd_exporter configs
# keep a gauge's value until it is sent again (docs/METRICS.md), so a graph of 10 s points
# has no gaps. Shorter costs lines in proportion; longer leaves a restarted server blind
# to a provider for longer.
REFRESH = 60.0
# The refresh wheel's slots (a second each at REFRESH 60): a report visits the slots its
# time went through since the last one, and in them the providers whose refresh is due.
SLOTS = 60

Row = tuple[str, Sequence[float]]  # a provider, and its gauges' values in `names` order
Values = Callable[[str], Sequence[float] | None]  # a provider's values now; None: not held


class QuietGauges:
    """The gauges `names` of every provider a worker reports, each sent at a change or a
    refresh due (see the module's docstring)."""

    def __init__(self, metrics: Metrics, names: Sequence[str], refresh: float = REFRESH,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._metrics = metrics
        self.names = tuple(names)
        self.refresh = refresh
        self._clock = clock
        # provider -> (the values last sent, the refresh cycle they were sent in)
        self._sent: dict[str, tuple[tuple[float, ...], int]] = {}
        # The providers held, by the slot of the cycle where their refresh falls.
        self._wheel: list[set[str]] = [set() for _ in range(SLOTS)]
        self._last: float | None = None  # the last report's time

    def report(self, changed: Iterable[Row], values: Values) -> int:
        """Send what changed of the providers in `changed` (those whose values may differ
        from the last sent: each new one in full), and the refreshes due of every provider
        held, whose values now `values` gives (None: no longer held, forgotten here). How
        many gauges were sent."""
        now = self._clock()
        sent = 0
        for provider, current in changed:
            sent += self._send(provider, tuple(current), now)
        for provider in self._due(now):
            held = values(provider)
            if held is None:
                self.forget([provider])
            else:
                sent += self._send(provider, tuple(held), now)
        self._last = now
        return sent

    def forget(self, providers: Iterable[str]) -> None:
        """Providers no longer held: nothing more is sent for them; reported again, they
        are new."""
        for provider in providers:
            if self._sent.pop(provider, None) is not None:
                self._wheel[self._slot(provider)].discard(provider)

    def _send(self, provider: str, current: tuple[float, ...], now: float) -> int:
        """Send a provider's gauges that changed, or all of them if it is new or its
        refresh is due; how many."""
        last = self._sent.get(provider)
        if last is None:
            self._wheel[self._slot(provider)].add(provider)
        cycle = self._cycle(provider, now)
        sent = 0
        for i in self._to_send(last, current, cycle):
            self._metrics.gauge(self.names[i], provider, current[i])
            sent += 1
        self._sent[provider] = (current, cycle)
        return sent

    def _to_send(self, last: tuple[tuple[float, ...], int] | None,
                 current: tuple[float, ...], cycle: int) -> Iterable[int]:
        """Which of a provider's gauges go out: all when it is new or its refresh is due
        (a new cycle began), else those whose value changed."""
        if last is None or last[1] != cycle:
            return range(len(current))
        if last[0] == current:
            return ()
        return [i for i, (was, now) in enumerate(zip(last[0], current, strict=True))
                if was != now]

    def _due(self, now: float) -> list[str]:
        """The providers whose refresh fell due since the last report: those of the slots
        from the last report's to now's (all of them after nearly a whole cycle), whose cycle
        changed since they were last sent."""
        if self._last is None:
            return []
        if now - self._last >= self.refresh * (SLOTS - 1) / SLOTS:  # it may wrap around
            slots: Iterable[int] = range(SLOTS)
        else:
            first, last = self._slot_at(self._last), self._slot_at(now)
            slots = [(first + i) % SLOTS for i in range((last - first) % SLOTS + 1)]
        return [provider for slot in slots for provider in self._wheel[slot]
                if self._sent[provider][1] != self._cycle(provider, now)]

    @property
    def providers(self) -> int:
        """Providers held: reported and not forgotten since."""
        return len(self._sent)

    def _offset(self, provider: str) -> float:
        """Where the provider's cycles start, ahead of the clock's: a hash of its name, the
        same in every process, so that refreshes spread."""
        return zlib.crc32(provider.encode("utf-8", "replace")) / 2**32 * self.refresh

    def _cycle(self, provider: str, now: float) -> int:
        """Which REFRESH cycle `now` is in, for this provider (its cycles start at its own
        offset)."""
        return int((now + self._offset(provider)) // self.refresh)

    def _slot(self, provider: str) -> int:
        """The slot of the wheel where the provider's cycles begin (`_slot_at` that time)."""
        return self._slot_at(-self._offset(provider))

    def _slot_at(self, when: float) -> int:
        """The slot of the wheel the clock is in at `when`."""
        return int((when % self.refresh) / self.refresh * SLOTS) % SLOTS
