"""A provider's rate for the whole cluster: turns leased from Redis, a batch at a time.

`shaping.providers.<provider>.cluster_rate` caps the messages per second that every host
of the cluster sends to that provider together (docs/SCALING.md);
`shaping.ip_pools.<pool>.<provider>.cluster_rate`, what the IPs of one group send to it
(the same, under another key: `limit_key`). Redis keeps one schedule per limit: the
time its next turn is free, turns being 1/rate apart. A worker does not ask Redis for
each message: it **leases** a batch of turns (the LEASE Lua script, one round trip),
consecutive on that schedule, and gives them out to its messages one by one, each at
its time. Since the hosts' batches never overlap on the schedule, their messages together
keep to the rate however they interleave, with no burst beyond it.

- **Cheap**: one round trip per batch; a batch is at most the worker's share of what the
  rate gives over `cluster.lease` seconds (a quarter of a second's turns at 60/s with three
  workers: three or four round trips a second per worker), and a worker leases at most
  `cluster.lease` seconds ahead of the schedule's present.
- **Fair to demand**: a worker asks for as many turns as its messages used of late (one
  lease at a time; the messages that come meanwhile wait for it): twice its last batch
  when that was all taken, half of it when turns went unused, at least one per message
  waiting; and it gets at most its share (the rate's turns over
  `cluster.lease`, divided by the workers that leased lately): a worker with little to send
  takes little, and a busy one comes back for more as soon as its batch is given out, so
  the rate goes where the demand is.
- **Degrading, not stopping**: while Redis is unreachable (engine.cluster: fallback) the
  worker keeps a schedule of its own at the rate divided by the workers it last saw share
  it (MEMBERS_SEEN), and keeps delivering; the first lease Redis answers ends it. That
  schedule starts a horizon after Redis was lost (the turns Redis gave out before are
  all within it), so the change never sends more than the rate. Back from it, a worker
  keeps to its fallback share for `cluster.retry` + `cluster.lease`, or until as many
  workers lease from Redis as it last saw (**rejoining**, engine.cluster_lease): it
  leases as many turns as that time span holds at the rate and takes every `members`-th
  (of those it last saw), so its messages go spaced at its share, each at its turn, and
  the span is held on Redis's schedule for it. The
  others may still be on their own schedules until their next retry, and Redis's schedule
  (empty, or with only this worker on it) knows nothing of their turns; taking the whole
  rate from it meanwhile sent up to 5/3 of the rate with three workers (bench/cluster.py:
  refusals at Redis's return in every run); and its batch at the rate's spacing a burst.

A turn not taken within GRACE of its time is dropped (counted in `cluster_turns_lost`),
so a turn is never used late enough to crowd the next host's. A message whose turn would
be more than `shaping.max_wait` away is not put in line: it goes back to the spool, as
with the local pace (engine.pacer).

Worker side: it sleeps with gevent.
"""
from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import gevent

from engine.cluster import Cluster
from engine.cluster_lease import InFlight, Rejoining
from engine.metrics import Metrics

GRACE = 0.05  # s: a leased turn not taken this long after its time is dropped
SLACK = 0.001  # s: a turn due this soon goes at once
MEMBERS_SEEN = 30.0  # s: a worker that leased within this long shares the rate

# KEYS[1]: the provider's schedule (when its next turn is free, Unix time at Redis);
# KEYS[2]: its members (sorted set: worker -> when it last leased).
# ARGV: member, turns wanted, rate (/s), horizon (s), members' memory (s).
# Returns {turns granted, seconds from now to the first (or, none granted: to come
# back in, when the batch asked for would fit), members}; the times are Redis's own, so
# the hosts' clocks do not matter.
LEASE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local member, want = ARGV[1], tonumber(ARGV[2])
local rate, horizon, memory = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
redis.call('ZADD', KEYS[2], now, member)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - memory)
redis.call('PEXPIRE', KEYS[2], math.ceil(memory * 1000))
local members = redis.call('ZCARD', KEYS[2])
local free = tonumber(redis.call('GET', KEYS[1]) or '0')
if free < now then free = now end
local ahead = free - now
local share = math.max(1, math.floor(rate * horizon / members))
local n = math.min(want, share)
if ahead + n / rate > horizon then  -- full: come back when the batch fits
  return {0, string.format('%.6f', ahead + n / rate - horizon), members}
end
redis.call('SET', KEYS[1], string.format('%.6f', free + n / rate),
           'PX', math.ceil((ahead + n / rate + memory) * 1000))
