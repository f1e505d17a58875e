"""Suspensions shared across the hosts of a cluster (engine.cluster_suspend) against a real
redis-server on loopback: two workers' shapers, each with its own connection to Redis as on
its own host; a block seen by one suspends the other within one `cluster.poll`, until the
same moment; Redis down: each goes on alone, without an error, and what one met meanwhile
(a block, a learned ceiling) is published at Redis's return, for the time it has left.

The turns are taken by this test's own thread (gevent, unpatched: redis-py's calls block
the loop for their loopback round trip); each worker's watching greenlet reads the others'
suspensions every `cluster.poll` whenever the test yields to gevent."""
from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import gevent
import pytest

from engine.caps import Deferral
from engine.cluster import FALLBACK
from engine.config import ClusterConfig, ThrottleConfig
from engine.reply import Reply
from engine.shaping import BLOCK, Shaping, ShapingPlan, Verdict
from tests.support.recorded_metrics import Recorded
from tests.support.redis import RedisServer, serving
from tests.support.wait import yielding_until

SPAMHAUS = Reply(554, "5.7.1", "Service unavailable; Client host [127.0.0.2] blocked using "
                               "zen.spamhaus.org")
POLL = 0.3  # s: cluster.poll in these tests
BLOCK_FOR = 2.0  # s: throttle.block_suspend
RETRY = 0.5  # s: cluster.retry (Redis tried again this often while it is down)


MADE: list[Shaping] = []


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with serving(MADE) as server:  # their watching greenlets stop at the end
        yield server


def host(server: RedisServer, name: str, ip: str, metrics: Recorded | None = None,
         block_for: float = BLOCK_FOR) -> Shaping:
    plan = ShapingPlan(ip=ip, throttle=ThrottleConfig(block_suspend=block_for),
                       cluster=ClusterConfig(redis=server.url, host=name, poll=POLL,
                                             retry=RETRY))
    MADE.append(Shaping(plan, metrics=metrics))
    return MADE[-1]


def suspended(turn: Deferral | int) -> bool:
    return isinstance(turn, Deferral) and turn.reason == "suspended"


