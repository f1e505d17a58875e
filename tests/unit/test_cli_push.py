"""engine.push.Pusher streams its jobs: it reads one only when fewer than WINDOW are
unanswered, against a stand-in engine (real ZeroMQ sockets on loopback), and ends with one
summary (engine.pushreport.Tally) whatever the number of jobs."""
from __future__ import annotations

import io
import json
import re
import time
from collections.abc import Iterator

import pytest
import zmq

from engine import auth, cliargs, push, pushreport
from engine.pushjobs import Job
from tests.support.control import free_tcp_endpoint
from tests.support.standin_engine import StandinEngine


def tiny_jobs(n: int, engine: StandinEngine, ahead: list[int]) -> Iterator[Job]:
    """`n` small jobs; records, as each is read, how many the engine has not yet received."""
    for i in range(n):
        ahead.append(i - engine.received)
        envelope = {"id": f"j{i}", "from": "s@example.test", "to": ["r@example.test"]}
        yield f"j{i}", [json.dumps(envelope).encode(), b"Subject: hi\r\n\r\nhi\r\n"]


@pytest.mark.timeout(60)
def test_jobs_are_read_as_the_window_has_room_never_all_at_once() -> None:
    n = 3 * push.WINDOW + 17
    ahead: list[int] = []
    with StandinEngine() as engine:
        pusher = push.Pusher(engine.ingest, engine.events, resend=3.0, timeout=20)
        tally = pusher.push(tiny_jobs(n, engine, ahead), n)
    assert (tally.accepted, tally.total, tally.exit_status()) == (n, n, 0)
    assert pusher.most_outstanding == push.WINDOW  # the window was used, and never exceeded
    # A job is read only once fewer than WINDOW are unanswered, and an answered job was
    # received: the reader is never more than WINDOW ahead of the engine. (Reading the
    # whole list first would put the last job n - 1 ahead.)
    assert len(ahead) == n and max(ahead) <= push.WINDOW


@pytest.mark.timeout(30)
def test_rejections_are_counted_by_reason_with_the_first_ids() -> None:
    def reject(envelope: dict[str, object]) -> str | None:
        number = int(str(envelope["id"])[1:])
        return None if number % 3 else f"reason {number % 2}"

    with StandinEngine(reject) as engine:
        pusher = push.Pusher(engine.ingest, engine.events, resend=3.0, timeout=20)
        tally = pusher.push(tiny_jobs(30, engine, []), 30)
    assert tally.exit_status() == 1
    assert tally.lines("tcp://x:1") == [
        "20 of 30 accepted, 10 rejected, 0 not acknowledged",
        "  rejected 5: reason 0 (j0, j6, j12, j18, j24)",
        "  rejected 5: reason 1 (j3, j9, j15, j21, j27)"]


def test_the_summary_stays_short_whatever_the_number_of_jobs_and_reasons() -> None:
    tally = pushreport.Tally(100_000, accepted=10)
    for i in range(pushreport.MAX_REASONS + 5):
        tally.reject(f"reason {i}", f"r{i}")
    tally.unanswered((f"u{i}" for i in range(10**9)), 100_000 - tally.answered)
    lines = tally.lines("tcp://127.0.0.1:5570")
    assert lines[0] == "10 of 100000 accepted, 25 rejected, 99965 not acknowledged"
    assert lines[1] == "  rejected 5: other reasons (r20, r21, r22, r23, r24)"  # the most first
    assert lines[2] == "  rejected 1: reason 0 (r0)"
    assert lines[-1] == ("  not acknowledged 99965: is the engine running, at"
                         " tcp://127.0.0.1:5570? (u0, u1, u2, u3, u4 and 99960 more)")
    assert len(lines) == 1 + (pushreport.MAX_REASONS + 1) + 1


class _Pipe(io.StringIO):
    def isatty(self) -> bool:
        return False


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def shown(stream: io.StringIO) -> str:
    """What `Progress` writes to `stream` for a push of 10 jobs: nothing answered, then 4."""
    tally = pushreport.Tally(10)
    progress = pushreport.Progress(stream, True, "tcp://127.0.0.1:5570")
    progress.show(tally)
    tally.accepted, tally.rejected = 3, {"bad address": pushreport.Reason(1, ["x"])}
    progress.show(tally)
    progress.end(tally)
    return stream.getvalue()


def test_progress_is_plain_lines_when_not_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pushreport, "PLAIN_EVERY", 0.0)
    assert shown(_Pipe()).splitlines() == [
        "mailengine push: 0 of 10 answered so far; waiting for the engine at"
        " tcp://127.0.0.1:5570",
        "mailengine push: 4 of 10 answered (3 accepted, 1 rejected)"]


def test_progress_on_a_terminal_is_a_bar_with_the_rate_and_the_time_left(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pushreport, "BAR_EVERY", 0.0)
    drawn = [line.strip() for line in shown(_Terminal()).split("\r") if line.strip()]
    assert drawn[0].startswith("mailengine push:   0%")
    assert drawn[0].endswith("0/10 [00:00<?, ?job/s, waiting for the engine at"
                             " tcp://127.0.0.1:5570]")
    assert re.fullmatch(r"mailengine push:  40%.*\| 4/10 \[00:00<00:00, *[\d.]+job/s,"
                        r" accepted=3, rejected=1\]", drawn[-1]), drawn[-1]
    assert shown(_Terminal()).endswith("\n")  # the bar stays, the summary goes below it


