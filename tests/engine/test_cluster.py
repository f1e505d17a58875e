"""Three engines, one Redis (issue #18): real `mailengine run` processes sending from
127.0.0.2, .3 and .4, each with its own spool and sockets, sharing a real redis-server on
loopback; one producer PUSH socket connected to the three ingest endpoints (ZeroMQ spreads
the jobs); one receiver that refuses past 60 messages/s from all of them together.

- the cluster limit of 60/s holds for the three together: at most 63/s in any 5 s window, at
  least 54/s on average, and the receiver refuses nothing;
- a job re-sent to another host within the duplicate window is acknowledged there as a
  duplicate, and delivered once;
- Redis killed mid-run: every host says so (`cluster_mode mode=fallback`) and delivery
  goes on at each host's share of the limit (the three together within 110% of it);
  Redis restarted: every worker shares the limit again within 10 s, the three within it;
  every job is delivered once;
- one engine killed -9 (`mailengine push`'s Pusher to the three, re-sending until some host
  says `queued`, as docs/SCALING.md lays it out): the other two take the new mail; the
  killed one's spooled mail goes out once it is back; nothing is lost;
- a block seen by one host stops the others (engine.cluster_suspend): a receiver that
  blocks the whole sending range; once one host met the block, the other knocks no more.
"""
from __future__ import annotations

import collections
import json
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from engine.testing import limits
from engine.testing.harness import LocalEngine, final_outcomes
from engine.testing.sink import SinkServer
from tests.support.cluster_engines import PROVIDER, finals, job, push_to_all, sharing_engines
from tests.support.rates import busiest
from tests.support.redis import RedisServer
from tests.support.wait import socket_event, until

IPS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
LIMIT = 60  # messages/s, for the three hosts together
JOBS = 1200  # 20 s at the limit
FALLBACK = 7.0  # s without Redis
MORE = 240  # jobs pushed once Redis is back


@pytest.fixture
def receiver() -> Iterator[SinkServer]:
    """Refuses (421) past 60 messages/s from every sender together (a token bucket, a few
    saved up: a sender that keeps to the rate is never refused)."""
    sink = SinkServer(tls=False, rate_limit=LIMIT, rate_burst=10, per_ip=False)
    yield sink
    sink.stop()


def per_second(receiver: SinkServer, since: float) -> dict[str, list[tuple[int, int]]]:
    """Messages accepted per second from each sender, seconds counted from `since`."""
    return {ip: sorted(collections.Counter(math.floor(t - since)
                                           for t in receiver.accept_times(ip)).items())
            for ip in IPS}


def shared_again(engine: LocalEngine) -> bool:
    """The engine's worker logged its link to Redis back after the fall back."""
    log = Path(engine.log_path).read_text()
    _, _, after = log.partition("event=cluster_mode mode=fallback")
    return "worker/" in after and any("worker/" in line and "mode=shared" in line
                                      for line in after.splitlines())


def push_spread(engines: list[LocalEngine], jobs: list[tuple[dict[str, Any], bytes]]) -> None:
    """One PUSH socket connected to every engine's ingest: ZeroMQ deals the jobs round."""
    ctx = zmq.Context.instance()
    push = ctx.socket(zmq.PUSH)
    monitor = push.get_monitor_socket(zmq.EVENT_CONNECTED)
    try:
        for engine in engines:
            push.connect(str(engine.config["ingest"]))
        for _ in engines:  # every peer connected first, or the first one takes them all
            socket_event(monitor, {zmq.EVENT_CONNECTED})
        for envelope, message in jobs:
            push.send_multipart([json.dumps(envelope).encode(), message])
    finally:
        push.disable_monitor()
        monitor.close(linger=0)
        push.close(linger=10_000)