return {n, string.format('%.6f', ahead), members}
"""


def limit_key(cluster: Cluster, kind: str, provider: str, pool: str | None) -> str:
    """The Redis key of a cluster-wide limit (`kind`: "rate", "hourly") of `provider`,
    or of IP group `pool` x `provider`: `<prefix>:<kind>:<provider>`, or
    `<prefix>:pool:<pool>:<kind>:<provider>`."""
    return cluster.key(kind, provider) if pool is None else \
        cluster.key("pool", pool, kind, provider)


class ClusterRate:
    """One provider's cluster-wide rate (or one IP group's x provider, `pool`), as one
    worker (`member`) takes its turns."""

    def __init__(self, cluster: Cluster, provider: str, rate: float, member: str,
                 metrics: Metrics | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 pool: str | None = None) -> None:
        self.provider = provider
        self.pool = pool
        self.rate = rate
        self._cluster = cluster
        self._member = member
        self._metrics = metrics
        self._clock = clock
        key = limit_key(cluster, "rate", provider, pool)
        self._keys = [key, f"{key}:members"]
        self._lease_script = cluster.script(LEASE)
        self._turns: deque[float] = deque()  # leased turns (this process's monotonic time)
        self._flight = InFlight()  # the lease in flight, and the messages waiting for it
        self._batch = 1  # turns to ask for: grows while all are taken, shrinks when some are lost
        self._back_at = -math.inf  # no turn to lease before this (the schedule is full)
        self._own_free = -math.inf  # fallback: the next free turn of this worker's schedule
        self._held_until = -math.inf  # the last turn leased from Redis (given out or not)
        # Back from fallback: at its fallback share for a retry and a lease horizon (the
        # others' retry, and the turns they took alone), or until all it saw lease again.
        self._rejoin = Rejoining(cluster.cfg.retry + cluster.cfg.lease)
        self.members = 1  # workers sharing the rate, as Redis said last
        self.lost = 0  # turns leased and not taken in time

    @property
    def share(self) -> float:
        """Messages per second this worker may count on: its part of the rate."""
        return self.rate / max(1, self.members)

    def take(self, max_wait: float) -> float:
        """Once this message's turn has come (it may have waited up to `max_wait`): 0.0.
        Else the seconds it would wait (more than `max_wait`), and it took no turn."""
        while True:
            now = self._clock()
            self._drop_late(now)
            if self._turns:
                return self._take_leased(now, max_wait)
            wait = max(self._back_at - now, 0.0) + self._flight.waiting / self.share
            if wait > max_wait:
                return wait
            if self._flight.join():  # another message was leasing: its turns are ours
                continue
            self._lease_now(max_wait)

    def _take_leased(self, now: float, max_wait: float) -> float:
        at = self._turns[0]
        if at - now > max_wait:
            return at - now
        self._turns.popleft()
        if at - now > SLACK:
            gevent.sleep(at - now)
        return 0.0

    def _drop_late(self, now: float) -> None:
        lost = 0
        while self._turns and self._turns[0] < now - GRACE:
            self._turns.popleft()
            lost += 1
        if lost:
            self.lost += lost
            self._batch = max(1, self._batch // 2)
            if self._metrics is not None:
                self._metrics.incr("cluster_turns_lost", self.provider, lost)

    def _lease_now(self, max_wait: float) -> None:
        """Lease turns for this message and those waiting behind it; until some are
        granted, or the schedule is full for longer than `max_wait` (`_back_at`)."""
        with self._flight.leasing():
            while True:
                wait = self._lease(max(self._batch, self._flight.waiting + 1))
                if wait <= 0.0:
                    return
                self._back_at = self._clock() + wait
                if wait > max_wait:
                    return
                gevent.sleep(wait)

    def _lease(self, want: int) -> float:
        """Lease up to `want` turns into `_turns`; 0.0 if some were, else when to ask
        again (seconds from now)."""
        started = self._clock()
        rejoining = self._rejoin.active(started)
        step = 1.0
        if rejoining:  # its share's messages over a lease, each taking `step` turns of the rate
            share = self._rejoin.share
            step = max(1.0, self.rate / share)
            want = math.ceil(step * min(want, max(
                1, math.floor(share * self._cluster.cfg.lease))))
        reply = self._cluster.run("lease", lambda client: self._lease_script(
            keys=self._keys, args=[self._member, want, self.rate, self._cluster.cfg.lease,
                                   MEMBERS_SEEN], client=client))
        now = self._clock()
        if reply is None:
            self._rejoin.fell_back(self.share)
            return self._lease_own(want, now)
        granted, offset, members = int(reply[0]), float(reply[1]), int(reply[2])
        if self._metrics is not None:
            self._metrics.timing("cluster_lease", self.provider, (now - started) * 1000)
            if self.pool is None:  # the provider's: one gauge, not two limits' in turn
                self._metrics.gauge("cluster_members", self.provider, members)
        self._rejoin.answered(now, members, self.members)
        self.members = max(1, members)
        self._own_free = -math.inf
        if granted <= 0:
            return max(offset, SLACK)
        self._batch = min(2 * self._batch, 2 * granted)  # all taken (none were left): more
        self._held_until = now + offset + (granted - 1) / self.rate
        if rejoining:  # every step-th turn of those leased: its share, spaced, at Redis's times
            self._turns.extend(now + offset + math.floor(i * step) / self.rate
                               for i in range(math.ceil(granted / step)))
            self._back_at = -math.inf
            return 0.0
        self._add(now + offset, granted, self.rate)
        return 0.0

    def _lease_own(self, want: int, now: float) -> float:
        """Redis unreachable: the same schedule, this worker's alone, at its share."""
        rate, horizon = self.share, self._cluster.cfg.lease
        free = max(self._own_free, now)
        if self._own_free == -math.inf and self._held_until > -math.inf:
            # From shared to alone: every turn Redis gave out before it went (to any host)
            # is within a horizon of now, and this worker's own are before `_held_until`.
            # Its schedule starts after both: never on top of them.
            free = max(now + horizon, self._held_until)
        self._own_free = free
        if free - now >= horizon:
            return free - now - horizon + 1.0 / rate
        granted = max(1, min(want, math.floor((horizon - (free - now)) * rate)))
        self._own_free = free + granted / rate
        self._add(free, granted, rate)
        return 0.0

    def _add(self, first: float, count: int, rate: float) -> None:
        self._turns.extend(first + i / rate for i in range(count))
        self._back_at = -math.inf

    def state(self) -> dict[str, Any]:
        if self.pool is not None:
            return {"cluster_rate": self.rate, "members": self.members, "leased": len(self._turns)}
        return {"cluster_rate": self.rate, "members": self.members,
                "share": round(self.share, 3), "mode": self._cluster.mode,
                "leased": len(self._turns), "lost": self.lost}