@pytest.mark.timeout(30)
def test_a_source_that_fails_while_sending_stops_reading_and_says_why() -> None:
    """The file changed between the count and the send: what was read is finished, the
    rest is counted not acknowledged, and the exit status is 2."""
    def jobs(engine: StandinEngine) -> Iterator[Job]:
        yield from tiny_jobs(5, engine, [])
        raise ValueError("jobs.jsonl:6: not a job (Expecting value)")

    with StandinEngine() as engine:
        pusher = push.Pusher(engine.ingest, engine.events, resend=3.0, timeout=20)
        tally = pusher.push(jobs(engine), 8)
    assert (tally.accepted, tally.unacknowledged.count, tally.exit_status()) == (5, 3, 2)
    assert tally.lines("tcp://x:1")[-1] == (
        "  stopped reading: jobs.jsonl:6: not a job (Expecting value)")


# -- several hosts (docs/SCALING.md) ----------------------------------------------


@pytest.mark.timeout(30)
def test_one_push_to_two_hosts_spreads_the_jobs_and_counts_each_host() -> None:
    with StandinEngine() as a, StandinEngine() as b:
        pusher = push.Pusher([a.ingest, b.ingest], [a.events, b.events], resend=3.0,
                             timeout=20)
        tally = pusher.push(tiny_jobs(200, a, []), 200)
        copies = a.copies + b.copies
    assert (tally.accepted, tally.exit_status()) == (200, 0)
    # Every job went once (none needed a re-send), and each host took some of them.
    assert set(copies.values()) == {1} and len(copies) == 200
    assert a.received > 0 and b.received > 0
    # Each host's count is what it answered (a stand-in answers every job it takes).
    assert tally.by_host == {a.ingest: a.received, b.ingest: b.received}
    assert tally.lines(f"{a.ingest}, {b.ingest}") == [
        "200 of 200 accepted, 0 rejected, 0 not acknowledged",
        f"  accepted by {a.ingest}: {a.received}",
        f"  accepted by {b.ingest}: {b.received}"]


@pytest.mark.timeout(30)
def test_a_job_one_host_took_and_never_answered_is_sent_again_and_answered_once() -> None:
    """Host a takes every first copy it gets and answers none (it died before its commit):
    each such job is sent again, same id, until a host answers; counted once."""
    with StandinEngine(answer_from=2) as a, StandinEngine() as b:
        pusher = push.Pusher([a.ingest, b.ingest], [a.events, b.events], resend=0.5,
                             timeout=20)
        tally = pusher.push(tiny_jobs(60, a, []), 60)
        first_to_a = {job_id for job_id, n in a.copies.items() if n}
        copies = a.copies + b.copies
    assert (tally.accepted, tally.exit_status()) == (60, 0)
    assert first_to_a and len(copies) == 60
    assert all(copies[job_id] >= 2 for job_id in first_to_a)  # re-sent, same id
    assert sum(tally.by_host.values()) == 60


@pytest.mark.timeout(30)
def test_a_host_down_gets_nothing_and_the_other_takes_every_job() -> None:
    down_ingest, down_events = free_tcp_endpoint(), free_tcp_endpoint()
    with StandinEngine() as up:
        started = time.monotonic()
        pusher = push.Pusher([down_ingest, up.ingest], [down_events, up.events],
                             resend=1.0, timeout=20)
        tally = pusher.push(tiny_jobs(50, up, []), 50)
        took = time.monotonic() - started
        received = up.received
    assert (tally.accepted, tally.exit_status()) == (50, 0)
    assert received == 50  # none was queued for the host that is down, none re-sent
    assert tally.by_host == {up.ingest: 50}
    assert tally.lines("")[-2:] == [f"  accepted by {down_ingest}: 0",
                                    f"  accepted by {up.ingest}: 50"]
    assert took < push.CONNECT_WAIT + 5  # waited for it at most CONNECT_WAIT


def test_several_hosts_need_one_events_endpoint_per_ingest() -> None:
    with pytest.raises(cliargs.UsageError, match="one events endpoint per ingest"):
        push.Pusher(["tcp://127.0.0.1:1", "tcp://127.0.0.1:2"], ["tcp://127.0.0.1:3"],
                    resend=1.0, timeout=1.0)


@pytest.mark.timeout(30)
def test_with_curve_each_host_is_reached_with_its_own_server_key() -> None:
    """Two hosts with key pairs of their own: each connection takes its host's key (a key
    set for the whole socket would fail one host's handshake, and it would get nothing)."""
    if not auth.available():
        pytest.skip("this libzmq has no CURVE")
    servers = [auth.KeyPair(*zmq.curve_keypair()) for _ in range(2)]
    client = auth.KeyPair(*zmq.curve_keypair())
    with StandinEngine(curve_secret=servers[0].secret) as a, \
            StandinEngine(curve_secret=servers[1].secret) as b:
        curves = [auth.CurveClient(key.public, client) for key in servers]
        pusher = push.Pusher([a.ingest, b.ingest], [a.events, b.events], resend=3.0,
                             timeout=10, curve=curves)
        tally = pusher.push(tiny_jobs(100, a, []), 100)
    assert (tally.accepted, tally.exit_status()) == (100, 0)
    assert tally.by_host[a.ingest] > 0 and tally.by_host[b.ingest] > 0, tally.by_host
