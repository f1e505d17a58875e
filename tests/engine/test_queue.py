"""`mailengine queue`, run as the operator types it (subprocesses), against a real engine and a
real sink: what waits, one job, retry, bounce, delete, suspend and resume, each seen in the
events the engine publishes and in what the sink received."""
from __future__ import annotations

import argparse
import json
import os
import pty
import re
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from engine.queue_cli import ask
from engine.testing.harness import LocalEngine, final_outcomes, make_message
from engine.testing.sink import SinkServer
from tests.support.cli import cli_env, mailengine

IP = "127.0.0.2"
PROVIDER = "127.0.0.1"  # the sink's host: the MX of every domain here (routes "*")


def job(job_id: str, *rcpts: str) -> tuple[dict[str, Any], bytes]:
    return ({"id": job_id, "from": "sender@example.test", "to": list(rcpts),
             "meta": {"campaign": "q"}}, make_message(hash(job_id) % 1000, 2000))


def queue(engine: LocalEngine, *args: str) -> Any:
    done = mailengine("queue", "-c", engine.config_path, *args)
    return done


def summary(engine: LocalEngine) -> dict[str, Any]:
    done = queue(engine, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def settled(engine: LocalEngine, rcpts: int) -> dict[str, Any]:
    """The summary once `rcpts` recipients wait for their next try (deferred by the sink,
    every result recorded, nothing in flight)."""
    control = argparse.Namespace(control=str(engine.config["control"]))
    deadline = time.monotonic() + 30
    while True:
        found = ask(control, {"command": "queue"})
        if (found["in_flight"] == 0 and sum(row["rcpts"] for row in found["rows"]) == rcpts
                and all(row["next_in"] > 60 for row in found["rows"])):
            return found
        assert time.monotonic() < deadline, found
        time.sleep(0.1)


def final_of(engine: LocalEngine, job_id: str, rcpt: str) -> dict[str, Any]:
    events = engine.wait_for(lambda evs: (job_id, rcpt) in final_outcomes(evs), 30,
                             f"the final event of {job_id} {rcpt}")
    return final_outcomes(events)[(job_id, rcpt)]


@pytest.fixture
def sink() -> Iterator[SinkServer]:
    """A sink that defers `defer...` recipients as a full mailbox (a 4.2.x reply is about the
    recipient, never push-back on our pace: no throttling muddles what waits)."""
    with SinkServer(rcpt_rules={"defer": "452 4.2.2 mailbox full"}) as server:
        yield server


@pytest.fixture
def engine(sink: SinkServer, local_engine: Callable[..., LocalEngine]) -> LocalEngine:
    """An engine whose first retry is 10 minutes away: what the sink defers stays queued
    until the operator acts."""
    return local_engine(sink.port, extra={"retry": {"schedule": [600]}})


@pytest.mark.timeout(90)
def test_summary_and_show_list_what_waits_per_ip_provider_and_domain(engine: LocalEngine) -> None:
    engine.push([job("a", "defer1@one.test", "ok@one.test"), job("b", "defer2@one.test"),
                 job("c", "defer3@two.test")])
    found = settled(engine, 3)
    rows = {row["domain"]: row for row in found["rows"]}
    assert set(rows) == {"one.test", "two.test"}
    assert (rows["one.test"]["ip"], rows["one.test"]["provider"]) == (IP, PROVIDER)
    assert (rows["one.test"]["rcpts"], rows["one.test"]["jobs"]) == (2, 2)
    assert rows["two.test"]["rcpts"] == 1
    assert rows["one.test"]["last_reply"] == {"code": 452, "enhanced": "4.2.2",
                                              "text": "mailbox full"}
    assert 500 < rows["one.test"]["next_in"] <= 600 * 1.1  # retry.jitter: +-10%
    assert found["complete"] and found["suspended"] == []

    text = queue(engine)
    assert text.returncode == 0
    assert "3 recipients waiting for 2 domains" in text.stdout
    assert any(line.split()[:5] == [IP, PROVIDER, "one.test", "2", "2"]
               for line in text.stdout.splitlines())

    shown = queue(engine, "show", "a")
    assert shown.returncode == 0, shown.stderr
    assert "defer1@one.test: pending, 1 attempt, next in" in shown.stdout
    assert "ok@one.test: delivered" in shown.stdout
    missing = queue(engine, "show", "nope")
    assert missing.returncode == 1
    assert missing.stderr.strip() == ("mailengine queue: no job 'nope' in the queue (ended, or"
                                      " never accepted)")


@pytest.mark.timeout(90)
def test_retry_by_id_domain_and_provider_tries_again_now(engine: LocalEngine,
                                                         sink: SinkServer) -> None:
    engine.push([job("r1", "defer@one.test"), job("r2", "defer@two.test"),
                 job("r3", "defer@three.test")])
    settled(engine, 3)
    sink.rcpt_rules.clear()  # the receiver takes them now; the next try is 10 minutes away

    done = queue(engine, "retry", "r1")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "job r1: 1 recipient of 1 job due now"
    assert final_of(engine, "r1", "defer@one.test")["event"] == "delivered"
    assert not {("r2", "defer@two.test"), ("r3", "defer@three.test")} & set(
        final_outcomes(engine.events()))

    done = queue(engine, "retry", "--domain", "TWO.test")
    assert done.returncode == 0, done.stderr
    assert final_of(engine, "r2", "defer@two.test")["event"] == "delivered"
    assert ("r3", "defer@three.test") not in final_outcomes(engine.events())

    done = queue(engine, "retry", "--provider", PROVIDER, "--ip", IP)
    assert done.returncode == 0, done.stderr
    delivered = final_of(engine, "r3", "defer@three.test")
    assert (delivered["event"], delivered["attempt"]) == ("delivered", 2)
    assert summary(engine)["rows"] == []

    nothing = queue(engine, "retry", "--domain", "one.test")
    assert nothing.returncode == 1
    assert nothing.stderr == ("mailengine queue: domain one.test: nothing waits there for a"
                              " later try\n")


@pytest.mark.timeout(90)
def test_bounce_ends_a_job_and_a_domain_each_with_its_bounced_event(
        engine: LocalEngine, sink: SinkServer) -> None:
    engine.push([job("b1", "defer@one.test", "ok@one.test"), job("b2", "defer1@two.test"),
                 job("b3", "defer2@two.test", "defer3@three.test")])
    settled(engine, 4)

    done = queue(engine, "bounce", "b1")  # one job: no question asked
    assert done.returncode == 0, done.stderr
    bounced = final_of(engine, "b1", "defer@one.test")
    assert (bounced["event"], bounced["code"], bounced["enhanced"], bounced["reply"]) == (
        "bounced", 550, "5.0.0", "bounced by the operator: not delivered")
    assert bounced["meta"] == {"campaign": "q"} and bounced["attempt"] == 1

    asked = queue(engine, "bounce", "--domain", "two.test")  # two jobs, no terminal: refused
    assert asked.returncode == 2
    assert asked.stderr.strip() == ("mailengine queue: 2 jobs (2 recipients) at domain"
                                    " two.test match; add --yes to bounce them all")
    assert summary(engine)["rows"][0]["domain"] == "two.test"

    done = queue(engine, "bounce", "--domain", "two.test", "--yes")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("domain two.test: 2 recipients of 2 jobs bounced")
    finals = final_outcomes(engine.wait_final(4, timeout=30))
    assert finals[("b2", "defer1@two.test")]["event"] == "bounced"
    assert finals[("b3", "defer2@two.test")]["reply"] == "bounced by the operator: not delivered"
    assert ("b3", "defer3@three.test") not in finals  # another domain of the same job waits
    assert [row["domain"] for row in summary(engine)["rows"]] == ["three.test"]
    assert len(sink.messages) == 1  # ok@one.test only


@pytest.mark.timeout(90)
def test_delete_ends_a_job_with_its_expired_event_and_empties_the_spool(
        engine: LocalEngine) -> None:
    engine.push([job("d1", "defer1@one.test", "defer2@one.test")])
    settled(engine, 2)

    done = queue(engine, "delete", "d1")
    assert done.returncode == 0, done.stderr
    finals = final_outcomes(engine.wait_final(2, timeout=30))
    for rcpt in ("defer1@one.test", "defer2@one.test"):
        event = finals[("d1", rcpt)]
        assert (event["event"], event["code"], event["enhanced"]) == ("expired", 451, "4.0.0")
        assert event["reply"] == "deleted from the queue by the operator: not delivered"
    assert engine.status()["spool"]["jobs"] == 0
    again = queue(engine, "delete", "d1")
    assert again.returncode == 1
    assert again.stderr.strip() == "mailengine queue: job d1: nothing waits there"


@pytest.mark.timeout(90)
def test_suspend_holds_a_provider_until_resume_which_sends_at_once(
        engine: LocalEngine, sink: SinkServer) -> None:
    done = queue(engine, "suspend", IP, PROVIDER, "--for", "30m")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (f"{IP} x {PROVIDER} suspended for 30m (`mailengine queue"
                                   " resume` lifts it)")

    def held() -> dict[str, Any]:
        return engine.status()["workers"][IP]["shaping"].get(PROVIDER) or {}
    engine.wait_for(lambda _: held().get("held") is True, 10, "the worker's hold")
    assert 1700 < held()["suspended_for"] <= 1800 and held()["phase"] == "suspended"

    engine.push([job("s1", "someone@one.test")])
    # Not tried (no event): back in the spool until the suspension ends, as the summary says.
    engine.wait_for(lambda _: any(row["domain"] == "one.test" for row in summary(engine)["rows"]),
                    20, "one.test waiting")
    found = summary(engine)
    assert found["suspended"] == [{"ip": IP, "provider": PROVIDER,
                                   "for": found["suspended"][0]["for"], "by": "operator"}]
    row = found["rows"][0]
    assert (row["ip"], row["provider"], row["last_reply"]["enhanced"]) == (IP, PROVIDER, "4.4.5")
    assert row["next_in"] > 1500
    assert sink.messages == []
    # 30m within the first 50 ms (the worker's figures are rounded to 0.1 s), then 29m.
    assert re.search(rf"^SUSPENDED {IP} x {PROVIDER} for (29|30)m \(by operator\)$",
                     queue(engine).stdout, re.MULTILINE)

    done = queue(engine, "resume", IP, PROVIDER)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{IP} x {PROVIDER} resumed; 1 recipient of 1 job due now"
    assert final_of(engine, "s1", "someone@one.test")["event"] == "delivered"
    # Listed again once the worker reports its delivery (released and idle, it is not).
    engine.wait_for(lambda _: "held" in held(), 10, "the worker's report of the delivery")
    assert held().get("held") is False and held()["suspended_for"] == 0
    with open(engine.log_path, encoding="utf-8") as f:
        log = f.read()
    assert f"event=provider_held ip={IP} provider={PROVIDER} seconds=1800.0" in log
    assert f"event=provider_released ip={IP} provider={PROVIDER}" in log


@pytest.mark.timeout(60)
def test_the_control_socket_is_0660_and_bad_requests_are_one_line(engine: LocalEngine) -> None:
    path = str(engine.config["control"]).removeprefix("ipc://")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o660

    usage = queue(engine, "retry")
    assert (usage.returncode, usage.stderr) == (
        2, "mailengine queue: give one of ID, --domain or --provider\n")
    stray = queue(engine, "suspend", "127.0.0.9", "google")
    assert (stray.returncode, stray.stderr) == (
        1, f"mailengine queue: ip '127.0.0.9' is not one of this engine's sending IPs ({IP})\n")
    bad = queue(engine, "suspend", IP, "google", "--for", "soon")
    assert bad.returncode == 2 and len(bad.stderr.splitlines()) == 1


@pytest.mark.timeout(90)
def test_a_restarted_worker_is_told_the_suspension_again(engine: LocalEngine) -> None:
    done = queue(engine, "suspend", IP, PROVIDER, "--for", "20m")
    assert done.returncode == 0, done.stderr

    def worker() -> dict[str, Any]:
        return engine.status()["workers"][IP]  # type: ignore[no-any-return]

    def held() -> bool:
        return (worker()["shaping"].get(PROVIDER) or {}).get("held") is True
    engine.wait_for(lambda _: held(), 10, "the worker's hold")
    first = worker()["pid"]
    os.kill(first, signal.SIGKILL)
    engine.wait_for(lambda _: worker()["pid"] not in (first, None) and worker()["ready"], 30,
                    "the worker restarted and said hello")
    engine.wait_for(lambda _: held(), 10, "the hold told to the new worker")
    assert 1100 < worker()["shaping"][PROVIDER]["suspended_for"] <= 1200


def answered(engine: LocalEngine, answer: bytes, *args: str) -> tuple[int, str]:
    """`mailengine queue ARGS` on a terminal (a pty) that answers its question with `answer`:
    (exit status, what it said on standard error)."""
    main, terminal = pty.openpty()
    try:
        done = subprocess.Popen([sys.executable, "-m", "engine.cli", "queue", "-c",
                                 engine.config_path, *args], stdin=terminal,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env())
        os.write(main, answer)
        _, stderr = done.communicate(timeout=30)
    finally:
        os.close(main)
        os.close(terminal)
    return done.returncode, stderr.decode()


@pytest.mark.timeout(90)
def test_a_delete_of_several_jobs_asks_on_a_terminal_and_does_only_what_is_confirmed(
        engine: LocalEngine) -> None:
    engine.push([job("t1", "defer1@one.test"), job("t2", "defer2@one.test")])
    settled(engine, 2)

    status, said = answered(engine, b"n\n", "delete", "--domain", "one.test")
    assert status == 1
    assert said == ("delete 2 jobs (2 recipients) at domain one.test? [y/N] "
                    "mailengine queue: nothing done\n")
    assert not final_outcomes(engine.events())
    assert settled(engine, 2)["rows"][0]["rcpts"] == 2

    status, said = answered(engine, b"y\n", "delete", "--domain", "one.test")
    assert status == 0, said
    finals = final_outcomes(engine.wait_final(2, timeout=30))
    assert {key: e["event"] for key, e in finals.items()} == {
        ("t1", "defer1@one.test"): "expired", ("t2", "defer2@one.test"): "expired"}
