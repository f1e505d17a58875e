"""The cluster's parts against a real redis-server on loopback (engine.cluster,
engine.cluster_rate, engine.cluster_dedup): leased turns of a cluster-wide rate shared by
several workers, each with its own connection as on its own host; the fallback when Redis
dies and the return when it is back; job-id claims across hosts.

The turns are taken by greenlets in this process (gevent, unpatched: redis-py's calls
block the loop for their loopback round trip, a fraction of a millisecond)."""
from __future__ import annotations

import logging
import time
from typing import Any

import gevent
import pytest

from engine.cluster import FALLBACK, SHARED, Cluster
from engine.cluster_dedup import SharedIds
from engine.cluster_rate import GRACE, ClusterRate
from engine.config import ClusterConfig
from engine.metrics import Metrics
from tests.support.rates import busiest
from tests.support.recorded_metrics import Recorded
from tests.support.redis import RedisServer


def cluster(server: RedisServer, host: str, metrics: Metrics | None = None,
            **options: Any) -> Cluster:
    return Cluster(ClusterConfig(redis=server.url, **options), host, metrics)


def taking(rate: ClusterRate, times: list[float], stop: float) -> None:
    """One message after another until `stop`: each turn's time into `times`."""
    while time.monotonic() < stop:
        if rate.take(10.0) == 0.0:
            times.append(time.monotonic())


def offering(rate: ClusterRate, times: list[float], stop: float, every: float) -> None:
    """A message every `every` seconds until `stop`, each waiting for its turn."""
    def one() -> None:
        if rate.take(10.0) == 0.0:
            times.append(time.monotonic())
    messages = []
    while time.monotonic() < stop:
        messages.append(gevent.spawn(one))
        gevent.sleep(every)
    gevent.joinall(messages, raise_error=True)


def between(times: list[float], start: float, end: float) -> int:
    return sum(1 for t in times if start <= t < end)


def run_workers(rates: list[ClusterRate], seconds: float, greenlets: int = 20,
                every: list[float] | None = None) -> list[list[float]]:
    """Each worker busy (`greenlets` messages one after another), or offered a message
    every `every[i]` seconds (when not 0), for `seconds`: the times of their turns."""
    stop = time.monotonic() + seconds
    times: list[list[float]] = [[] for _ in rates]
    jobs = []
    for i, rate in enumerate(rates):
        if every and every[i]:
            jobs.append(gevent.spawn(offering, rate, times[i], stop, every[i]))
        else:
            jobs += [gevent.spawn(taking, rate, times[i], stop) for _ in range(greenlets)]
    gevent.joinall(jobs, timeout=seconds + 15, raise_error=True)
    return times


def test_three_workers_keep_to_the_cluster_rate_together_in_equal_shares(
        redis_server: RedisServer) -> None:
    metrics = Recorded()
    rates = [ClusterRate(cluster(redis_server, f"host{i}", metrics), "example", 60.0,
                         f"host{i}/127.0.0.{i + 2}", metrics) for i in range(3)]
    started = time.monotonic()
    times = run_workers(rates, 5.0)
    every = sorted(t for worker in times for t in worker)
    # Never past the rate: at most its turns in any second (a turn taken up to GRACE late).
    assert busiest(every, 1.0) <= 60 + 60 * GRACE + 1, busiest(every, 1.0)
    # All of it used: from the first second on (the first leases), 90% of the rate at least.
    assert between(every, started + 1.0, started + 5.0) >= 0.9 * 60 * 4, len(every)
    # Fair: equal demand, equal shares (a third each, within a fifth of it).
    for worker in times:
        assert abs(len(worker) - len(every) / 3) <= len(every) / 15, [len(w) for w in times]
    # Cheap: a lease carries many turns (a fifth of a lease per message at most here).
    leases = metrics.count("timing", "cluster_lease")
    assert 0 < leases <= len(every) / 5, (leases, len(every))
    assert all(rate.members == 3 for rate in rates)


