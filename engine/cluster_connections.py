"""A provider's concurrent connections for the whole cluster: slots held in Redis.

`shaping.providers.<provider>.cluster_connections` caps the connections open at once to that
provider from every host of the cluster together (docs/SCALING.md), on top of each IP's own
`max_connections` (engine.gate). Redis keeps, per provider, what each holder (a worker:
`host/ip`) holds and until when its lease runs (KumoMTA keeps such semaphores in Redis):

- `<prefix>:conns:<provider>`: a hash, holder -> slots held;
- `...:lease`: a sorted set, holder -> when its lease lapses (Redis's clock);
- `...:want`: a sorted set, holder -> until when it counts as waiting for a slot.

Every call is one Lua script (SLOTS), one round trip: the holder says how many slots it
holds (its own count: a Redis restarted, or a holder back from a fallback, is registered
again by its next call), whether it asks for one more now, and whether callers of its wait.
Holders whose lease lapsed (a host killed -9, cut off) are dropped first: they stop
counting `cluster.connection_lease` after their last call.

- **Cheap**: a round trip per connection opened (a connection carries many messages) and
  one per release, batched in the background; a holder renews its lease every
  `cluster.poll` (at most a third of the lease) while it holds slots; none per message.
- **Fair to demand**: a holder's share is the limit divided by the holders holding or
  waiting, rounded up. A free slot goes to whoever asks, unless others wait and the asker
  holds its share already. A holder above its share while others wait gives slots back:
  its idle connections close at once, and its busy ones when they come back (instead of
  carrying the next message). A holder whose connections all carry mail keeps them until
  then; one that waits for nothing does not hoard.
- **Waiting**: a caller refused a slot waits at the provider's gate (engine.gate, at most
  `shaping.max_wait`); while callers wait, the worker asks again every ASK_AGAIN seconds.
- **Degrading, not stopping**: while Redis is unreachable (engine.cluster: fallback) the
  worker holds at most the limit divided by the holders it last saw (at least 1).

Worker side: it sleeps with gevent.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import gevent
from gevent.lock import Semaphore

from engine import logs
from engine.cluster import Cluster
from engine.metrics import Metrics

log = logging.getLogger("mailengine.cluster")

ASK_AGAIN = 0.1  # s: how often a worker whose callers wait for a slot asks Redis again
WANTING = 2.0  # s: a holder counts as waiting this long after it last asked in vain

# KEYS: the holders' slots (hash), their leases (zset), those waiting (zset).
# ARGV: holder, slots it holds, asking for one more (0/1), callers waiting (0/1), limit,
# lease (s), how long a wait counts (s).
# Returns {granted (0/1), slots held by all, holders (holding or waiting), share, others
# waiting (0/1)}.
SLOTS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local me, held = ARGV[1], tonumber(ARGV[2])
local ask, waiting = ARGV[3] == '1', ARGV[4] == '1'
local limit, lease, wanting = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
for _, gone in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)) do
  redis.call('HDEL', KEYS[1], gone)
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
local total, holders, seen = 0, 0, {}
local pairs_ = redis.call('HGETALL', KEYS[1])
for i = 1, #pairs_, 2 do
  if pairs_[i] ~= me then
    total = total + tonumber(pairs_[i + 1])
    holders = holders + 1
    seen[pairs_[i]] = true
  end
end
local others_waiting = 0
for _, who in ipairs(redis.call('ZRANGE', KEYS[3], 0, -1)) do
  if who ~= me then
    others_waiting = 1
    if not seen[who] then holders = holders + 1 end
  end
end
if held > 0 or ask or waiting then holders = holders + 1 end
local share = math.max(1, math.ceil(limit / math.max(1, holders)))
local granted = 0
if ask and total + held < limit and (held < share or others_waiting == 0) then
  granted = 1
  held = held + 1
end
if held > 0 then
  redis.call('HSET', KEYS[1], me, held)
  redis.call('ZADD', KEYS[2], now + lease, me)
else
  redis.call('HDEL', KEYS[1], me)
  redis.call('ZREM', KEYS[2], me)
end
if (ask and granted == 0) or waiting then
  redis.call('ZADD', KEYS[3], now + wanting, me)
elseif granted == 1 then
  redis.call('ZREM', KEYS[3], me)
end
local keep = math.ceil((lease + wanting) * 1000)
for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], keep) end
return {granted, total + held, holders, share, others_waiting}
"""


