"""The supervisor with real workers: one per sending IP, routing by ip and pool, a worker that
dies, malformed jobs, SIGHUP reload, and an events log left torn by a kill."""
from __future__ import annotations

import collections
import contextlib
import json
import os
import signal
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import zmq

from engine.testing.harness import LocalEngine, final_outcomes, make_message
from engine.testing.sink import SinkServer
from tests.support.wait import until

IP2, IP3 = "127.0.0.2", "127.0.0.3"
POOLS = {"both": [IP2, IP3], "only3": [IP3]}


def job(job_id: str, **fields: Any) -> tuple[dict[str, Any], bytes]:
    rcpt = f"{job_id}@example.test"
    return ({"id": job_id, "from": "sender@example.test", "to": [rcpt], **fields},
            make_message(0, 1000, rcpt=rcpt))


def peers(sink: SinkServer) -> dict[str, str]:
    """Recipient -> the source address its message came from."""
    return {rcpt: m.peer[0] for m in sink.messages for rcpt in m.rcpt_tos}


def two_ip_engine(local_engine: Callable[..., LocalEngine], sink: SinkServer) -> LocalEngine:
    return local_engine(sink.port, ips=(IP2, IP3), extra={"ip_pools": POOLS})


@contextlib.contextmanager
def raw_producer(engine: LocalEngine) -> Iterator[zmq.Socket]:
    """A bare PUSH socket on the engine's ingest, for frames `mailengine push` never sends."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 2000)
    sock.connect(str(engine.config["ingest"]))
    try:
        yield sock
    finally:
        sock.close()
        ctx.term()


def send(sock: zmq.Socket, env: dict[str, Any], message: bytes) -> None:
    sock.send_multipart([json.dumps(env).encode(), message])


@pytest.mark.timeout(60)
def test_two_sending_ips_one_worker_each_and_jobs_leave_from_their_ip_or_pool(
        sink: SinkServer, local_engine: Callable[..., LocalEngine]) -> None:
    engine = two_ip_engine(local_engine, sink)
    workers = engine.status()["workers"]
    assert set(workers) == {IP2, IP3}
    assert all(w["alive"] for w in workers.values())
    assert workers[IP2]["pid"] != workers[IP3]["pid"]

    jobs = ([job(f"ip2-{i}", ip=IP2) for i in range(5)]
            + [job(f"ip3-{i}", ip=IP3) for i in range(5)]
            + [job(f"both-{i}", pool="both") for i in range(20)]
            + [job(f"only3-{i}", pool="only3") for i in range(5)])
    assert engine.push(jobs)
    finals = final_outcomes(engine.wait_final(len(jobs), timeout=30))
    assert {e["event"] for e in finals.values()} == {"delivered"}

    sink.wait_for(len(jobs))
    came_from = peers(sink)
    prefix_ips = collections.defaultdict(set)
    for rcpt, ip in came_from.items():
        prefix_ips[rcpt.split("-")[0]].add(ip)
    assert prefix_ips == {"ip2": {IP2}, "ip3": {IP3}, "both": {IP2, IP3}, "only3": {IP3}}
    # The events say the same as the sink.
    assert all(e["ip"] == came_from[e["rcpt"]] for e in finals.values())


@pytest.mark.timeout(60)
def test_unknown_ip_or_pool_is_rejected_with_a_clear_error(
        sink: SinkServer, local_engine: Callable[..., LocalEngine]) -> None:
    engine = two_ip_engine(local_engine, sink)
    bad = [job("bad-ip", ip="127.0.0.9"), job("bad-pool", pool="nope")]
    assert engine.push(bad) is False  # push succeeds only when every job is queued
    rejected = {e["id"]: e for e in engine.wait_for(
        lambda evs: sum(e["event"] == "rejected" for e in evs) >= 2, 10)
        if e["event"] == "rejected"}
    assert rejected["bad-ip"]["error"] == "ip 127.0.0.9 is not one of this engine's sending IPs"
    assert rejected["bad-pool"]["error"] == ("unknown pool 'nope' (configured: both, default, "
                                             "only3)")
    assert not [e for e in engine.events() if e["event"] == "queued"]
    assert sink.messages == []


@pytest.mark.timeout(60)
def test_pool_jobs_go_out_via_the_other_ip_while_a_worker_is_down(
        sink: SinkServer, local_engine: Callable[..., LocalEngine]) -> None:
    engine = two_ip_engine(local_engine, sink)
    with raw_producer(engine) as producer:
        send(producer, *job("warm-up", pool="both"))  # the socket is connected once this is in
        engine.wait_for(lambda evs: any(e["event"] == "delivered" for e in evs), 10)

        victim = engine.status()["workers"][IP2]["pid"]
        os.kill(victim, signal.SIGKILL)
        # The supervisor restarts it after a backoff (0.5 s the first time): push in between.
        until(lambda: not engine.status()["workers"][IP2]["alive"], 5, "the worker's death",
              engine.log_tail)
        for i in range(10):
            send(producer, *job(f"down-{i}", pool="both"))
        send(producer, *job("wants-ip2", ip=IP2))  # waits for its own worker to come back

        finals = final_outcomes(engine.wait_final(12, timeout=30))
    assert {e["event"] for e in finals.values()} == {"delivered"}
    came_from = peers(sink)
    assert {came_from[f"down-{i}@example.test"] for i in range(10)} == {IP3}
    assert came_from["wants-ip2@example.test"] == IP2
    workers = engine.status()["workers"]
    assert workers[IP2]["alive"] and workers[IP2]["pid"] != victim
    assert workers[IP2]["restarts"] == 1


@pytest.mark.timeout(60)
def test_malformed_jobs_are_rejected_and_the_others_still_delivered(
        sink: SinkServer, local_engine: Callable[..., LocalEngine]) -> None:
    engine = local_engine(sink.port)
    with raw_producer(engine) as producer:
        send(producer, *job("before"))
        producer.send_multipart([b'{"id": "broken", "to": [', b"Subject: x\r\n\r\nbody\r\n"])
        producer.send_multipart([json.dumps({"id": "three", "from": "", "to": ["a@b.test"]})
                                 .encode(), b"Subject: x\r\n\r\nbody\r\n", b"extra"])
        producer.send_multipart([b"\xff\xfe not utf-8", b"x"])
        send(producer, *job("after"))
        events = engine.wait_for(lambda evs: len(final_outcomes(evs)) >= 2
                                 and sum(e["event"] == "rejected" for e in evs) >= 3, 20)
    errors = [e["error"] for e in events if e["event"] == "rejected"]
    assert errors[0].startswith("envelope is not valid JSON: ")
    assert errors[1] == "expected 2 frames (envelope, message), got 3"
    assert errors[2].startswith("envelope is not UTF-8")
    assert {e["id"] for e in final_outcomes(events).values()} == {"before", "after"}
    assert len(sink.wait_for(2)) == 2
    assert engine.status()["workers"]["127.0.0.2"]["alive"]


@pytest.mark.timeout(60)
def test_sighup_reload_adds_a_sending_ip_and_a_bad_config_is_refused(
        sink: SinkServer, local_engine: Callable[..., LocalEngine]) -> None:
    engine = local_engine(sink.port, ips=(IP2,))
    old = engine.status()["workers"]
    assert set(old) == {IP2}

    engine.config["ips"].append({"address": IP3, "helo": "mta-127-0-0-3.test"})
    engine.reload()  # rewrites the config file, then SIGHUP
    workers = until(
        lambda: (w := engine.status()["workers"]).get(IP3, {}).get("alive")
        and w[IP2]["alive"] and w[IP2]["pid"] != old[IP2]["pid"] and w,
        15, "a worker for the new IP (and a fresh one for the old)", engine.log_tail)
    assert workers[IP3]["pid"] not in (old[IP2]["pid"], workers[IP2]["pid"])
    assert engine.push([job("via-new", ip=IP3), job("via-old", ip=IP2)])
    engine.wait_final(2, timeout=20)
    assert peers(sink) == {"via-new@example.test": IP3, "via-old@example.test": IP2}

    engine.config["ips"] = [{"address": IP2}, {"address": "not-an-ip"}]
    engine.reload()
    until(lambda: "event=reload_refused" in engine.log_tail(50), 10, "reload_refused",
          engine.log_tail)
    assert "ips[1].address" in engine.log_tail(50)  # the error names the key
    # Still running, with the config it had.
    assert engine.proc is not None and engine.proc.poll() is None
    assert set(engine.status()["workers"]) == {IP2, IP3}
    assert engine.push([job("after-refusal", ip=IP3)])
    engine.wait_final(3, timeout=20)
    assert peers(sink)["after-refusal@example.test"] == IP3


@pytest.mark.timeout(60)
def test_regression_events_log_torn_by_a_kill_does_not_swallow_the_next_event(
        sink: SinkServer, local_engine: Callable[..., LocalEngine]) -> None:
    # A kill -9 can stop the supervisor halfway through writing a line of the events log.
    engine = local_engine(sink.port, start=False)
    with open(engine.events_log, "w", encoding="utf-8") as f:
        f.write('{"event":"delivered","id":"torn-by-a-ki')
    engine.start()
    assert engine.push([job("next")])
    engine.wait_final(1, timeout=20)
    with open(engine.events_log, encoding="utf-8") as f:
        lines = f.read().splitlines()
    assert lines[0] == '{"event":"delivered","id":"torn-by-a-ki'
    assert [json.loads(line)["event"] for line in lines[1:]] == ["queued", "delivered"]
    assert engine.unparsable == [lines[0]]