def test_the_rate_follows_demand_a_quiet_worker_leaves_its_share_to_a_busy_one(
        redis_server: RedisServer) -> None:
    quiet = ClusterRate(cluster(redis_server, "quiet"), "example", 60.0, "quiet/127.0.0.2")
    busy = ClusterRate(cluster(redis_server, "busy"), "example", 60.0, "busy/127.0.0.3")
    started = time.monotonic()
    times = run_workers([quiet, busy], 5.0, every=[0.1, 0.0])  # quiet: 10 messages/s
    assert len(times[0]) >= 48  # the quiet one gets what it asks, all of it
    # the busy one, the rest (from the second second on: its first leases)
    assert between(times[1], started + 1.0, started + 5.0) >= 0.85 * (60 - 10) * 4, \
        len(times[1])
    assert busiest(times[0] + times[1], 1.0) <= 60 + 60 * GRACE + 1


def test_redis_killed_each_worker_goes_on_at_its_share_then_shares_again_when_it_is_back(
        redis_server: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "mailengine.cluster")
    metrics = Recorded()
    links = [cluster(redis_server, f"host{i}", metrics, retry=0.5) for i in range(2)]
    rates = [ClusterRate(link, "example", 60.0, f"host{i}/127.0.0.{i + 2}", metrics)
             for i, link in enumerate(links)]
    run_workers(rates, 1.0)
    assert [link.mode for link in links] == [SHARED, SHARED]
    assert [rate.members for rate in rates] == [2, 2]

    redis_server.kill()
    killed = time.monotonic()
    times = run_workers(rates, 3.0)
    assert [link.mode for link in links] == [FALLBACK, FALLBACK]
    # Each at half the rate (the two it last saw share it): delivery goes on, within the rate.
    for worker in times:  # (from a second on: past the turns leased before)
        assert 0.85 * 30 * 2 <= between(worker, killed + 1.0, killed + 3.0) <= 30 * 2 + 3
    fallbacks = [r.getMessage() for r in caplog.records if "mode=fallback" in r.getMessage()]
    assert len(fallbacks) == 2 and all("caller=lease" in line for line in fallbacks)
    assert metrics.total("cluster_fallbacks") == 2

    redis_server.start()  # empty: the schedule and the members are rebuilt by the leases
    back = time.monotonic()
    times = run_workers(rates, 2.0)
    assert [link.mode for link in links] == [SHARED, SHARED]
    shared = [r.getMessage() for r in caplog.records if "mode=shared" in r.getMessage()]
    assert len(shared) == 4  # at the start, and back
    every = sorted(t for worker in times for t in worker)
    assert between(every, back + 1.0, back + 2.0) >= 0.85 * 60, len(every)
    assert busiest([t for t in every if t >= back + 1.0], 1.0) <= 60 + 60 * GRACE + 1


def test_a_worker_back_from_fallback_keeps_to_its_share_for_a_retry_and_a_lease(
        redis_server: RedisServer) -> None:
    """Regression (bench/cluster.py: refusals at Redis's return in every run): a worker back
    from fallback leased from Redis's empty schedule as its only member, at the whole rate,
    while the others, not back yet (until their next `retry`) or still giving out their own
    turns (up to a `lease` ahead), sent their fallback shares: up to 5/3 of the rate
    together. Back, a worker keeps to its fallback share for `retry` + `lease` (1.5 s here),
    then takes what Redis gives it."""
    links = [cluster(redis_server, f"host{i}", retry=0.5) for i in range(3)]
    rates = [ClusterRate(link, "example", 60.0, f"host{i}/127.0.0.{i + 2}")
             for i, link in enumerate(links)]
    run_workers(rates, 1.0)
    assert [rate.members for rate in rates] == [3, 3, 3]
    redis_server.kill()
    run_workers(rates[:1], 0.3)
    assert links[0].mode == FALLBACK
    redis_server.start()  # empty; only host0 sends from now on (the others could be in fallback)
    start = time.monotonic()
    times = run_workers(rates[:1], 4.0)[0]
    assert links[0].mode == SHARED
    # back within a retry, its own turns given out (a lease's at most, 20) meanwhile, then
    # a third of the rate (a batch of a lease's share, 20, each second) until 1.5 s after,
    # then the whole rate
    rejoining = [t for t in times if start + 0.5 <= t < start + 2.0]
    assert busiest(rejoining, 1.0) <= 20 + 3, (busiest(rejoining, 1.0), len(times))
    assert between(times, start + 3.0, start + 4.0) >= 0.85 * 60, len(times)


