"""The allowed rate of one sending IP x provider: found, lowered when pushed back, regained.

A receiver's limit is found the way TCP finds a path's capacity, clocked by its replies:

- **start** (slow start): nothing learned yet. The rate starts at `throttle.start_rate` and,
  while the pace is what holds mail back (`binding`: turns had to wait), every clean reply
  raises it, as TCP's window grows by a segment per acknowledgement and so doubles every
  round trip: replies come at the rate, so each adds ln 2 / the transaction time (smoothed),
  and `throttle.growth` messages/s at least. A fast willing receiver is at full speed within
  tens of milliseconds (the loopback benchmarks keep their figures), a slow one sees the rate
  grow at its own pace, and what goes past a limit before the receiver pushes back is what
  is in flight then. The configured `rate` caps it. (Regressions: growing by a fraction per
  reply blew up in finite time; a fixed 5/s per reply cost the loopback benchmarks 40%.)
- **push-back** (a throttle rule, or refusals recognised by behaviour: engine.pushback),
  answered once per episode (engine.shaping counts only refusals of mail sent since the last
  answer). The receiver's limit is estimated as what it accepted since the last push-back,
  per second: the last push-back found its bucket empty (or its window used up), so what it
  let through since is what it refills, a token bucket's rate or a fixed window's average.
  The allowed rate goes to 95% of that estimate (over a second at least: what a fast slow
  start got through in a tenth of one is that many per second). Too little accepted to
  tell (refused at once): the rate is multiplied by `throttle.decrease` instead, and that is
  taken as the limit until a probe says more.
- **backoff**: after a push-back that found the limit lower (or none to go by), only probes
  go out, one every `throttle.probe_interval`, until one is accepted: a window that is used up
  is not knocked on at the full rate. A backoff that lasts probes more rarely (a fifth of the
  time it has lasted, at most every PROBE_MAX). A limit confirmed (within 20%) or found
  higher needs no pause.
- **steady**: at 95% of the limit, back within RECOVERY seconds after a decrease. After
  `throttle.probe_every` seconds of clean sending there, a probe: growth as in slow start but
  PROBE_SHARE as fast (the limit is near: what a probe sends past it is refused) until the
  provider pushes back and says where its limit is now (a second later when the last probe
  found it higher: a raised limit is climbed quickly).

Nothing here sleeps or knows gevent: engine.shaping asks and tells, with its clock's time.
What is learned (the rate, the limit) is kept across restarts by engine.shaping.
"""
from __future__ import annotations

import math
from typing import Any

from engine.config import ThrottleConfig

START, STEADY, BACKOFF = "start", "steady", "backoff"
RECOVERY = 10.0  # s: after a decrease, back to 95% of the limit within this long
TARGET = 0.95  # of the estimated limit: where the rate settles
CONFIRMED = (0.8, 1.25)  # an estimate within these of the last one confirms it
# Too little to go by: an estimate needs MIN_ACCEPTED messages over MIN_SPAN at least.
# Regression (a restart's first probe): three messages in a tenth of a second, padded to
# half a second, made a limit of 6/s out of a bucket of 40/s.
MIN_SPAN = 1.0  # s
MIN_ACCEPTED = 3  # messages
RISING_PROBE = 1.0  # s: the next probe after one that found the limit higher
# A backoff that lasts: probes every probe_interval at first, then every PROBE_STRETCH of the
# time it has lasted, at most PROBE_MAX apart: a provider that refuses for an hour is knocked
# on every five minutes by then, not every second.
PROBE_STRETCH = 0.2
PROBE_MAX = 300.0
PROBE_SHARE = 0.1  # a probe above a known limit grows this fraction of throttle.growth
SMOOTHING = 0.125  # of a new transaction time in the smoothed one (TCP's SRTT gain)
# Accepted in less than MIN_SPAN, this many messages say the limit is that many per MIN_SPAN
# at least (what a fast slow start got through before the first push-back).
PADDED = 10  # messages


