"""The cluster-wide limits one worker's messages to one provider take, together.

A provider may have a cluster-wide rate and hourly budget of its own
(`shaping.providers.<provider>`), and each IP group (`ip_pools`) the worker's IP belongs to
may have its own (`shaping.ip_pools.<pool>.<provider>`): a message takes from every one
(engine.shaping asks `take`, just before it goes). The budgets first: a message with none
left this hour does not wait for a turn; then the rates' turns, the moment it goes. A
message deferred after taking from a budget, or sent back to the spool untried after its
turn (engine.shaping.ProviderShaper.give_back), gives it back (`give_back`), each budget's to
the minute it was counted in (`Taken`, which the caller keeps with the message); a rate's turn
taken before another rate deferred it goes unused (a turn of the first limit's schedule
the cluster does not use: never more than the rate).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from engine.cluster import Cluster
from engine.cluster_hourly import ClusterHourly, Counted
from engine.cluster_rate import ClusterRate
from engine.config import SendingLimits, ShapingConfig
from engine.metrics import Metrics


@dataclass(frozen=True)
class Wait:
    """Not now: the message's turn or budget is `seconds` away; `reason` for the deferral
    ("cluster pace": a turn, sent back to join the line before it; else a budget)."""

    seconds: float
    reason: str

    @property
    def pace(self) -> bool:
        return self.reason == "cluster pace"


# What a message took of the budgets: each, with where it counted it (to give it back there).
Taken = tuple[tuple[ClusterHourly, Counted], ...]


class ClusterLimits:
    """Every cluster-wide limit of one sending IP x provider."""

    def __init__(self, rates: list[ClusterRate], hourlies: list[ClusterHourly]) -> None:
        self.rates = rates
        self.hourlies = hourlies

    @classmethod
    def of(cls, cluster: Cluster, shaping: ShapingConfig, provider: str,
           limits: SendingLimits, pools: tuple[str, ...], member: str,
           metrics: Metrics | None, clock: Callable[[], float]) -> ClusterLimits | None:
        """The cluster-wide limits of `provider` (its own: `limits`, resolved) for an IP in
        IP groups `pools`; None if it has none."""
        wanted: list[tuple[str | None, float, int]] = [
            (None, limits.cluster_rate, limits.cluster_hourly)]
        for pool in pools:
            of_pool = shaping.ip_pools.get(pool, {}).get(provider)
            if of_pool is not None:
                wanted.append((pool, of_pool.cluster_rate, of_pool.cluster_hourly))
        rates = [ClusterRate(cluster, provider, rate, member, metrics, clock, pool)
                 for pool, rate, _ in wanted if rate > 0]
        hourlies = [ClusterHourly(cluster, provider, hourly, member, metrics, clock, pool)
                    for pool, _, hourly in wanted if hourly > 0]
        return cls(rates, hourlies) if rates or hourlies else None

    def take(self, max_wait: float, again: bool = False) -> Wait | Taken:
        """What the message took of the budgets once it may go (its budgets counted, its
        turns come: it may have waited up to `max_wait`); else how long it would wait, and
        it took nothing of the budgets. `again`: its turn is taken again, its budgets were
        counted the first time (it takes none)."""
        taken: list[tuple[ClusterHourly, Counted]] = []
        for hourly in () if again else self.hourlies:
            seconds = hourly.take()
            if seconds > 0.0:
                self.give_back(tuple(taken))
                return Wait(seconds, hourly.reason)
            taken.append((hourly, hourly.counted))  # read at once: no greenlet ran since
        for rate in self.rates:
            seconds = rate.take(max_wait)
            if seconds > 0.0:
                self.give_back(tuple(taken))
                return Wait(seconds, "cluster pace")
        return tuple(taken)

    @staticmethod
    def give_back(taken: Taken) -> None:
        """A message that took its budgets (`taken`) was deferred after all (a suspension,
        a local cap met meanwhile), or went back untried: they are not counted."""
        for hourly, counted in taken:
            hourly.give_back(counted)

    def close(self) -> None:
        for hourly in self.hourlies:
            hourly.close()

    def state(self) -> dict[str, Any]:
        state: dict[str, Any] = {}
        limits: list[ClusterRate | ClusterHourly] = [*self.rates, *self.hourlies]
        for limit in limits:
            if limit.pool is None:
                state.update(limit.state())
            else:
                state.setdefault("pools", {}).setdefault(limit.pool, {}).update(limit.state())
        return state