def first_suspended_turn(shaping: Shaping, provider: str, timeout: float) -> float:
    """Turns every 10 ms until one is refused as suspended: when (monotonic)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if suspended(shaping.get(provider).turn()):
            return time.monotonic()
        gevent.sleep(0.01)
    raise TimeoutError(f"{provider} not suspended within {timeout} s")


def test_a_block_seen_by_one_host_suspends_the_other_within_one_poll_until_it_ends(
        redis_server: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "mailengine.cluster")
    a_metrics, b_metrics = Recorded(), Recorded()
    a = host(redis_server, "mta-a", "127.0.0.2", a_metrics)
    b = host(redis_server, "mta-b", "127.0.0.3", b_metrics)
    assert not suspended(b.get("yahoo").turn())  # b sends to yahoo, and read: nothing
    assert not suspended(b.get("gmail").turn())
    assert not suspended(a.get("yahoo").turn())

    blocked_at = time.monotonic()
    assert a.get("yahoo").judge([SPAMHAUS], a.get("yahoo").epoch) == Verdict(BLOCK)
    gevent.sleep(0)  # the publishing greenlet runs
    key = redis_server.client().get("mailengine:suspend:yahoo")  # type: ignore[attr-defined]
    assert key is not None and key.split(b"|")[1:] == [b"mta-a/127.0.0.2", b"block"]

    followed_at = first_suspended_turn(b, "yahoo", timeout=POLL + 1.0)
    assert followed_at - blocked_at <= POLL + 0.2
    assert not suspended(b.get("gmail").turn())  # only the provider that blocked
    ends_a, ends_b = a.get("yahoo").suspended_until, b.get("yahoo").suspended_until
    assert abs(ends_a - ends_b) < POLL + 0.1  # the same moment, on either host's clock
    assert b.get("yahoo").state()["followed"] == 1
    assert a_metrics.total("cluster_suspensions_published") == 1
    assert b_metrics.total("cluster_suspensions_followed") == 1
    lines = [r.getMessage() for r in caplog.records
             if "event=provider_suspended_elsewhere" in r.getMessage()]
    assert len(lines) == 1 and "provider=yahoo origin=mta-a/127.0.0.2 reason=block" in lines[0]

    # Later reads do not follow it again; the publisher does not follow its own.
    gevent.sleep(POLL + 0.05)
    b.get("yahoo").turn()
    a.get("yahoo").turn()
    assert b_metrics.total("cluster_suspensions_followed") == 1
    assert a_metrics.total("cluster_suspensions_followed") == 0

    # Expiry ends it on both hosts, and Redis forgets it.
    deadline = max(ends_a, ends_b)
    gevent.sleep(max(0.0, deadline - time.monotonic()) + 0.05)
    assert not suspended(b.get("yahoo").turn())
    assert not suspended(a.get("yahoo").turn())
    assert redis_server.client().get("mailengine:suspend:yahoo") is None  # type: ignore[attr-defined]


def test_a_host_that_meets_the_provider_later_follows_at_its_first_message(
        redis_server: RedisServer) -> None:
    a, b = host(redis_server, "mta-a", "127.0.0.2"), host(redis_server, "mta-b", "127.0.0.3")
    a.get("yahoo").judge([SPAMHAUS], a.get("yahoo").epoch)
    gevent.sleep(0)
    # b reads within its poll interval anyway: a provider new to it is read at once.
    assert not suspended(b.get("gmail").turn())
    assert suspended(b.get("yahoo").turn())


def test_a_longer_suspension_wins_and_a_resume_is_not_undone(
        redis_server: RedisServer) -> None:
    a, b = host(redis_server, "mta-a", "127.0.0.2"), host(redis_server, "mta-b", "127.0.0.3")
    assert b.get("yahoo").turn() is not None
    assert a._shared is not None and b._shared is not None
    assert a._shared.publish_now("yahoo", 60.0, "rule:slow")
    assert b._shared.publish_now("yahoo", 1.0, BLOCK)  # shorter: the minute stays
    ttl = redis_server.client().pttl("mailengine:suspend:yahoo")  # type: ignore[attr-defined]
    assert ttl > 50_000
    followed = first_suspended_turn(b, "yahoo", timeout=POLL + 1.0)
    assert b.get("yahoo").suspended_until - followed > 50

    b.hold("yahoo", 0)  # the operator resumes yahoo on b: b sends again ...
    gevent.sleep(POLL + 0.05)
    assert not suspended(b.get("yahoo").turn())  # ... and does not follow the same again
    assert b.get("yahoo").followed == 1


def test_redis_down_each_host_suspends_alone_without_an_error(
        redis_server: RedisServer) -> None:
    a, b = host(redis_server, "mta-a", "127.0.0.2"), host(redis_server, "mta-b", "127.0.0.3")
    assert not suspended(b.get("yahoo").turn())
    redis_server.kill()
    a.get("yahoo").judge([SPAMHAUS], a.get("yahoo").epoch)
    gevent.sleep(0)
    assert suspended(a.get("yahoo").turn())  # local behaviour: blocked here
    gevent.sleep(POLL + 0.05)
    assert not suspended(b.get("yahoo").turn())  # b knows nothing, and goes on
    assert a.cluster is not None and a.cluster.mode == FALLBACK
    assert b.cluster is not None and b.cluster.mode == FALLBACK


def test_an_idle_worker_follows_too_within_one_poll(redis_server: RedisServer) -> None:
    """b sent once and is idle since: its watching greenlet follows a's block, with no
    message of b's asking."""
    a, b = host(redis_server, "mta-a", "127.0.0.2"), host(redis_server, "mta-b", "127.0.0.3")
    assert not suspended(b.get("yahoo").turn())
    blocked_at = time.monotonic()
    a.get("yahoo").judge([SPAMHAUS], a.get("yahoo").epoch)
    deadline = blocked_at + POLL + 1.0
    while not b.get("yahoo").suspended and time.monotonic() < deadline:
        gevent.sleep(0.01)
    assert b.get("yahoo").suspended
    assert time.monotonic() - blocked_at <= POLL + 0.2


