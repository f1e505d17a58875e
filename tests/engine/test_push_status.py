"""`mailengine push` and `mailengine status`, run as the commands a person types (subprocesses)
against a real engine, or against none."""
from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import zmq

from engine.testing.harness import LocalEngine, final_outcomes
from engine.testing.sink import SinkServer
from tests.support.cli import cli_env, mailengine, mailengine_bg
from tests.support.standin_engine import StandinEngine


def eml(rcpt: str, subject: str) -> str:
    return (f"From: Sender <sender@example.test>\r\nTo: <{rcpt}>\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject}@example.test>\r\n\r\nHello {rcpt}.\r\n")


def eml_folder(path: Path, n: int, prefix: str) -> Path:
    path.mkdir()
    for i in range(n):
        (path / f"{i:03}.eml").write_text(eml(f"{prefix}{i}@example.test", f"{prefix}{i}"))
    (path / "notes.txt").write_text("not a message: push reads only .eml files\n")
    return path


def jsonl(path: Path, jobs: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(j) + "\n" for j in jobs))
    return path


def jsonl_job(job_id: str, rcpt: str) -> dict[str, Any]:
    return {"id": job_id, "from": "sender@example.test", "to": [rcpt],
            "meta": {"src": "jsonl"}, "message": eml(rcpt, job_id)}


def by_rcpt(sink: SinkServer) -> collections.Counter[str]:
    return collections.Counter(r for m in sink.messages for r in m.rcpt_tos)


@pytest.mark.timeout(60)
def test_push_a_folder_of_eml_and_a_jsonl_file_exits_0_once_all_are_accepted(
        sink: SinkServer, local_engine: Callable[..., LocalEngine], tmp_path: Path) -> None:
    engine = local_engine(sink.port)
    folder = eml_folder(tmp_path / "outbox", 12, "eml")
    lines = jsonl(tmp_path / "jobs.jsonl",
                  [jsonl_job(f"jl-{i}", f"jl{i}@example.test") for i in range(8)])

    done = mailengine("push", "-c", engine.config_path, str(folder), str(lines))
    assert done.returncode == 0, done.stderr
    assert "20 of 20 accepted, 0 rejected, 0 not acknowledged" in done.stderr

    finals = final_outcomes(engine.wait_final(20, timeout=30))
    assert collections.Counter(e["event"] for e in finals.values()) == {"delivered": 20}
    sink.wait_for(20)
    assert by_rcpt(sink) == {**{f"eml{i}@example.test": 1 for i in range(12)},
                             **{f"jl{i}@example.test": 1 for i in range(8)}}
    assert {e["id"] for e in finals.values()} >= {f"jl-{i}" for i in range(8)}
    assert all(e["meta"] == {"src": "jsonl"} for e in finals.values() if e["id"].startswith("jl"))

    # One job refused among good ones: the good ones are accepted, and push exits 1.
    mixed = jsonl(tmp_path / "mixed.jsonl", [jsonl_job("fine", "fine@example.test"),
                                             {**jsonl_job("stray", "s@example.test"),
                                              "ip": "127.0.0.9"}])
    done = mailengine("push", "-c", engine.config_path, str(mixed))
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        "mailengine push: 1 of 2 accepted, 1 rejected, 0 not acknowledged",
        "  rejected 1: ip 127.0.0.9 is not one of this engine's sending IPs (stray)"]


