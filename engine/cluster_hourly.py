"""A provider's hourly budget for the whole cluster: blocks of it leased from Redis.

`shaping.providers.<provider>.cluster_hourly` caps the messages per hour that every host of
the cluster sends to that provider together; `shaping.ip_pools.<pool>.<provider>.
cluster_hourly`, what the IPs of one group send to it (docs/SCALING.md).

**The hour** is the local `hourly`'s (engine.caps): the last 60 one-minute buckets, a
sliding hour, here minutes of Redis's clock (`TIME`: the hosts' clocks do not matter). Redis
keeps a count per minute (a hash, `<prefix>:hourly:<provider>`); what is left is the budget
less the last 60 minutes' counts. A message with none left goes back to the spool without
an attempt, due when the oldest minute leaves the hour, as with the local cap.

- **Cheap**: a worker does not ask Redis for each message: it **leases a block** of the
  budget (the LEASE script, one round trip), counted in the current minute, and gives it
  out to its messages one by one.
- **Fair to demand**: a block is as large as the worker's demand of late (twice the last
  block while it takes them all, half when some lapsed, at least one per message waiting),
  and at most a fair share of what is left: what is left divided by the workers that
  leased lately (`members`). A quiet worker takes little; a busy one comes back as soon as
  its block is given out; so the budget goes where the mail is.
- **Lapses, then returns**: a block is good until the end of the minute (Redis's) it is
  counted in, so every message is counted in the minute it goes and the sliding hour is
  exact (a block used later would count in a minute that leaves the hour before the
  message does). What the worker did not give out by then lapses, and is **returned** to
  that minute's count with its next lease (no round trip of its own); so is a message
  given back (`give_back`: it did not go) after its block lapsed, to the minute it was
  counted in (`Counted`), not the next block's. So the budget is not lost to a worker
  that needed less; a worker none of whose messages took from its block for IDLE
  seconds (its mail went) returns the remainder at once (a round trip of its own). A
  worker killed leaves its remainder counted until its minute leaves the hour: never
  more than the budget, sometimes a little less.
- **Used up**: the message goes back to the spool, due when the oldest minute leaves the
  hour (the budget surely has room then); but while other workers hold blocks of this
  minute (Redis keeps each worker's last block), when those are back: IDLE after the
  minute's end (a block lapses then, or was returned idle before). The worker asks Redis
  again at the next minute at the earliest, so a used-up budget costs a round trip a
  minute, not one per message.
- **Degrading, not stopping**: while Redis is unreachable (engine.cluster: fallback) the
  worker keeps to the budget divided by the workers it last saw (`members`), over its own
  last hour (every message it sent, shared or alone: it does not know what the others sent
  before Redis went, only that its share is what it may count on). What it sent alone is
  added to the current minute's count at its first lease Redis answers, so the cluster's
  hour includes it.
- **Rebuilt**: each worker keeps what Redis counts of its own, by minute (its blocks and
  what it sent alone, less what it returned) and sends it with every lease. Redis keeps
  each worker's last block as long as the counts (`...:blocks`): a worker missing there
  with counts of its own still in the hour finds a Redis that lost them (restarted
  without persistence, flushed, failed over to an empty replica), and the lease adds
  them back to their minutes, before the returns they are owed (`cluster_state_rebuilt
  what=hourly_count`). Each worker adds only its own, and only once: the lease marks it
  there again. That lease grants nothing: the others' counts may still be missing, so
  the worker rejoins (below) and leases again.
- **Rejoining** (engine.cluster_lease): back from fallback, a worker's blocks stay within
  what is left of its fallback share (over its own hour) for `cluster.retry` + a block
  alone's life (ALONE_BLOCK), or until as many workers lease as it last saw. The others
  may still be alone, their messages counted in Redis only at their next lease: Redis's
  "left" is too high meanwhile, and an empty Redis shows the first worker back as the
  only member, whose blocks are sized "left / members": it could take the whole budget
  on top of what the others sent alone (up to all of the budget but its own share).
  Likewise after a rebuild, the others' counts set again only at their next lease.

Worker side: waiting for a lease in flight uses gevent.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gevent

from engine import logs
from engine.caps import HourWindow
from engine.cluster import Cluster
from engine.cluster_lease import InFlight, Rejoining
from engine.cluster_rate import limit_key
from engine.metrics import Metrics

log = logging.getLogger("mailengine.cluster")

# s: a worker that leased within this long shares the budget. Longer than a block's life
# (a minute): a worker taking a block a minute is still a member.
MEMBERS_SEEN = 120.0
MIN_WAIT = 1.0  # s: the budget used up, the first message is not back sooner than this
# s: the share used up while Redis is unreachable, a message is back within this long (Redis
# may be back by then, and the cluster's hour have room), not only when its own hour frees.
ALONE_RECHECK = 60.0
IDLE = 2.0  # s: a block none of the worker's messages took from this long is returned
ALONE_BLOCK = 60.0  # s: a block of its share, Redis unreachable, is given out this long

# KEYS[1]: the counts (hash: minute number at Redis -> messages counted in that minute);
# KEYS[2]: the members (sorted set: worker -> when it last leased); KEYS[3]: their last
# blocks (hash: worker -> "<minute>:<granted>"), kept as long as the counts: a worker missing
# there that has counts of its own in the hour finds a Redis that lost them (restarted empty).
# ARGV: member, wanted, budget, members' memory (s), returned ("<minute>:<n>,..." : each to
# the minute it was counted in), what Redis counts of this worker's ("<minute>:<n>,...": set
# again if Redis lost it), sent alone (while Redis was unreachable), the time ('' = Redis's
# TIME; tests give it), IDLE.
# Returns {granted, seconds until the block lapses (none granted: until the message should
# come back: when the oldest minute leaves the hour; or, while other workers hold blocks of
# this minute, which they return unused when idle or at the minute's end, then), members,
# left after this block, the block's minute, seconds until the minute ends, counts set
# again (then nothing is granted: the others' counts may still be missing)}.
LEASE = """
local now
if ARGV[8] ~= '' then
  now = tonumber(ARGV[8])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local member, want, budget = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local memory, alone = tonumber(ARGV[4]), tonumber(ARGV[7])
