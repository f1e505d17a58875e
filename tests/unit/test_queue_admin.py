"""engine.queue_admin over a real spool and dispatcher (no workers): bounce and delete store
each final event with its outcome (the outbox) and leave jobs in flight alone; retry makes
recipients due with their attempt counts; the spool's queue reads; the routes learned from
results; the Hold message and the shaper's hold and release."""
from __future__ import annotations

import json
import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from engine import config as config_mod
from engine import control, protocol
from engine.clock import EngineClock
from engine.control import BadRequest
from engine.dispatch import Dispatcher, InFlight
from engine.events import Event
from engine.job import Job
from engine.protocol import Attempt, Hold, Status
from engine.queue_admin import QueueAdmin, Routes
from engine.reply import Reply
from engine.shaping import Deferral
from engine.spool import RcptUpdate, Spool, SpoolError
from engine.workers import WorkerHandle, Workers
from tests.support.shaping import shaper

T0 = 1_800_000_000.0
LATER = Reply(452, "4.2.2", "mailbox full")


class Frozen(EngineClock):
    """The engine's time, held at T0 + `at`."""

    def __init__(self) -> None:
        super().__init__()
        self.at = 0.0

    def now(self) -> float:
        return T0 + self.at


@pytest.fixture
def parts(tmp_path: Path) -> Iterator[tuple[QueueAdmin, Spool, Dispatcher, list[Event]]]:
    cfg = config_mod.from_dict({"spool": str(tmp_path / "spool"), "statsd": {"enabled": False},
                                "run_dir": str(tmp_path / "run"),
                                "ips": [{"address": "127.0.0.2"}]})
    spool = Spool(cfg.spool)
    published: list[Event] = []
    ctx = zmq.Context()
    workers = Workers(ctx, cfg, None)
    clock = Frozen()
    dispatcher = Dispatcher(cfg, spool, workers, published.append, clock=clock)
    yield QueueAdmin(spool, dispatcher, workers, published.append, clock), spool, dispatcher, \
        published
    spool.close()
    ctx.term()


def deferred(spool: Spool, job_id: str, *rcpts: str) -> None:
    """A job accepted at T0 whose recipients were each tried once and deferred an hour."""
    spool.accept([Job(id=job_id, sender="s@example.test", rcpts=rcpts, message=b"x\r\n",
                      meta={"m": job_id})], T0, 86400.0)
    spool.record([RcptUpdate(job_id, r, Status.DEFERRED, next_attempt=T0 + 3600, reply=LATER)
                  for r in rcpts], T0)


def in_flight(dispatcher: Dispatcher, job_id: str) -> None:
    dispatcher.in_flight[job_id] = InFlight("127.0.0.2", {}, T0, T0 + 86400, {})


def test_bounce_stores_each_final_event_with_its_outcome_and_leaves_jobs_in_flight_alone(
        parts: tuple[QueueAdmin, Spool, Dispatcher, list[Event]]) -> None:
    admin, spool, dispatcher, published = parts
    deferred(spool, "j1", "a@one.test", "b@ONE.test", "c@two.test")
    deferred(spool, "j2", "d@one.test")
    in_flight(dispatcher, "j2")

    with pytest.raises(BadRequest, match="job j2 is in flight"):
        admin.bounce({"id": "j2"})
    assert admin.bounce({"domain": "one.test", "dry_run": True}) == {
        "jobs": 2, "rcpts": 3, "dry_run": True}
    assert published == []

    answer = admin.bounce({"domain": "One.Test."})
    assert answer == {"jobs": 1, "rcpts": 2, "more": False, "in_flight": 1}
    assert spool.unpublished() == published  # stored in the outbox, then published
    lines = [json.loads(line) for _, line in published]
    assert [(e["event"], e["rcpt"], e["code"], e["enhanced"], e["attempt"], e["meta"])
            for e in lines] == [("bounced", "a@one.test", 550, "5.0.0", 1, {"m": "j1"}),
                                ("bounced", "b@ONE.test", 550, "5.0.0", 1, {"m": "j1"})]
    assert spool.count_waiting(job_id="j1") == (1, 1)  # c@two.test still waits
    assert spool.count_waiting(domain="one.test") == (1, 1)  # j2's, in flight