SLOW_DOWN = Reply(421, "4.7.0", "Rate limited, slow down")  # the shipped rule "rate-text"


def test_a_learned_ceiling_is_shared_the_lowest_and_seeds_a_worker_that_learned_none(
        redis_server: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "mailengine.cluster")
    b_metrics = Recorded()
    a, b = host(redis_server, "mta-a", "127.0.0.2"), host(redis_server, "mta-b", "127.0.0.3",
                                                          b_metrics)
    c = host(redis_server, "mta-c", "127.0.0.4")
    assert not suspended(b.get("yahoo").turn())  # b sends to yahoo: slow start, no limit
    assert b.get("yahoo").rate.limit is None
    pushed = a.get("yahoo")
    assert pushed.judge([SLOW_DOWN], pushed.epoch) == Verdict("rule:rate-text")
    learned = pushed.rate.limit
    assert learned is not None
    deadline = time.monotonic() + POLL + 1.0
    while b.get("yahoo").rate.limit is None and time.monotonic() < deadline:
        gevent.sleep(0.01)
    shaper = b.get("yahoo")
    assert shaper.rate.limit == pytest.approx(learned, rel=1e-3)
    assert shaper.rate.rate == pytest.approx(0.95 * learned, rel=1e-3)
    assert shaper.state()["seeded"] == pytest.approx(learned, rel=1e-3)
    assert b_metrics.total("cluster_ceilings_followed") == 1
    assert "event=provider_ceiling_shared provider=yahoo" in caplog.text

    # The lowest holds: a higher one leaves it; a lower one replaces it.
    assert c._shared is not None
    assert c._shared.publish_ceiling_now("yahoo", learned * 10)
    key = "mailengine:ceiling:yahoo"
    assert float(redis_server.client().get(key)) == pytest.approx(learned, rel=1e-3)  # type: ignore[attr-defined]
    assert 0 < redis_server.client().pttl(key) <= 3_600_000  # type: ignore[attr-defined]
    assert c._shared.publish_ceiling_now("yahoo", learned / 2)
    assert float(redis_server.client().get(key)) == pytest.approx(learned / 2, rel=1e-3)  # type: ignore[attr-defined]
    # A worker that learned a limit of its own keeps it.
    gevent.sleep(POLL + 0.05)
    a.get("yahoo").turn()
    b.get("yahoo").turn()
    assert a.get("yahoo").rate.limit == learned
    assert b.get("yahoo").rate.limit == pytest.approx(learned, rel=1e-3)
    assert b_metrics.total("cluster_ceilings_followed") == 1


# -- the state rebuilt when Redis returns empty, and lifted by the operator -----------------


def key_of(server: RedisServer, name: str) -> bytes | None:
    return server.client().get(name)  # type: ignore[attr-defined, no-any-return]