local minute = math.floor(now / 60)
local rebuilt = 0
if ARGV[6] ~= '' and redis.call('HEXISTS', KEYS[3], member) == 0 then
  for m, n in string.gmatch(ARGV[6], '(%d+):(%d+)') do
    if tonumber(m) > minute - 60 then
      redis.call('HINCRBY', KEYS[1], m, n)
      rebuilt = rebuilt + tonumber(n)
    end
  end
end
redis.call('ZADD', KEYS[2], now, member)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - memory)
redis.call('PEXPIRE', KEYS[2], math.ceil(memory * 1000))
local members = redis.call('ZCARD', KEYS[2])
for m, n in string.gmatch(ARGV[5], '(%d+):(%d+)') do
  local held = tonumber(redis.call('HGET', KEYS[1], m) or '0')
  if held > 0 then redis.call('HSET', KEYS[1], m, math.max(0, held - tonumber(n))) end
end
if alone > 0 then redis.call('HINCRBY', KEYS[1], minute, alone) end
local counts = redis.call('HGETALL', KEYS[1])
local used, oldest = 0, minute
for i = 1, #counts, 2 do
  local m, n = tonumber(counts[i]), tonumber(counts[i + 1])
  if m <= minute - 60 or n <= 0 then
    redis.call('HDEL', KEYS[1], counts[i])
  else
    used = used + n
    if m < oldest then oldest = m end
  end
end
local left = budget - used
if left <= 0 then
  local back = (oldest + 60) * 60 - now
  local blocks = redis.call('HGETALL', KEYS[3])
  for i = 1, #blocks, 2 do
    local m, n = string.match(blocks[i + 1], '^(%d+):(%d+)$')
    if blocks[i] ~= member and tonumber(m) == minute and tonumber(n) > 0 then
      back = math.min(back, (minute + 1) * 60 - now + tonumber(ARGV[9]))
    end
  end
  redis.call('HSET', KEYS[3], member, string.format('%d:0', minute))
  redis.call('EXPIRE', KEYS[1], 3660)
  redis.call('EXPIRE', KEYS[3], 3660)
  return {0, string.format('%.6f', back), members, 0, minute,
          string.format('%.6f', (minute + 1) * 60 - now), rebuilt}