def test_a_job_whose_taken_back_hand_out_may_still_report_is_left_alone_too(
        parts: tuple[QueueAdmin, Spool, Dispatcher, list[Event]]) -> None:
    admin, spool, dispatcher, published = parts
    deferred(spool, "j1", "a@one.test")
    deferred(spool, "j2", "b@one.test")
    dispatcher.earlier[7] = InFlight("127.0.0.2", {}, T0, T0 + 86400, {"a@one.test": 0},
                                     handout=7, job_id="j1")
    with pytest.raises(BadRequest, match="job j1 is in flight"):
        admin.delete({"id": "j1"})
    assert admin.delete({"domain": "one.test"})["in_flight"] == 1
    assert [json.loads(line)["id"] for _, line in published] == ["j2"]


def test_delete_ends_with_expired_events_and_the_job_is_finished(
        parts: tuple[QueueAdmin, Spool, Dispatcher, list[Event]]) -> None:
    admin, spool, _, published = parts
    deferred(spool, "j1", "a@one.test", "b@two.test")
    assert admin.delete({"id": "j1"}) == {"jobs": 1, "rcpts": 2, "more": False,
                                          "in_flight": 0}
    assert [json.loads(line)["reply"] for name, line in published if name == "expired"] == [
        "deleted from the queue by the operator: not delivered"] * 2
    assert spool.stats().jobs == 0 and spool.job_record("j1") is None
    with pytest.raises(BadRequest, match="give a job id or a domain"):
        admin.delete({"id": "j1", "domain": "one.test"})


def test_retry_makes_recipients_due_now_and_keeps_their_attempts(
        parts: tuple[QueueAdmin, Spool, Dispatcher, list[Event]]) -> None:
    admin, spool, _, published = parts
    deferred(spool, "j1", "a@one.test", "b@two.test")
    assert spool.due(T0 + 1, 10) == []
    assert admin.retry({"domain": "two.test"})["rcpts"] == 1
    due = spool.due(T0 + 1, 10)
    assert [(p.job.id, p.rcpts, dict(p.attempts)) for p in due] == [
        ("j1", ("b@two.test",), {"b@two.test": 1})]
    assert published == []  # nothing ended, nothing to say
    assert admin.retry({"domain": "two.test"})["rcpts"] == 0  # due already: not found again
    record = spool.job_record("j1")
    assert record is not None and record["rcpts"][1]["reply"] == "mailbox full"


def test_waiting_pages_and_by_domain_reads_a_bounded_number(
        parts: tuple[QueueAdmin, Spool, Dispatcher, list[Event]]) -> None:
    _, spool, _, _ = parts
    for i in range(5):
        deferred(spool, f"j{i}", f"r{i}@one.test", f"r{i}@two.test")
    found, more = spool.waiting(domain="one.test", limit=3)
    assert ([w.rcpt for w in found], more) == (["r0@one.test", "r1@one.test", "r2@one.test"],
                                               True)
    assert spool.waiting(domain="one%test")[0] == []  # the domain is no LIKE pattern
    domains, scanned = spool.by_domain(4)
    assert scanned == 4 and sum(q.rcpts for q in domains) == 4
    domains, scanned = spool.by_domain(100)
    assert {(q.domain, q.rcpts, q.jobs) for q in domains} == {("one.test", 5, 5),
                                                             ("two.test", 5, 5)}
    assert all(q.reply == LATER and q.oldest_ts == T0 for q in domains)


def test_by_domain_gives_each_domain_the_reply_of_its_recipient_tried_most(
        parts: tuple[QueueAdmin, Spool, Dispatcher, list[Event]]) -> None:
    _, spool, _, _ = parts
    spool.accept([Job(id="a", sender="s@example.com", rcpts=("x@One.test", "y@one.test"),
                      message=b"x"),
                  Job(id="b", sender="s@example.com", rcpts=("z@one.test", "n@new.test"),
                      message=b"x")], T0 + 5, 86400.0)
    full = Reply(452, "4.2.2", "full again")
    spool.record([RcptUpdate("a", "x@One.test", Status.DEFERRED, T0 + 60, LATER)], T0)
    for _ in range(2):
        spool.record([RcptUpdate("b", "z@one.test", Status.DEFERRED, T0 + 90, full)], T0)
    domains, scanned = spool.by_domain(100)
    assert scanned == 4
    assert {(q.domain, q.rcpts, q.jobs, q.oldest_ts, q.next_attempt, q.reply)
            for q in domains} == {("one.test", 3, 2, T0 + 5, T0 + 5, full),
                                  ("new.test", 1, 1, T0 + 5, T0 + 5, None)}


