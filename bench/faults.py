"""Faults of the machine, injected into a running LocalEngine for bench/fault_soak.py.

Each fault is real: a SIGKILL of a worker or of the supervisor, a tmpfs holding the spool
filled to the last block by a ballast file, a DNS server that stops answering (queries are
read and dropped, as behind a dead resolver). `plan` places them on a timeline, seeded; the
`Injector` strikes each at its time and keeps a `Strike` record of what it did and saw, for
the soak's accounting (bench/soak_ledger.py).

The spool's filesystem needs `mount -t tmpfs`: root.
"""
from __future__ import annotations

import contextlib
import errno
import os
import random
import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from engine.spool import Spool
from engine.testing.harness import LocalEngine
from engine.testing.sink import SinkServer
from tests.support.dnsserver import DnsServer

WORKER, SUPERVISOR, DISK, DNS = "worker kill -9", "supervisor kill -9", "spool disk full", \
    "DNS down"
# The script: (kind, how many, seconds each lasts).
SCRIPT = ((WORKER, 3, 0.0), (SUPERVISOR, 2, 0.0), (DISK, 2, 10.0), (DNS, 1, 5.0))
RECOVERY = 5.0  # seconds a slot keeps free after its fault, for the engine to come back
LEAD_IN = 0.06  # share of the window before the first slot: deliveries flowing


@dataclass(frozen=True)
class Fault:
    at: float  # seconds after the start of the run
    kind: str
    seconds: float  # how long it lasts (0: a single blow)


@dataclass
class Strike:
    """What one fault did, as it happened (Unix times)."""

    fault: Fault
    started: float = 0.0
    ended: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)


def plan(seed: int, window: float, script: tuple[tuple[str, int, float], ...] = SCRIPT
         ) -> list[Fault]:
    """The faults in a seeded order, one per equal slot of `window` seconds (after a lead-in),
    each at a seeded moment of its slot that leaves RECOVERY seconds after it ends."""
    rng = random.Random(seed)
    kinds = [(kind, seconds) for kind, count, seconds in script for _ in range(count)]
    rng.shuffle(kinds)
    start = window * LEAD_IN
    slot = (window - start) / len(kinds)
    faults = []
    for number, (kind, seconds) in enumerate(kinds):
        room = max(0.0, slot - seconds - RECOVERY)
        faults.append(Fault(round(start + number * slot + rng.uniform(0, room), 1), kind,
                            seconds))
    return faults


class SwitchableDns(DnsServer):
    """The test DNS server (tests/support/dnsserver.py), which can go down: while `down`,
    every query is read and dropped, over UDP and TCP (clients time out)."""

    def __init__(self, zone: Mapping[str, Any], **options: Any) -> None:
        super().__init__(zone, **options)
        self.down = False
        self.dropped = 0

    def respond(self, wire: bytes, tcp: bool) -> bytes | None:
        if self.down:
            self.dropped += 1
            return None
        return super().respond(wire, tcp)


