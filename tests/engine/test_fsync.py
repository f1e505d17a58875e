"""`queued` is published only after the job is on disk: shown with strace (issue #14, item 11).

The supervisor runs under `strace -f -y`: every write to the spool's write-ahead log, every
fsync/fdatasync and every write or send of its events is traced, with the file or socket each
descriptor is. For each job pushed, the trace must show, in this order: a write to
`spool.db-wal` holding the job's id (the commit's frames), an fsync or fdatasync of
`spool.db-wal` begun after it and finished, then the first `"event":"queued"` for the job,
in the events log (write) and on the PUB socket (sendto/sendmsg).

The check fails if the spool did not sync its log at each commit: SQLite's
`synchronous=OFF` never syncs, and `NORMAL` in WAL mode syncs only at checkpoints, so the
announcement would come with no sync between the job's write and it.
`test_the_check_fails_without_a_sync_at_commit` shows it: the same check on a small SQLite
program under each setting.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest

from engine.testing.harness import LocalEngine
from engine.testing.sink import SinkServer
from tests.support.wait import until

IP = "127.0.0.2"
TRACED = "fsync,fdatasync,write,pwrite64,pwritev,pwritev2,sendto,sendmsg"
WRITES = frozenset({"write", "pwrite64", "pwritev", "pwritev2"})
SENDS = frozenset({"write", "sendto", "sendmsg"})
SYNCS = frozenset({"fsync", "fdatasync"})
WAL = "spool.db-wal"
LINE = re.compile(r"^(\d+) +(\d\d:\d\d:\d\d\.\d+) (.*)$")
CALL = re.compile(r"^(\w+)\((\d+)<([^>]*)>")
RESUMED = re.compile(r"^<\.\.\. \w+ resumed>")


def strace_command(out: Path) -> list[str]:
    """strace, following threads and children, the data of writes in full, descriptors
    named; the test is skipped where strace is missing or may not trace."""
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace is not installed")
    command = [strace, "-f", "-tt", "-y", "-s", "65536", "-e", f"trace={TRACED}"]
    if subprocess.run([*command, "--seccomp-bpf", "-o", "/dev/null", "true"],
                      capture_output=True, timeout=20).returncode == 0:
        command.append("--seccomp-bpf")  # untraced calls do not stop: much faster
    elif subprocess.run([*command, "-o", "/dev/null", "true"], capture_output=True,
                        timeout=20).returncode != 0:
        pytest.skip("strace cannot trace here (ptrace not permitted)")
    return [*command, "-o", str(out)]


def stop_traced(engine: LocalEngine) -> int:
    """SIGTERM to the engine under strace, which blocks fatal signals itself (-o FILE with a
    command: `-I 3`) and exits with its command's status once that has exited."""
    strace = engine.proc
    assert strace is not None
    engine.proc = None
    children = Path(f"/proc/{strace.pid}/task/{strace.pid}/children").read_text().split()
    for pid in children:  # the supervisor (its workers are its own children)
        os.kill(int(pid), signal.SIGTERM)
    try:
        return strace.wait(60)
    except subprocess.TimeoutExpired:
        strace.kill()  # PTRACE_O_EXITKILL: the engine dies with it
        strace.wait(10)
        raise


@dataclass(frozen=True)
class Call:
    """One system call: its line when it entered and when it returned, its name, the file or
    socket of its descriptor, and its text (arguments as strace shows them)."""

    entered: int
    done: int
    ts: str
    name: str
    path: str
    text: str


def calls(trace: str) -> list[Call]:
    """The calls of an strace -f -y output, each whole: a call another thread interrupted
    (`<unfinished ...>`) joined with its `<... resumed>` line."""
    started: dict[str, tuple[int, str]] = {}
    found = []
    for index, line in enumerate(trace.splitlines()):
        match = LINE.match(line)
        if match is None:
            continue
        pid, ts, text = match.groups()
        entered = index
        if text.endswith("<unfinished ...>"):
            started[pid] = (index, text.removesuffix("<unfinished ...>"))
            continue
        resumed = RESUMED.match(text)
        if resumed is not None and pid in started:
            entered, head = started.pop(pid)
            text = head + text[resumed.end():]
        call = CALL.match(text)
        if call is not None:  # not a signal, an exit
            found.append(Call(entered, index, ts, call[1], call[3], text))
    return found