def test_by_domain_counts_the_domain_after_the_last_at_in_lower_case(
        parts: tuple[QueueAdmin, Spool, Dispatcher, list[Event]]) -> None:
    _, spool, _, _ = parts
    spool.accept([Job(id="q", sender="s@example.com",
                      rcpts=('"a@b"@Quoted.test', "c@quoted.test", "local"), message=b"x"),
                  Job(id="r", sender="s@example.com", rcpts=("d@quoted.test",),
                      message=b"x")], T0, 86400.0)
    domains, scanned = spool.by_domain(100)
    assert scanned == 4
    assert {(q.domain, q.rcpts, q.jobs, q.reply) for q in domains} == {
        ("quoted.test", 3, 2, None), ("local", 1, 1, None)}


def answered(answer: dict[str, Any] | control.OffLoop) -> dict[str, Any]:
    """A handler's answer, an OffLoop one read and made here."""
    return answer.answer(answer.read()) if isinstance(answer, control.OffLoop) else answer


def test_by_domain_apart_reads_from_another_thread_what_the_loop_wrote(
        parts: tuple[QueueAdmin, Spool, Dispatcher, list[Event]]) -> None:
    _, spool, _, _ = parts
    for i in range(3):
        deferred(spool, f"j{i}", f"r{i}@one.test", f"r{i}@two.test")
    read: list[Any] = []
    thread = threading.Thread(target=lambda: read.append(spool.by_domain(100, apart=True)))
    thread.start()
    thread.join(20)
    (domains, scanned), = read  # no error: its own connection, opened in that thread
    assert scanned == 6 and sorted(domains, key=lambda q: q.domain) == \
        sorted(spool.by_domain(100)[0], key=lambda q: q.domain)
    assert {(q.domain, q.rcpts, q.reply) for q in domains} == {("one.test", 3, LATER),
                                                              ("two.test", 3, LATER)}


def test_the_queue_summary_is_read_off_the_loop_and_made_in_it(
        parts: tuple[QueueAdmin, Spool, Dispatcher, list[Event]]) -> None:
    admin, spool, _, _ = parts
    deferred(spool, "j1", "a@one.test")
    answer = admin.commands()["queue"]({"limit": 5})
    assert isinstance(answer, control.OffLoop)  # nothing read yet: the read is the thread's
    deferred(spool, "j2", "b@two.test")
    assert {row["domain"] for row in answered(answer)["rows"]} == {"one.test", "two.test"}
    with pytest.raises(BadRequest):  # a bad request is refused at once, in the loop
        admin.commands()["queue"]({"limit": "many"})


def test_routes_remember_the_latest_deferral_per_domain_within_a_limit() -> None:
    routes = Routes(limit=2)

    def deferral(rcpt: str, ip: str, provider: str) -> Attempt:
        return Attempt(job_id="j", rcpt=rcpt, status=Status.DEFERRED, reply=LATER, ip=ip,
                       provider=provider, ts=T0)
    routes.saw([deferral("a@one.test", "127.0.0.2", "google"),
                deferral("b@two.test", "127.0.0.3", "google")])
    routes.saw([Attempt(job_id="j", rcpt="c@two.test", status=Status.DELIVERED,
                        reply=Reply(250, None, "ok"), ip="127.0.0.2", provider="x", ts=T0)])
    assert routes.domains("google") == ["one.test", "two.test"]
    assert routes.domains("google", "127.0.0.3") == ["two.test"]
    routes.saw([deferral("a@ONE.test", "127.0.0.2", "google"),
                deferral("z@three.test", "127.0.0.2", "yahoo")])
    assert routes.of("two.test") is None  # the least recently seen went
    assert routes.domains("google") == ["one.test"]


@pytest.mark.parametrize("provider, seconds", [("", 60.0), ("a b", 60.0), ("x" * 254, 60.0),
                                               ("google", -1.0), ("google", float("nan")),
                                               ("google", protocol.HOLD_MAX + 1)])
def test_a_hold_refuses_what_it_cannot_mean(provider: str, seconds: float) -> None:
    with pytest.raises(ValueError):
        Hold(provider, seconds)


