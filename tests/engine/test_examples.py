"""The producer and subscriber examples of conf/examples/ (docs/EXAMPLES.md), run as a user
runs them: as commands, against the real engine and a real SMTP sink, or against a
stand-in engine that answers only a job's later copies.

The Node.js producer needs node and its `zeromq` package (`make node-example`: npm ci in
conf/examples/node). Without them its tests skip, saying what is missing; with
MAILENGINE_NODE_EXAMPLE=required in the environment (.ci/run sets it) they fail instead, so
CI cannot pass without running them.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import zmq

from engine.testing.harness import LocalEngine
from engine.testing.sink import SinkServer
from tests.support import ROOT
from tests.support.standin_engine import StandinEngine
from tests.support.wait import until

EXAMPLES = ROOT / "conf" / "examples"
NODE_EXAMPLE = EXAMPLES / "node"
REQUIRE_NODE = "MAILENGINE_NODE_EXAMPLE"
PRODUCERS = ["python", "node"]


def producer(language: str) -> list[str]:
    """The command that runs the producer example in `language`."""
    if language == "python":
        return [sys.executable, str(EXAMPLES / "producer.py")]
    return [node(), str(NODE_EXAMPLE / "producer.js")]


def node() -> str:
    """The node command, when it and the example's packages are installed: else the test
    skips (fails, when REQUIRE_NODE is set) saying what is missing."""
    found = shutil.which("node")
    if found is None or shutil.which("npm") is None:
        missing = "node and npm are not installed (Debian: apt-get install nodejs npm)"
    elif not (NODE_EXAMPLE / "node_modules" / "zeromq").is_dir():
        missing = ("the Node example's zeromq package is not installed: `make node-example`"
                   " (npm ci in conf/examples/node)")
    else:
        return found
    if os.environ.get(REQUIRE_NODE) == "required":
        pytest.fail(f"{missing}; {REQUIRE_NODE}=required")
    pytest.skip(missing)


def run(command: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def messages(folder: Path, count: int, name: str) -> list[Path]:
    """`count` .eml files, each with a Message-ID of its own (`<name>-N@example.test>`)."""
    folder.mkdir()
    files = []
    for i in range(count):
        path = folder / f"{name}-{i}.eml"
        path.write_bytes(f"From: <news@example.test>\r\nTo: <ann@example.test>\r\n"
                         f"Subject: {name} {i}\r\nMessage-ID: <{name}-{i}@example.test>\r\n"
                         f"\r\nHello, this is {name} {i}.\r\n".encode())
        files.append(path)
    return files


def endpoints(ingest: str, events: str) -> list[str]:
    return ["--ingest", ingest, "--events", events]


def answers(stdout: str) -> dict[str, tuple[str, str]]:
    """The producer's lines: file name -> (its answer, the job id)."""
    out = {}
    for line in stdout.splitlines():
        answer, job_id, path = line.split(" ", 2)
        out[Path(path.split(":")[0]).name] = (answer, job_id)
    return out


@contextmanager
def subscriber(events: str, out: Path, *topics: str) -> Iterator[Callable[[], list[Any]]]:
    """Run the subscriber example (--json) into `out`; yields a function that reads the
    events it printed so far. Stopped with SIGTERM at the end: it must exit 0."""
    with open(out, "wb") as sink_file:
        proc = subprocess.Popen([sys.executable, str(EXAMPLES / "subscriber.py"), "--json",
                                 "--events", events, *topics], stdout=sink_file,
                                stderr=subprocess.PIPE)
    try:
        yield lambda: [json.loads(line) for line in out.read_text().splitlines()]
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=10)
    assert proc.returncode == 0, stderr.decode()


def wait_subscribed(ingest: str, seen: Callable[[], list[Any]]) -> None:
    """Until the subscriber receives events: a job the engine refuses (no recipients) is
    sent every 0.2 s until the subscriber has printed its `rejected`. A SUB socket gets only
    what is published once its subscription has reached the engine."""
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.connect(ingest)
    probe = [json.dumps({"id": "probe", "from": "", "to": []}).encode(), b"\r\n"]

    def arrived() -> bool:
        push.send_multipart(probe)
        return any(e["id"] == "probe" for e in seen())

    try:
        until(arrived, 20, "the subscriber's first event", interval=0.2)
    finally:
        ctx.destroy(linger=0)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("language", PRODUCERS)
def test_the_producer_hands_mail_to_the_engine_and_the_subscriber_sees_its_events(
        language: str, sink: SinkServer, local_engine: Callable[..., LocalEngine],
        tmp_path: Path) -> None:
    command = producer(language)
    engine = local_engine(sink.port)
    ingest, events = str(engine.config["ingest"]), str(engine.config["events"])
    files = messages(tmp_path / "outbox", 3, f"{language}-news")
    with subscriber(events, tmp_path / "seen.jsonl") as seen:
        wait_subscribed(ingest, seen)
        done = run([*command, *endpoints(ingest, events), "--from", "news@example.test",
                    "--to", "ann@example.test", "--meta", '{"campaign": "spring"}',
                    *map(str, files)])
        assert done.returncode == 0, done.stdout + done.stderr
        got = answers(done.stdout)
        assert {name: answer for name, (answer, _) in got.items()} == {
            f.name: "queued" for f in files}
        ids = {job_id for _, job_id in got.values()}
        assert len(ids) == 3

        sink.wait_for(3, timeout=30)
        assert sorted(m.content.split(b"Message-ID: ")[1].split(b"\r\n")[0]
                      for m in sink.messages) == [
            f"<{language}-news-{i}@example.test>".encode() for i in range(3)]
        assert {m.rcpt_tos for m in sink.messages} == {("ann@example.test",)}

        def delivered() -> list[Any]:
            return [e for e in seen() if e["event"] == "delivered" and e["id"] in ids]
        until(lambda: len(delivered()) == 3, 30, "3 delivered events at the subscriber")
    events_seen = [e for e in seen() if e["id"] in ids]
    assert {e["id"] for e in events_seen if e["event"] == "delivered"} == ids
    assert all(e["meta"] == {"campaign": "spring"} for e in events_seen)
    assert all(e["rcpt"] == "ann@example.test" for e in events_seen
               if e["event"] == "delivered")
    # Each `queued` reached the producer; the subscriber, started first, saw them too.
    assert {e["id"] for e in events_seen if e["event"] == "queued"} == ids