@pytest.mark.timeout(240)
def test_three_engines_share_a_limit_and_duplicates_and_go_on_without_redis_until_it_is_back(
        local_engine: Callable[..., LocalEngine], redis_server: RedisServer,
        receiver: SinkServer) -> None:
    engines = sharing_engines(local_engine, receiver.port, redis_server, IPS,
                              cluster={"retry": "1s"}, provider={"cluster_rate": LIMIT})

    # A job re-sent to another host within the window: a duplicate there, delivered once.
    resent = [job("resent-1", 0)]
    assert engines[0].push(resent)
    engines[0].wait_final(1, timeout=30)
    assert engines[1].push(resent)  # acknowledged, as a duplicate, and not spooled there
    events = engines[1].wait_for(lambda evs: any(e["event"] == "queued" for e in evs),
                                 timeout=10, what="queued")
    assert [(e["event"], e["id"], e.get("duplicate")) for e in events] == \
        [("queued", "resent-1", True)]

    # 1,200 jobs from one producer, spread over the three.
    start_count = len(receiver.accept_times())
    push_spread(engines, [job(f"j-{i}", i) for i in range(JOBS)])
    until(lambda: len(receiver.accept_times()) >= start_count + 8 * LIMIT, timeout=60,
          what="8 s of deliveries")
    redis_server.kill()
    killed = time.time()
    time.sleep(FALLBACK)  # (a phase of the scenario: delivery goes on without Redis)
    redis_server.start()  # empty, on the same port
    back = time.time()
    # Mail for every host again: each worker leases from Redis, which it tries every 1 s.
    push_spread(engines, [job(f"k-{i}", i) for i in range(MORE)])
    until(lambda: all(shared_again(engine) for engine in engines), timeout=10,
          what="every worker sharing again within 10 s",
          detail=lambda: "\n".join(e.log_tail(5) for e in engines))

    until(lambda: len(finals(engines)) >= 1 + JOBS + MORE, timeout=90,
          what="every job delivered", detail=lambda: engines[0].log_tail())

    times = sorted(receiver.accept_times()[start_count:])
    shared = [t for t in times if t < killed]
    alone = [t for t in times if killed + 2.0 <= t < back]  # past the turns leased before
    again = [t for t in times if t >= back + 2.0]
    seen = per_second(receiver, killed)  # for the messages: what the receiver saw, when
    # Shared: at most 63/s in any 5 s, at least 54/s on average, nothing refused.
    assert busiest(shared, 5.0) <= 63 * 5, seen
    assert len(shared) / (shared[-1] - shared[0]) >= 54, seen
    assert [t for t in receiver.throttle_times() if t < killed] == [], seen
    # Redis gone: delivery goes on, each host at most at its share (a third), the three
    # within 110% of the limit; one host at least had mail all along (what each had left
    # when Redis went differs).
    share, span = LIMIT / 3, back - killed - 2.0
    assert busiest(alone, span) <= 1.1 * LIMIT * span, seen
    for ip in IPS:
        mine = [t for t in receiver.accept_times(ip) if killed + 2.0 <= t < back]
        assert busiest(mine, span) <= 1.1 * share * span + 1, (ip, seen)
    assert len(alone) >= 0.8 * share * span, seen
    # Redis back: the limit is shared again, the three within it.
    assert busiest(again, 5.0) <= 63 * 5, seen
    for engine in engines:
        assert "event=cluster_mode mode=fallback" in Path(engine.log_path).read_text(), \
            engine.log_tail()
    # Each job delivered once, by one host, from every host's IP.
    final = finals(engines)
    assert all(e["event"] == "delivered" for e in final.values())
    by_rcpt = collections.Counter(r for m in receiver.messages for r in m.rcpt_tos)
    assert by_rcpt["resent-1@a.test"] == 1
    assert max(by_rcpt.values()) == 1 and len(by_rcpt) == 1 + JOBS + MORE
    by_ip = collections.Counter(e["ip"] for e in final.values())
    assert set(by_ip) == set(IPS) and min(by_ip.values()) >= JOBS / 5, by_ip


@pytest.mark.timeout(240)
def test_an_engine_killed_the_others_take_the_new_mail_and_its_own_goes_out_once_it_is_back(
        local_engine: Callable[..., LocalEngine], redis_server: RedisServer) -> None:
    sink = SinkServer(tls=False)
    try:
        # slow enough that host0 still holds mail when it is killed
        engines = sharing_engines(local_engine, sink.port, redis_server, IPS,
                                  provider={"cluster_rate": 100})
        first = push_to_all(engines, [job(f"a-{i}", i) for i in range(600)])
        assert first.exit_status() == 0, first.lines("")
        until(lambda: final_outcomes(engines[0].events()), timeout=30,
              what="host0 delivering")
        engines[0].kill()  # kill -9: its spooled mail waits for it
        then = push_to_all(engines, [job(f"b-{i}", i) for i in range(300)])
        assert then.exit_status() == 0, then.lines("")
        ingest = [str(e.config["ingest"]) for e in engines]
        assert then.by_host.get(ingest[0], 0) == 0, then.by_host  # down: none dealt to it
        assert sum(then.by_host.values()) == 300, then.by_host
        engines[0].start()  # its spool, as the kill left it
        restarted = time.time()
        everyone = {f"{p}-{i}@a.test" for p, n in (("a", 600), ("b", 300)) for i in range(n)}
        until(lambda: everyone <= {r for m in sink.messages for r in m.rcpt_tos}, timeout=120,
              what="every job delivered", detail=lambda: engines[0].log_tail())
        final = finals(engines)
        # The new mail went to the two left; host0 delivered what it held, after its restart.
        b_ips = {e["ip"] for (job_id, _), e in final.items() if job_id.startswith("b-")}
        assert b_ips == set(IPS[1:]), b_ips
        held = [e for e in final.values() if e["ip"] == IPS[0] and e["ts"] >= restarted]
        assert held and all(e["event"] == "delivered" for e in held)
        # Nothing lost; a copy twice only where the engine said it might be (the kill cut a
        # delivery short of its result: `possible_duplicate` on the re-send).
        received = collections.Counter(r for m in sink.messages for r in m.rcpt_tos)
        twice = {r for r, n in received.items() if n > 1}
        flagged = {e["rcpt"] for engine in engines for e in engine.events()
                   if e.get("possible_duplicate") or e.get("ambiguous")}
        assert set(received) == everyone and twice <= flagged, (twice, flagged)
    finally:
        sink.stop()


