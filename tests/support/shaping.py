"""Traffic shaping on a fake clock, for the unit tier.

- `FakeTime`: a clock the test moves by hand.
- `limits(...)`, `shaper(...)`: the config's limits of an IP x provider, and a ProviderShaper
  on a FakeTime. Its pacer waits for a turn on a real gevent timer, so a shaper on a fake
  clock must never have to wait: `shaper()` is unpaced by default (`rate=0`, no slow start),
  and its `max_wait` is 0, so a turn that would have to wait comes back at once as a
  Deferral ("pace") instead of blocking the test on real time.
- `SendingModel`: a deterministic model of one sending IP x provider sending a backlog on a
  fake clock (turns at the allowed rate's spacing, replies after a short round trip, a few
  transactions in flight) against a receiver's policy, driving the real `AllowedRate`
  (engine.rate) and `Pushback` (engine.pushback) the way engine.shaping and engine.delivery
  do. The receivers: `Bucket` (a token bucket whose rate may change on a schedule), and
  engine.testing.limits' FixedWindow and Open, which take the model's time as it is.
- The throttling sink the conversation and engine tiers play (LIMIT, BURST, its replies) and
  `halves`.
"""
from __future__ import annotations

import dataclasses
import heapq
import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from engine import classify
from engine.config import PoolConfig, SendingLimits, ShapingConfig, ThrottleConfig
from engine.pacer import BINDING
from engine.pushback import HOLD, Pushback
from engine.rate import AllowedRate
from engine.reply import Reply
from engine.shaping import ProviderShaper
from engine.testing.limits import TokenBucket

# -- a shaper on a fake clock ------------------------------------------------------------------


class FakeTime:
    """A clock the test moves by hand (`now`, in seconds): monotonic and wall time alike."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def clock(self) -> float:
        return self.now


DEFAULT_LIMITS = SendingLimits.of(PoolConfig(), ShapingConfig(), "192.0.2.10", "example.net")
DEFAULT_THROTTLE = ThrottleConfig()
UNPACED = ThrottleConfig(slow_start=False)  # with rate 0: no pace at all, turns never wait


def limits(**changes: Any) -> SendingLimits:
    """The config's default limits of an IP x provider, with `changes`."""
    return dataclasses.replace(DEFAULT_LIMITS, **changes)


def shaper(limits: SendingLimits = DEFAULT_LIMITS, throttle: ThrottleConfig = UNPACED,
           t: FakeTime | None = None, max_wait: float = 0.0, cap: int | None = None,
           provider: str = "example.net", on_learned: Callable[[], None] | None = None,
           ) -> tuple[ProviderShaper, FakeTime]:
    """A ProviderShaper on a FakeTime (monotonic and wall clock both), and the FakeTime.

    Unpaced by default (the default limits' rate is 0, and no slow start). `max_wait` 0: a
    turn that would wait is a Deferral, never a wait on the real gevent timer. `cap`: the
    warm-up's daily cap; `on_learned`: called when the shaper learned something worth
    keeping (engine.shaping.Shaping saves then)."""
    t = t or FakeTime()
    return ProviderShaper(provider, limits, throttle, max_wait, lambda: cap, t.clock,
                          t.clock, on_learned), t


# -- the throttling sink of the conversation and engine tiers ----------------------------------

LIMIT = 20.0  # msg/s per client IP at the throttling sink
BURST = 5.0
SLOW_DOWN_421 = "421 4.7.0 Rate limited, slow down"
SLOW_DOWN_451 = "451 4.7.1 Rate limited, slow down"


def halves(times: Sequence[float], start: float, end: float) -> tuple[int, int]:
    """How many of `times` fall in the first and in the second half of [start, end]."""
    middle = (start + end) / 2
    return (sum(1 for t in times if t < middle), sum(1 for t in times if t >= middle))


# -- a model of sending, on a fake clock -------------------------------------------------------

IP = "192.0.2.10"
PROVIDER = "example.net"
# A transaction on loopback, and the pool's default connections (pool.max_connections). With
# these the model draws refusals as the real engine does in bench/shaping_sim.py (token bucket:
# 0.5% of the messages refused here, 0.4% there; fixed window: 1.7% here, 1.3% there): what is
# in flight when a receiver pushes back is refused with it, so the share grows with
# rtt x connections.
RTT = 0.002  # s: from a message's turn to its reply
CONNECTIONS = 10  # transactions in flight at most
RETRY = 60.0  # s: an ordinary deferral waits this long (the retry schedule's first step)


