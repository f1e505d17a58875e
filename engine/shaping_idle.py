"""Idle providers: which providers' shaping state a worker shows, and which it forgets.

A worker makes a shaper (engine.shaping.ProviderShaper) for each provider it sends to. A
burst to ten thousand domains, each with its own MX host, makes ten thousand: kept for the
worker's life and all reported every second, the `status` answer was 2.8 MB and took a
third of a second (docs/PERFORMANCE.md, "Many destinations"). So:

- **Shown** (`worth_showing`): the worker's report every second, hence `mailengine status`,
  lists only the providers with something to show: mail sent in the last 10 s, messages
  waiting for a turn, connections open, a suspension, a throttle received, a limit learned
  (its own or the cluster's). The others are counted (`shaping_idle`), not listed.
- **Active** (engine.shaping.Shaping.active_gauges): the report does not ask this of every
  provider held, only of the active ones: those a change since the last report marked
  (`ProviderShaper.mark_active`: a turn, a connection let in, a reply judged, a suspension,
  a limit, a shaper made) and those still worth showing. One with nothing left to show
  leaves them at the report that finds so; whatever could make it worth showing again, or
  change its gauges, marks it first, and what ends with time alone (the current rate's 10 s,
  a suspension) ends while it is active. So a second's report costs in proportion to the
  providers with something going on, not to the ten thousand held idle (docs/PERFORMANCE.md,
  "Idle providers' StatsD gauges"); their gauges' refreshes are engine.quiet_gauges'.
- **Forgotten** (`forgettable`): a shaper no message asked for (engine.shaping.Shaping.get)
  for `shaping.forget_after`, with nothing it must keep, is dropped, and made anew when mail
  comes again, as a restarted worker makes it: what must survive goes to the store a restart
  reads (the learned rate and limit, kept `throttle.remember`; today's warm-up count). It is
  kept while a connection to the provider is open or awaited, or a pool still holds its
  connection gate (a new gate beside it would let more connections in than allowed; pools go
  after `pool.idle_timeout`, engine.pools); while messages wait for a turn; while a
  suspension runs (its own, the operator's, one followed from the cluster); while the hourly
  cap counts messages of the last hour; while the rate is in backoff (probes only: made anew,
  it would go at the learned rate at once), at most engine.rate.PROBE_MAX longer; and, when
  `throttle.remember` is 0 (nothing learned is restored), while it learned something.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from engine.rate import BACKOFF, PROBE_MAX

if TYPE_CHECKING:
    from engine.shaping import ProviderShaper


def worth_showing(shaper: ProviderShaper) -> bool:
    """Whether `status` lists the provider: anything going on, or learned."""
    return bool(shaper.gate.open or shaper.pacer.waiting or shaper.suspended
                or shaper.triggers or shaper.rate.limit is not None
                or shaper.seeded is not None or shaper.current_rate() > 0)


def forgettable(shaper: ProviderShaper, now: float, after: float) -> bool:
    """Whether the shaper may be dropped at `now`: unused for `after` seconds (longer in
    backoff), and nothing it must keep."""
    unused = now - shaper.last_used
    if unused < after:  # first: the cheap test that keeps the busy ones
        return False
    if shaper.rate.phase == BACKOFF and unused < after + PROBE_MAX:
        return False
    return not (shaper.gate.in_use or shaper.pacer.waiting or shaper.suspended
                or shaper.caps.counted_this_hour()
                or (shaper.rate.learning and shaper.throttle.remember <= 0))