class RangeBlock(limits.Open):
    """Takes mail until `blocking`; then refuses every sender at the banner and at MAIL
    (`554 ... blocked`, a block of the whole sending range). Counts each sender's connections
    and transactions (`knocks`) from the moment it blocks."""

    REPLY = "554 5.7.1 Service unavailable; Client host [{ip}] blocked using zen.spamhaus.org"

    def __init__(self) -> None:
        self.blocking = False
        self.knocks: collections.Counter[str] = collections.Counter()

    def on_connect(self, client_ip: str, open_connections: int, now: float) -> str | None:
        return self._refusal(client_ip)

    def on_mail(self, client_ip: str, now: float) -> str | None:
        return self._refusal(client_ip)

    def _refusal(self, client_ip: str) -> str | None:
        if not self.blocking:
            return None
        self.knocks[client_ip] += 1
        return self.REPLY.format(ip=client_ip)


@pytest.mark.timeout(120)
def test_a_block_seen_by_one_host_stops_the_other_from_knocking(
        local_engine: Callable[..., LocalEngine], redis_server: RedisServer) -> None:
    policy = RangeBlock()
    sink = SinkServer(tls=False, policy=policy)
    try:
        a, b = sharing_engines(local_engine, sink.port, redis_server, IPS[:2],
                               cluster={"poll": "500ms"},
                               extra={"throttle": {"block_suspend": "1h"}})
        # Both hosts send to the receiver while it takes mail: it knows both.
        for engine, prefix in ((a, "a"), (b, "b")):
            assert engine.push([job(f"{prefix}-{i}", i) for i in range(3)])
            engine.wait_final(3, timeout=30)
        policy.blocking = True
        # Host a meets the block, suspends the provider, and publishes it.
        assert a.push([job(f"a2-{i}", i) for i in range(10)])
        until(lambda: policy.knocks[IPS[0]] > 0
              and "event=provider_blocked" in a.log_tail(200), timeout=30,
              what="host a blocked", detail=a.log_tail)
        key = f"mailengine:suspend:{PROVIDER}"
        until(lambda: redis_server.client().get(key) is not None,  # type: ignore[attr-defined]
              timeout=10, what="the block published to Redis")
        # Host b, idle since its mail went, follows within one poll (its worker reads the
        # suspensions every cluster.poll) ...
        until(lambda: "event=provider_suspended_elsewhere" in b.log_tail(400), timeout=5,
              what="host b following host a's block", detail=b.log_tail)
        # ... and its new mail: not one knock at the receiver; back in the spool (no
        # attempt counted), due when host a's suspension ends.
        assert b.push([job(f"b2-{i}", i) for i in range(10)])

        def shaping() -> dict[str, Any]:
            worker = b.status()["workers"][IPS[1]]
            return dict(worker.get("shaping", {}).get(PROVIDER, {}))
        until(lambda: shaping().get("followed") == 1 and shaping()["phase"] == "suspended",
              timeout=30, what="host b following the block", detail=b.log_tail)
        until(lambda: not b.status()["in_flight"] and b.status()["spool"]["jobs"] == 10,
              timeout=30, what="host b's mail back in the spool", detail=b.log_tail)
        assert policy.knocks[IPS[1]] == 0, policy.knocks
        assert policy.knocks[IPS[0]] >= 1
        assert shaping()["suspended_for"] > 3000  # until host a's suspension ends
        assert b.status()["spool"]["rcpts_deferred"] == 0  # no attempt burned
        assert not [e for e in b.events()  # none attempted
                    if e["id"].startswith("b2-") and e["event"] != "queued"]
        log = b.log_tail(400)
        assert "event=provider_suspended_elsewhere" in log and "origin=host0/127.0.0.2" in log
    finally:
        sink.stop()