class Receiver(Protocol):
    """What the model sends to: engine.testing.limits.Policy's MAIL FROM and its limit."""

    def on_mail(self, client_ip: str, now: float) -> str | None: ...

    def limit(self, now: float) -> float | None: ...


class Bucket:
    """A token bucket of `rate` per second (at most `burst` saved up) on the model's clock,
    answering `reply` past it; `schedule` changes the rate, `[(after_seconds, rate), ...]`
    from the first MAIL FROM. What engine.testing.limits.RateLimit is on the real clock (its
    buckets read time.monotonic, which stands still in a model)."""

    def __init__(self, rate: float, burst: float, t: FakeTime, reply: str = SLOW_DOWN_421,
                 schedule: Sequence[tuple[float, float]] = ()) -> None:
        self.rate = rate
        self.reply = reply
        self.schedule = sorted(schedule)
        self._bucket = TokenBucket(rate, burst, t.clock)
        self._start: float | None = None

    def on_mail(self, client_ip: str, now: float) -> str | None:
        if self._start is None:
            self._start = now
        self._bucket.rate = self.limit(now)
        return None if self._bucket.take() else self.reply

    def limit(self, now: float) -> float:
        start = now if self._start is None else self._start
        return next((rate for after, rate in reversed(self.schedule) if now - start >= after),
                    self.rate)


@dataclass
class Run:
    """What a model run did, in model seconds from its start."""

    count: int  # messages sent
    seconds: float = 0.0  # until the last was delivered (or the run gave up)
    delivered: list[float] = field(default_factory=list)  # when each was accepted
    refused: list[float] = field(default_factory=list)  # when each refusal came back
    refused_messages: set[int] = field(default_factory=set)  # messages that saw a refusal
    pushbacks: list[float] = field(default_factory=list)  # when a push-back was answered
    deferred: int = 0  # refusals taken for ordinary deferrals (retried after RETRY)

    @property
    def refused_share(self) -> float:
        """The share of the messages that saw a refusal."""
        return len(self.refused_messages) / self.count

    def delivered_rate(self, start: float, end: float) -> float:
        """Messages accepted per second in [start, end)."""
        return sum(1 for t in self.delivered if start <= t < end) / (end - start)


