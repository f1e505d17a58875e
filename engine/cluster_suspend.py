"""Suspensions and learned ceilings shared by the hosts of a cluster: a block seen by one
host stops them all.

When a worker's provider shaper suspends a provider on its own (a block of the sending IP,
or a throttle rule with `suspend`: engine.shaping), it publishes the suspension to the
cluster's Redis: one key per provider, `<prefix>:suspend:<provider>`, expiring when the
suspension ends, whose value says until when (Redis's clock), who saw it and why. Every
worker of every host reads the keys of the providers it sends to at most every
`cluster.poll` seconds (one round trip for all of them, never one per message: by a
greenlet of its own, started at the worker's first message, and at once for a provider new
to the worker), and suspends a provider whose key says so until the same moment: nothing
more is sent there from any host, whether its worker was busy or idle. Each suspension is
followed once (a host's `mailengine queue resume` ends it on that host alone; `queue
--cluster resume` ends it on every host and lifts it: each worker told deletes the key).

- A longer suspension wins: publishing never shortens the one in Redis.
- Times are Redis's (`TIME`), turned into "seconds from now" by the script, so the hosts'
  clocks do not matter.
- **Degrading**: while Redis is unreachable (engine.cluster: fallback) nothing is published
  or read, and each host suspends on what it sees alone, as without a cluster; what a
  worker met meanwhile (a block, a rule's `suspend`, a learned ceiling) is held for Redis.
- **Rebuilding**: at Redis's return, each worker sets in it what it knows, at its next read
  (the same round trip): what Redis lost, if it comes back empty (restarted without
  persistence, flushed): the suspensions each published or follows, still running, and the
  lowest ceilings they know, each as it was; and what it met while Redis was away, published
  then (a longer suspension, a lower ceiling there kept). Each for the time it has left, not
  a fresh full one (`cluster_state_rebuilt`, `met_in_fallback` for the second kind).

**Learned ceilings** go the same way: a limit a worker learned from a push-back is shared
as the lowest of the cluster's (`<prefix>:ceiling:<provider>`, for `cluster.ceiling_expiry`),
read in the same round trip, and a worker that has learned no limit of the provider yet
starts there (at 95% of it) instead of slow-starting into it; one that learned its own keeps
it (a receiver's limits are mostly per IP).

Counted: `cluster_suspensions_published`, `cluster_suspensions_followed`,
`cluster_ceilings_followed`, `cluster_state_rebuilt`; a host following another's suspension logs
`provider_suspended_elsewhere`, one starting at a shared ceiling `provider_ceiling_shared`.

Worker side: publishing runs in a greenlet of its own (judging a reply never waits).
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import gevent

from engine import logs
from engine.cluster import Cluster
from engine.metrics import Metrics

log = logging.getLogger("mailengine.cluster")

# s: what is this close to its end is not set again in Redis (where it expires on its own)
REBUILD_MARGIN = 0.5

# KEYS[1]: the provider's suspension. ARGV: seconds, who (host/ip), why.
# Sets it unless the one there lasts longer; returns the value that holds after.
PUBLISH = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local seconds = tonumber(ARGV[1])
local cur = redis.call('GET', KEYS[1])
if cur then
  local cur_until = tonumber(string.match(cur, '^[^|]+'))
  if cur_until and cur_until >= now + seconds then return cur end
end
local value = string.format('%.6f', now + seconds) .. '|' .. ARGV[2] .. '|' .. ARGV[3]
redis.call('SET', KEYS[1], value, 'PX', math.ceil(seconds * 1000))
return value
"""

# KEYS[1]: the provider's learned ceiling. ARGV: the limit (/s), its expiry (s). The lowest
# holds: a higher one leaves it (and its expiry) as it is. Returns {the ceiling that holds,
# its milliseconds left}.
CEILING = """
local cur = redis.call('GET', KEYS[1])
if cur and tonumber(cur) and tonumber(cur) <= tonumber(ARGV[1]) then
  return {cur, redis.call('PTTL', KEYS[1])}
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', math.ceil(tonumber(ARGV[2]) * 1000))
return {ARGV[1], math.ceil(tonumber(ARGV[2]) * 1000)}
"""