def test_a_message_whose_cluster_turn_is_beyond_max_wait_is_not_put_in_line(
        redis_server: RedisServer) -> None:
    rate = ClusterRate(cluster(redis_server, "host0"), "example", 2.0, "host0/127.0.0.2")
    waits: list[float] = []

    def one() -> None:
        waits.append(rate.take(max_wait=1.0))

    gevent.joinall([gevent.spawn(one) for _ in range(8)], timeout=10, raise_error=True)
    went = [w for w in waits if w == 0.0]
    # 2/s, leased 1 s ahead at most: the turns within a second went, the rest did not wait.
    assert 2 <= len(went) <= 4, waits
    assert all(w > 1.0 for w in waits if w != 0.0), waits


def test_job_ids_claimed_across_hosts(redis_server: RedisServer) -> None:
    metrics = Recorded()
    a = SharedIds(cluster(redis_server, "a", metrics), metrics)
    b = SharedIds(cluster(redis_server, "b", metrics), metrics)
    claims = a.claim(["j1", "j2", "j1"])
    assert (claims.elsewhere, claims.pending, claims.checked) == (set(), set(), True)
    a.confirm(["j1"])  # j1 spooled on a; j2 still being spooled there
    claims = b.claim(["j1", "j2", "j3"])
    assert claims.elsewhere == {"j1"}  # acknowledged by b as a duplicate
    assert claims.pending == {"j2"}  # b neither acknowledges nor spools it: sent again
    assert a.claim(["j1", "j2"]).elsewhere == set()  # a host's own claims are its own
    assert b.claim(["j3"]).elsewhere == set()
    assert metrics.total("duplicates_elsewhere") == 1
    assert metrics.total("claimed_elsewhere") == 1
    client: Any = redis_server.client()
    assert client.get("mailengine:job:j1") == b"accepted:a"
    assert 86000 < client.ttl("mailengine:job:j1") <= 86400
    assert 0 < client.ttl("mailengine:job:j2") <= 60  # a pending claim lapses soon


def test_redis_down_at_intake_only_the_spool_checks_and_it_is_counted(
        redis_server: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "mailengine.cluster")
    metrics = Recorded()
    link = cluster(redis_server, "a", metrics, retry=60)
    ids = SharedIds(link, metrics)
    redis_server.kill()
    claims = ids.claim(["j1", "j2"])
    assert not claims.checked and not claims.elsewhere and not claims.pending
    assert metrics.total("dedup_unchecked") == 2
    assert link.mode == FALLBACK
    started = time.monotonic()
    ids.claim(["j3"])  # within `retry`: Redis is not even tried
    assert time.monotonic() - started < 0.05
    assert metrics.total("dedup_unchecked") == 3
    lines = [r.getMessage() for r in caplog.records if "event=cluster_mode" in r.getMessage()]
    assert len(lines) == 1 and "mode=fallback" in lines[0] and "at_start=True" in lines[0]


def test_a_password_in_the_url_is_not_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "mailengine.cluster")
    port = RedisServer().port  # nothing listens there
    link = Cluster(ClusterConfig(redis=f"redis://user:s3cret@127.0.0.1:{port}/0"), "a")
    assert link.run("dedup", lambda client: client.ping()) is None
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "mode=fallback" in text and "s3cret" not in text and "user:***@" in text