def announcement(job_id: str) -> str:
    """The start of a `queued` event for `job_id`, as strace shows the data written."""
    return '{\\"event\\":\\"queued\\",\\"id\\":\\"' + job_id + '\\"'


def unsynced(traced: list[Call], ids: Iterable[str], wal: str = WAL) -> dict[str, str]:
    """The jobs announced `queued` without a sync of the write-ahead log between their
    write to it and the announcement: id -> what the trace shows."""
    problems = {}
    for job_id in ids:
        written = [c.done for c in traced
                   if c.name in WRITES and c.path.endswith(wal) and job_id in c.text]
        told = [c.entered for c in traced if c.name in SENDS and announcement(job_id) in c.text]
        if not written or not told:
            problems[job_id] = f"written to the log at {written[:1]}, announced at {told[:1]}"
            continue
        synced = [c for c in traced if c.name in SYNCS and c.path.endswith(wal)
                  and written[0] < c.entered and c.done < min(told)]
        if not synced:
            problems[job_id] = (f"announced on line {min(told) + 1} with no sync of {wal} since"
                                f" its write on line {written[0] + 1}")
    return problems


def channels(traced: list[Call], job_id: str) -> set[str]:
    """Where `job_id`'s `queued` went: the events log (a file) and sockets."""
    return {"log" if c.path.endswith("events.jsonl") else "socket" for c in traced
            if c.name in SENDS and announcement(job_id) in c.text}


def job(job_id: str) -> tuple[dict[str, object], bytes]:
    message = (f"From: <s@example.test>\r\nTo: <r@example.test>\r\nSubject: {job_id}\r\n"
               f"Message-ID: <{job_id}@example.test>\r\n\r\nfsync test\r\n")
    return {"id": job_id, "from": "s@example.test", "to": ["r@example.test"]}, message.encode()


@pytest.mark.timeout(180)
def test_every_queued_is_published_after_an_fsync_of_the_spools_log(
        sink: SinkServer, local_engine: Callable[..., LocalEngine], tmp_path: Path) -> None:
    trace = tmp_path / "strace.txt"
    engine = local_engine(sink.port, ips=(IP,), start=False, wrapper=strace_command(trace))
    ids = [f"fsync-job-{i}" for i in range(5)]
    try:
        engine.start(timeout=60)
        assert engine.push([job(ids[0])], timeout=60)  # one alone, then four together
        assert engine.push([job(i) for i in ids[1:]], timeout=60)
        until(lambda: sum(e["event"] == "delivered" for e in engine.events()) == len(ids), 60,
              "the deliveries", engine.log_tail)
    finally:
        assert stop_traced(engine) == 0  # and strace has written everything

    traced = calls(trace.read_text(encoding="utf-8", errors="replace"))
    assert unsynced(traced, ids) == {}
    for job_id in ids:
        assert channels(traced, job_id) == {"log", "socket"}  # both channels were checked
    syncs = [c for c in traced if c.name in SYNCS and c.path.endswith(WAL)]
    print(f"\n{len(traced)} calls traced, {len(syncs)} syncs of {WAL}")


# A commit, then its announcement, as the supervisor does them, by SQLite alone.
COMMIT_THEN_ANNOUNCE = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1] + "/spool.db", isolation_level=None)
db.execute("PRAGMA journal_mode=WAL")
db.execute("PRAGMA synchronous=" + sys.argv[2])
db.execute("CREATE TABLE jobs (id TEXT)")
db.execute("BEGIN")
db.execute("INSERT INTO jobs VALUES ('job-7')")
db.execute("COMMIT")
with open(sys.argv[1] + "/events.jsonl", "a") as log:
    log.write('{"event":"queued","id":"job-7"}\\n')
"""


@pytest.mark.parametrize(("synchronous", "safe"), [("FULL", True), ("NORMAL", False),
                                                    ("OFF", False)])
def test_the_check_fails_without_a_sync_at_commit(tmp_path: Path, synchronous: str,
                                                  safe: bool) -> None:
    trace = tmp_path / "strace.txt"
    subprocess.run([*strace_command(trace), sys.executable, "-c", COMMIT_THEN_ANNOUNCE,
                    str(tmp_path), synchronous], check=True, timeout=30)
    problems = unsynced(calls(trace.read_text(encoding="utf-8", errors="replace")), ["job-7"])
    assert (problems == {}) is safe, problems