def test_a_hold_travels_as_one_frame_and_the_shaper_holds_until_released() -> None:
    frame = protocol.hold_frame(Hold("google", 600.0))
    assert protocol.hold_from_frame(frame) == Hold("google", 600.0)
    with pytest.raises(ValueError):
        protocol.hold_from_frame(b'{"type": "result"}')

    s, t = shaper(provider="google")
    epoch = s.epoch
    s.hold(600.0)
    turn = s.turn()
    assert isinstance(turn, Deferral) and turn.reason == "suspended"
    assert turn.retry_at == pytest.approx(t.now + 600)
    assert s.epoch == epoch + 1 and s.suspended
    assert s.state()["held"] is True and s.state()["suspended_for"] == 600
    s.release()
    assert s.turn() == s.epoch and s.state()["held"] is False
    assert s.state()["phase"] != "suspended"


def test_a_resume_on_every_host_travels_with_lift() -> None:
    frame = protocol.hold_frame(Hold("google", 0.0, lift=True))
    assert protocol.hold_from_frame(frame) == Hold("google", 0.0, lift=True)
    assert b"lift" not in protocol.hold_frame(Hold("google", 0.0))  # as before, otherwise
    assert protocol.hold_from_frame(b'{"type": "hold", "provider": "g", "seconds": 0,'
                                    b' "lift": "yes"}').lift is False


def test_a_suspension_without_an_ip_is_every_ip_and_a_worker_not_running_is_told_later(
        tmp_path: Path) -> None:
    """Two sending IPs, no worker running (none in this test): asked by IP, refused; asked
    for every IP (what `queue --cluster suspend` sends), remembered for both and said."""
    cfg = config_mod.from_dict({"spool": str(tmp_path / "spool"), "statsd": {"enabled": False},
                                "run_dir": str(tmp_path / "run"),
                                "ips": [{"address": "127.0.0.2"}, {"address": "127.0.0.3"}]})
    spool = Spool(cfg.spool)
    ctx = zmq.Context()
    workers = Workers(ctx, cfg, None)
    for ip in ("127.0.0.2", "127.0.0.3"):  # their handles, as before their workers are ready
        workers.handles[ip] = WorkerHandle(ip)
    dispatcher = Dispatcher(cfg, spool, workers, lambda _: None, clock=Frozen())
    admin = QueueAdmin(spool, dispatcher, workers, lambda _: None, Frozen())
    try:
        with pytest.raises(BadRequest, match=r"the worker of 127\.0\.0\.2 is not running"):
            admin.suspend({"ip": "127.0.0.2", "provider": "google"})
        done = admin.suspend({"provider": "Google", "seconds": 600})
        assert (done["ips"], done["provider"], done["not_running"]) == (
            ["127.0.0.2", "127.0.0.3"], "google", ["127.0.0.2", "127.0.0.3"])
        assert set(admin._holds) == {("127.0.0.2", "google"), ("127.0.0.3", "google")}
        resumed = admin.resume({"provider": "google", "lift": True})
        assert resumed["ips"] == ["127.0.0.2", "127.0.0.3"] and resumed["rcpts"] == 0
        assert admin._holds == {}
    finally:
        spool.close()
        ctx.destroy(linger=0)


def test_over_a_tcp_control_socket_the_queue_is_shown_and_never_changed(
        parts: tuple[QueueAdmin, Spool, Dispatcher, list[Event]]) -> None:
    admin, spool, dispatcher, published = parts
    deferred(spool, "j1", "a@one.test")
    tcp = QueueAdmin(spool, dispatcher, admin._workers, published.append, admin._clock,
                     "tcp://127.0.0.1:5572")
    commands = tcp.commands()
    assert answered(commands["queue"]({}))["rows"][0]["domain"] == "one.test"
    assert commands["queue_show"]({"id": "j1"})["rcpts"][0]["rcpt"] == "a@one.test"
    for name, request in (("queue_bounce", {"id": "j1"}), ("queue_delete", {"id": "j1"}),
                          ("queue_retry", {"id": "j1"}),
                          ("queue_suspend", {"ip": "127.0.0.2", "provider": "google"}),
                          ("queue_resume", {"ip": "127.0.0.2", "provider": "google"})):
        with pytest.raises(BadRequest, match="the control socket is tcp"):
            commands[name](request)
    assert published == [] and spool.count_waiting(job_id="j1") == (1, 1)


