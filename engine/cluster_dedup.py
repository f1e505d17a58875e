"""De-duplication of job ids across the hosts of a cluster, at intake (docs/SCALING.md).

Each spool refuses a second job with an id it holds or finished lately (engine.spool);
a producer that re-sends a job whose `queued` it missed may reach another host, though,
whose spool has never seen it. So each id is also claimed in Redis (engine.cluster), one
key per id, `<prefix>:job:<id>`, in two steps around the spool's commit:

1. **claim**, before the spool: `SET NX` of `pending:<host>` with a short expiry
   (PENDING), else `GET`, for the whole intake batch in one Lua script (one round trip,
   atomic).
   An id held by another host is that host's: `accepted:<host>`: acknowledged here as a
   duplicate (`queued`, `"duplicate": true`) and not spooled; `pending:<host>`: that host
   is spooling it this instant, and it is neither acknowledged nor spooled here: its
   producer sends it again (to whichever host), by then the claim says which.
2. **confirm**, once the spool has it: `accepted:<host>` for `cluster.duplicate_window`.

A host killed between the two steps leaves its claims pending: they lapse after PENDING,
and the job (acknowledged nowhere) is taken by whichever host gets it next. A batch the
spool cannot take is not acknowledged either: its claims lapse the same way.

With Redis unreachable (engine.cluster: fallback), only the spool's own check applies and
the jobs taken so are counted (`dedup_unchecked`): a re-send to another host meanwhile is
accepted there too, and delivered twice.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from engine.cluster import Cluster
from engine.metrics import Metrics

PENDING = 60.0  # s: an unconfirmed claim lapses after this long (its host died, its spool failed)
ACCEPTED, CLAIMED = "accepted:", "pending:"

# One script call per batch: a pipeline of SET NX and GET per id cost the supervisor 33 µs
# of CPU a job in redis-py; the two scripts, claim and confirm, 3 (bench/cluster_cost.py).
# KEYS: the ids' keys; ARGV: this host's claim, its expiry in ms. Returns the keys held
# already, as {index (from 1), holder, index, holder, ...}: nothing to read back for the
# fresh ones, most of a batch.
CLAIM = """
local held = {}
for i, key in ipairs(KEYS) do
  if not redis.call('SET', key, ARGV[1], 'NX', 'PX', ARGV[2]) then
    local holder = redis.call('GET', key)
    if holder then
      held[#held + 1] = i
      held[#held + 1] = holder
    end
  end
end
return held
"""
# KEYS: the ids' keys; ARGV: "accepted:<host>", the duplicate window in ms.
CONFIRM = """
for _, key in ipairs(KEYS) do
  redis.call('SET', key, ARGV[1], 'PX', ARGV[2])
end
return #KEYS
"""


@dataclass
class Claims:
    """What the cluster says of a batch's ids: those another host accepted (`elsewhere`:
    acknowledge them as duplicates) and those another host is spooling now (`pending`:
    acknowledge nothing). The rest are this host's to spool."""

    elsewhere: set[str] = field(default_factory=set)
    pending: set[str] = field(default_factory=set)
    checked: bool = True  # False: Redis did not answer; only the spool's check applied


class SharedIds:
    """The claims of one host's intake."""

    def __init__(self, cluster: Cluster, metrics: Metrics) -> None:
        self._cluster = cluster
        self._metrics = metrics
        self._window_ms = int(cluster.cfg.duplicate_window * 1000)
        self._claim = cluster.script(CLAIM)
        self._confirm = cluster.script(CONFIRM)

    def claim(self, ids: Sequence[str]) -> Claims:
        """Claim `ids` for this host (step 1); what is not this host's to spool."""
        unique = list(dict.fromkeys(ids))
        keys = [self._cluster.key("job", i) for i in unique]
        replies = self._cluster.run("dedup", lambda client: self._claim(
            keys=keys, args=[CLAIMED + self._cluster.host, int(PENDING * 1000)],
            client=client))
        if replies is None:
            self._metrics.incr("dedup_unchecked", "all", len(keys))
            return Claims(checked=False)
        claims = Claims()
        for index, holder in zip(replies[::2], replies[1::2], strict=True):
            self._judge(claims, unique[int(index) - 1], holder)
        if claims.elsewhere:
            self._metrics.incr("duplicates_elsewhere", "all", len(claims.elsewhere))
        if claims.pending:
            self._metrics.incr("claimed_elsewhere", "all", len(claims.pending))
        return claims

    def _judge(self, claims: Claims, job_id: str, holder: Any) -> None:
        text = holder.decode("utf-8", "replace") if isinstance(holder, bytes) else str(holder)
        if text in (ACCEPTED + self._cluster.host, CLAIMED + self._cluster.host):
            return  # this host's own: its spool says whether it is a duplicate
        if text.startswith(ACCEPTED):
            claims.elsewhere.add(job_id)
        elif text.startswith(CLAIMED):
            claims.pending.add(job_id)

    def confirm(self, ids: Iterable[str]) -> None:
        """The spool has `ids` (step 2): a duplicate anywhere for the window from now."""
        keys = [self._cluster.key("job", i) for i in dict.fromkeys(ids)]
        if keys:
            self._cluster.run("dedup", lambda client: self._confirm(
                keys=keys, args=[ACCEPTED + self._cluster.host, self._window_ms],
                client=client))
