"""Traffic shaping: how fast one sending IP may send to one receiving provider.

Each worker (one sending IP) keeps a `ProviderShaper` per provider (see
`engine.provider`), built from the config's `SendingLimits` and `ThrottleConfig`
(engine.config; `ShapingPlan` says which apply to the IP). A shaper holds

- the **connection gate** (engine.gate): at most `max_connections` open
  connections to the provider across all its MX hosts, and at most
  `connection_rate` new ones per second;
- the **message pace**: transactions are spaced `1 / allowed_rate` apart. The
  allowed rate adapts (AIMD): a reply that matches a throttle rule
  (engine.classify.throttle_rule) multiplies it by `throttle.decrease` and may
  suspend the provider for a while; clean deliveries add it back step by step,
  never above the configured `rate`. The rate the provider accepted when it
  pushed back is remembered as a ceiling: the rate climbs back to just under it
  within seconds, then probes above it, more rarely each time the provider
  confirms the same limit, so throttles become rare instead of recurring on
  every sawtooth. A throttle makes every turn taken before it stale (`epoch`):
  taken again at the new rate;
- **caps**: messages per hour, and a warm-up schedule of messages per day for a
  new IP.

Waiting for a turn is never a delivery attempt. A wait longer than
`shaping.max_wait` (a suspension, a cap reached, a long queue) is not waited out
in the worker, where it would hold a slot that other providers' mail could use:
the recipients go back to the spool, due when the turn comes (`Deferral`), and
no attempt is counted.
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import gevent

from engine import classify, logs
from engine.config import (
    Config,
    PoolConfig,
    SendingLimits,
    ShapingConfig,
    ThrottleConfig,
    ThrottleRule,
    WarmupConfig,
)
from engine.gate import Clock, ConnectionGate
from engine.reply import Reply

log = logging.getLogger("mailengine.shaping")


# The adaptive rate's shape after a throttle (see ProviderShaper._increase):
RECOVERY = 10.0  # s: after a decrease, back to just under the ceiling within this long
PROBE_MIN = 0.02  # at the ceiling, probing starts at this fraction of `increase`...
PROBE_RAMP = 10.0  # ...and reaches all of it this long after the last decrease;
PROBE_RAMP_MAX = 3600.0  # doubled (up to this) each time the provider confirms its limit
PACE_LEAD = 1.0  # s: a message deferred for the pace comes back this much before its turn
RATE_WINDOW = 10.0  # s: the window of the current rate
ESTIMATE_WINDOW = 5.0  # s: the accepted rate a throttle is measured by (no older ramp in it)
MIN_SPAN = 0.1  # s: a rate is measured over at least this long


@dataclass(frozen=True)
class Deferral:
    """Not now: come back at `retry_at`. Not an attempt."""

    retry_at: float
    reason: str


# -- the per provider shaper ----------------------------------------------------------------


@dataclass
class _Window:
    """Counts in one-minute buckets over the last hour."""

    buckets: deque[tuple[int, int]] = field(default_factory=deque)  # (minute, count)

    def add(self, now: float) -> None:
        minute = int(now // 60)
        if self.buckets and self.buckets[-1][0] == minute:
            self.buckets[-1] = (minute, self.buckets[-1][1] + 1)
        else:
            self.buckets.append((minute, 1))

    def total(self, now: float) -> int:
        horizon = int(now // 60) - 59
        while self.buckets and self.buckets[0][0] < horizon:
            self.buckets.popleft()
        return sum(count for _, count in self.buckets)

    def frees_at(self) -> float:
        """When the oldest minute leaves the hour."""
        return (self.buckets[0][0] + 60) * 60.0 if self.buckets else 0.0


class ProviderShaper:
    """One sending IP x one provider: its `limits`, and how its rate adapts (`throttle`)."""

    def __init__(self, provider: str, limits: SendingLimits, throttle: ThrottleConfig,
                 max_wait: float, daily_cap: Callable[[], int | None] | None = None,
                 clock: Clock = time.monotonic, wall: Clock = time.time,
                 sleep: Callable[[float], Any] = gevent.sleep) -> None:
        self.provider = provider
        self._sleep = sleep
        self.limits = limits
        self.throttle = throttle
        self._rules = classify.throttle_rules(throttle)
        self.max_wait = max_wait
        self._daily_cap = daily_cap or (lambda: None)
        self._clock = clock
        self._wall = wall
        self.gate = ConnectionGate(limits.max_connections, limits.connection_rate, clock)
        self.allowed_rate = limits.rate  # 0: unlimited until a throttle says otherwise
        self.ceiling: float | None = None
        self.suspended_until = 0.0  # monotonic
        self.throttles = 0
        self.sent_today = 0
        self._day_start = self._day_end = 0.0  # the UTC day `_today()` last formatted
        self._today_text = ""
        self._day = self._today()
        self._next_slot = 0.0
        self._last_decrease = -1e9
        self._hour = _Window()
        self._recent: deque[float] = deque()  # send times of the last 10 s: the current rate
        self._accepted: deque[float] = deque()  # clean deliveries of the last 5 s
        self._active_since: float | None = None  # sending without a 10 s pause since
        self._probe_ramp = PROBE_RAMP
        self._recover_from = 0.0  # the allowed rate just after the last decrease
        # Bumped on every decrease and suspension: a turn taken before is stale (taken at a
        # rate the provider refused) and must be taken again before sending (see delivery).
        self.epoch = 0

    # -- taking a turn -----------------------------------------------------------

    def turn(self, again: bool = False) -> Deferral | None:
        """Wait for this message's turn (up to max_wait), or say when to come back.

        `again`: the message's turn went stale (a throttle since, see `epoch`) and is
        taken again. The caps counted it the first time: only the pace and a
        suspension apply, and it is not counted twice.
        """
        now = self._clock()
        deferral = self._suspended(now) if again else self._blocked(now)
        if deferral is not None:
            return deferral
        slot = max(now, self._next_slot)
        if slot - now > self.max_wait:
            # Back from the spool a little before the turn: due exactly at it, the
            # supervisor's tick and the hand-over made it late, and the pace lost a
            # fifth of a second's mail every max_wait (a dip to 42 in a second at 50/s).
            return Deferral(self._wall() + (slot - now) - min(PACE_LEAD, self.max_wait / 2),
                            "pace")
        if self.allowed_rate > 0:
            self._next_slot = slot + 1.0 / self.allowed_rate
        if not again:
            self._count(slot, now)
        if slot > now:
            self._sleep(slot - now)
        return None

    def _suspended(self, now: float) -> Deferral | None:
        if now < self.suspended_until:
            return Deferral(self._wall() + (self.suspended_until - now), "suspended")
        return None

    def _blocked(self, now: float) -> Deferral | None:
        suspended = self._suspended(now)
        if suspended is not None:
            return suspended
        if self.limits.hourly and self._hour.total(self._wall()) >= self.limits.hourly:
            return Deferral(max(self._hour.frees_at(), self._wall() + 1.0), "hourly limit")
        cap = self._daily_cap()
        self._roll_day()
        if cap is not None and self.sent_today >= cap:
            return Deferral(_next_midnight(self._wall()), "warm-up daily limit")
        return None

    def _count(self, at: float, now: float) -> None:
        self._hour.add(self._wall())
        self.sent_today += 1
        if not self._recent or at - self._recent[-1] > RATE_WINDOW:
            # Now, not `at`: a slot reserved seconds ahead, taken as the start, made a
            # rate over a negative span, and a ceiling of 460/s (see _rate).
            self._active_since = now
        self._recent.append(at)

    # -- learning from replies -----------------------------------------------------

    def observe(self, reply: Reply) -> ThrottleRule | None:
        """Adapt to one reply; returns the throttle rule it matched, if any."""
        rule = self.match(reply)
        if rule is not None:
            self._throttled(rule)
        elif reply.ok:
            self._clean()
        return rule

    def match(self, reply: Reply) -> ThrottleRule | None:
        """The throttle rule `reply` matches (engine.classify.throttle_rule), if any."""
        if reply.ok:  # a success is never a throttle: said here, without a call per delivery
            return None
        return classify.throttle_rule(self._rules, self.provider, reply)

    def resume_at(self) -> float:
        """When a throttled recipient should be tried again (Unix time)."""
        now = self._clock()
        wait = max(self.suspended_until - now, self.throttle.retry_after)
        return self._wall() + wait

    def _throttled(self, rule: ThrottleRule) -> None:
        now = self._clock()
        self.throttles += 1
        if rule.suspend > 0:
            until = now + rule.suspend
            if until > self.suspended_until:
                if now >= self.suspended_until:
                    self._new_epoch(now)
                self.suspended_until = until
                log.warning(logs.kv("provider_suspended", provider=self.provider,
                                    rule=rule.name, seconds=rule.suspend))
        if now - self._last_decrease < self.throttle.holdoff:
            return  # the same burst, already answered
        self._last_decrease = now
        self._new_epoch(now)
        current = self._limit_estimate(now)
        # Throttled at about the rate of the last throttle: the provider confirmed its
        # limit. If that was a probe above it, probe half as eagerly next time (throttles
        # fall off over time); a new limit starts over.
        confirmed = self.ceiling is not None and 0.8 < current / self.ceiling < 1.25
        probing = self.ceiling is not None and self.allowed_rate >= self.ceiling * 0.95
        if not confirmed:
            self._probe_ramp = PROBE_RAMP
        elif probing:
            self._probe_ramp = min(PROBE_RAMP_MAX, self._probe_ramp * 2)
        rate = min(self.allowed_rate, current) if self.allowed_rate > 0 else current
        self.ceiling = current
        # The same limit again: back to just under it, not down by `decrease`; halving on
        # every probe was the sawtooth the ceiling is there to avoid (it held a 20/s
        # provider at 72% on average). A new limit, or the first, still gets `decrease`.
        factor = max(self.throttle.decrease, 0.95) if confirmed else self.throttle.decrease
        self.allowed_rate = max(self.throttle.min_rate, rate * factor)
        self._recover_from = self.allowed_rate
        log.info(logs.kv("rate_decreased", provider=self.provider, rule=rule.name,
                         rate=f"{self.allowed_rate:.2f}", ceiling=f"{current:.2f}"))

    def _new_epoch(self, now: float) -> None:
        """Turns taken so far are stale: their holders take them again (see `epoch`), so
        the slots they reserved are free. (Kept, they were dead air: up to max_wait of
        nothing sent, then the backlog in a burst that drew the next throttle.)"""
        self.epoch += 1
        self._next_slot = now

    def _limit_estimate(self, now: float) -> float:
        """The rate that drew the throttle: what the provider accepted just before it.

        Regression (the rate collapsed to a fifth of the limit): this was the rate we
        *sent*, throttled attempts included, averaged over 10 s even when sending had
        begun a second before. Against a provider taking 20/s it read 60, 30, 15, 9...
        as echoes of one overload came back. What the provider accepted, over the time
        we have been sending, is its limit when it pushes back. Early on this errs high
        (the provider's burst allowance counts too), and the next throttle, seconds
        later, corrects it; a ceiling too low would only be found by slow probing.
        """
        accepted = self._rate(self._accepted, now, ESTIMATE_WINDOW)
        if accepted > self.throttle.min_rate:
            return accepted
        # Nothing accepted lately (throttled from the first message): what we sent, or
        # were allowed to send.
        sent = self._rate(self._recent, now, ESTIMATE_WINDOW)
        allowed = self.allowed_rate or max(sent, self.throttle.start_rate)
        return min(allowed, sent) if sent > self.throttle.min_rate else allowed

    def _rate(self, times: deque[float], now: float, window: float) -> float:
        """Events per second in `times` (newest last) over the last `window` seconds, or
        since sending began if that is later."""
        count = 0
        for t in reversed(times):  # newest last (bar a few reserved before a throttle)
            if t < now - window:
                break
            count += t <= now  # a turn reserved ahead is not sent yet
        began = self._active_since if self._active_since is not None else now
        return count / min(window, max(MIN_SPAN, now - began))

    def _clean(self) -> None:
        """Increase per clean delivery, so that per second of sending at the allowed rate
        it adds `_increase()`: back to just under the last ceiling within seconds, then
        probing above it, slowly at first (see `_increase`)."""
        now = self._clock()
        self._accepted.append(now)
        while self._accepted[0] < now - ESTIMATE_WINDOW:
            self._accepted.popleft()
        rate = self.allowed_rate
        if rate <= 0:
            return  # unlimited and never throttled
        new = rate + self._increase(rate, now) / rate  # per message
        if self.ceiling is not None and rate < self.ceiling * 0.95:
            new = min(new, self.ceiling * 0.95)  # recovering: up to the target, not past it
        maximum = self.limits.rate or float("inf")
        if self.limits.rate == 0 and self.ceiling is not None and new >= self.ceiling * 4:
            # An unlimited provider that recovered well past its old ceiling: unlimited again.
            self.allowed_rate, self.ceiling = 0.0, None
            return
        self.allowed_rate = min(maximum, new)

    def _increase(self, rate: float, now: float) -> float:
        """Messages per second added per second of clean sending at `rate`.

        Below 95% of the ceiling: `increase`, less near the ceiling, but at least enough
        to get back within RECOVERY seconds. Regression (never recovered): the step was
        `increase` times the room left, so the rate only ever approached the target (a
        20/s provider took minutes to get near it), and never probed above it. At the
        ceiling: a probe, PROBE_MIN of `increase` at first, growing the longer the
        provider stays quiet, so a ceiling measured too low (or a limit the provider
        raised) is found in bounded time. Regression (stuck): the
        probe was PROBE_MIN for ever, 0.01 msg/s per second with the defaults.
        """
        increase = self.throttle.increase
        if self.ceiling is None:
            return increase
        target = self.ceiling * 0.95
        if rate < target:
            return max(increase * (target - rate) / target,
                       (target - self._recover_from) / RECOVERY)
        quiet = now - self._last_decrease
        return increase * min(1.0, max(PROBE_MIN, quiet / self._probe_ramp))

    # -- what it looks like ------------------------------------------------------------

    def current_rate(self) -> float:
        """Messages per second over the last 10 s.

        Regression (status showed 43/s while 15/s went out): turns reserved up to
        max_wait ahead were counted as sent already."""
        now = self._clock()
        while self._recent and self._recent[0] < now - RATE_WINDOW:
            self._recent.popleft()
        return sum(1 for t in self._recent if t <= now) / RATE_WINDOW

    def state(self) -> dict[str, Any]:
        now = self._clock()
        return {
            "allowed_rate": round(self.allowed_rate, 3),
            "max_rate": self.limits.rate,
            "current_rate": round(self.current_rate(), 3),
            "suspended_for": round(max(0.0, self.suspended_until - now), 1),
            "throttles": self.throttles,
            "connections": self.gate.open,
            "max_connections": self.limits.max_connections,
            "sent_today": self.sent_today,
            "daily_cap": self._daily_cap(),
        }

    def _today(self) -> str:
        """Today's UTC date, "2026-11-28". Asked at every turn: formatted only when the
        wall clock leaves the day formatted last (a float comparison otherwise)."""
        now = self._wall()
        if not self._day_start <= now < self._day_end:
            day = now // 86400  # Unix time has no leap seconds: a UTC day is 86400 s
            self._day_start, self._day_end = day * 86400, (day + 1) * 86400
            self._today_text = datetime.datetime.fromtimestamp(now, datetime.UTC).strftime(
                "%Y-%m-%d")
        return self._today_text

    def _roll_day(self) -> None:
        today = self._today()
        if today != self._day:
            self._day, self.sent_today = today, 0


def _next_midnight(now: float) -> float:
    day = datetime.datetime.fromtimestamp(now, datetime.UTC).date()
    midnight = datetime.datetime.combine(day + datetime.timedelta(days=1), datetime.time(),
                                         datetime.UTC)
    return midnight.timestamp()


# -- all providers of one sending IP --------------------------------------------------------


@dataclass(frozen=True)
class ShapingPlan:
    """What config says for one sending IP (`ip`): its limits per provider (`pool` and
    `shaping`, see SendingLimits), how the rate adapts (`throttle`), and its warm-up."""

    ip: str = ""
    pool: PoolConfig = field(default_factory=PoolConfig)
    shaping: ShapingConfig = field(default_factory=ShapingConfig)
    throttle: ThrottleConfig = field(default_factory=ThrottleConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    # The first day of the IP's warm-up (`warmup.ips`); None: this IP is not warming up.
    warmup_start: datetime.date | None = field(init=False)

    def __post_init__(self) -> None:
        start = self.warmup.ips.get(self.ip)
        object.__setattr__(self, "warmup_start",
                           datetime.date.fromisoformat(start) if start else None)

    def limits_for(self, provider: str) -> SendingLimits:
        return SendingLimits.of(self.pool, self.shaping, self.ip, provider)

    def daily_cap(self, today: datetime.date) -> int | None:
        schedule = self.warmup.schedule
        if self.warmup_start is None or not schedule:
            return None
        day = (today - self.warmup_start).days
        if day < 0:
            return schedule[0]
        if day >= len(schedule):
            return None  # warmed up
        return schedule[day]


class Shaping:
    """The shapers of one sending IP, created on first use, with warm-up counts kept on disk."""

    def __init__(self, plan: ShapingPlan, state_file: str | None = None,
                 clock: Clock = time.monotonic, wall: Clock = time.time,
                 sleep: Callable[[float], Any] = gevent.sleep) -> None:
        self.plan = plan
        self._sleep = sleep
        self.state_file = state_file
        self._clock = clock
        self._wall = wall
        self._shapers: dict[str, ProviderShaper] = {}
        self._saved_counts = self._load_counts()

    def get(self, provider: str) -> ProviderShaper:
        shaper = self._shapers.get(provider)
        if shaper is None:
            shaper = ProviderShaper(provider, self.plan.limits_for(provider),
                                    self.plan.throttle, self.plan.shaping.max_wait,
                                    self._daily_cap, self._clock, self._wall, self._sleep)
            if self._saved_counts.get("day") == shaper._day:
                shaper.sent_today = int(self._saved_counts.get("sent", {}).get(provider, 0))
            self._shapers[provider] = shaper
        return shaper

    def _daily_cap(self) -> int | None:
        if self.plan.warmup_start is None:  # not warming up: no date to work out per message
            return None
        today = datetime.datetime.fromtimestamp(self._wall(), datetime.UTC).date()
        return self.plan.daily_cap(today)

    def state(self) -> dict[str, dict[str, Any]]:
        return {name: shaper.state() for name, shaper in self._shapers.items()}

    def items(self) -> Iterable[tuple[str, ProviderShaper]]:
        return self._shapers.items()

    def save(self) -> None:
        """Keep today's counts, so a restarted worker still honours the warm-up caps."""
        if not self.state_file or self.plan.warmup_start is None:
            return
        day = next(iter(self._shapers.values()))._day if self._shapers else None
        data = {"day": day, "sent": {n: s.sent_today for n, s in self._shapers.items()}}
        tmp = self.state_file + ".tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(data, f)
            os.replace(tmp, self.state_file)
        except OSError as err:
            log.error(logs.kv("shaping_state_unsaved", file=self.state_file, error=err))

    def _load_counts(self) -> dict[str, Any]:
        if not self.state_file:
            return {}
        try:
            with open(self.state_file, encoding="utf-8") as f:
                data = json.load(f)
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}


def plan_for(cfg: Config, ip: str) -> ShapingPlan:
    """The shaping plan of sending IP `ip` from the config."""
    return ShapingPlan(ip=ip, pool=cfg.pool, shaping=cfg.shaping, throttle=cfg.throttle,
                       warmup=cfg.warmup)
