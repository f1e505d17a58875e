"""`mailengine push` to several hosts (issue #18, docs/SCALING.md): two real engines on
loopback, sending from 127.0.0.2 and 127.0.0.3 to one real SMTP sink, one reached over tcp
and one over ipc; one `mailengine push` run (a subprocess, as a person types it) given both
hosts' ingest and events endpoints.

- both up: every job acknowledged once, each host took some, the summary counts each
  host's, and each job is delivered once, by the host that took it;
- one host stopped before the push: its share goes to the other, which delivers it all;
  nothing is lost, and the summary says the stopped host accepted none.
"""
from __future__ import annotations

import collections
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from engine.testing.harness import LocalEngine, final_outcomes
from engine.testing.sink import SinkServer
from tests.support.cli import mailengine
from tests.support.control import free_tcp_endpoint

IPS = ("127.0.0.2", "127.0.0.3")


def outbox(path: Path, n: int) -> Path:
    path.mkdir()
    for i in range(n):
        (path / f"{i:03}.eml").write_text(
            f"From: <sender@example.test>\r\nTo: <r{i}@example.test>\r\nSubject: m{i}\r\n"
            f"Message-ID: <m{i}@example.test>\r\n\r\nHello r{i}.\r\n")
    return path


def two_hosts(local_engine: Callable[..., LocalEngine], port: int) -> list[LocalEngine]:
    """Host 0 on tcp (as across a network), host 1 on ipc (the harness's default)."""
    tcp = {"ingest": free_tcp_endpoint(), "events": free_tcp_endpoint()}
    return [local_engine(port, ips=(IPS[0],), extra=tcp), local_engine(port, ips=(IPS[1],))]


def push_to(engines: list[LocalEngine], *args: str) -> tuple[int, list[str]]:
    hosts = [opt for e in engines
             for opt in ("--ingest", str(e.config["ingest"]), "--events", str(e.config["events"]))]
    done = mailengine("push", *hosts, *args, timeout=60)
    return done.returncode, done.stderr.splitlines()


def accepted_by(lines: list[str]) -> dict[str, int]:
    """The summary's count per host, by its ingest endpoint."""
    found = (re.fullmatch(r"  accepted by (\S+): (\d+)", line) for line in lines)
    return {m[1]: int(m[2]) for m in found if m}


def queued_ids(engine: LocalEngine) -> list[str]:
    """The ids this engine spooled (a duplicate's `queued` is not a spooling)."""
    return [e["id"] for e in engine.events()
            if e["event"] == "queued" and not e.get("duplicate")]


@pytest.mark.timeout(120)
def test_one_push_spreads_the_jobs_over_two_hosts_each_acknowledged_once_and_delivered_once(
        sink: SinkServer, local_engine: Callable[..., LocalEngine], tmp_path: Path) -> None:
    engines = two_hosts(local_engine, sink.port)
    n = 60
    # --resend long: every job's first copy is answered well before it, so a job
    # acknowledged twice here would be push's fault, not a re-send's.
    status, lines = push_to(engines, "--resend", "20s", str(outbox(tmp_path / "out", n)))
    assert status == 0, lines
    assert lines[0] == f"mailengine push: {n} of {n} accepted, 0 rejected, 0 not acknowledged"
    counts = accepted_by(lines)
    ingest = [str(e.config["ingest"]) for e in engines]
    assert list(counts) == ingest and sum(counts.values()) == n
    assert min(counts.values()) > 0, counts  # ZeroMQ dealt to both

    # Each host spooled what the summary says it accepted, and no job was taken twice.
    spooled = [queued_ids(e) for e in engines]
    assert [len(ids) for ids in spooled] == [counts[i] for i in ingest]
    assert not set(spooled[0]) & set(spooled[1])
    # Delivered once each, every job by the host that took it (its own sending IP).
    for engine in engines:
        engine.wait_final(len(queued_ids(engine)), timeout=30)
    sink.wait_for(n)
    received = collections.Counter(r for m in sink.messages for r in m.rcpt_tos)
    assert received == {f"r{i}@example.test": 1 for i in range(n)}
    for engine, ip, ids in zip(engines, IPS, spooled, strict=True):
        finals = final_outcomes(engine.events())
        assert {e["id"] for e in finals.values()} == set(ids)
        assert {(e["event"], e["ip"]) for e in finals.values()} == {("delivered", ip)}


@pytest.mark.timeout(120)
def test_a_host_stopped_before_the_push_its_share_goes_to_the_other_and_nothing_is_lost(
        sink: SinkServer, local_engine: Callable[..., LocalEngine], tmp_path: Path) -> None:
    engines = two_hosts(local_engine, sink.port)
    engines[0].stop()  # the tcp one: a host that is down
    n = 40
    status, lines = push_to(engines, "--resend", "2s", str(outbox(tmp_path / "out", n)))
    assert status == 0, lines
    assert lines[0] == f"mailengine push: {n} of {n} accepted, 0 rejected, 0 not acknowledged"
    assert accepted_by(lines) == {str(engines[0].config["ingest"]): 0,
                                  str(engines[1].config["ingest"]): n}
    finals = final_outcomes(engines[1].wait_final(n, timeout=30))
    assert {(e["event"], e["ip"]) for e in finals.values()} == {("delivered", IPS[1])}
    sink.wait_for(n)
    received = collections.Counter(r for m in sink.messages for r in m.rcpt_tos)
    assert received == {f"r{i}@example.test": 1 for i in range(n)}