@pytest.mark.timeout(60)
@pytest.mark.parametrize("language", PRODUCERS)
def test_the_producer_sends_a_job_again_until_it_is_queued(language: str,
                                                           tmp_path: Path) -> None:
    """A stand-in engine takes the first two copies of each job and says nothing (as an
    engine that died before its commit): the producer sends each again, with the same id,
    until the third copy is answered `queued`."""
    command = producer(language)
    files = messages(tmp_path / "outbox", 2, "again")
    with StandinEngine(answer_from=3) as standin:
        done = run([*command, *endpoints(standin.ingest, standin.events), "--resend", "0.3",
                    "--timeout", "10", "--from", "news@example.test",
                    "--to", "ann@example.test", *map(str, files)])
    assert done.returncode == 0, done.stdout + done.stderr
    got = answers(done.stdout)
    assert {answer for answer, _ in got.values()} == {"queued"}
    assert {job_id for _, job_id in got.values()} == set(standin.copies)
    assert all(copies >= 3 for copies in standin.copies.values()), standin.copies


@pytest.mark.timeout(60)
@pytest.mark.parametrize("language", PRODUCERS)
def test_the_producer_spreads_over_several_hosts_until_one_answers_each_job(
        language: str, tmp_path: Path) -> None:
    """Two stand-in hosts, given as --ingest/--events pairs (docs/SCALING.md): one takes
    jobs and never answers (as a host that died before its commit), the other answers
    every job. Every job is queued in the end: those the first took were sent again, with
    the same id, until the other had them."""
    command = producer(language)
    files = messages(tmp_path / "outbox", 8, "spread")
    with StandinEngine(answer_from=10**6) as mute, StandinEngine() as answering:
        done = run([*command, *endpoints(mute.ingest, mute.events),
                    *endpoints(answering.ingest, answering.events), "--resend", "0.3",
                    "--timeout", "10", "--from", "news@example.test",
                    "--to", "ann@example.test", *map(str, files)])
        mute_ids, answered_ids = set(mute.copies), set(answering.copies)
    assert done.returncode == 0, done.stdout + done.stderr
    got = answers(done.stdout)
    assert {answer for answer, _ in got.values()} == {"queued"} and len(got) == 8
    ids = {job_id for _, job_id in got.values()}
    assert answered_ids == ids  # each job reached the host that answers
    assert mute_ids <= ids  # what the mute one took was sent again: nothing lost


@pytest.mark.timeout(60)
@pytest.mark.parametrize("language", PRODUCERS)
def test_a_rejected_job_is_named_with_its_error_and_the_producer_exits_1(
        language: str, tmp_path: Path) -> None:
    command = producer(language)
    files = messages(tmp_path / "outbox", 2, "mixed")

    def reject(envelope: dict[str, Any]) -> str | None:
        return "recipient 1 'ann@' has an empty domain" if envelope["to"] == ["ann@"] else None

    with StandinEngine(reject) as standin:
        done = run([*command, *endpoints(standin.ingest, standin.events),
                    "--from", "news@example.test", "--to", "ann@", *map(str, files)])
        unanswered = run([*command, *endpoints(standin.ingest, "ipc:///nonexistent/events"),
                          "--timeout", "1", "--from", "news@example.test",
                          "--to", "ann@example.test", str(files[0])])
    assert done.returncode == 1
    lines = done.stdout.splitlines()
    assert len(lines) == 2
    for line, path in zip(lines, files, strict=True):
        assert line.startswith("rejected ")
        assert line.endswith(f" {path}: recipient 1 'ann@' has an empty domain")
    assert unanswered.returncode == 1  # taken, and no answer ever came
    assert [(name, answer) for name, (answer, _) in answers(unanswered.stdout).items()] == [
        (files[0].name, "unanswered")]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("language", PRODUCERS)
def test_a_producer_started_before_the_engine_exits_0_once_the_engine_is_up(
        language: str, sink: SinkServer, local_engine: Callable[..., LocalEngine],
        tmp_path: Path) -> None:
    command = producer(language)
    engine = local_engine(sink.port, start=False)
    files = messages(tmp_path / "outbox", 2, f"{language}-early")
    early = subprocess.Popen([*command, *endpoints(str(engine.config["ingest"]),
                                                   str(engine.config["events"])),
                              "--resend", "0.5", "--from", "news@example.test",
                              "--to", "ann@example.test", *map(str, files)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        engine.start()
        stdout, stderr = early.communicate(timeout=60)
    finally:
        if early.poll() is None:
            early.kill()
            early.communicate()
    assert early.returncode == 0, stdout + stderr
    assert {answer for answer, _ in answers(stdout).values()} == {"queued"}
    sink.wait_for(2, timeout=30)
    assert len(sink.messages) == 2  # sent several times, queued and delivered once