@pytest.mark.timeout(60)
def test_redis_restarted_empty_the_workers_that_hold_a_suspension_set_it_again_for_a_new_one(
        redis_server: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    """a blocked (published), b followed; Redis loses everything, by a FLUSHALL and then by
    a real restart: within a poll or two the suspension is back, as it was, and a worker
    that never saw it (c, d: a host started since) follows it until the same moment."""
    caplog.set_level(logging.WARNING, "mailengine.cluster")
    a_metrics, b_metrics = Recorded(), Recorded()
    a = host(redis_server, "mta-a", "127.0.0.2", a_metrics, block_for=60)
    b = host(redis_server, "mta-b", "127.0.0.3", b_metrics, block_for=60)
    assert not suspended(a.get("yahoo").turn())
    assert not suspended(b.get("yahoo").turn())
    a.get("yahoo").judge([SPAMHAUS], a.get("yahoo").epoch)
    first_suspended_turn(b, "yahoo", timeout=POLL + 1.0)
    key = "mailengine:suspend:yahoo"
    published = key_of(redis_server, key)
    assert published is not None

    redis_server.client().flushall()  # type: ignore[attr-defined]
    yielding_until(lambda: key_of(redis_server, key) is not None, 2 * POLL + 0.5,
                   "the suspension set again after a FLUSHALL (at the next poll of a or b)")
    assert key_of(redis_server, key) == published  # as it was: nobody follows it twice
    ttl = redis_server.client().pttl(key)  # type: ignore[attr-defined]
    assert 50_000 < ttl <= 60_000
    c = host(redis_server, "mta-c", "127.0.0.4")
    assert suspended(c.get("yahoo").turn())  # a worker that never saw it: read at once
    ends = a.get("yahoo").suspended_until
    assert abs(c.get("yahoo").suspended_until - ends) < 0.5
    rebuilt = a_metrics.total("cluster_state_rebuilt") + b_metrics.total("cluster_state_rebuilt")
    assert rebuilt >= 1
    assert "event=cluster_state_rebuilt provider=yahoo what=suspension" in caplog.text
    assert b.get("yahoo").followed == 1  # the one set again is not followed again

    redis_server.kill()  # a real restart, empty (nothing is saved)
    redis_server.start()
    yielding_until(lambda: key_of(redis_server, key) is not None, RETRY + 3 * POLL + 1.0,
                   "the suspension set again after a restart (cluster.retry, then a poll)")
    assert key_of(redis_server, key) == published
    d = host(redis_server, "mta-d", "127.0.0.5")
    assert suspended(d.get("yahoo").turn())
    assert abs(d.get("yahoo").suspended_until - ends) < 0.5
    assert not suspended(d.get("gmail").turn())  # only what was lost is set again


@pytest.mark.timeout(60)
def test_a_learned_ceiling_lost_with_redis_is_set_again_and_seeds_a_new_worker(
        redis_server: RedisServer) -> None:
    a = host(redis_server, "mta-a", "127.0.0.2")
    assert not suspended(a.get("yahoo").turn())  # its watching greenlet runs
    pushed = a.get("yahoo")
    assert pushed.judge([SLOW_DOWN], pushed.epoch) == Verdict("rule:rate-text")
    learned = pushed.rate.limit
    assert learned is not None
    key = "mailengine:ceiling:yahoo"
    yielding_until(lambda: key_of(redis_server, key) is not None, 1.0, "the ceiling published")
    ttl = redis_server.client().pttl(key)  # type: ignore[attr-defined]

    redis_server.client().flushall()  # type: ignore[attr-defined]
    yielding_until(lambda: key_of(redis_server, key) is not None, 2 * POLL + 0.5,
                   "the ceiling set again")
    assert float(key_of(redis_server, key) or 0) == pytest.approx(learned, rel=1e-3)
    assert redis_server.client().pttl(key) <= ttl  # type: ignore[attr-defined]  # not renewed
    c = host(redis_server, "mta-c", "127.0.0.4")
    assert not suspended(c.get("yahoo").turn())
    assert c.get("yahoo").rate.limit == pytest.approx(learned, rel=1e-3)  # seeded


@pytest.mark.timeout(60)
def test_a_resume_on_every_host_lifts_the_suspension_from_redis_and_nobody_follows_it_again(
        redis_server: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    """`queue --cluster resume`: each host's workers release the provider with `lift`. The
    first deletes the key; one not told yet (still suspended) may set it again meanwhile,
    until it is told too; then it is gone for good, and a new worker sends."""
    caplog.set_level(logging.WARNING, "mailengine.cluster")
    a = host(redis_server, "mta-a", "127.0.0.2", block_for=60)
    b = host(redis_server, "mta-b", "127.0.0.3", block_for=60)
    assert not suspended(a.get("yahoo").turn())
    assert not suspended(b.get("yahoo").turn())
    a.get("yahoo").judge([SPAMHAUS], a.get("yahoo").epoch)
    first_suspended_turn(b, "yahoo", timeout=POLL + 1.0)
    key = "mailengine:suspend:yahoo"

    b.hold("yahoo", 0, lift=True)  # b told first
    assert "event=provider_suspension_lifted provider=yahoo origin=mta-a/127.0.0.2" \
        in caplog.text
    assert not suspended(b.get("yahoo").turn())
    yielding_until(lambda: key_of(redis_server, key) is not None, 2 * POLL + 0.5,
                   "a, still suspended, sets it again")
    gevent.sleep(POLL + 0.05)
    assert not suspended(b.get("yahoo").turn())  # b does not follow it again

    a.hold("yahoo", 0, lift=True)  # then a
    assert key_of(redis_server, key) is None
    gevent.sleep(2 * POLL + 0.1)
    assert key_of(redis_server, key) is None  # nobody sets it again
    assert not suspended(a.get("yahoo").turn())
    assert not suspended(b.get("yahoo").turn())
    c = host(redis_server, "mta-c", "127.0.0.4")
    assert not suspended(c.get("yahoo").turn())


@pytest.mark.timeout(30)
def test_a_resume_on_one_host_leaves_the_suspension_in_redis_for_the_others(
        redis_server: RedisServer) -> None:
    a = host(redis_server, "mta-a", "127.0.0.2", block_for=60)
    b = host(redis_server, "mta-b", "127.0.0.3", block_for=60)
    assert not suspended(b.get("yahoo").turn())
    a.get("yahoo").judge([SPAMHAUS], a.get("yahoo").epoch)
    first_suspended_turn(b, "yahoo", timeout=POLL + 1.0)
    a.hold("yahoo", 0)  # `queue resume` on a alone: a sends; the key stays for b and others
    assert not suspended(a.get("yahoo").turn())
    assert key_of(redis_server, "mailengine:suspend:yahoo") is not None
    redis_server.client().flushall()  # type: ignore[attr-defined]
    # b still follows it, and sets it again; a resumed it and neither sets nor follows it.
    yielding_until(lambda: key_of(redis_server, "mailengine:suspend:yahoo") is not None,
                   2 * POLL + 0.5, "b sets it again")
    gevent.sleep(POLL + 0.05)
    assert not suspended(a.get("yahoo").turn())
    assert suspended(b.get("yahoo").turn())


# -- what a worker met while Redis was away, published at its return ------------------------

DOWN_FOR = 1.5  # s: Redis kept down this long, so that the time left is plainly not a fresh one


def restart_after(server: RedisServer, seconds: float) -> None:
    """Redis down for `seconds` (the workers in fallback meanwhile), then back, empty."""
    gevent.sleep(seconds)  # the outage's length, not a wait for an event
    server.start()


@pytest.mark.timeout(60)
def test_a_block_met_while_redis_was_down_is_published_at_its_return_for_the_time_left(
        redis_server: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    """a is blocked while Redis is down: it suspends alone. Redis back (empty): a publishes
    the block at its next read, ending when a's own ends (not a fresh block_suspend), and b,
    which never met the block, follows it until the same moment."""
    caplog.set_level(logging.WARNING, "mailengine.cluster")
    a_metrics = Recorded()
    a = host(redis_server, "mta-a", "127.0.0.2", a_metrics, block_for=30)
    b = host(redis_server, "mta-b", "127.0.0.3", block_for=30)
    assert not suspended(a.get("yahoo").turn())
    assert not suspended(b.get("yahoo").turn())

    redis_server.kill()
    a.get("yahoo").judge([SPAMHAUS], a.get("yahoo").epoch)
    gevent.sleep(0)  # the publishing greenlet: no Redis to take it
    assert a.cluster is not None and a.cluster.mode == FALLBACK
    assert suspended(a.get("yahoo").turn())  # alone meanwhile
    assert a_metrics.total("cluster_suspensions_published") == 0
    restart_after(redis_server, DOWN_FOR)

    key = "mailengine:suspend:yahoo"
    yielding_until(lambda: key_of(redis_server, key) is not None, RETRY + 3 * POLL + 1.0,
                   "the block published at Redis's return (cluster.retry, then a poll)")
    value = key_of(redis_server, key)
    assert value is not None and value.split(b"|")[1:] == [b"mta-a/127.0.0.2", b"block"]
    ends = a.get("yahoo").suspended_until
    ttl = redis_server.client().pttl(key)  # type: ignore[attr-defined]
    assert abs(ttl / 1000 - (ends - time.monotonic())) < POLL  # a's time left ...
    assert ttl < (30 - DOWN_FOR) * 1000  # ... not a fresh full one
    assert a_metrics.total("cluster_state_rebuilt") == 1
    assert ("event=cluster_state_rebuilt provider=yahoo what=suspension"
            " member=mta-a/127.0.0.2 met_in_fallback=True") in caplog.text

    first_suspended_turn(b, "yahoo", timeout=RETRY + 3 * POLL + 1.0)
    assert abs(b.get("yahoo").suspended_until - ends) < POLL + 0.1
    assert b.get("yahoo").followed == 1
    gevent.sleep(POLL + 0.05)  # later reads: a does not follow its own, nor publish it again
    a.get("yahoo").turn()
    assert a.get("yahoo").followed == 0
    assert a_metrics.total("cluster_state_rebuilt") == 1

    # Held from then on as Redis has it: lost again, it is set again as it was.
    redis_server.client().flushall()  # type: ignore[attr-defined]
    yielding_until(lambda: key_of(redis_server, key) is not None, 2 * POLL + 0.5,
                   "the published block set again after a FLUSHALL")
    assert key_of(redis_server, key) == value
    assert "met_in_fallback=False" in caplog.text


@pytest.mark.timeout(60)
def test_a_ceiling_learned_while_redis_was_down_is_shared_at_its_return_for_the_time_left(
        redis_server: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "mailengine.cluster")
    a_metrics = Recorded()
    a = host(redis_server, "mta-a", "127.0.0.2", a_metrics)
    b = host(redis_server, "mta-b", "127.0.0.3")
    assert not suspended(a.get("yahoo").turn())
    assert not suspended(b.get("yahoo").turn())
    expiry = ClusterConfig().ceiling_expiry

    redis_server.kill()
    pushed = a.get("yahoo")
    assert pushed.judge([SLOW_DOWN], pushed.epoch) == Verdict("rule:rate-text")
    learned = pushed.rate.limit
    assert learned is not None
    gevent.sleep(0)  # the publishing greenlet: no Redis to take it
    restart_after(redis_server, DOWN_FOR)

    key = "mailengine:ceiling:yahoo"
    yielding_until(lambda: key_of(redis_server, key) is not None, RETRY + 3 * POLL + 1.0,
                   "the ceiling shared at Redis's return")
    assert float(key_of(redis_server, key) or 0) == pytest.approx(learned, rel=1e-3)
    assert redis_server.client().pttl(key) < (expiry - DOWN_FOR) * 1000  # type: ignore[attr-defined]
    assert a_metrics.total("cluster_state_rebuilt") == 1
    assert ("event=cluster_state_rebuilt provider=yahoo what=ceiling"
            " member=mta-a/127.0.0.2 met_in_fallback=True") in caplog.text
    yielding_until(lambda: b.get("yahoo").rate.limit is not None, RETRY + 3 * POLL + 1.0,
                   "b seeded by the ceiling a learned alone")
    assert b.get("yahoo").rate.limit == pytest.approx(learned, rel=1e-3)


@pytest.mark.timeout(60)
def test_a_block_met_while_redis_was_down_and_resumed_by_the_operator_is_not_published(
        redis_server: RedisServer) -> None:
    a = host(redis_server, "mta-a", "127.0.0.2", block_for=30)
    assert not suspended(a.get("yahoo").turn())
    redis_server.kill()
    a.get("yahoo").judge([SPAMHAUS], a.get("yahoo").epoch)
    gevent.sleep(0)
    a.hold("yahoo", 0)  # `queue resume yahoo` while Redis is still down
    redis_server.start()
    assert a.cluster is not None
    yielding_until(lambda: a.cluster is not None and a.cluster.mode != FALLBACK,
                   RETRY + 3 * POLL + 1.0, "a back on Redis")
    gevent.sleep(POLL + 0.05)  # a read after the return
    assert key_of(redis_server, "mailengine:suspend:yahoo") is None
    assert not suspended(a.get("yahoo").turn())
