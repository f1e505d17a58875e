"""Hourly budgets across the cluster (engine.cluster_hourly) and the limits of an IP group
(engine.cluster_limits) against a real redis-server on loopback: several workers, each with
its own connection as on its own host, share one budget, never above it together, and it
goes where the demand is; a block's remainder lapses at its minute's end and is returned;
a message given back after its block lapsed is returned to the minute it was counted in;
Redis killed: each worker goes on at its share, and back from it keeps to that share until
the others are back; Redis restarted empty: each worker sets its own counts of the hour
again, once; an IP group's limit applies to its IPs only; after close() nothing is started.

The hour turns on a clock of the test's (`Clock`): the workers' own and the cluster's time
the scripts are given in place of Redis's `TIME`, so no test waits for a minute or an hour."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import gevent
import pytest

from engine.caps import Deferral
from engine.cluster import FALLBACK, SHARED, Cluster
from engine.cluster_hourly import IDLE, ClusterHourly
from engine.cluster_limits import ClusterLimits
from engine.config import ClusterConfig, from_dict
from engine.shaping import ProviderShaper, Shaping, plan_for
from tests.support.recorded_metrics import Recorded
from tests.support.redis import RedisServer, serving
from tests.support.shaping import UNPACED, limits
from tests.support.wait import until

START = 1_800_000_000.0  # the cluster's time at the test's start: the start of a minute


class Clock:
    """The test's time: `monotonic()` for the workers, `cluster()` for Redis's."""

    def __init__(self) -> None:
        self.t = 0.0

    def monotonic(self) -> float:
        return self.t

    def cluster(self) -> float:
        return START + self.t


MADE: list[Shaping | ClusterHourly] = []


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with serving(MADE) as server:
        yield server


def worker(server: RedisServer, clock: Clock, name: str, hourly: int = 30,
           metrics: Recorded | None = None) -> ClusterHourly:
    link = Cluster(ClusterConfig(redis=server.url, retry=5.0), name, metrics, clock.monotonic)
    MADE.append(ClusterHourly(link, "example", hourly, f"{name}/127.0.0.2", metrics,
                              clock.monotonic, now=clock.cluster))
    return MADE[-1]  # type: ignore[return-value]


def sent(limit: ClusterHourly, wanted: int) -> int:
    """Messages of `wanted` offered one after another that went (stops at the first
    refused: the budget is used up)."""
    for count in range(wanted):
        if limit.take() > 0.0:
            return count
    return wanted


def counted(server: RedisServer) -> int:
    client: Any = server.client()
    return sum(int(n) for n in client.hgetall("mailengine:hourly:example").values())


@pytest.mark.timeout(30)
def test_workers_share_an_hourly_budget_never_above_it_and_it_goes_where_the_demand_is(
        redis_server: RedisServer) -> None:
    clock = Clock()
    metrics = Recorded()
    busy, quiet, idle = (worker(redis_server, clock, name, metrics=metrics)
                         for name in ("busy", "quiet", "idle"))
    assert sent(idle, 1) == 1  # a member, with next to no demand
    went = [0, 0]

    def offer(i: int, limit: ClusterHourly, every: float) -> None:
        for _ in range(40):
            if limit.take() == 0.0:
                went[i] += 1
            gevent.sleep(every)

    # Twenty greenlets of the busy worker, one message at a time for the quiet one.
    jobs = [gevent.spawn(offer, 0, busy, 0.0) for _ in range(20)]
    jobs.append(gevent.spawn(offer, 1, quiet, 0.001))
    gevent.joinall(jobs, timeout=20, raise_error=True)
    assert 1 + sum(went) == 30, went  # the whole budget used, never more
    assert went[0] > went[1] >= 1, went  # most of it where the demand was
    assert counted(redis_server) == 30
    # Used up; the others hold blocks of this minute (and may return some): back once
    # those have lapsed, IDLE after the minute's end.
    assert busy.take() == pytest.approx(60.0 + IDLE, abs=0.01)
    clock.t = 60.0 + IDLE  # nothing came back: back when the first minute leaves the hour
    assert busy.take() == pytest.approx(3600.0 - clock.t, abs=0.01)
    assert busy.state()["hourly_left"] == 0
    assert metrics.count("timing", "cluster_hourly_lease") < 30  # blocks, not one per message

    clock.t = 3600.0  # the hour has turned: the budget is whole again
    assert sent(busy, 40) == 30
    assert 0 < metrics.count("gauge", "cluster_hourly_left")


@pytest.mark.timeout(30)
def test_a_sliding_hour_a_minute_frees_its_count_when_it_leaves_the_hour(
        redis_server: RedisServer) -> None:
    clock = Clock()
    limit = worker(redis_server, clock, "a")
    assert sent(limit, 10) == 10  # minute 0
    clock.t = 1800.0
    assert sent(limit, 40) == 20  # minute 30: the rest of the hour's
    wait = limit.take()
    assert 1799.0 <= wait <= 1800.0, wait  # minute 0 leaves the hour at 3600 s
    clock.t = 3600.0
    assert sent(limit, 40) == 10  # minute 0's ten, not minute 30's twenty


@pytest.mark.timeout(30)
def test_a_blocks_remainder_lapses_at_its_minutes_end_and_is_returned_with_the_next_lease(
        redis_server: RedisServer) -> None:
    clock = Clock()
    first, second = worker(redis_server, clock, "first"), worker(redis_server, clock, "second")
    assert sent(second, 1) == 1
    assert sent(first, 8) == 8  # blocks of 1, 2, 4, then one of up to 8: some of it held
    held = first.state()["hourly_held"]
    assert held > 0
    assert sent(second, 40) == 30 - 9 - held  # the held part is not the second's
    clock.t = 61.0  # the next minute: the first's block has lapsed
    assert sent(first, 1) == 1  # its lease returns the remainder
    # which the second can have now, but for the first's new block
    assert sent(second, 40) == held - 1 - first.state()["hourly_held"]
    assert counted(redis_server) == 30


@pytest.mark.timeout(30)
def test_a_block_idle_for_two_seconds_is_returned_at_once_for_the_others(
        redis_server: RedisServer) -> None:
    clock = Clock()
    done, other = worker(redis_server, clock, "done"), worker(redis_server, clock, "other")
    assert sent(other, 1) == 1
    assert sent(done, 8) == 8  # the last of its mail: part of its block held
    held = done.state()["hourly_held"]
    assert held > 0 and counted(redis_server) == 9 + held
    clock.t += IDLE  # none of its messages took from it since: returned, one round trip
    # (polled letting gevent run: its watching greenlet returns the block)
    until(lambda: gevent.sleep(0.05) or counted(redis_server) == 9, timeout=10,
          what="the idle block returned")
    assert done.state()["hourly_held"] == 0
    assert sent(other, 40) == 30 - 9  # all of the rest, for the worker with mail


@pytest.mark.timeout(30)
def test_after_close_a_block_leased_starts_no_idle_watch(redis_server: RedisServer) -> None:
    """Regression (CI: a greenlet left running after a test's close failed the hub check
    of every test after it): close() is final, as at a worker's end."""
    clock = Clock()
    limit = worker(redis_server, clock, "closed")
    limit.close()
    assert sent(limit, 4) == 4  # blocks of 1, 2 and 4 leased: 3 of the last held
    assert limit.state()["hourly_held"] == 3 and counted(redis_server) == 7
    gevent.get_hub().loop.update_now()
    # Nothing on the hub: no watch will return the block when idle (it lapses at its
    # minute's end, its remainder returned with a later lease).
    assert gevent.wait(timeout=1.0), "a greenlet or timer started after close()"