class ClusterConnections:
    """One provider's cluster-wide connection slots, as one worker (`member`) holds them.

    The provider's gate (engine.gate) asks `acquire` before it opens a connection and
    calls `release` when one has closed; `waiters()` says whether callers wait for a slot,
    `shed(n)` closes up to n idle connections (both the gate's)."""

    def __init__(self, cluster: Cluster, provider: str, limit: int, member: str,
                 metrics: Metrics | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.provider = provider
        self.limit = limit
        self._cluster = cluster
        self._member = member
        self._metrics = metrics
        self._clock = clock
        self._keys = [cluster.key("conns", provider), cluster.key("conns", provider, "lease"),
                      cluster.key("conns", provider, "want")]
        self._script = cluster.script(SLOTS)
        self._lock = Semaphore()  # one call at a time: each says this worker's count
        self.held = 0  # slots this worker holds (connections open, or closing)
        self.total = 0  # slots held by every worker, as Redis said last
        self.members = 1  # holders holding or waiting, as Redis said last
        self.share = limit  # this worker's share, as Redis said last
        self.others_waiting = False  # other workers wait for a slot (Redis, last call)
        self.denied = 0  # asks refused
        self.shed_count = 0  # idle connections closed to give their slot back
        self._waiting_since: float | None = None  # callers began to wait (an episode)
        self._keeper: gevent.Greenlet[Any, Any] | None = None
        self._closed = False  # close(): no greenlet of its own any more
        self._syncing = False  # a release is on its way to Redis
        self._unsynced = False  # a release Redis has not been told of yet
        # The gate's (engine.gate.ConnectionGate.limit_cluster): whether callers wait for a
        # slot, wake one of them (it asks again), close up to n idle connections.
        self.waiters: Callable[[], bool] = lambda: False
        self.wake: Callable[[], None] = lambda: None
        self.shed: Callable[[int], int] = lambda count: 0

    @property
    def mode(self) -> str:
        """The link to Redis (engine.cluster): shared, fallback."""
        return self._cluster.mode

    @property
    def fallback_share(self) -> int:
        """Slots this worker may hold while Redis is unreachable."""
        return max(1, self.limit // max(1, self.members))

    @property
    def over_share(self) -> bool:
        """Holding more than its share while other workers wait (or while the cluster holds
        more than the limit: slots registered again after Redis came back empty): a
        connection that comes back is closed rather than reused (its slot goes to them)."""
        return (self.others_waiting or self.total > self.limit) and self.held > self.share

    def acquire(self) -> bool:
        """One more slot for a connection about to open: whether it was granted (one round
        trip; while Redis is unreachable, this worker's share of the limit)."""
        granted = self._call(ask=True)
        if granted:
            self._ended_wait()
        else:
            self.denied += 1
            if self._metrics is not None:
                self._metrics.incr("cluster_connections_denied", self.provider)
            self._began_wait()
        self._gauge()
        self._keep()
        return granted

    def release(self) -> None:
        """A connection that held a slot has closed: the slot is free here at once, and
        for the other hosts at the next call (in the background, batched)."""
        self.held = max(0, self.held - 1)
        self._unsynced = True
        self._gauge()
        if self._closed:  # told in the caller: nothing is started after close()
            self._sync()
        elif not self._syncing:
            self._syncing = True
            gevent.spawn(self._sync)

    def _sync(self) -> None:
        """Tell Redis the count, again while releases came during the call."""
        try:
            while self._unsynced:
                self._unsynced = False
                self._call(ask=False)
        finally:
            self._syncing = False

    def _call(self, ask: bool) -> bool:
        """One round trip saying this worker's count (and asking for one more if `ask`);
        whether a slot was granted. In fallback: granted while below the fallback share."""
        with self._lock:
            held, waiting = self.held, self.waiters()
            started = self._clock()
            reply = self._cluster.run("connections", lambda client: self._script(
                keys=self._keys, args=[self._member, held, int(ask), int(waiting), self.limit,
                                       self._cluster.cfg.connection_lease, WANTING],
                client=client))
            if reply is None:
                granted = ask and self.held < self.fallback_share
                self.held += granted
                return granted
            if self._metrics is not None:
                self._metrics.timing("cluster_connections_call", self.provider,
                                     (self._clock() - started) * 1000)
            granted = int(reply[0]) == 1
            self.total, self.members = int(reply[1]), max(1, int(reply[2]))
            self.share, self.others_waiting = int(reply[3]), int(reply[4]) == 1
            self.held += granted  # in the lock: the next call says it
            return granted

    # -- keeping the lease, asking again, giving back ------------------------------------

    def _keep(self) -> None:
        if not self._closed and (self._keeper is None or self._keeper.dead):
            self._keeper = gevent.spawn(self._keep_up)

    def _keep_up(self) -> None:
        """While this worker holds slots or callers wait: renew the lease every
        `cluster.poll` (a third of the lease at most), wake a waiting caller every
        ASK_AGAIN (it asks again), and give back idle slots beyond the share."""
        cfg = self._cluster.cfg
        renew_every = min(cfg.poll, cfg.connection_lease / 3)
        renewed = self._clock()
        while not self._closed and (self.held > 0 or self.waiters()):
            waiting = self.waiters()
            if not waiting:
                self._ended_wait()  # they went back to the spool, or took a connection
            gevent.sleep(ASK_AGAIN if waiting
                         else max(0.0, renewed + renew_every - self._clock()))
            if waiting:
                self.wake()
            if self._clock() - renewed >= renew_every:
                renewed = self._clock()
                self._call(ask=False)
                self._give_back()

    def _give_back(self) -> None:
        if self.over_share:
            closed = self.shed(self.held - self.share)
            if closed:
                self.shed_count += closed
                if self._metrics is not None:
                    self._metrics.incr("cluster_connections_shed", self.provider, closed)

    def _began_wait(self) -> None:
        if self._waiting_since is None:
            self._waiting_since = self._clock()
            log.info(logs.kv("cluster_connections_full", provider=self.provider,
                             limit=self.limit, held=self.held, total=self.total,
                             members=self.members, share=self.share,
                             mode=self._cluster.mode))

    def _ended_wait(self) -> None:
        since, self._waiting_since = self._waiting_since, None
        if since is not None and self._metrics is not None:
            self._metrics.timing("cluster_connections_wait", self.provider,
                                 (self._clock() - since) * 1000)

    def _gauge(self) -> None:
        if self._metrics is not None:
            self._metrics.gauge("cluster_connections_held", self.provider, self.held)

    def close(self) -> None:
        """No more renewals: the keeping greenlet ends, and none is started again (a test's
        or a worker's end: a lease not renewed lapses after `cluster.connection_lease`); a
        release after it tells Redis in its caller."""
        self._closed = True
        keeper, self._keeper = self._keeper, None
        if keeper is not None:
            keeper.kill(block=True, timeout=1.0)

    def state(self) -> dict[str, Any]:
        return {"cluster_connections": self.limit, "slots_held": self.held,
                "cluster_open": self.total, "connection_share": self.share,
                "connection_members": self.members, "mode": self._cluster.mode}