@pytest.mark.timeout(60)
def test_push_with_no_engine_resends_then_exits_1_not_acknowledged(
        local_engine: Callable[..., LocalEngine], tmp_path: Path) -> None:
    engine = local_engine(2525, start=False)  # a config, and nothing running
    lines = jsonl(tmp_path / "jobs.jsonl", [jsonl_job("lonely", "a@example.test")])

    started = time.monotonic()
    done = mailengine("push", "-c", engine.config_path, "--timeout", "2", "--resend", "0.3",
                      str(lines))
    took = time.monotonic() - started
    assert done.returncode == 1
    assert done.stderr.splitlines()[-1] == (
        f"  not acknowledged 1: is the engine running, at {engine.config['ingest']}? (lonely)")
    assert 2.0 <= took < 15

    # Something takes the jobs but never says `queued` (an engine that dies before its
    # commit): push keeps re-sending the same job, then gives up the same way.
    ctx = zmq.Context()
    mute = ctx.socket(zmq.PULL)
    mute.bind(str(engine.config["ingest"]))
    try:
        done = mailengine("push", "-c", engine.config_path, "--timeout", "2", "--resend", "0.3",
                          str(lines))
        copies = []
        while mute.poll(100):
            copies.append(json.loads(mute.recv_multipart()[0])["id"])
    finally:
        mute.close(linger=0)
        ctx.term()
    assert done.returncode == 1
    assert "  not acknowledged 1: is the engine running" in done.stderr
    assert len(copies) >= 3 and set(copies) == {"lonely"}  # re-sent, always with its id


@pytest.mark.timeout(60)
def test_push_started_before_the_engine_exits_0_once_the_engine_is_up(
        sink: SinkServer, local_engine: Callable[..., LocalEngine], tmp_path: Path) -> None:
    engine = local_engine(sink.port, start=False)
    lines = jsonl(tmp_path / "jobs.jsonl",
                  [jsonl_job(f"early-{i}", f"early{i}@example.test") for i in range(5)])
    push = mailengine_bg("push", "-c", engine.config_path, "--timeout", "30", str(lines))
    try:
        time.sleep(1.5)
        assert push.poll() is None  # still trying
        engine.start()
        _, stderr = push.communicate(timeout=40)
    finally:
        if push.poll() is None:
            push.kill()
            push.communicate()
    assert push.returncode == 0, stderr
    engine.wait_final(5, timeout=30)
    sink.wait_for(5)
    assert by_rcpt(sink) == {f"early{i}@example.test": 1 for i in range(5)}


@pytest.mark.timeout(60)
def test_duplicate_ids_are_acknowledged_as_duplicates_and_delivered_once(
        sink: SinkServer, local_engine: Callable[..., LocalEngine], tmp_path: Path) -> None:
    engine = local_engine(sink.port)
    # Twice in one file, and the whole file pushed twice.
    lines = jsonl(tmp_path / "jobs.jsonl",
                  [jsonl_job("dup-a", "a@example.test"), jsonl_job("dup-b", "b@example.test"),
                   jsonl_job("dup-a", "a@example.test")])
    first = mailengine("push", "-c", engine.config_path, str(lines))
    assert first.returncode == 0, first.stderr
    engine.wait_final(2, timeout=30)
    second = mailengine("push", "-c", engine.config_path, str(lines))
    assert second.returncode == 0, second.stderr

    queued = [(e["id"], e.get("duplicate", False)) for e in
              engine.wait_for(lambda evs: sum(e["event"] == "queued" for e in evs) >= 6, 10)
              if e["event"] == "queued"]
    assert collections.Counter(queued) == {("dup-a", False): 1, ("dup-b", False): 1,
                                           ("dup-a", True): 3, ("dup-b", True): 1}
    # Nothing left to send, the engine stopped and the sink idle: a copy sent twice is there.
    engine.wait_for(lambda _: engine.status()["spool"]["jobs"] == 0, 10, "an empty spool")
    assert engine.stop(timeout=20) == 0
    sink.wait_idle()
    assert by_rcpt(sink) == {"a@example.test": 1, "b@example.test": 1}
    delivered = [e["id"] for e in engine.events() if e["event"] == "delivered"]
    assert sorted(delivered) == ["dup-a", "dup-b"]


