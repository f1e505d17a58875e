"""The spool's filesystem full, for real: a small tmpfs holds the spool, a ballast file fills
it, and the engine goes on (issue #14, item 1).

Before: `SpoolError: spool write failed: database or disk is full` ended the supervisor, and
under systemd it restarted into the same failure, delivering nothing of what it had spooled.
Now intake stops acknowledging (producers keep their copy and send it again), delivery of what
is spooled goes on, and intake resumes by itself once space returns. Needs root (a tmpfs
mount): skipped elsewhere; the same logic without a mount is
tests/conversation/test_supervisor_parts.py.
"""
from __future__ import annotations

import collections
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from engine.testing.harness import LocalEngine
from engine.testing.sink import SinkServer
from tests.support.wait import until

IP = "127.0.0.2"
# Room for the write-ahead log to grow to its checkpoint size (16 MB) once space returns:
# a filesystem smaller than that fills up with the log itself.
FS_BYTES = 48 * 1024 * 1024
LEFT_FREE = 1_500_000  # bytes the ballast leaves: room for the spool's file and a few jobs
JOBS = 120
SIZE = 47_000  # bytes per message: JOBS of them are several times what is left


@pytest.fixture
def small_filesystem(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "fs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={FS_BYTES},mode=0700",
                           "tmpfs", str(mount)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(path: Path, leave: int) -> None:
    """A ballast file that leaves `leave` bytes free on path's filesystem."""
    stat = os.statvfs(path.parent)
    free = stat.f_bavail * stat.f_frsize
    with open(path, "wb") as f:
        f.write(b"\0" * max(0, free - leave))


def message(job_id: str) -> bytes:
    head = f"Subject: {job_id}\r\nMessage-ID: <{job_id}@example.test>\r\n\r\n"
    return (head + ("x" * 76 + "\r\n") * (SIZE // 78)).encode()


@pytest.mark.timeout(180)
def test_a_full_spool_filesystem_pauses_intake_and_loses_nothing(
        sink: SinkServer, local_engine: Callable[..., LocalEngine],
        small_filesystem: Path) -> None:
    ballast = small_filesystem / "ballast"
    engine = local_engine(sink.port, ips=(IP,), start=False,
                          extra={"spool": str(small_filesystem / "spool")})
    engine.start()
    fill(ballast, LEFT_FREE)
    jobs = [({"id": f"f{i}", "from": "s@example.test", "to": [f"r{i}@example.test"]},
             message(f"f{i}")) for i in range(JOBS)]
    producer = _Producer(engine, jobs)
    producer.start()

    until(lambda: "event=spool_unwritable" in _log(engine), 60, "the spool to fill",
          engine.log_tail)
    paused = until(lambda: (s := engine.status())["spool"]["writable"] is False and s, 10,
                   "status to say so", engine.log_tail)
    assert paused["spool"]["intake_paused"] is True
    queued_while_full = {e["id"] for e in engine.events() if e["event"] == "queued"}
    assert 0 < len(queued_while_full) < JOBS  # some fitted, the rest was not acknowledged
    # What was spooled is delivered meanwhile.
    until(lambda: queued_while_full <= _received(sink).keys(), 60,
          "the spooled jobs to be delivered while the disk is full", engine.log_tail)

    ballast.unlink()  # space returns: intake resumes by itself
    producer.join(120)
    assert producer.accepted is True, (
        f"queued {len({e['id'] for e in engine.events() if e['event'] == 'queued'})}"
        f" of {JOBS}; {producer.error!r}\n{engine.log_tail(40)}")
    until(lambda: len(_received(sink)) == JOBS, 90, "every job delivered", engine.log_tail)
    engine.wait_final(JOBS, 30)  # the sink has them: their results are recorded just after
    counts = _received(sink)
    assert max(counts.values()) == 1  # nothing sent twice
    assert "event=spool_writable" in _log(engine)
    assert engine.status()["spool"]["writable"] is True
    delivered = collections.Counter(e["id"] for e in engine.events()
                                    if e["event"] == "delivered")
    assert set(delivered) == {env["id"] for env, _ in jobs} and max(delivered.values()) == 1
    assert engine.proc is not None and engine.proc.poll() is None  # never exited


class _Producer:
    """`LocalEngine.push` in a thread: re-sends each job until it is `queued`."""

    def __init__(self, engine: LocalEngine, jobs: list) -> None:
        import threading
        self.accepted: bool | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(engine, jobs), daemon=True)

    def _run(self, engine: LocalEngine, jobs: list) -> None:
        try:
            self.accepted = engine.push(jobs, timeout=150)
        except BaseException as exc:
            self.error = exc
            raise

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


def _received(sink: SinkServer) -> collections.Counter[str]:
    return collections.Counter(m.content.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0].decode()
                               for m in sink.messages)


def _log(engine: LocalEngine) -> str:
    with open(engine.log_path, encoding="utf-8", errors="replace") as f:
        return f.read()