class SendingModel:
    """One sending IP x provider sending a backlog to `receiver`, on a fake clock.

    What it models, as engine.shaping and engine.delivery do it:
    - a message takes a **turn** at the allowed rate's spacing (`AllowedRate.spacing`), and
      only when one of `connections` is free; the turn is stamped with the **epoch**;
    - the receiver answers at once (its `on_mail`), the reply comes back `rtt` later;
    - an acceptance ends a run of refusals (`Pushback.accepted`), and, if the message's turn
      is of the current epoch, is a clean reply to the rate (`AllowedRate.clean`, binding
      while messages waited for the pace within engine.pacer.BINDING);
    - a refusal a throttle rule matches (engine.classify) is push-back; one that may be
      push-back (`classify.refusal`) goes to `Pushback.refusal`: push-back when it says so,
      else the first of a run waits for the next outcome's verdict (at most
      engine.pushback.HOLD), else an ordinary deferral;
    - push-back is answered once: only for a message whose turn is of the current epoch
      (the refusals of mail sent before the answer change nothing), by
      `AllowedRate.pushback`, a new epoch, and the next turn a whole spacing from now;
    - a throttled message goes again first in line; an ordinary deferral goes back to the
      end of the line after `retry` seconds.
    Connections, DNS, the spool and max_wait are left out. `rate` is the configured rate
    (0: none); a worker restart is a second model on the same receiver and clock whose
    `rate.restore` gets the first one's `rate.learned()`.
    """

    def __init__(self, receiver: Receiver, t: FakeTime,
                 throttle: ThrottleConfig = DEFAULT_THROTTLE,
                 rate: float = 0.0, rtt: float = RTT, connections: int = CONNECTIONS,
                 retry: float = RETRY) -> None:
        self.receiver = receiver
        self.t = t
        self.rtt = rtt
        self.connections = connections
        self.retry = retry
        self.rate = AllowedRate(rate, throttle, t.now)
        self.pushback = Pushback(throttle.pushback_after)
        self.rules = classify.throttle_rules(throttle)
        self.epoch = 0
        self._line: deque[int] = deque()
        self._in_flight: list[tuple[float, int, int, str | None, int]] = []  # a heap
        self._deferred: list[tuple[float, int]] = []  # a heap: (due, message)
        self._pending: list[tuple[int, int, float]] = []  # (message, recognised, until)
        self._last_turn = -math.inf
        self._waited_at = -math.inf
        self._pace_waits = False  # messages wait for the pace now
        self._sent = 0

    def send(self, count: int, horizon: float = 300.0) -> Run:
        """Send `count` messages, until all are delivered or `horizon` model seconds."""
        start = self.t.now
        run = Run(count)
        self._line.extend(range(count))
        while True:
            self._step(run)
            if len(run.delivered) == count:
                break
            self.t.now = self._next_event()
            if self.t.now - start >= horizon:
                break
        run.seconds = min(self.t.now - start, horizon)
        for times in (run.delivered, run.refused, run.pushbacks):
            times[:] = [at - start for at in times]
        return run

    # -- the loop --------------------------------------------------------------------------

    def _step(self, run: Run) -> None:
        now = self.t.now
        while self._in_flight and self._in_flight[0][0] <= now:
            _, _, message, reply, epoch = heapq.heappop(self._in_flight)
            self._reply(run, message, reply, epoch)
        while self._deferred and self._deferred[0][0] <= now:
            self._line.append(heapq.heappop(self._deferred)[1])
        if self._pending and min(until for _, _, until in self._pending) <= now:
            self._verdicts(run, timed_out=True)
        self._turns()

    def _turns(self) -> None:
        """Give every turn due now; note whether the pace holds messages back."""
        now = self.t.now
        while self._line and len(self._in_flight) < self.connections \
                and now >= self._last_turn + self.rate.spacing():
            self._turn(self._line.popleft())
        self._pace_waits = bool(self._line) and len(self._in_flight) < self.connections
        if self._pace_waits:
            self._waited_at = now

    def _turn(self, message: int) -> None:
        now = self.t.now
        self._last_turn = now
        reply = self.receiver.on_mail(IP, now)
        self._sent += 1
        heapq.heappush(self._in_flight, (now + self.rtt, self._sent, message, reply, self.epoch))

    def _next_event(self) -> float:
        """The model time of the next reply, retry, verdict or turn."""
        times = [self._in_flight[0][0]] if self._in_flight else []
        times += [self._deferred[0][0]] if self._deferred else []
        times += [until for _, _, until in self._pending]
        if self._line and len(self._in_flight) < self.connections:
            times.append(self._last_turn + self.rate.spacing())
        return max(self.t.now, min(times)) if times else math.inf

    # -- judging replies, as engine.shaping.ProviderShaper.judge does ----------------------

    def _reply(self, run: Run, message: int, text: str | None, epoch: int) -> None:
        now, fresh = self.t.now, epoch == self.epoch
        if text is None:
            run.delivered.append(now)
            self.pushback.accepted(now)
            if fresh:
                self.rate.clean(now, self._pace_waits or now - self._waited_at < BINDING,
                                self.rtt)
            self._verdicts(run)
            return
        run.refused.append(now)
        run.refused_messages.add(message)
        reply = Reply.parse(int(text[:3]), text[4:])
        if classify.throttle_rule(self.rules, PROVIDER, reply) is not None:
            self._pushed_back(run, fresh)
            self._line.appendleft(message)
        elif classify.refusal(reply):
            self._refusal(run, message, fresh)
        else:
            self._defer(run, message)

    def _refusal(self, run: Run, message: int, fresh: bool) -> None:
        """A refusal that may be push-back: so judged, or waiting for the next outcome."""
        pushing = self.pushback.refusal(self.t.now)
        self._verdicts(run)
        if pushing:
            self._pushed_back(run, fresh)
            self._line.appendleft(message)
        elif self.pushback.refused > 0:
            self._pending.append((message, self.pushback.recognised, self.t.now + HOLD))
        else:  # at first contact: an ordinary deferral
            self._defer(run, message)

    def _verdicts(self, run: Run, timed_out: bool = False) -> None:
        """The refusals waiting for the next outcome (or whose wait ran out) learn whether
        the provider is pushing back (Pushback.verdict): throttled, or deferred."""
        waiting, self._pending = self._pending, []
        for message, recognised, until in waiting:
            if timed_out and until > self.t.now:
                self._pending.append((message, recognised, until))
            elif self.pushback.pushing or self.pushback.recognised > recognised:
                self._line.appendleft(message)
            else:
                self._defer(run, message)

    def _pushed_back(self, run: Run, fresh: bool) -> None:
        """Answered once: mail whose turn came before the last answer changes nothing."""
        if not fresh:
            return
        self.epoch += 1
        self.rate.pushback(self.t.now)
        self._last_turn = self.t.now  # the next turn a whole spacing from now
        run.pushbacks.append(self.t.now)

    def _defer(self, run: Run, message: int) -> None:
        run.deferred += 1
        heapq.heappush(self._deferred, (self.t.now + self.retry, message))