def test_over_a_curve_control_socket_the_queue_is_changed(
        parts: tuple[QueueAdmin, Spool, Dispatcher, list[Event]]) -> None:
    """With control.curve only the listed operators reach a tcp control socket."""
    admin, spool, dispatcher, published = parts
    deferred(spool, "j1", "a@one.test")
    tcp = QueueAdmin(spool, dispatcher, admin._workers, published.append, admin._clock,
                     "tcp://127.0.0.1:5572", authenticated=True)
    tcp.commands()["queue_bounce"]({"id": "j1"})
    assert [e[0] for e in published] == ["bounced"]


def test_the_control_socket_answers_every_request_even_a_failing_one(tmp_path: Path) -> None:
    def refuse(_: dict[str, Any]) -> dict[str, Any]:
        raise BadRequest("no such job")

    def bug(_: dict[str, Any]) -> dict[str, Any]:
        raise KeyError("x")

    ctx = zmq.Context()
    endpoint = f"ipc://{tmp_path}/control"
    rep = ctx.socket(zmq.REP)
    rep.bind(endpoint)
    control.restrict(endpoint)
    assert stat.S_IMODE(os.stat(tmp_path / "control").st_mode) == 0o660
    req = ctx.socket(zmq.REQ)
    req.connect(endpoint)
    answering = control.Control(rep, lambda: {"pid": 1}, {"refuse": refuse, "bug": bug})
    try:
        answers = []
        for request in ({"command": "status"}, {"command": "refuse"}, {"command": "bug"},
                        {"command": "nope"}, ["not", "an", "object"]):
            req.send_json(request)
            assert rep.poll(5000)
            answering.answer()
            answers.append(req.recv_json())
    finally:
        req.close(linger=0)
        rep.close(linger=0)
        ctx.term()
    assert answers == [
        {"pid": 1}, {"error": "no such job"},
        {"error": "internal error: KeyError: 'x' (a bug; see the engine's log)"},
        {"error": "unknown command 'nope'; the commands: bug, refuse, status"},
        {"error": "unknown command None; the commands: bug, refuse, status"}]


def test_a_long_read_is_answered_off_the_loop_while_the_socket_waits(tmp_path: Path) -> None:
    go = threading.Event()
    readers: list[threading.Thread] = []

    def long(request: dict[str, Any]) -> control.OffLoop:
        def read() -> int:
            readers.append(threading.current_thread())
            assert go.wait(20)
            return int(request["n"]) * 2
        return control.OffLoop(read=read, answer=lambda doubled: {"doubled": doubled})

    def failing(_: dict[str, Any]) -> control.OffLoop:
        def read() -> None:
            raise SpoolError("spool read failed: disk I/O error")
        return control.OffLoop(read=read, answer=lambda _: {})

    ctx = zmq.Context()
    endpoint = f"ipc://{tmp_path}/control"
    rep = ctx.socket(zmq.REP)
    rep.bind(endpoint)
    first, second = ctx.socket(zmq.REQ), ctx.socket(zmq.REQ)
    first.connect(endpoint)
    second.connect(endpoint)
    answering = control.Control(rep, lambda: {"pid": 1}, {"long": long, "failing": failing})
    try:
        first.send_json({"command": "long", "n": 21})
        assert rep.poll(5000)
        answering.answer()  # returns with the read under way in its thread
        assert answering.busy
        second.send_json({"command": "status"})
        answering.answer()  # not read: the answer under way goes first
        answering.finish()  # not done: nothing sent
        assert answering.busy and first.poll(50) == 0
        go.set()
        answering.finish(wait=20)
        assert not answering.busy and first.recv_json() == {"doubled": 42}
        assert readers and readers[0] is not threading.current_thread()
        assert rep.poll(5000)
        answering.answer()  # then the request that waited
        assert second.recv_json() == {"pid": 1}
        first.send_json({"command": "failing"})
        assert rep.poll(5000)
        answering.answer()
        answering.finish(wait=20)
        assert first.recv_json() == {
            "error": "spool read failed: disk I/O error; nothing was changed, try again"}
    finally:
        for sock in (first, second, rep):
            sock.close(linger=0)
        ctx.term()
