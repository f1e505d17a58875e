"""Traffic shaping: how fast one sending IP may send to one receiving provider.

Each worker (one sending IP) keeps a `ProviderShaper` per provider (see `engine.provider`),
built from the config's `SendingLimits` and `ThrottleConfig` (engine.config; `ShapingPlan`
says which apply to the IP). A shaper is made of

- the **connection gate** (engine.gate): at most `max_connections` open connections to the
  provider across all its MX hosts, and at most `connection_rate` new ones per second;
- the **pace** (engine.pacer): turns spaced at the allowed rate of the moment;
- the **allowed rate** (engine.rate): slow start, decrease on push-back, recovery, probing;
- **push-back recognised by behaviour** (engine.pushback), besides the throttle rules;
- **caps** (engine.caps): messages per hour, and a warm-up schedule of messages per day;
- in a cluster, the provider's **cluster-wide limits** (engine.cluster_limits: a rate's
  turns and an hourly budget's blocks leased from Redis, the provider's own and its IP
  groups'), taken after the local pace, just before the message is sent; its
  **cluster-wide connections** (engine.cluster_connections: slots held in Redis, asked
  by the connection gate for each new connection); and the
  **shared suspensions** (engine.cluster_suspend): a suspension of this shaper's own (a
  block, a rule's `suspend`) is published, and one another host published is followed;
  likewise a learned limit, where a worker that learned none starts.

Delivery asks for a turn before it sends (`turn`) and tells the shaper what each transaction's
replies were (`judge`): a throttle rule, push-back by behaviour or a block of the IP slows the
provider down (or suspends it), and its recipients are deferred, never bounced, without an
attempt counted, until their next turn (`resume_at`). Waiting for a turn is never a delivery
attempt; a wait longer than `shaping.max_wait` is not waited out in the worker, where it would
hold a slot that other providers' mail could use: the recipients go back to the spool, due
when the turn comes (`Deferral`). A turn counts its message against the caps and the
cluster's budgets before the message has a connection: one that goes back untried after its
turn (no cluster connection slot within max_wait, a turn taken again after a throttle that
is not now, the worker's own trouble) gives back what it took (`give_back`), so a message
never sent uses up no cap. What was learned survives a restart (`Shaping.save`).
A provider idle for `shaping.forget_after` is forgotten, and shown in `status` only while it
has something to show (engine.shaping_idle).
"""
from __future__ import annotations

import collections
import datetime
import json
import logging
import math
import os
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from engine import classify, logs, shaping_idle
from engine.caps import Caps, Counted, Deferral
from engine.cluster import Cluster
from engine.cluster_connections import ClusterConnections
from engine.cluster_limits import ClusterLimits, Taken, Wait
from engine.cluster_suspend import SharedSuspensions
from engine.config import (
    ClusterConfig,
    Config,
    PoolConfig,
    SendingLimits,
    ShapingConfig,
    ThrottleConfig,
    ThrottleRule,
    WarmupConfig,
)
from engine.gate import Clock, ConnectionGate
from engine.metrics import Metrics
from engine.pacer import Pacer
from engine.pushback import Pushback
from engine.rate import AllowedRate
from engine.reply import Reply

log = logging.getLogger("mailengine.shaping")

__all__ = ["BLOCK", "CLEAN", "PROVIDER_GAUGES", "PUSHBACK", "Deferral", "ProviderShaper",
           "Shaping", "ShapingPlan", "Verdict", "plan_for"]

RATE_WINDOW = 10.0  # s: the window of the current rate
# Each provider's StatsD gauges (engine.metrics), the values of Shaping.gauges in this order.
PROVIDER_GAUGES = ("allowed_rate", "suspended")


@dataclass(frozen=True)
class Verdict:
    """What one transaction's replies said about the pace: `trigger` names why its refused
    recipients are throttled ("rule:<name>", "pushback", "block"), None if they are not;
    `pending`: a first refusal, whose verdict comes with the next transaction
    (`ProviderShaper.verdict`, never while holding a connection)."""

    trigger: str | None = None
    pending: bool = False


CLEAN = Verdict()
BLOCK, PUSHBACK = "block", "pushback"  # the triggers that are not a rule's name


@dataclass(frozen=True)
class Counts:
    """What a message's turn counted: against the caps, and the cluster's budgets (each in
    the minute it counted it in), given back together if it goes back untried."""

    caps: Counted
    cluster: Taken = ()