class AllowedRate:
    """The allowed rate (messages per second, `math.inf`: no limit) and how it adapts."""

    def __init__(self, configured: float, throttle: ThrottleConfig, now: float) -> None:
        self.configured = configured or math.inf  # `rate` from config: the most, ever
        self.throttle = throttle
        self.limit: float | None = None  # the receiver's limit, as estimated
        self.phase = START if throttle.slow_start else STEADY
        self.rate = min(self.configured, throttle.start_rate) if throttle.slow_start \
            else self.configured
        self._initial = self.rate
        self.pushbacks = 0
        self._anchor = now  # accepted messages are counted from here for the estimate
        self._accepted = 0
        self._recover_from = 0.0  # the rate right after the last decrease
        self._decreased_at = -math.inf
        self._steady_since = now  # clean at the target since, for the next probe
        self._rising = False  # the last probe found the limit higher: probe again soon
        self._backoff_since = now
        self._probe_gap = throttle.probe_interval  # between probes in backoff
        self._transaction: float | None = None  # s: a transaction's time, smoothed

    # -- what the shaper asks ------------------------------------------------------------

    def spacing(self) -> float:
        """Seconds between turns now: 0 without a limit; a probe at a time in backoff."""
        if self.phase == BACKOFF:
            return max(self._probe_gap, 1.0 / self.rate)
        return 0.0 if self.rate == math.inf else 1.0 / self.rate

    def time_for(self, turns: int) -> float:
        """Seconds the next `turns` turns take at the rate, as it would grow in slow start
        with every turn accepted (a projection: a push-back re-plans the line)."""
        gap = self.spacing()
        if turns <= 0 or gap == 0.0:
            return 0.0
        if self.phase == BACKOFF:  # a probe, then (once one is accepted) the lowered rate
            return gap + (turns - 1) / self.rate
        if self.phase != START or self.rate >= self.configured:
            return turns * gap
        # Turn k's gap is 1 / (rate + k * growth): their sum is at most the first gap plus
        # the integral over the rest, ln((rate + (n - 1) * growth) / rate) / growth.
        growth = self.growth
        growing = turns
        if self.configured != math.inf:  # grows until the configured rate, then holds it
            growing = min(turns, math.ceil((self.configured - self.rate) / growth))
        total = gap + math.log((self.rate + (growing - 1) * growth) / self.rate) / growth
        return total + (turns - growing) / self.configured if turns > growing else total

    @property
    def growth(self) -> float:
        """Messages/s a clean reply adds in the start phase. Slow start's (nothing learned):
        enough to double the rate every transaction time, as TCP's window doubles every
        round trip (replies come at the rate: ln 2 / the transaction time per reply), and
        `throttle.growth` at least; a probe's above a known limit: PROBE_SHARE of
        `throttle.growth`."""
        if self.limit is not None:
            return self.throttle.growth * PROBE_SHARE
        if self._transaction:
            return max(self.throttle.growth, math.log(2) / self._transaction)
        return self.throttle.growth

    # -- what the shaper tells -------------------------------------------------------------

    def clean(self, now: float, binding: bool, seconds: float | None = None) -> None:
        """A delivery accepted; `binding`: turns waited for the pace lately; `seconds`: the
        transaction's time on its connection (MAIL to the final reply)."""
        self._accepted += 1
        if seconds is not None and seconds > 0:
            self._transaction = seconds if self._transaction is None else \
                self._transaction + SMOOTHING * (seconds - self._transaction)
        if self.phase == BACKOFF:  # the probe went through: send again
            self.phase = STEADY
            self._steady_since = now
        if self.phase == START:
            if binding:
                self.rate = min(self.configured, self.rate + self.growth)
            return
        self._regain(now)

    def pushback(self, now: float) -> None:
        """The provider pushed back on mail sent since the last answer: estimate its limit,
        lower the rate. In backoff already (only probes go), nothing more."""
        if self.phase == BACKOFF:  # a probe refused: the longer it lasts, the rarer they get
            stretched = PROBE_STRETCH * (now - self._backoff_since)
            self._probe_gap = max(self.throttle.probe_interval, min(PROBE_MAX, stretched))
            return
        self.pushbacks += 1
        self._decreased_at = now
        estimate, previous = self._estimate(now), self.limit
        if estimate is None:  # refused at once: too little accepted to tell
            base = self.throttle.start_rate if self.rate == math.inf else self.rate
            rate = self.throttle.decrease * base
            self.limit = rate / TARGET  # a guess: the next probe comes soon to correct it
            self._rising = True
            self._lower(rate, now, BACKOFF)
            return
        self.limit = estimate
        lower = previous is not None and estimate <= CONFIRMED[0] * previous
        self._rising = previous is not None and estimate >= CONFIRMED[1] * previous
        self._lower(TARGET * estimate, now, BACKOFF if lower or previous is None else STEADY)

    def _lower(self, rate: float, now: float, phase: str) -> None:
        if phase == BACKOFF:
            self._backoff_since, self._probe_gap = now, self.throttle.probe_interval
        self.rate = max(self.throttle.min_rate, min(self.configured, rate))
        self._recover_from = self.rate
        self._anchor, self._accepted = now, 0
        self.phase = phase
        self._steady_since = now

    # -- learning that survives a restart ---------------------------------------------------

    @property
    def learning(self) -> bool:
        """Something was learned worth keeping: a limit, or a rate grown from the start."""
        return self.limit is not None or self.rate != self._initial

    def learned(self) -> dict[str, Any]:
        rate = None if self.rate == math.inf else self.rate
        return {"rate": rate, "limit": self.limit, "pushbacks": self.pushbacks}

    def restore(self, learned: dict[str, Any], now: float) -> None:
        """What an earlier worker learned: straight to that rate, not from the start."""
        rate, limit = learned.get("rate"), learned.get("limit")
        if not isinstance(rate, int | float) or not rate > 0:
            return
        self.rate = min(self.configured, float(rate))
        if isinstance(limit, int | float) and limit > 0:
            self.limit = float(limit)
            # Saved while probing, the rate is the probe's, grown for a moment far above
            # the limit: go on where it settles, not at that.
            self.rate = min(self.rate, TARGET * self.limit)
        self.phase = STEADY if self.limit is not None else START  # no limit yet: grow on
        self._recover_from = self.rate
        self._anchor, self._steady_since = now, now

    # -- internals -------------------------------------------------------------------------

    def _estimate(self, now: float) -> float | None:
        """Messages accepted per second since the anchor (the last push-back, or the start
        of the growth that led here): over MIN_SPAN at least, with PADDED messages or more
        in a shorter span; None with too little to go by."""
        span = now - self._anchor
        if self._accepted < MIN_ACCEPTED or (span < MIN_SPAN and self._accepted < PADDED):
            return None
        return self._accepted / max(span, MIN_SPAN)

    def _regain(self, now: float) -> None:
        """Steady: recover towards the target, hold it, and probe above it now and then."""
        if self.limit is None:
            return
        target = min(self.configured, TARGET * self.limit)
        if self.rate < target:
            step = max(self.throttle.increase,
                       (target - self._recover_from) / RECOVERY) / self.rate  # per message
            self.rate = min(target, self.rate + step)
            self._steady_since = now
        elif now - self._steady_since >= self._probe_after() and self.rate < self.configured:
            self.phase = START  # probe: grow until the provider says where its limit is

    def _probe_after(self) -> float:
        return RISING_PROBE if self._rising else self.throttle.probe_every