end
local n = math.min(want, left, math.max(1, math.floor(left / members)))
if rebuilt > 0 then n = 0 end
redis.call('HINCRBY', KEYS[1], minute, n)
redis.call('EXPIRE', KEYS[1], 3660)
redis.call('HSET', KEYS[3], member, string.format('%d:%d', minute, n))
redis.call('EXPIRE', KEYS[3], 3660)
local ends = string.format('%.6f', (minute + 1) * 60 - now)
return {n, ends, members, left - n, minute, ends, rebuilt}
"""


@dataclass(frozen=True)
class Counted:
    """One message counted against the budget: when (the worker's clock) and in which
    minute of Redis's ("": a block alone, Redis unreachable), so that it is given back to
    the minute it was counted in."""

    at: float
    minute: str


class ClusterHourly:
    """One provider's (or one IP group's x provider, `pool`) hourly budget across the
    cluster, as one worker (`member`) takes from it. `now`: the cluster's time; None
    (always, but in tests): Redis's own."""

    def __init__(self, cluster: Cluster, provider: str, hourly: int, member: str,
                 metrics: Metrics | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 pool: str | None = None, now: Callable[[], float] | None = None) -> None:
        self.provider = provider
        self.pool = pool
        self.hourly = hourly
        self._cluster = cluster
        self._member = member
        self._metrics = metrics
        self._clock = clock
        self._now = now
        key = limit_key(cluster, "hourly", provider, pool)
        self._keys = [key, f"{key}:members", f"{key}:blocks"]
        self._lease_script = cluster.script(LEASE)
        self._held = 0  # the block's messages not given out yet
        self._lapses_at = -math.inf  # the block is good until then (this process's clock)
        self._minute = ""  # the minute (Redis's) the block is counted in; "": a block alone
        self._taken = 0  # of the block, given out
        # Lapsed unused, or given back after its block lapsed: minute -> count, returned to
        # that minute with the next lease.
        self._returns: dict[str, int] = {}
        self._alone = 0  # sent while Redis was unreachable, not yet counted there
        # What Redis counts of this worker's, by minute (its blocks, what it sent alone, less
        # what it returned): set again in a Redis that lost it (restarted empty).
        self._counted: dict[str, int] = {}
        # What the last take counted (read by its caller at once, no other greenlet runs
        # between: given back with it if the message does not go).
        self.counted = Counted(-math.inf, "")
        self._mine = HourWindow()  # what this worker sent in its last hour: the fallback's count
        self._flight = InFlight()  # the lease in flight, and the messages waiting for it
        # Back from fallback: at its fallback share for a retry and a block alone (the
        # others' retry, and what they were given alone), or until all it saw lease again.
        self._rejoin = Rejoining(cluster.cfg.retry + ALONE_BLOCK)
        self._batch = 1  # messages to ask for
        # The budget used up: no lease is tried before `_back_at` (the next minute, when
        # lapsed blocks are returned), and a message is told to come back at `_frees_at`.
        self._back_at = -math.inf
        self._frees_at = -math.inf
        self._last_take = -math.inf  # when a message last took from the block
        self._idle_watch: gevent.Greenlet | None = None  # returns an idle block
        self._closed = False  # close(): no idle watch any more
        self.members = 1  # workers sharing the budget, as Redis said last
        self.left = hourly  # of the hour, as Redis said last

    @property
    def reason(self) -> str:
        """A message deferred for this budget is "not sent yet: <provider> <reason>"."""
        return "cluster hourly limit" + (f" of pool {self.pool}" if self.pool else "")

    @property
    def share(self) -> int:
        """Messages per hour this worker may count on alone: its part of the budget."""
        return max(1, self.hourly // max(1, self.members))

    def take(self) -> float:
        """0.0: this message may go, counted against the hour (where: `counted`). Else the
        seconds until the hour has room again (it took nothing)."""
        while True:
            now = self._clock()
            self._lapse(now)
            if self._held > 0:
                self._held -= 1
                self._taken += 1
                self._last_take = now
                self._mine.add(now)
                self.counted = Counted(now, self._minute)
                if not self._minute:
                    self._alone += 1
                return 0.0
            if now < self._back_at:
                return max(self._frees_at - now, MIN_WAIT)
            if self._flight.join():  # another message was leasing: its block is ours
                continue
            self._lease_now()

    def give_back(self, counted: Counted | None = None) -> None:
        """A message that took from the budget (`counted`: `self.counted` as its `take` left
        it; None: the last take) did not go after all (another limit deferred it): its share
        goes back into the block, or, that block lapsed meanwhile, to Redis, to the minute it
        was counted in (a later minute would leave the hour after it: a message too many in
        the hour meanwhile)."""
        counted = counted or self.counted
        self._mine.remove(counted.at)
        if not counted.minute:  # (counted in Redis since: it stays counted, never too few)
            self._alone = max(0, self._alone - 1)
        if counted.minute == self._minute and self._clock() < self._lapses_at:
            self._held += 1  # its block is still running
            self._taken = max(0, self._taken - 1)
        elif counted.minute:
            self._return_later(counted.minute, 1)

    def _lapse(self, now: float) -> None:
        if now >= self._lapses_at > -math.inf:
            self._end_block()

    def _end_block(self) -> None:
        """The block lapsed or was all given out: what is left of it is returned with the
        next lease; the next block follows the demand."""
        if self._held > 0:
            if self._minute:
                self._return_later(self._minute, self._held)
            self._batch = max(1, self._batch // 2)
        elif self._taken >= self._batch:
            self._batch *= 2  # all taken: more next time
        self._held, self._taken, self._lapses_at = 0, 0, -math.inf

    def _return_later(self, minute: str, count: int) -> None:
        self._returns[minute] = self._returns.get(minute, 0) + count

    def _lease_now(self) -> None:
        with self._flight.leasing():
            if self._lapses_at > -math.inf:  # the block was all given out
                self._end_block()
            self._lease(max(self._batch, self._flight.waiting + 1))

    def _lease(self, want: int) -> None:
        """A block of up to `want` into `_held`; none left: `_back_at`, when to ask again.
        Rejoining (back from fallback), no more than is left of its fallback share."""
        started = self._clock()
        asked = want
        if want > 0 and self._rejoin.active(started):
            want = min(want, max(0, int(self._rejoin.share) - self._mine.total(started)))
        returns, alone = dict(self._returns), self._alone
        reply = self._cluster.run("hourly", lambda client: self._lease_script(
            keys=self._keys, args=[self._member, want, self.hourly, MEMBERS_SEEN,
                                   _by_minute(returns), _by_minute(self._counted), alone,
                                   "" if self._now is None else repr(self._now()), IDLE],
            client=client))
        now = self._clock()
        if reply is None:
            self._rejoin.fell_back(self.share)
            if asked > 0:
                self._lease_alone(asked, now)
            return
        granted, seconds, members = int(reply[0]), float(reply[1]), int(reply[2])
        rebuilt = int(reply[6])
        self._answered(returns, alone, granted, str(int(reply[4])))
        if rebuilt > 0:  # the others' counts may be missing too, until their next lease:
            self._rebuilt(rebuilt)  # rejoining, as back from a fallback
            self._rejoin.fell_back(self.share)
        self._rejoin.answered(now, members, self.members)
        self.members, self.left = max(1, members), int(reply[3])
        if self._metrics is not None:
            self._metrics.timing("cluster_hourly_lease", self.provider, (now - started) * 1000)
            if self.pool is None:
                self._metrics.gauge("cluster_hourly_left", self.provider, self.left)
        if asked == 0:  # a return only
            return
        if rebuilt > 0 and granted <= 0 and self.left > 0:  # none granted at a rebuild
            self._lease(asked)
            return
        if want == 0:  # rejoining, its share used up
            if not self._rejoin.active(now):  # rejoined by this answer: Redis's budget now
                self._lease(asked)
                return
            # Back when its hour frees, or it has rejoined.
            self._back_at = self._frees_at = now + max(MIN_WAIT, min(
                self._mine.frees_at() - now, ALONE_RECHECK, self._rejoin.until - now))
            return
        if granted <= 0:  # used up: back when the hour frees; asked again next minute
            self._frees_at = now + max(seconds, MIN_WAIT)
            self._back_at = now + max(float(reply[5]), MIN_WAIT)
            return
        # Good until its minute ends at Redis: counted from before the call, never later.
        self._block(granted, started + seconds, str(int(reply[4])))

    def _answered(self, returns: dict[str, int], alone: int, granted: int,
                  minute: str) -> None:
        """Redis took the lease: what was returned and sent alone is counted there now (a
        give-back during the call is returned with the next lease), and the block."""
        for returned, count in returns.items():
            still = self._returns.pop(returned, 0) - count
            if still > 0:
                self._returns[returned] = still
            self._add_counted(returned, -count)
        self._alone = max(0, self._alone - alone)
        self._add_counted(minute, alone + granted)
        for old in [m for m in self._counted if int(m) <= int(minute) - 60]:
            del self._counted[old]  # left the hour

    def _add_counted(self, minute: str, count: int) -> None:
        total = self._counted.get(minute, 0) + count
        if total > 0:
            self._counted[minute] = total
        else:
            self._counted.pop(minute, None)

    def _rebuilt(self, count: int) -> None:
        """Redis had lost this worker's counts of the hour (restarted empty, flushed): the
        lease set them again."""
        if self._metrics is not None:
            self._metrics.incr("cluster_state_rebuilt", self.provider)
        log.warning(logs.kv("cluster_state_rebuilt", provider=self.provider,
                            what="hourly_count", member=self._member, met_in_fallback=False,
                            pool=self.pool or "", count=count))

    def _lease_alone(self, want: int, now: float) -> None:
        """Redis unreachable: this worker's share over its own last hour."""
        left = self.share - self._mine.total(now)
        if left <= 0:
            frees_in = self._mine.frees_at() - now
            self._back_at = self._frees_at = now + min(max(frees_in, MIN_WAIT), ALONE_RECHECK)
            return
        self._block(min(want, left), now + ALONE_BLOCK, "")

    def _block(self, granted: int, lapses_at: float, minute: str) -> None:
        self._held += granted
        self._lapses_at, self._minute = lapses_at, minute
        self._back_at = -math.inf
        self._last_take = self._clock()
        if minute and self._idle_watch is None and not self._closed:
            self._idle_watch = gevent.spawn_later(IDLE, self._return_if_idle)

    def _return_if_idle(self) -> None:
        """A block none of the worker's messages took from for IDLE (its mail went): what
        is left of it goes back to Redis now, one round trip, for the workers that have
        mail, instead of at the end of its minute and the worker's next lease."""
        self._idle_watch = None
        if self._held == 0 or not self._minute or self._closed:
            return
        idle = self._clock() - self._last_take
        if idle < IDLE or self._flight.busy:
            self._idle_watch = gevent.spawn_later(max(IDLE - idle, 0.1), self._return_if_idle)
            return
        self._end_block()
        with self._flight.leasing():
            self._lease(0)

    def close(self) -> None:
        """Stop watching for an idle block, and start no watch again (a worker's end, a
        test's): a block leased after it lapses at its minute's end, its remainder returned
        with a later lease."""
        self._closed = True
        watch, self._idle_watch = self._idle_watch, None
        if watch is not None:
            watch.kill(block=True, timeout=1.0)

    def state(self) -> dict[str, Any]:
        if self.pool is not None:
            return {"cluster_hourly": self.hourly, "hourly_left": self.left}
        return {"cluster_hourly": self.hourly, "hourly_left": self.left,
                "hourly_members": self.members, "hourly_held": self._held}


def _by_minute(counts: dict[str, int]) -> str:
    """Counts by minute as LEASE takes them: "<minute>:<count>,..."."""
    return ",".join(f"{minute}:{count}" for minute, count in counts.items() if count > 0)