# KEYS: n providers' suspensions, then the same n providers' ceilings. ARGV: for each
# provider, what this worker knows of the cluster's state: the suspension it holds ('' for
# none) and its milliseconds left, the lowest ceiling it knows ('') and its milliseconds
# left. A key missing (Redis restarted empty) is set again from them: the state rebuilt.
# A suspension met while Redis was away has no time of Redis's yet ('|who|why'): it is
# published now, as PUBLISH would, for the time it has left (a longer one there is kept).
# Returns, for each provider, {suspension, seconds left, ceiling, its ms left, rebuilt}
# ('' for what there is not; rebuilt: 1 the suspension, 2 the ceiling, 3 both).
READ = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local n = #KEYS / 2
local out = {}
for i = 1, n do
  local held, held_ms = ARGV[4 * i - 3], tonumber(ARGV[4 * i - 2])
  local known, known_ms = tonumber(ARGV[4 * i - 1]), tonumber(ARGV[4 * i])
  local rebuilt = 0
  local value = redis.call('GET', KEYS[i])
  if held ~= '' and held_ms and held_ms > 0 then
    if string.sub(held, 1, 1) == '|' then
      local ends = now + held_ms / 1000
      local cur_until = value and tonumber(string.match(value, '^[^|]+'))
      if not (cur_until and cur_until >= ends) then
        value, rebuilt = string.format('%.6f', ends) .. held, 1
        redis.call('SET', KEYS[i], value, 'PX', held_ms)
      end
    elseif not value then
      redis.call('SET', KEYS[i], held, 'PX', held_ms)
      value, rebuilt = held, 1
    end
  end
  local left = 0
  if value then
    left = (tonumber(string.match(value, '^[^|]+')) or now) - now
  else
    value = ''
  end
  local ceiling = redis.call('GET', KEYS[n + i])
  if known and known_ms and known_ms > 0 and (not ceiling or known < (tonumber(ceiling) or 0)) then
    ceiling = ARGV[4 * i - 1]
    redis.call('SET', KEYS[n + i], ceiling, 'PX', known_ms)
    rebuilt = rebuilt + 2
  end
  local ceiling_ms = 0
  if ceiling then ceiling_ms = redis.call('PTTL', KEYS[n + i]) else ceiling = '' end
  out[i] = {value, string.format('%.6f', left), ceiling, ceiling_ms, rebuilt}
end
return out
"""

# KEYS[1]: the provider's suspension, lifted by the operator (`queue --cluster resume`).
# Returns the value it had ('' for none).
LIFT = """
local value = redis.call('GET', KEYS[1])
if value then redis.call('DEL', KEYS[1]) end
return value or ''
"""


class Follower(Protocol):
    """What a provider's shaper offers (engine.shaping.ProviderShaper)."""

    def follow(self, seconds: float, origin: str, reason: str) -> bool: ...

    def seed(self, limit: float) -> bool: ...