class ProviderShaper:
    """One sending IP x one provider: its `limits`, and how its rate adapts (`throttle`)."""

    def __init__(self, provider: str, limits: SendingLimits, throttle: ThrottleConfig,
                 max_wait: float, daily_cap: Callable[[], int | None] | None = None,
                 clock: Clock = time.monotonic, wall: Clock = time.time,
                 on_learned: Callable[[], None] | None = None,
                 cluster: ClusterLimits | None = None,
                 shared: SharedSuspensions | None = None,
                 on_active: Callable[[str], None] | None = None) -> None:
        self.provider = provider
        self.limits = limits
        self.throttle = throttle
        self.max_wait = max_wait
        self._rules = classify.throttle_rules(throttle)
        self._clock = clock
        self._wall = wall
        self._on_learned = on_learned or (lambda: None)
        self._on_active = on_active or (lambda _provider: None)
        # The gate and the pacer ask the shaper through a weak reference: no cycle, so a
        # shaper forgotten idle (Shaping.forget_idle) is freed at once, not at the next full
        # collection (rare in a worker: engine.gctune), its memory used again.
        me = weakref.proxy(self)
        self.gate = ConnectionGate(limits.max_connections, limits.connection_rate, clock,
                                   lambda: me.suspended, lambda: me.mark_active())
        self.rate = AllowedRate(limits.rate, throttle, clock())
        self.pacer = Pacer(self.rate.spacing, self.rate.time_for, clock, lambda: me.epoch)
        self.pushback = Pushback(throttle.pushback_after)
        self.caps = Caps(limits.hourly, daily_cap or (lambda: None), wall, clock)
        self.cluster = cluster  # the provider's rates and hourly budgets across the cluster
        self.shared = shared  # the cluster's suspensions, if a cluster is configured
        self.followed = 0  # suspensions followed from other hosts
        self.seeded: float | None = None  # the cluster's ceiling this IP started at, if any
        self.suspended_until = 0.0  # monotonic
        self.held = False  # the suspension now is the operator's (`hold`)
        self.triggers: collections.Counter[str] = collections.Counter()  # throttles, by why
        self._recent: deque[float] = deque()  # send times of the last 10 s: the current rate
        # Bumped on every decrease and suspension: a turn taken before is stale (taken at a
        # rate the provider refused) and must be taken again before sending (see delivery).
        self.epoch = 0
        # What the last turn counted against the caps and the cluster's budgets (read by its
        # caller at once, no other greenlet runs between: given back if the message goes
        # back untried).
        self.counted: Counts | None = None
        self.last_used = clock()  # when a message last asked for this shaper (Shaping.get)

    def mark_active(self) -> None:
        """Something happened that what `status` shows of it (engine.shaping_idle), or its
        gauges, may follow: a turn, a connection let in, a reply judged, a suspension, a
        limit. Shaping visits it at its next report (`Shaping.active_gauges`)."""
        self._on_active(self.provider)

    # -- taking a turn -----------------------------------------------------------

    def holds(self, epoch: int) -> bool:
        """Whether a turn taken in `epoch` still holds: no push-back or block since."""
        return self.epoch == epoch

    def turn(self, again: bool = False, first: bool = False) -> Deferral | int:
        """Wait for this message's turn (up to max_wait): the turn's epoch (see `epoch`);
        or a Deferral, when to come back.

        `again`: the message's turn went stale (a throttle since, see `epoch`), or it was
        throttled, and it is taken again. The caps counted it the first time: only the pace
        and a suspension apply, and it is not counted twice. `first`: at the head of the
        line (a throttled message: it becomes the next probe).
        """
        self.mark_active()  # it waits in line, or counts in the current rate
        if self.shared is not None:
            self.shared.check()  # at most once per cluster.poll: one round trip
        deferral = self._suspended() or (None if again else self.caps.reached())
        if deferral is not None:
            return deferral
        turn = self.pacer.wait_for_turn(self.max_wait, first)
        if isinstance(turn, float):
            return Deferral(self._wall() + self._back_in(turn), "pace")
        taken: Taken = ()
        if self.cluster is not None:  # last: its turn is the moment the message goes
            wait = self.cluster.take(self.max_wait, again)
            if isinstance(wait, Wait):  # a turn: back to join the line; a budget: its time
                back = self._back_in(wait.seconds) if wait.pace else wait.seconds
                return Deferral(self._wall() + back, wait.reason)
            taken = wait
        # Suspended, or a cap reached, while this message waited in line: with a paced
        # line every message in it passed the cap's check before the first was counted.
        if self.shared is not None:
            self.shared.check()
        deferral = self._suspended() or (None if again else self.caps.reached())
        if deferral is not None:
            ClusterLimits.give_back(taken)
            return deferral
        if not again:
            self.counted = Counts(self.caps.count(), taken)
            self._recent.append(self.counted.caps.at)
        return turn

    def give_back(self, counted: Counts | None) -> None:
        """A message whose turn counted it (`counted`: `self.counted` as its `turn` left
        it; None: counted by an earlier turn, when it went) goes back to the spool untried:
        no connection slot in the cluster, a turn taken again that is not now, the
        worker's own trouble. What it took goes back: a message never sent uses up no cap,
        local (`hourly`, the warm-up's daily cap) or the cluster's budgets. (Its pace's and
        cluster rate's turns went by unused: time, not a count.)"""
        if counted is None:
            return
        self.caps.give_back(counted.caps)
        if counted.caps.at in self._recent:
            self._recent.remove(counted.caps.at)
        ClusterLimits.give_back(counted.cluster)

    def _back_in(self, turn: float) -> float:
        """When a message whose turn is `turn` seconds away (more than max_wait) should be
        back from the spool: max_wait/2 before its turn, to join the line while half of
        it is still ahead. Those sent back together are all told the first turn past the
        line and come back together: whatever the rate is by then, they fill the line
        again. Regression: due a second before that turn, they came back too late for a
        rate that rose meanwhile (a recovery after a push-back, a probe): the line ran dry
        for a second after every push-back. (Due exactly at it, the supervisor's tick and
        the hand-over made them late: a dip to 42 in a second at 50/s.)"""
        return turn - self.max_wait / 2

    @property
    def suspended(self) -> bool:
        return self._clock() < self.suspended_until

    def _suspended(self) -> Deferral | None:
        now = self._clock()
        if now < self.suspended_until:
            return Deferral(self._wall() + (self.suspended_until - now), "suspended")
        return None

    # -- learning from replies -----------------------------------------------------

    def judge(self, replies: Sequence[Reply], epoch: int,
              seconds: float | None = None, repeated: Sequence[Reply] = (),
              guessed: bool = False) -> Verdict:
        """What the replies to one transaction (or a connection's failure) say about the
        pace; the shaper adapts to them. `epoch`: the message's turn's (see `epoch`): the
        refusal of mail sent before the last answer to a push-back says nothing new;
        `seconds`: the transaction's time (slow start's clock). `repeated`: refusals of
        recipients the receiver refused before (Task.tried), left out of `replies`: a
        block or a rule's words count in them, but by behaviour they are no push-back of
        their own: their own mailbox may explain them. Throttled while the provider pushes
        back; else an ordinary deferral, unless `guessed`: some were throttled by behaviour
        alone in this worker, and the next transaction of another message decides (a
        window that closes again refuses them first). Never waits (see `Verdict.pending`).
        """
        now = self._clock()
        fresh = epoch == self.epoch
        refused = [reply for reply in replies if not reply.ok]
        worded = [*refused, *repeated]
        if any(classify.block(reply) for reply in worded):
            self._blocked(next(r for r in worded if classify.block(r)), now)
            return self._counted(Verdict(BLOCK))
        rule = next((r for reply in worded if (r := self.match(reply)) is not None), None)
        if rule is not None:
            self._throttled(rule, now, fresh)
            return self._counted(Verdict(f"rule:{rule.name}"))
        if len(refused) < len(replies):
            self._accepted(now, fresh, seconds)
            return CLEAN
        if refused and all(classify.refusal(reply) for reply in refused):
            if self.pushback.refusal(now):
                self._pushed_back(now, PUSHBACK, fresh)
                return self._counted(Verdict(PUSHBACK))
            return Verdict(pending=self.pushback.refused > 0)
        if not refused and repeated and all(classify.refusal(reply) for reply in repeated):
            if self.pushback.pushing:  # a probe refused: answered as any refusal now is
                self._pushed_back(now, PUSHBACK, fresh)
                return self._counted(Verdict(PUSHBACK))
            return Verdict(pending=guessed)
        return CLEAN

    def verdict(self) -> Verdict:
        """A pending verdict (a first refusal): waits for the next transaction's outcome
        (engine.pushback.HOLD at most); a throttle if the provider is pushing back."""
        return self._counted(Verdict(PUSHBACK)) if self.pushback.verdict() else CLEAN

    def _counted(self, verdict: Verdict) -> Verdict:
        assert verdict.trigger is not None
        self.triggers[verdict.trigger] += 1
        self.mark_active()
        return verdict

    @property
    def throttles(self) -> int:
        """Transactions throttled, whatever the trigger."""
        return sum(self.triggers.values())

    def match(self, reply: Reply) -> ThrottleRule | None:
        """The throttle rule `reply` matches (engine.classify.throttle_rule), if any."""
        if reply.ok:  # a success is never a throttle: said here, without a call per delivery
            return None
        return classify.throttle_rule(self._rules, self.provider, reply)

    def resume_at(self) -> float:
        """When a throttled recipient should be tried again (Unix time): at the next turn
        (it goes first in line), or when the suspension ends; after `throttle.retry_after`
        at least."""
        now = self._clock()
        wait = max(self.suspended_until - now, self.pacer.expected_wait(first=True))
        return self._wall() + max(wait, self.throttle.retry_after)

    def _accepted(self, now: float, fresh: bool, seconds: float | None) -> None:
        """A transaction accepted. Only mail sent since the last push-back tells the rate
        anything (a stale success must not end a backoff, nor count in the estimate)."""
        self.pushback.accepted(now)
        if not fresh:
            return
        self.mark_active()  # the allowed rate may grow
        before = self.rate.spacing()
        self.rate.clean(now, self.pacer.binding, seconds)
        if self.rate.spacing() != before:  # faster (a probe accepted ends the backoff): now
            self.pacer.changed(self.max_wait)

    def _throttled(self, rule: ThrottleRule, now: float, fresh: bool) -> None:
        if rule.suspend > 0:
            self._suspend(now + rule.suspend, now)
            log.warning(logs.kv("provider_suspended", provider=self.provider,
                                rule=rule.name, seconds=rule.suspend))
            if self.shared is not None:
                self.shared.publish(self.provider, rule.suspend, f"rule:{rule.name}")
        self._pushed_back(now, f"rule:{rule.name}", fresh)

    def _blocked(self, reply: Reply, now: float) -> None:
        """The receiver blocks this IP (a block list, a reputation block): stop sending to it
        for `throttle.block_suspend` instead of burning the recipients' retries."""
        self._suspend(now + self.throttle.block_suspend, now)
        log.warning(logs.kv("provider_blocked", provider=self.provider,
                            seconds=self.throttle.block_suspend, reply=reply))
        if self.shared is not None:
            self.shared.publish(self.provider, self.throttle.block_suspend, BLOCK)

    def follow(self, seconds: float, origin: str, reason: str) -> bool:
        """Another host of the cluster (`origin`) suspended this provider for `seconds`
        from now (`reason`: engine.cluster_suspend): suspended here too, until then.
        Whether that suspends it longer than it was."""
        now = self._clock()
        if now + seconds <= self.suspended_until:
            return False
        self._suspend(now + seconds, now)
        self.followed += 1
        return True

    def seed(self, limit: float) -> bool:
        """The cluster's learned ceiling for this provider (engine.cluster_suspend: the
        lowest another worker learned from a push-back): taken as this IP's limit when it
        learned none of its own yet, instead of slow-starting into it. Whether it was."""
        if self.rate.limit is not None or self.rate.pushbacks:
            return False
        self.rate.restore({"rate": limit, "limit": limit}, self._clock())  # at 95% of it
        self.pacer.changed(self.max_wait)
        self.seeded = limit
        self.mark_active()
        return True

    def _suspend(self, until: float, now: float) -> None:
        if until > self.suspended_until:
            self.held = False
            if now >= self.suspended_until:
                self.epoch += 1
            self.suspended_until = until
            self.pacer.changed(self.max_wait)
            self.mark_active()

    def hold(self, seconds: float) -> None:
        """The operator's suspension (`mailengine queue suspend`): nothing is sent for
        `seconds` from now, whatever suspension there was (a longer one is cut short)."""
        now = self._clock()
        if now >= self.suspended_until:
            self.epoch += 1  # turns taken before are stale: taken again, and refused
        self.suspended_until = now + seconds
        self.held = True
        self.pacer.changed(self.max_wait)
        self.mark_active()

    def release(self, lift: bool = False) -> None:
        """The operator's resumption (`mailengine queue resume`): any suspension ends now,
        the operator's, a throttle rule's or a block's (`lift`: on every host, and in the
        cluster's Redis too: engine.cluster_suspend)."""
        self.suspended_until = 0.0
        self.held = False
        self.pacer.changed(self.max_wait)
        self.mark_active()
        if self.shared is not None:  # what another host published is not followed again
            self.shared.released(self.provider, lift)

    def _pushed_back(self, now: float, trigger: str, fresh: bool) -> None:
        """Lower the rate, once per episode: a refusal of mail sent before the last answer
        (a stale turn: not `fresh`) is the same burst, already answered. Regression (the
        rate fell to a fifth of the limit): every echo of one overload cut it again."""
        if not fresh:
            return
        self.epoch += 1
        self.rate.pushback(now)
        self.pacer.changed(self.max_wait, restart=True)
        self.mark_active()
        self._on_learned()
        if self.shared is not None and self.rate.limit is not None:
            self.shared.publish_ceiling(self.provider, self.rate.limit)
        log.info(logs.kv("rate_decreased", provider=self.provider, trigger=trigger,
                         rate=f"{self.rate.rate:.2f}", limit=f"{self.rate.limit or 0:.2f}"))

    # -- what it looks like ------------------------------------------------------------

    @property
    def allowed_rate(self) -> float:
        """Messages per second allowed now; 0 when there is no limit."""
        rate = self.rate.rate
        return 0.0 if rate == math.inf else rate

    @property
    def sent_today(self) -> int:
        return self.caps.sent_today

    def current_rate(self) -> float:
        """Messages per second over the last 10 s."""
        now = self._clock()
        while self._recent and self._recent[0] < now - RATE_WINDOW:
            self._recent.popleft()
        return len(self._recent) / RATE_WINDOW

    def state(self) -> dict[str, Any]:
        now = self._clock()
        return {
            "allowed_rate": round(self.allowed_rate, 3),
            "max_rate": self.limits.rate,
            "current_rate": round(self.current_rate(), 3),
            "limit": round(self.rate.limit, 3) if self.rate.limit is not None else None,
            "phase": "suspended" if now < self.suspended_until else self.rate.phase,
            "suspended_for": round(max(0.0, self.suspended_until - now), 1),
            "held": self.held and now < self.suspended_until,
            "throttles": self.throttles,
            "blocks": self.triggers[BLOCK],
            "triggers": dict(self.triggers),
            "waiting": self.pacer.waiting,
            "connections": self.gate.open,
            "max_connections": self.limits.max_connections,
            "sent_today": self.caps.sent_today,
            "daily_cap": self.caps.daily_cap,
            **(self.cluster.state() if self.cluster is not None else {}),
            **(self.gate.cluster.state() if self.gate.cluster is not None else {}),
            **({"followed": self.followed, "seeded": self.seeded}
               if self.shared is not None else {}),
        }


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
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    hostname: str = ""  # this host's name in the cluster when cluster.host is not set
    ip_pools: tuple[str, ...] = ()  # the IP groups (`ip_pools`) this IP belongs to
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
    """The shapers of one sending IP, created on first use. What they learned (the allowed
    rate and the limit per provider) and today's warm-up counts are kept in `state_file`, so
    a restarted worker (or engine) neither floods a receiver again nor forgets its caps."""

    def __init__(self, plan: ShapingPlan, state_file: str | None = None,
                 clock: Clock = time.monotonic, wall: Clock = time.time,
                 metrics: Metrics | None = None) -> None:
        self.plan = plan
        self.state_file = state_file
        self._clock = clock
        self._wall = wall
        self._metrics = metrics
        self._shapers: dict[str, ProviderShaper] = {}
        # The providers something happened to since the last report, and those still
        # worth showing (engine.shaping_idle): what the report visits, not all held.
        self._active: set[str] = set()
        self._saved = self._load()  # what a restart (or a shaper made anew) takes up
        self.forgotten = 0  # shapers dropped idle (forget_idle), for the figures
        # The connection to the cluster's Redis (engine.cluster), if one is configured.
        self.cluster = Cluster(plan.cluster, plan.hostname, metrics, clock) \
            if plan.cluster.redis else None
        # Suspensions published to (and followed from) the other hosts, in a cluster.
        self._shared = SharedSuspensions(self.cluster, f"{self.cluster.host}/{plan.ip}",
                                         self._shapers.items, metrics, clock) \
            if self.cluster is not None else None

    def get(self, provider: str) -> ProviderShaper:
        shaper = self._shapers.get(provider)
        if shaper is None:
            limits = self.plan.limits_for(provider)
            shaper = ProviderShaper(provider, limits, self.plan.throttle,
                                    self.plan.shaping.max_wait, self._daily_cap, self._clock,
                                    self._wall, self.save, self._cluster_limits(provider, limits),
                                    self._shared, self._active.add)
            self._restore(provider, shaper)
            self._limit_connections(provider, limits, shaper)
            self._shapers[provider] = shaper
            shaper.mark_active()  # new: its gauges go out at once
        shaper.last_used = self._clock()
        return shaper

    def _cluster_limits(self, provider: str, limits: SendingLimits) -> ClusterLimits | None:
        """The provider's cluster-wide limits (its own, its IP groups'), if a cluster is
        configured and it has some."""
        if self.cluster is None:
            return None
        return ClusterLimits.of(self.cluster, self.plan.shaping, provider, limits,
                                self.plan.ip_pools, f"{self.cluster.host}/{self.plan.ip}",
                                self._metrics, self._clock)

    def _limit_connections(self, provider: str, limits: SendingLimits,
                           shaper: ProviderShaper) -> None:
        """The provider's connections across the cluster, if limited and a cluster is
        configured: its gate asks the cluster's slots too."""
        if self.cluster is None or limits.cluster_connections <= 0:
            return
        shaper.gate.limit_cluster(ClusterConnections(
            self.cluster, provider, limits.cluster_connections,
            f"{self.cluster.host}/{self.plan.ip}", self._metrics, self._clock),
            self.plan.shaping.max_wait)

    def _restore(self, provider: str, shaper: ProviderShaper) -> None:
        if self._saved.get("day") == shaper.caps.day:
            shaper.caps.sent_today = int(self._saved.get("sent", {}).get(provider, 0))
        learned = self._saved.get("learned", {}).get(provider)
        if isinstance(learned, dict) and self._fresh(learned, self._wall()):
            shaper.rate.restore(learned, self._clock())

    def _daily_cap(self) -> int | None:
        if self.plan.warmup_start is None:  # not warming up: no date to work out per message
            return None
        today = datetime.datetime.fromtimestamp(self._wall(), datetime.UTC).date()
        return self.plan.daily_cap(today)

    def hold(self, provider: str, seconds: float, lift: bool = False) -> None:
        """Suspend `provider` for `seconds`; 0 resumes it (engine.protocol.Hold)."""
        shaper = self.get(provider)
        if seconds > 0:
            shaper.hold(seconds)
        else:
            shaper.release(lift)

    def state(self) -> dict[str, dict[str, Any]]:
        """The state of the providers with something to show (engine.shaping_idle), by
        name; the others are `providers` minus these. Only the active ones are looked at:
        the others have nothing to show (`active_gauges`)."""
        shown = {}
        for name in sorted(self._active):
            shaper = self._shapers.get(name)
            if shaper is not None and shaping_idle.worth_showing(shaper):
                shown[name] = shaper.state()
        return shown

    def active_gauges(self) -> list[tuple[str, tuple[float, float]]]:
        """The gauges' values (PROVIDER_GAUGES order) of the active providers: those whose
        values may have changed since the last call, the others' are as they were (the
        worker's report, every second, through engine.quiet_gauges, which refreshes the
        others with `gauges_of`). A provider with nothing left to show leaves the active
        set here, with its values as it leaves: whatever shows it again, or changes its
        gauges, marks it active again first (ProviderShaper.mark_active). What ends with
        time alone (a suspension, the current rate's window) ends while it is active, so
        it is seen here; whether it is shown is asked before its values are read, so that
        the values are those it keeps."""
        rows = []
        for name in list(self._active):
            shaper = self._shapers.get(name)
            if shaper is None:  # a shaper forgotten, still used by a delivery
                self._active.discard(name)
                continue
            if not shaping_idle.worth_showing(shaper):
                self._active.discard(name)
            rows.append((name, _gauges(shaper)))
        return rows

    def gauges_of(self, provider: str) -> tuple[float, float] | None:
        """A provider's gauges' values now (PROVIDER_GAUGES order); None if not held."""
        shaper = self._shapers.get(provider)
        return _gauges(shaper) if shaper is not None else None

    @property
    def providers(self) -> int:
        """Providers whose shaper this IP holds now."""
        return len(self._shapers)

    def forget_idle(self) -> list[str]:
        """Drop the shapers unused for `shaping.forget_after` with nothing to keep
        (engine.shaping_idle); what they learned, and today's counts, wait in the store a
        restart reads, for the shaper made anew. The providers dropped."""
        after = self.plan.shaping.forget_after
        if after <= 0:
            return []
        now = self._clock()
        idle = [name for name, shaper in self._shapers.items()
                if shaping_idle.forgettable(shaper, now, after)]
        for name in idle:
            self._keep(name, self._shapers.pop(name))
            self._active.discard(name)
        self.forgotten += len(idle)
        return idle

    def _keep(self, provider: str, shaper: ProviderShaper) -> None:
        """A dropped shaper's learned rate (as `save` writes it) and today's count."""
        if shaper.rate.learning:
            learned = self._saved.setdefault("learned", {})
            learned[provider] = {**shaper.rate.learned(), "at": self._wall()}
        today = shaper.caps.today()
        if shaper.caps.sent_today and shaper.caps.day == today:
            if self._saved.get("day") != today:  # another day's counts are spent
                self._saved["day"], self._saved["sent"] = today, {}
            self._saved.setdefault("sent", {})[provider] = shaper.caps.sent_today

    def close(self) -> None:
        """Stop watching the cluster's suspensions and idle budgets (a worker's end, a
        test's)."""
        if self._shared is not None:
            self._shared.close()
        for shaper in self._shapers.values():
            if shaper.cluster is not None:
                shaper.cluster.close()
            if shaper.gate.cluster is not None:
                shaper.gate.cluster.close()

    def items(self) -> Iterable[tuple[str, ProviderShaper]]:
        return self._shapers.items()

    def save(self) -> None:
        """Write what was learned and today's counts (atomically: a new file, renamed)."""
        if not self.state_file:
            return
        now = self._wall()
        # Providers not used since the start, or forgotten since, stay until too old.
        learned = {name: entry for name, entry in self._saved.get("learned", {}).items()
                   if self._fresh(entry, now)}
        self._saved["learned"] = learned
        learned.update({name: {**shaper.rate.learned(), "at": now}
                        for name, shaper in self._shapers.items() if shaper.rate.learning})
        day = time.strftime("%Y-%m-%d", time.gmtime(now))  # the UTC day, as Caps.today()
        sent = dict(self._saved.get("sent", {})) if self._saved.get("day") == day else {}
        sent.update({name: shaper.caps.sent_today for name, shaper in self._shapers.items()
                     if shaper.caps.sent_today and shaper.caps.day == day})
        data = {"day": day, "sent": sent, "learned": learned}
        tmp = self.state_file + ".tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(data, f)
            os.replace(tmp, self.state_file)
        except OSError as err:
            log.error(logs.kv("shaping_state_unsaved", file=self.state_file, error=err))

    def _fresh(self, learned: Any, now: float) -> bool:
        """A stored learned rate a shaper made now would take up (`throttle.remember`)."""
        try:
            return 0 <= now - float(learned.get("at", 0.0)) <= self.plan.throttle.remember
        except (AttributeError, TypeError, ValueError):
            return False

    def _load(self) -> dict[str, Any]:
        if not self.state_file:
            return {}
        try:
            with open(self.state_file, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict):
            return {}
        # A damaged file's tables are dropped whole: they are read and written as dicts.
        return {key: value for key, value in data.items()
                if key not in ("sent", "learned") or isinstance(value, dict)}


def _gauges(shaper: ProviderShaper) -> tuple[float, float]:
    """A provider's StatsD gauges' values, in PROVIDER_GAUGES order."""
    return shaper.allowed_rate, int(shaper.suspended)


def plan_for(cfg: Config, ip: str) -> ShapingPlan:
    """The shaping plan of sending IP `ip` from the config."""
    return ShapingPlan(ip=ip, pool=cfg.pool, shaping=cfg.shaping, throttle=cfg.throttle,
                       warmup=cfg.warmup, cluster=cfg.cluster, hostname=cfg.hostname,
                       ip_pools=tuple(name for name, ips in cfg.ip_pools.items() if ip in ips))
