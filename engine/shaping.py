"""Traffic shaping: how fast one sending IP may send to one receiving provider.

Each worker (one sending IP) keeps a `ProviderShaper` per provider (see
`engine.provider`). A shaper holds

- the **connection gate**: at most `max_connections` open connections to the
  provider across all its MX hosts, and at most `connection_rate` new ones per
  second;
- the **message pace**: transactions are spaced `1 / allowed_rate` apart. The
  allowed rate adapts (AIMD): a reply that matches a throttle rule multiplies it
  by `throttle.decrease` and may suspend the provider for a while; clean
  deliveries add it back step by step, never above the configured `rate`. The
  rate the provider accepted when it pushed back is remembered as a ceiling:
  the rate climbs back to just under it within seconds, then probes above it,
  more rarely each time the provider confirms the same limit, so throttles
  become rare instead of recurring on every sawtooth. A throttle makes every
  turn taken before it stale (`epoch`): taken again at the new rate;
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
import fnmatch
import json
import logging
import os
import re
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import gevent
from gevent.event import AsyncResult

from engine import logs
from engine.config import Config, ProviderLimits
from engine.reply import Reply
from engine.waiters import any_waiting, wake_first

log = logging.getLogger("mailengine.shaping")

Clock = Callable[[], float]


# -- configuration shapes (built and validated by engine.config) -----------------------


@dataclass(frozen=True)
class Limits:
    """The effective limits of one sending IP x provider. 0 means unlimited."""

    max_connections: int = 10
    max_messages: int = 100  # per connection
    rate: float = 0.0  # messages per second: the most the adaptive rate may reach
    hourly: int = 0  # messages per hour
    connection_rate: float = 0.0  # new connections per second


@dataclass(frozen=True)
class ThrottleRule:
    """A reply that means "slow down". Every field given must match."""

    name: str
    provider: str | None = None
    code: int | None = None
    enhanced: str | None = None  # a glob: "4.7.*"
    text: re.Pattern[str] | None = None  # searched, case-insensitive
    suspend: float = 0.0  # seconds to stop sending to the provider; 0: only slow down

    def matches(self, provider: str, reply: Reply) -> bool:
        if reply.ok:
            return False
        if self.provider is not None and self.provider != provider:
            return False
        if self.code is not None and self.code != reply.code:
            return False
        if self.enhanced is not None and not fnmatch.fnmatchcase(reply.status, self.enhanced):
            return False
        return self.text is None or self.text.search(reply.text) is not None


def _rule(name: str, suspend: float = 0.0, text: str | None = None,
          **fields: Any) -> ThrottleRule:
    pattern = re.compile(text, re.IGNORECASE) if text else None
    return ThrottleRule(name=name, text=pattern, suspend=suspend, **fields)


# The large providers' documented throttle replies first (they suspend), then
# the generic ones (they only slow down). Checked in order; the first match wins.
DEFAULT_RULES: tuple[ThrottleRule, ...] = (
    _rule("gmail-unsolicited-rate", provider="google", enhanced="4.7.28", suspend=900),
    _rule("gmail-rate", provider="google", enhanced="4.7.*", suspend=300,
          text=r"unusual rate|rate limit|temporarily rate limited"),
    _rule("microsoft-busy", provider="microsoft", suspend=300,
          text=r"S3150|S775|server busy|throttl"),
    _rule("yahoo-deferred", provider="yahoo", suspend=900,
          text=r"TS0[1-4]|TSS0[1-9]|temporarily deferred"),
    _rule("apple-rate", provider="apple", suspend=600, text=r"CS0[1-9]|rate limit"),
    _rule("comcast-rate", provider="comcast", suspend=600, text=r"RL0{3,}\d|rate limit"),
    _rule("mailru-ratelimit", provider="mailru", suspend=600, text=r"ratelimit|too many"),
    _rule("yandex-ratelimit", provider="yandex", suspend=600, text=r"ratelimit|too many"),
    # Not "try again later" alone: greylisting says that too, and is no throttle.
    _rule("rate-text", text=r"rate.?limit|too many (messages|mails|connections|recipients"
                            r" from)|throttl|slow down|(rate|limit) exceeded"),
    _rule("421", code=421),
    _rule("4.7.x-policy", enhanced="4.7.*", text=r"rate|limit|volume|busy|temporar"),
)


@dataclass(frozen=True)
class Throttling:
    """How the adaptive rate reacts (config `throttle`)."""

    decrease: float = 0.5  # multiply the allowed rate by this on a throttle
    increase: float = 0.5  # messages/s added back per second of clean sending at the rate
    min_rate: float = 0.05  # never below this many messages per second
    start_rate: float = 10.0  # the allowed rate of an unlimited provider after a first throttle
    holdoff: float = 2.0  # throttles within this many seconds of a decrease count once
    retry_after: float = 60.0  # a throttled recipient without suspension waits this long
    rules: tuple[ThrottleRule, ...] = DEFAULT_RULES


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


# -- the connection gate --------------------------------------------------------------------


class ConnectionGate:
    """Open connections of one IP x provider across its MX hosts' pools."""

    def __init__(self, max_connections: int, connection_rate: float,
                 clock: Clock = time.monotonic) -> None:
        self.max_connections = max_connections
        self.connection_rate = connection_rate
        self._clock = clock
        self.open = 0
        self._next_at = 0.0  # when the next new connection may start
        self._waiters: deque[AsyncResult] = deque()
        self._timer: Any = None
        self._idle_closers: list[Callable[[], bool]] = []

    def try_enter(self) -> bool:
        """Take a connection slot if one is free now."""
        if self.open >= self.max_connections:
            # Closing an idle connection elsewhere frees its slot for us right now.
            if not self._close_someone_idle() or self.open >= self.max_connections:
                return False
        now = self._clock()
        if self.connection_rate > 0:
            if now < self._next_at:
                self._wake_at(self._next_at - now)
                return False
            self._next_at = max(now, self._next_at) + 1.0 / self.connection_rate
        self.open += 1
        return True

    def leave(self) -> None:
        self.open -= 1
        self.wake_one()

    def add_waiter(self, waiter: AsyncResult) -> None:
        self._waiters.append(waiter)

    def has_waiters(self) -> bool:
        """Someone waits for a slot: a pool waiting at the gate, for another MX host."""
        return any_waiting(self._waiters)

    def remove_waiter(self, waiter: AsyncResult) -> None:
        if waiter in self._waiters:
            self._waiters.remove(waiter)

    def on_idle(self, closer: Callable[[], bool]) -> None:
        """Register a pool's "close one idle connection" hook."""
        self._idle_closers.append(closer)

    def forget(self, closer: Callable[[], bool]) -> None:
        if closer in self._idle_closers:
            self._idle_closers.remove(closer)

    def wake_one(self) -> None:
        wake_first(self._waiters)

    def _wake_at(self, delay: float) -> None:
        if self._timer is None or self._timer.dead:
            self._timer = gevent.spawn_later(delay, self.wake_one)

    def _close_someone_idle(self) -> bool:
        """All slots taken: an idle connection to another MX host of the provider
        gives its slot up, rather than wait for its idle timeout."""
        return any(closer() for closer in self._idle_closers)


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
    """One sending IP x one provider."""

    def __init__(self, provider: str, limits: Limits, throttling: Throttling,
                 max_wait: float = 10.0, daily_cap: Callable[[], int | None] | None = None,
                 clock: Clock = time.monotonic, wall: Clock = time.time,
                 sleep: Callable[[float], Any] = gevent.sleep) -> None:
        self.provider = provider
        self._sleep = sleep
        self.limits = limits
        self.throttling = throttling
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
        if reply.ok:  # no rule matches a success (ThrottleRule.matches): skip asking each
            return None
        for rule in self.throttling.rules:
            if rule.matches(self.provider, reply):
                return rule
        return None

    def resume_at(self) -> float:
        """When a throttled recipient should be tried again (Unix time)."""
        now = self._clock()
        wait = max(self.suspended_until - now, self.throttling.retry_after)
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
        if now - self._last_decrease < self.throttling.holdoff:
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
        factor = max(self.throttling.decrease, 0.95) if confirmed else self.throttling.decrease
        self.allowed_rate = max(self.throttling.min_rate, rate * factor)
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
        if accepted > self.throttling.min_rate:
            return accepted
        # Nothing accepted lately (throttled from the first message): what we sent, or
        # were allowed to send.
        sent = self._rate(self._recent, now, ESTIMATE_WINDOW)
        allowed = self.allowed_rate or max(sent, self.throttling.start_rate)
        return min(allowed, sent) if sent > self.throttling.min_rate else allowed

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
        increase = self.throttling.increase
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
    """What config says for one sending IP: defaults, then per provider, then per IP x provider."""

    defaults: Limits
    providers: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    for_ip: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    throttling: Throttling = field(default_factory=Throttling)
    max_wait: float = 10.0
    warmup_schedule: Sequence[int] = ()
    warmup_start: datetime.date | None = None  # None: this IP is not warming up

    def limits_for(self, provider: str) -> Limits:
        limits = replace(self.defaults, **dict(self.providers.get(provider, {})))
        return replace(limits, **dict(self.for_ip.get(provider, {})))

    def daily_cap(self, today: datetime.date) -> int | None:
        if self.warmup_start is None or not self.warmup_schedule:
            return None
        day = (today - self.warmup_start).days
        if day < 0:
            return self.warmup_schedule[0]
        if day >= len(self.warmup_schedule):
            return None  # warmed up
        return self.warmup_schedule[day]


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
                                    self.plan.throttling, self.plan.max_wait,
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
    defaults = Limits(max_connections=cfg.pool.max_connections,
                      max_messages=cfg.pool.max_messages, rate=cfg.shaping.rate,
                      hourly=cfg.shaping.hourly, connection_rate=cfg.shaping.connection_rate)
    rules = tuple(_rule(r.name, r.suspend, r.text, provider=r.provider, code=r.code,
                        enhanced=r.enhanced) for r in cfg.throttle.rules)
    if cfg.throttle.default_rules:
        rules += DEFAULT_RULES
    t = cfg.throttle
    throttling = Throttling(decrease=t.decrease, increase=t.increase, min_rate=t.min_rate,
                            start_rate=t.start_rate, holdoff=t.holdoff,
                            retry_after=t.retry_after, rules=rules)
    start = cfg.warmup.ips.get(ip)
    return ShapingPlan(
        defaults=defaults,
        providers={name: _overrides(limits) for name, limits in cfg.shaping.providers.items()},
        for_ip={name: _overrides(limits)
                for name, limits in cfg.shaping.ips.get(ip, {}).items()},
        throttling=throttling, max_wait=cfg.shaping.max_wait,
        warmup_schedule=cfg.warmup.schedule,
        warmup_start=datetime.date.fromisoformat(start) if start else None)


def _overrides(limits: ProviderLimits) -> dict[str, Any]:
    return {f.name: getattr(limits, f.name) for f in fields(limits)
            if getattr(limits, f.name) is not None}