class SharedSuspensions:
    """One worker's side of the cluster's suspensions (`member`: host/ip).

    `followers()` gives the worker's shapers by provider: those are the keys read.

    What the worker knows of the cluster's state is kept to **rebuild** it: the suspensions
    it published or follows while they run (`_held`, until the operator resumes them here)
    and the lowest ceiling of each provider (`_ceilings`, until its expiry). A key found
    missing at a read (a Redis restarted without persistence, a FLUSHALL) is set again in
    the same round trip, as it was and for the time it has left: the other workers, and
    those that start later, follow it again within a poll. What it met while Redis was
    away (a publish that found no Redis) is held too, and published at the first read
    Redis answers, for the time it has left then."""

    def __init__(self, cluster: Cluster, member: str,
                 followers: Callable[[], Iterable[tuple[str, Follower]]],
                 metrics: Metrics | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._cluster = cluster
        self.member = member.replace("|", "_")
        self._followers = followers
        self._metrics = metrics
        self._clock = clock
        self._publish = cluster.script(PUBLISH)
        self._ceiling = cluster.script(CEILING)
        self._read = cluster.script(READ)
        self._lift = cluster.script(LIFT)
        self._seen: dict[str, str] = {}  # provider -> the suspension followed (or own) last
        self._held: dict[str, tuple[str, float]] = {}  # provider -> (suspension, ends)
        self._ceilings: dict[str, tuple[str, float]] = {}  # provider -> (lowest, expires)
        self._ceilings_alone: set[str] = set()  # those learned while Redis was away
        self._next_read = -math.inf
        self._reading = False
        self._known: frozenset[str] = frozenset()  # the providers read last time
        self._poller: gevent.Greenlet[Any, Any] | None = None
        self._closed = False  # close(): no watching greenlet any more

    def publish(self, provider: str, seconds: float, reason: str) -> None:
        """This worker suspended `provider` for `seconds` (`reason`: "block", "rule:x"):
        tell the other hosts, in the background."""
        gevent.spawn(self.publish_now, provider, seconds, reason)

    def publish_now(self, provider: str, seconds: float, reason: str) -> bool:
        """`publish`, waiting for Redis's answer: whether it took it (False: off, or
        falling back)."""
        value = self._cluster.run("suspend", lambda client: self._publish(
            keys=[self._cluster.key("suspend", provider)],
            args=[f"{seconds:.3f}", self.member, reason], client=client))
        if value is None:
            self._keep_unpublished(provider, seconds, reason)
            return False
        value = _text(value)
        if _fields(value)[1] == self.member:  # its own: not followed back
            self._seen[provider] = value
            self._held[provider] = (value, self._clock() + seconds)
        else:  # a longer one of another host's: followed at the next read
            self._next_read = -math.inf
        if self._metrics is not None:
            self._metrics.incr("cluster_suspensions_published", provider)
        return True

    def publish_ceiling(self, provider: str, limit: float) -> None:
        """This worker learned `provider`'s limit (messages/s) from a push-back: shared as
        the lowest of the cluster's, for `cluster.ceiling_expiry`, in the background."""
        gevent.spawn(self.publish_ceiling_now, provider, limit)

    def publish_ceiling_now(self, provider: str, limit: float) -> bool:
        expiry = self._cluster.cfg.ceiling_expiry
        if expiry <= 0 or not limit > 0:
            return False
        holds = self._cluster.run("ceiling", lambda client: self._ceiling(
            keys=[self._cluster.key("ceiling", provider)], args=[f"{limit:.3f}", expiry],
            client=client))
        if holds is None:
            self._keep_unpublished_ceiling(provider, limit, expiry)
            return False
        self._ceilings_alone.discard(provider)
        self._know_ceiling(provider, _text(holds[0]), int(holds[1]))
        return True

    def _keep_unpublished(self, provider: str, seconds: float, reason: str) -> None:
        """A suspension Redis did not take (away): held to be published at its return, for
        the time it has left then (engine.cluster: the first command it answers). Without a
        time of Redis's yet: its value is `|who|why` until then. A longer one held stays."""
        ends = self._clock() + seconds
        if self._held.get(provider, ("", -math.inf))[1] < ends:
            self._held[provider] = (f"|{self.member}|{reason}", ends)

    def _keep_unpublished_ceiling(self, provider: str, limit: float, expiry: float) -> None:
        """A ceiling Redis did not take (away): held to be shared at its return for what is
        left of `expiry`, unless a lower one known still holds (the lowest wins)."""
        known, now = self._ceilings.get(provider), self._clock()
        if known is not None and known[1] > now and _number(known[0]) <= limit:
            return
        self._ceilings[provider] = (f"{limit:.3f}", now + expiry)
        self._ceilings_alone.add(provider)

    def released(self, provider: str, lift: bool = False) -> None:
        """The operator resumed `provider` on this host: the suspension known now is not
        followed again (a newer one will be), nor published again. `lift`: resumed on every
        host (`queue --cluster resume`), so the suspension in Redis is deleted too, else
        the workers that start later would follow it."""
        self._held.pop(provider, None)
        if lift:
            value = self._cluster.run("lift", lambda client: self._lift(
                keys=[self._cluster.key("suspend", provider)], args=[], client=client))
            if value:
                self._seen[provider] = _text(value)
                log.warning(logs.kv("provider_suspension_lifted", provider=provider,
                                    origin=_fields(_text(value))[1]))
        self._next_read = -math.inf  # read now what holds, and mark it seen
        self._read_now(ignore={provider})

    def check(self) -> None:
        """Follow what the other hosts published, if `cluster.poll` passed since the last
        read (or a provider is new to this worker); cheap otherwise."""
        if self._poller is None and not self._closed:
            self._poller = gevent.spawn(self._poll)
        if self._reading:
            return
        now = self._clock()
        if now < self._next_read:
            providers = {name for name, _ in self._followers()}
            if providers <= self._known:
                return
        self._read_now()

    def _poll(self) -> None:
        """Read every `cluster.poll`, whether messages ask for turns or not."""
        while not self._closed:
            gevent.sleep(max(self._next_read - self._clock(), 0.0) + 0.001)
            if not self._closed:
                self.check()

    def close(self) -> None:
        """No more reads: the watching greenlet ends, and none is started again (a test's
        or a worker's end; a `check` after it reads at most once more, in its caller)."""
        self._closed = True
        poller, self._poller = self._poller, None
        if poller is not None:
            poller.kill(block=True, timeout=1.0)

    def _read_now(self, ignore: set[str] | None = None) -> None:
        followers = dict(self._followers())
        self._known = frozenset(followers)
        self._next_read = self._clock() + self._cluster.cfg.poll
        if not followers:
            return
        names = sorted(followers)
        args = self._known_state(names)
        alone = {name: held for name in names
                 if _unpublished((held := self._held.get(name, ("", 0.0)))[0])}
        alone_ceilings = self._ceilings_alone & set(names)
        self._reading = True
        try:
            reply = self._cluster.run("suspensions", lambda client: self._read(
                keys=[*(self._cluster.key("suspend", name) for name in names),
                      *(self._cluster.key("ceiling", name) for name in names)], args=args,
                client=client))
        finally:
            self._reading = False
        if reply is None:
            return
        self._ceilings_alone -= alone_ceilings
        for name, (raw, left, ceiling, ceiling_ms, rebuilt) in zip(names, reply, strict=True):
            if name in alone:
                self._published_late(name, alone[name], _text(raw), int(rebuilt))
            self._rebuilt(name, int(rebuilt), name in alone, name in alone_ceilings)
            self._know_ceiling(name, _text(ceiling), int(ceiling_ms))
            self._seed(name, followers[name], _text(ceiling))
            self._follow(name, followers[name], _text(raw), float(left), ignore or set())

    def _known_state(self, names: list[str]) -> list[str]:
        """READ's arguments: for each provider, the suspension this worker holds and the
        lowest ceiling it knows, each with its milliseconds left ('' for none)."""
        now = self._clock()
        args: list[str] = []
        for name in names:
            for known in (self._held, self._ceilings):
                value, ends = known.get(name, ("", now))
                if ends <= now + REBUILD_MARGIN:  # (ending: as Redis's expiry does)
                    known.pop(name, None)
                    value = ""
                args += [value, str(math.ceil((ends - now) * 1000)) if value else ""]
        return args

    def _follow(self, name: str, follower: Follower, value: str, seconds: float,
                ignore: set[str]) -> None:
        if not value or value == self._seen.get(name):
            return
        self._seen[name] = value
        if name in ignore:
            return
        _, origin, reason = _fields(value)
        if seconds <= 0:  # (its own, published by this process, is in _seen)
            return
        if follower.follow(seconds, origin, reason):
            self._held[name] = (value, self._clock() + seconds)
            if self._metrics is not None:
                self._metrics.incr("cluster_suspensions_followed", name)
            log.warning(logs.kv("provider_suspended_elsewhere", provider=name,
                                origin=origin, reason=reason, seconds=f"{seconds:.1f}"))

    def _know_ceiling(self, name: str, ceiling: str, ms_left: int) -> None:
        if ceiling and ms_left > 0:
            self._ceilings[name] = (ceiling, self._clock() + ms_left / 1000)

    def _published_late(self, name: str, sent: tuple[str, float], value: str,
                        rebuilt: int) -> None:
        """A suspension met while Redis was away (`sent`), at the read that published it:
        held from now on as Redis has it (its own, not followed back); or, with a longer
        one there (not set), no more: that one is followed instead."""
        if self._held.get(name) != sent:  # resumed, or replaced, while Redis answered
            return
        if rebuilt & 1:
            self._held[name] = (value, sent[1])
            self._seen[name] = value
        else:
            del self._held[name]

    def _rebuilt(self, name: str, rebuilt: int, alone: bool, alone_ceiling: bool) -> None:
        """Count and log what this worker set in Redis from what it knows: what Redis had
        lost, or what it met while Redis was away (`met_in_fallback`: never published)."""
        for bit, what, met_alone in ((1, "suspension", alone), (2, "ceiling", alone_ceiling)):
            if rebuilt & bit:
                if self._metrics is not None:
                    self._metrics.incr("cluster_state_rebuilt", name)
                log.warning(logs.kv("cluster_state_rebuilt", provider=name, what=what,
                                    member=self.member, met_in_fallback=met_alone))

    def _seed(self, name: str, follower: Follower, ceiling: str) -> None:
        """A worker that learned nothing of the provider yet starts at the cluster's
        learned ceiling (the lowest), not from slow start into it."""
        try:
            limit = float(ceiling) if ceiling else 0.0
        except ValueError:
            return
        if limit > 0 and follower.seed(limit):
            if self._metrics is not None:
                self._metrics.incr("cluster_ceilings_followed", name)
            log.info(logs.kv("provider_ceiling_shared", provider=name, limit=f"{limit:.2f}"))


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _number(text: str) -> float:
    """A ceiling's value as Redis keeps it; one that is not a number holds nothing."""
    try:
        return float(text)
    except ValueError:
        return math.inf


def _unpublished(value: str) -> bool:
    """A suspension held that Redis never had (met while it was away): no time yet."""
    return value.startswith("|")


def _fields(value: str) -> list[str]:
    """A suspension's value: until (Redis's time), who, why."""
    return [*value.split("|", 2), "", ""][:3]
