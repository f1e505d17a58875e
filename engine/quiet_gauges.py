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
cost about N / REFRESH refreshes a second, never a burst of N at once. A provider no longer
reported (forgotten idle) is forgotten here too: nothing more is sent for it, and made anew
it is sent at once.
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

Row = tuple[str, Sequence[float]]  # a provider, and its gauges' values in `names` order


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

    def report(self, rows: Iterable[Row]) -> int:
        """Send what changed or is due of every provider in `rows`, every provider held;
        those left out are forgotten. How many gauges were sent."""
        now = self._clock()
        held: dict[str, tuple[tuple[float, ...], int]] = {}
        sent = 0
        for provider, values in rows:
            current, cycle = tuple(values), self._cycle(provider, now)
            for i in self._to_send(self._sent.get(provider), current, cycle):
                self._metrics.gauge(self.names[i], provider, current[i])
                sent += 1
            held[provider] = (current, cycle)
        self._sent = held
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

    @property
    def providers(self) -> int:
        """Providers whose gauges were reported last time (the others are forgotten)."""
        return len(self._sent)

    def _cycle(self, provider: str, now: float) -> int:
        """Which REFRESH cycle `now` is in, for this provider: its cycles start at its own
        offset (a hash of its name, the same in every process), so refreshes spread."""
        offset = zlib.crc32(provider.encode("utf-8", "replace")) / 2**32 * self.refresh
        return int((now + offset) // self.refresh)