@pytest.mark.timeout(60)
def test_status_prints_live_figures_and_json(
        sink: SinkServer, local_engine: Callable[..., LocalEngine]) -> None:
    engine = local_engine(sink.port, ips=("127.0.0.2", "127.0.0.3"))
    message = _write(engine, "one.eml", eml("x@example.test", "one"))
    pushed = mailengine("push", "-c", engine.config_path, "--from", "s@example.test", "--to",
                        "x@example.test", "--id", "one", "-q", str(message))
    assert pushed.returncode == 0, pushed.stderr
    assert pushed.stderr == ""  # -q
    engine.wait_final(1, timeout=20)
    pids = {ip: w["pid"] for ip, w in engine.status()["workers"].items()}

    text = mailengine("status", "-c", engine.config_path)
    assert text.returncode == 0, text.stderr
    out = text.stdout
    assert f"mailengine (pid {engine.proc.pid if engine.proc else '?'})" in out
    assert "spool: 0 jobs, 0 recipients pending, 0 deferred" in out
    assert "queued 1" in out and "delivered 1" in out
    for ip, pid in pids.items():
        assert any(line.startswith(ip) and "yes" in line and str(pid) in line
                   for line in out.splitlines())

    raw = mailengine("status", "-c", engine.config_path, "--json")
    assert raw.returncode == 0, raw.stderr
    figures = json.loads(raw.stdout)
    assert figures["pid"] == (engine.proc.pid if engine.proc else None)
    assert figures["events"]["delivered"] == 1 and figures["spool"]["jobs"] == 0
    assert {ip: w["pid"] for ip, w in figures["workers"].items()} == pids

    engine.stop()
    gone = mailengine("status", "-c", engine.config_path, "--timeout", "1")
    assert gone.returncode == 1
    assert "is the engine running?" in gone.stderr


@pytest.mark.timeout(60)
def test_push_with_no_engine_ends_with_one_short_summary_not_a_line_per_job(
        tmp_path: Path) -> None:
    many = jsonl(tmp_path / "many.jsonl",
                 [jsonl_job(f"m-{i:04}", f"m{i}@example.test") for i in range(3000)])
    nowhere = f"ipc://{tmp_path}/nothing"
    done = mailengine("push", "--ingest", nowhere, "--events", f"{nowhere}-events",
                      "--timeout", "1s", "--resend", "300ms", str(many))
    assert done.returncode == 1
    assert "\r" not in done.stderr  # not a terminal: plain lines, no bar
    lines = done.stderr.splitlines()
    assert lines[-2:] == [
        "mailengine push: 0 of 3000 accepted, 0 rejected, 3000 not acknowledged",
        f"  not acknowledged 3000: is the engine running, at {nowhere}? (m-0000, m-0001,"
        f" m-0002, m-0003, m-0004 and 2995 more)"]
    assert len(lines) <= 4  # at most a progress line or two before it


def tiny_jsonl(path: Path, n: int) -> Path:
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"t{i}", "from": "s@example.test",
                                "to": ["r@example.test"], "message": "Subject: t\r\n\r\nt\r\n"})
                    + "\n")
    return path


def push_peak_rss(engine: StandinEngine, jobs: Path, out: Path) -> int:
    """`mailengine push` of `jobs` to the stand-in; its peak resident set size, in KiB."""
    with out.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "push", "-q", "--ingest",
                                 engine.ingest, "--events", engine.events, str(jobs)],
                                env=cli_env(), stdout=log, stderr=log)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.returncode == 0, out.read_text()
    return int(usage.ru_maxrss)


@pytest.mark.timeout(300)
def test_push_streams_a_big_file_in_memory_flat_in_the_number_of_jobs(tmp_path: Path) -> None:
    """200,000 jobs take no more memory than 20,000: push reads them as its window of
    unacknowledged jobs has room (tests/unit/test_cli_push.py sees the window itself).
    Measured: 39 MB peak for either (and for 600,000); push holding every job, as it once
    did, peaked at 118 MB for 200,000."""
    small = tiny_jsonl(tmp_path / "small.jsonl", 20_000)
    big = tiny_jsonl(tmp_path / "big.jsonl", 200_000)
    with StandinEngine() as engine:
        small_kib = push_peak_rss(engine, small, tmp_path / "small.out")
        big_kib = push_peak_rss(engine, big, tmp_path / "big.out")
        assert engine.received >= 220_000
    assert big_kib - small_kib < 20 * 1024, (small_kib, big_kib)


def _write(engine: LocalEngine, name: str, text: str) -> Path:
    path = Path(engine.workdir) / name
    path.write_text(text)
    return path