@pytest.mark.timeout(30)
def test_a_message_deferred_after_taking_gives_its_budget_back(
        redis_server: RedisServer) -> None:
    clock = Clock()
    limit = worker(redis_server, clock, "a", hourly=3)
    assert sent(limit, 3) == 3
    limit.give_back()  # the third went nowhere (another limit deferred it)
    assert limit.take() == 0.0
    assert limit.take() > 0.0


@pytest.mark.timeout(30)
def test_a_message_given_back_after_its_block_lapsed_is_returned_to_its_own_minute(
        redis_server: RedisServer) -> None:
    """Regression: a message counted in one minute and given back in the next (it waited
    for a connection slot across the minute's end, and went back untried) was given back
    into the next minute's block: sent in that minute as a message more than its count
    there, while the first minute kept a count for a message never sent, and left the hour
    a minute early: at the hour's turn a message too many went."""
    clock = Clock()
    limit = worker(redis_server, clock, "a", hourly=3)
    shaper = ProviderShaper("example", limits(), UNPACED, 0.0, clock=clock.monotonic,
                            wall=clock.cluster, cluster=ClusterLimits([], [limit]))
    clock.t = 59.0
    assert not isinstance(shaper.turn(), Deferral)  # counted in minute 0
    counted_then = shaper.counted
    clock.t = 61.0
    assert not isinstance(shaper.turn(), Deferral)  # minute 1: a block of its own
    shaper.give_back(counted_then)  # the first went back untried
    assert not isinstance(shaper.turn(), Deferral)
    assert not isinstance(shaper.turn(), Deferral)  # the third of the hour, all in minute 1
    deferral = shaper.turn()
    assert isinstance(deferral, Deferral) and deferral.reason == "cluster hourly limit"
    client: Any = redis_server.client()
    minute = int(START // 60)
    assert client.hgetall("mailengine:hourly:example") == {str(minute + 1).encode(): b"3"}
    clock.t = 3601.0  # minute 0 has left the hour, minute 1 not yet: still three in it
    deferral = shaper.turn()
    assert isinstance(deferral, Deferral) and deferral.reason == "cluster hourly limit"


@pytest.mark.timeout(30)
def test_redis_killed_each_worker_goes_on_at_its_share_then_shares_again(
        redis_server: RedisServer) -> None:
    clock = Clock()
    metrics = Recorded()
    a, b = worker(redis_server, clock, "a", metrics=metrics), worker(redis_server, clock, "b")
    assert [sent(a, 1), sent(b, 1), sent(a, 4), sent(b, 4)] == [1, 1, 4, 4]
    assert a.members == b.members == 2

    redis_server.kill()
    clock.t = 60.0  # their blocks lapsed: the next messages need leases
    # Each at its share, 30 / 2, over its own hour (the five it sent shared included).
    assert sent(a, 40) == 10 and sent(b, 40) == 10
    assert a._cluster.mode == b._cluster.mode == FALLBACK
    assert a.take() > 0.0  # delivery at the share, not beyond: back when its hour frees
    assert metrics.total("cluster_fallbacks") == 1

    redis_server.start()  # empty: the hour is rebuilt by the workers
    clock.t = 130.0  # past cluster.retry, and the fallback's blocks
    # Each lease sets again what Redis counted of its worker's before it went, and counts
    # what it sent alone: the hour's thirty, none left. (Rejoining, a keeps to its share,
    # used up, until b, which it saw before, leases too.)
    assert sent(a, 1) == 0 and sent(b, 1) == 0
    assert counted(redis_server) == 30
    assert metrics.total("cluster_state_rebuilt") == 1  # a's, of its metrics
    clock.t = 190.0  # a's message back
    assert sent(a, 40) + sent(b, 40) == 0
    assert a._cluster.mode == b._cluster.mode == SHARED
    clock.t = 3600.0  # minute 0, the ten sent before Redis went, leaves the hour
    assert sent(a, 40) + sent(b, 40) == 10  # (the twenty alone are counted at minute 2)


@pytest.mark.timeout(30)
def test_the_first_worker_back_from_fallback_keeps_to_its_share_until_the_others_lease(
        redis_server: RedisServer) -> None:
    """Regression: Redis restarted empty, the first worker back saw itself the only member
    and "left" nearly the whole budget, the other's messages sent alone being counted only
    at its next lease: it took 28 more, on top of the other's ten sent alone. Rejoining, it
    keeps to its fallback share (15 over its own hour) until the other leases again."""
    clock = Clock()
    a, b = worker(redis_server, clock, "a"), worker(redis_server, clock, "b")
    assert [sent(a, 1), sent(b, 1), sent(a, 4), sent(b, 4)] == [1, 1, 4, 4]
    assert a.members == b.members == 2  # a share of 15 each

    redis_server.kill()
    clock.t = 60.0  # their blocks lapsed: the next messages need leases
    assert sent(b, 40) == 10 and sent(a, 1) == 1  # alone, each within its share
    redis_server.start()  # empty
    clock.t = 70.0  # past cluster.retry
    assert sent(a, 40) == 9  # its share's rest, though Redis saw 24 left and no other
    assert a._cluster.mode == SHARED
    # Its five before Redis went (set again), the one alone and its blocks; not b's.
    assert counted(redis_server) == 5 + 1 + 9

    clock.t = 131.0  # b's messages back from the spool (its share was used up alone)
    # Its lease sets its five again and counts its ten: the hour's thirty.
    assert sent(b, 40) == 0
    assert counted(redis_server) == 30
    assert sent(a, 40) == 0


@pytest.mark.timeout(30)
def test_redis_restarted_empty_each_worker_sets_its_count_of_the_hour_again_once(
        redis_server: RedisServer) -> None:
    """Regression: Redis restarted empty forgot what the cluster had sent in the hour, and
    the workers sent the whole budget again on top of it. Each worker sets again what Redis
    counted of its own (its blocks less what it returned, by minute), at its first lease
    Redis answers; once: a second reconnect to the same Redis adds nothing."""
    clock = Clock()
    metrics = {name: Recorded() for name in ("a", "b")}
    a, b = (worker(redis_server, clock, name, metrics=metrics[name]) for name in ("a", "b"))

    def rebuilt() -> list[float]:
        return [metrics[name].total("cluster_state_rebuilt") for name in ("a", "b")]
    assert [sent(a, 1), sent(b, 1), sent(a, 8), sent(b, 2)] == [1, 1, 8, 2]  # twelve sent
    clock.t = 30.0
    redis_server.kill()  # nothing asked of it while it is down
    redis_server.start()  # empty
    more = 0
    # The next minute (their blocks lapsed); then past cluster.retry (had a first call after
    # the restart failed: at its share alone meanwhile); then past rejoining.
    for t in (60.0, 70.0, 130.0):
        clock.t = t
        more += sent(a, 40) + sent(b, 40)
    assert more == 30 - 12  # not a whole hour's thirty on top of the twelve
    assert counted(redis_server) == 30
    assert rebuilt() == [1, 1]

    client: Any = redis_server.client()
    client.client_kill_filter(_type="normal")  # their connections dropped: a reconnect
    for t in (190.0, 200.0):  # (past cluster.retry, had the first call failed)
        clock.t = t
        assert sent(a, 40) + sent(b, 40) == 0
    assert counted(redis_server) == 30  # not set again
    assert rebuilt() == [1, 1]
    assert a._cluster.mode == b._cluster.mode == SHARED


@pytest.mark.timeout(30)
def test_an_ip_groups_limit_applies_to_its_ips_only_besides_the_providers_own(
        redis_server: RedisServer) -> None:
    cfg = from_dict({
        "hostname": "mta.example.com",
        "ips": [{"address": "127.0.0.2"}, {"address": "127.0.0.3"}, {"address": "127.0.0.4"}],
        "ip_pools": {"bulk": ["127.0.0.3", "127.0.0.4"]},
        "cluster": {"redis": redis_server.url, "host": "mta-a"},
        "shaping": {"providers": {"example": {"cluster_hourly": 12}},
                    "ip_pools": {"bulk": {"example": {"cluster_hourly": 5,
                                                      "cluster_rate": 1000}}}}})
    transactional, bulk1, bulk2 = (Shaping(plan_for(cfg, ip)) for ip in
                                   ("127.0.0.2", "127.0.0.3", "127.0.0.4"))
    MADE.extend((transactional, bulk1, bulk2))

    def turns(shaping: Shaping, wanted: int) -> tuple[int, Deferral | None]:
        for count in range(wanted):
            turn = shaping.get("example").turn()
            if isinstance(turn, Deferral):
                return count, turn
        return wanted, None

    went, deferral = turns(bulk1, 3)
    assert (went, deferral) == (3, None)
    went, deferral = turns(bulk2, 10)  # the pool's five, the two IPs together
    assert went == 2 and deferral is not None
    assert deferral.reason == "cluster hourly limit of pool bulk"
    # Not in the pool: the provider's twelve, less the pool's five and what bulk2 holds.
    went, deferral = turns(transactional, 20)
    assert went == 12 - 5 - bulk2.get("example").state()["hourly_held"]
    assert deferral is not None and deferral.reason == "cluster hourly limit"
    state = bulk1.get("example").state()
    assert state["cluster_hourly"] == 12
    assert state["pools"]["bulk"]["cluster_hourly"] == 5
    assert state["pools"]["bulk"]["cluster_rate"] == 1000
    assert "pools" not in transactional.get("example").state()
    client: Any = redis_server.client()
    assert client.exists("mailengine:pool:bulk:hourly:example")
    assert client.exists("mailengine:pool:bulk:rate:example")