class SmallFilesystem:
    """A tmpfs of `size` bytes at `path` (root only), and a ballast file to fill it up."""

    def __init__(self, path: str, size: int) -> None:
        self.path = path
        os.makedirs(path, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs",
                               path], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise PermissionError(f"cannot mount a tmpfs at {path} (root needed): "
                                  f"{done.stderr.strip()}")
        self.ballast = os.path.join(path, "ballast")

    def fill(self) -> int:
        """Write the ballast until the filesystem refuses a single block; bytes written.
        Unbuffered: what a buffer held back would fail again at close."""
        written = 0
        fd = os.open(self.ballast, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            for chunk in (b"\0" * (1 << 20), b"\0" * (1 << 12)):
                while True:
                    try:
                        written += os.write(fd, chunk)
                    except OSError as err:
                        if err.errno != errno.ENOSPC:
                            raise
                        break
        finally:
            os.close(fd)
        return written

    def free(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.ballast)

    def available(self) -> int:
        stat = os.statvfs(self.path)
        return stat.f_bavail * stat.f_frsize

    def unmount(self) -> None:
        subprocess.run(["umount", "-l", self.path], check=False, capture_output=True)


class Injector(threading.Thread):
    """Strikes the faults of a plan at their times, relative to `started` (Unix time)."""

    def __init__(self, faults: list[Fault], started: float, engine: LocalEngine,
                 sink: SinkServer, dns: SwitchableDns, disk: SmallFilesystem,
                 ips: list[str], seed: int, log: Callable[[str], None]) -> None:
        super().__init__(name="fault-injector", daemon=True)
        self.faults, self.started = faults, started
        self.engine, self.sink, self.dns, self.disk = engine, sink, dns, disk
        self.ips = ips
        self.rng = random.Random(seed ^ 0x5EED)
        self.log = log
        self.strikes: list[Strike] = []
        self.error: BaseException | None = None
        self._halt = threading.Event()

    def stop(self) -> None:
        self._halt.set()

    def run(self) -> None:
        try:
            for fault in self.faults:
                if self._halt.wait(max(0.0, self.started + fault.at - time.time())):
                    return
                strike = Strike(fault, started=time.time())
                self.strikes.append(strike)
                self.log(f"fault at {fault.at:.0f}s: {fault.kind}")
                try:
                    self._strike(strike)
                except Exception as exc:  # reported with the strike; the script goes on
                    strike.details["error"] = repr(exc)
                    self.log(f"fault {fault.kind} failed: {exc!r}")
                strike.ended = time.time()
        except BaseException as exc:  # reported by the soak
            self.error = exc
            self.log(f"fault injector failed: {exc!r}")

    def _strike(self, strike: Strike) -> None:
        kind = strike.fault.kind
        if kind == WORKER:
            strike.details = kill_worker(self.engine, self.rng.choice(self.ips))
        elif kind == SUPERVISOR:
            strike.details = kill_supervisor(self.engine, self.sink)
        elif kind == DISK:
            strike.details = self._disk_full(strike.fault.seconds)
        elif kind == DNS:
            strike.details = self._dns_down(strike.fault.seconds)
        else:
            raise ValueError(kind)

    def _disk_full(self, seconds: float) -> dict[str, Any]:
        """Fill the spool's filesystem for `seconds`; what the engine said meanwhile: the
        seconds its status called the spool unwritable, its `spool_unwritable` lines.

        The spool's write-ahead log is truncated first: grown once to its checkpoint size,
        it is written over in place from then on, and a filesystem full around it goes
        unnoticed (measured: no `spool_unwritable` in two 10 s windows). Truncated, the
        engine's next commits need new blocks, as after a checkpoint that shrank the log,
        or with a spool that grows."""
        offset = _size(self.engine.log_path)
        wal = truncate_wal(os.path.join(str(self.engine.config["spool"]), "spool.db"))
        ballast = self.disk.fill()
        until = time.monotonic() + seconds
        paused = 0.0
        while not self._halt.wait(0.25) and time.monotonic() < until:
            paused += 0.25 * (not _spool_writable(self.engine))
        self.disk.free()
        back = time.monotonic()
        while not _spool_writable(self.engine) and time.monotonic() - back < RECOVERY:
            time.sleep(0.1)
            paused += 0.1
        said = _read_from(self.engine.log_path, offset)
        return {"ballast_bytes": ballast, "wal_freed_bytes": wal, "paused_s": round(paused, 1),
                "unwritable_lines": said.count("event=spool_unwritable "),
                "writable_lines": said.count("event=spool_writable ")}

    def _dns_down(self, seconds: float) -> dict[str, Any]:
        before = self.dns.dropped
        self.dns.down = True
        try:
            self._halt.wait(seconds)
        finally:
            self.dns.down = False
        return {"queries_dropped": self.dns.dropped - before}


def kill_worker(engine: LocalEngine, ip: str) -> dict[str, Any]:
    """SIGKILL the worker of `ip`; until the supervisor has a new one ready."""
    before = engine.status()["workers"][ip]
    os.kill(before["pid"], signal.SIGKILL)
    killed = time.time()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with contextlib.suppress(TimeoutError):
            now = engine.status()["workers"][ip]
            if now["alive"] and now["ready"] and now["pid"] != before["pid"]:
                break
        time.sleep(0.05)
    return {"ip": ip, "pid": before["pid"], "killed": killed,
            "in_flight": before.get("in_flight"),
            "connections_open": before.get("connections_open"),
            "back_after_s": round(time.time() - killed, 2)}


def kill_supervisor(engine: LocalEngine, sink: SinkServer) -> dict[str, Any]:
    """SIGKILL the supervisor (its workers die with it), take stock of what it left, restart
    it on the same spool. `unrecorded`: recipients the sink has an answered copy of and the
    spool still holds pending: their results were lost with the supervisor, so they go out
    again (each one a duplicate nobody can flag). `pending_dropped`: pending recipients whose
    only copies the sink dropped unanswered (ambiguous; their flag may be lost too)."""
    figures = engine.status()
    worker_pids = [w["pid"] for w in figures["workers"].values()]
    engine.kill()
    killed = time.time()
    deadline = time.monotonic() + 10
    while any(_running(pid) for pid in worker_pids) and time.monotonic() < deadline:
        time.sleep(0.02)
    with contextlib.suppress(TimeoutError):
        sink.wait_idle(5)  # the dead workers' connections closed: the sink has it all
    answered: set[tuple[str, str]] = set()
    dropped: set[tuple[str, str]] = set()
    for message in sink.messages:
        (dropped if message.unanswered else answered).update(message_keys(message))
    with Spool(str(engine.config["spool"])) as spool:
        pending = {(p.job.id, rcpt) for p in spool.due(time.time() + 10 ** 7, 10 ** 7)
                   for rcpt in p.rcpts}
    engine.start(timeout=60)
    return {"killed": killed, "in_flight": figures.get("in_flight"),
            "pending_in_spool": len(pending),
            "unrecorded": sorted(list(k) for k in pending & answered),
            "pending_dropped": sorted(list(k) for k in (pending & dropped) - answered),
            "back_after_s": round(time.time() - killed, 2)}


def message_keys(message: Any) -> list[tuple[str, str]]:
    """(job id, recipient) for each recipient of a sink message: the job id is the local
    part of its Message-ID (the soak's messages are made that way)."""
    head = message.content.split(b"\r\n\r\n", 1)[0]
    for line in head.split(b"\r\n"):
        if line[:12].lower() == b"message-id: ":
            job_id = line[12:].strip(b"<> ").split(b"@", 1)[0].decode()
            return [(job_id, rcpt) for rcpt in message.rcpt_tos]
    return []


def truncate_wal(database: str) -> int:
    """Checkpoint the SQLite database's write-ahead log into it and truncate the log, from a
    connection of our own (SQLite lets any connection do it); the bytes the log gave back."""
    before = _size(database + "-wal")
    conn = sqlite3.connect(database, timeout=5)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    finally:
        conn.close()
    return before - _size(database + "-wal")


def _spool_writable(engine: LocalEngine) -> bool:
    try:
        return bool(engine.status()["spool"].get("writable", True))
    except TimeoutError:
        return True  # no answer: nothing known, nothing counted


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _read_from(path: str, offset: int) -> str:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read().decode("utf-8", "replace")


def _running(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False
