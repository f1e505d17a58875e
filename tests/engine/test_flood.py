"""A flood of invalid jobs with a few valid ones among them, through the real engine.

A raw ZeroMQ PUSH producer sends, interleaved, `invalid` jobs of every kind intake
refuses (bad JSON, injected addresses, NUL, oversize, wrong frame count, unknown ip
or pool...) and `valid` good ones. Every valid job must be delivered, every invalid one
rejected (one `rejected` event each), and the supervisor's memory must stay bounded
while it happens: its RSS is sampled from /proc during the run.

The suite runs 5,000 + 200; the full size runs once as a script, with the results
recorded in docs/SECURITY.md:

    python -m tests.engine.test_flood --invalid 100000 --valid 1000
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import zmq

from engine.testing.harness import LocalEngine, make_message
from engine.testing.sink import SinkServer

MAX_MESSAGE = 8000  # limits.max_message_size in the flood engine
GOOD = b"Subject: flood\r\n\r\nfine\r\n"


def _envelope(job_id: str, **fields: Any) -> bytes:
    return json.dumps({"id": job_id, "from": "s@example.test", "to": ["r@example.test"],
                       **fields}).encode()


# Each kind of invalid job: its frames, given an id. Every one gets one `rejected` event.
INVALID: dict[str, Callable[[str], list[bytes]]] = {
    "not-json": lambda i: [b"{\"id\": \"" + i.encode() + b"\", nope", GOOD],
    "array": lambda i: [b"[1, 2, 3]", GOOD],
    "no-from": lambda i: [json.dumps({"id": i, "to": ["r@example.test"]}).encode(), GOOD],
    "crlf-rcpt": lambda i: [_envelope(i, to=["a@b.test>\r\nRCPT TO:<victim@example.test"]),
                            GOOD],
    "nul-sender": lambda i: [_envelope(i, **{"from": "a\x00b@example.test"}), GOOD],
    "empty-to": lambda i: [_envelope(i, to=[]), GOOD],
    "unknown-field": lambda i: [_envelope(i, bcc=["x@example.test"]), GOOD],
    "nul-message": lambda i: [_envelope(i), b"Subject: x\r\n\r\na\x00b\r\n"],
    "empty-message": lambda i: [_envelope(i), b""],
    "too-large": lambda i: [_envelope(i), b"x" * (MAX_MESSAGE + 1)],
    "one-frame": lambda i: [_envelope(i)],
    "three-frames": lambda i: [_envelope(i), GOOD, GOOD],
    "not-utf8": lambda i: [b"{\"id\": \"\xff\xfe\"}", GOOD],
    "unknown-ip": lambda i: [_envelope(i, ip="192.0.2.99"), GOOD],
    "unknown-pool": lambda i: [_envelope(i, pool="nope"), GOOD],
    "bad-expires": lambda i: [_envelope(i, expires=-5), GOOD],
    "duplicate-key": lambda i: [b"{\"id\": \"" + i.encode() + b"\", \"to\": [], \"to\": []}",
                                GOOD],
    "nan": lambda i: [b"{\"id\": \"" + i.encode() + b"\", \"expires\": NaN}", GOOD],
    "deep": lambda i: [b"[" * 5000 + b"]" * 5000, GOOD],
    "bidi-rcpt": lambda i: [_envelope(i, to=["ad\u202emin@example.test"]), GOOD],
}


@dataclass
class FloodResult:
    invalid: int
    valid: int
    rejected: int = 0
    delivered: int = 0
    sink_messages: int = 0
    send_seconds: float = 0.0
    total_seconds: float = 0.0
    rss_kib: list[int] = field(default_factory=list)  # supervisor, sampled every 0.02 s
    rss_start_kib: int = 0
    worker_rss_kib: list[int] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {"invalid": self.invalid, "valid": self.valid, "rejected": self.rejected,
                "delivered": self.delivered, "sink_messages": self.sink_messages,
                "send_seconds": round(self.send_seconds, 1),
                "total_seconds": round(self.total_seconds, 1),
                "jobs_per_second": round((self.invalid + self.valid) / self.total_seconds),
                "supervisor_rss_mib": {"start": _mib(self.rss_start_kib),
                                       "peak": _mib(max(self.rss_kib, default=0)),
                                       "end": _mib(self.rss_kib[-1] if self.rss_kib else 0),
                                       "samples": len(self.rss_kib)},
                "worker_rss_mib_peak": _mib(max(self.worker_rss_kib, default=0)),
                "unexpected": self.unexpected[:10]}


def _mib(kib: int) -> float:
    return round(kib / 1024, 1)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class RssSampler:
    """Samples a process's RSS every `interval` seconds in a thread, until stopped."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.pid, self.interval = pid, interval
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.samples.append(rss_kib(self.pid))
            except OSError:
                return

    def stop(self) -> list[int]:
        self._stop.set()
        self._thread.join(2)
        return self.samples


def flood_jobs(invalid: int, valid: int) -> Iterator[tuple[str, list[bytes]]]:
    """(kind, frames), the valid ones spread evenly among the invalid."""
    kinds = list(INVALID)
    every = max(1, invalid // max(valid, 1))
    sent_valid = 0
    for n in range(invalid):
        if n % every == 0 and sent_valid < valid:
            yield "valid", [_envelope(f"ok-{sent_valid}", to=[f"ok{sent_valid}@example.test"]),
                            make_message(sent_valid, 600)]
            sent_valid += 1
        kind = kinds[n % len(kinds)]
        yield kind, INVALID[kind](f"bad-{n}")
    for left in range(sent_valid, valid):
        yield "valid", [_envelope(f"ok-{left}", to=[f"ok{left}@example.test"]),
                        make_message(left, 600)]


def flood_engine(workdir: str, sink_port: int, log_level: str = "warning") -> LocalEngine:
    """`log_level` warning by default: at info, each rejection is also a log line."""
    return LocalEngine(workdir, sink_port, extra={
        "limits": {"max_message_size": MAX_MESSAGE},
        "pool": {"max_connections": 4},
        "log_level": log_level,
    })


def run_flood(engine: LocalEngine, sink: SinkServer, invalid: int, valid: int,
              timeout: float = 600.0) -> FloodResult:
    result = FloodResult(invalid, valid)
    assert engine.proc is not None
    result.rss_start_kib = rss_kib(engine.proc.pid)
    worker_pid = next(iter(engine.status()["workers"].values()))["pid"]
    sampler, worker_sampler = RssSampler(engine.proc.pid), RssSampler(worker_pid, 0.2)
    ctx = zmq.Context()
    started = time.monotonic()
    try:
        producer = ctx.socket(zmq.PUSH)
        producer.setsockopt(zmq.LINGER, 5000)
        producer.connect(str(engine.config["ingest"]))
        for _, frames in flood_jobs(invalid, valid):
            producer.send_multipart(frames)
        result.send_seconds = time.monotonic() - started
        producer.close()
        _wait_outcomes(engine, result, started + timeout)
    finally:
        ctx.term()
        result.rss_kib = sampler.stop()
        result.worker_rss_kib = worker_sampler.stop()
    result.total_seconds = time.monotonic() - started
    result.sink_messages = len(sink.messages)
    return result


def _wait_outcomes(engine: LocalEngine, result: FloodResult, deadline: float) -> None:
    delivered: set[str] = set()
    seen = 0
    while True:
        events = engine.events()
        for event in events[seen:]:
            name, job_id = event["event"], event.get("id") or ""
            if name == "rejected":
                result.rejected += 1
                if job_id.startswith("ok-"):
                    result.unexpected.append(f"valid job rejected: {event}")
            elif name == "delivered":
                delivered.add(job_id)
            elif name in ("bounced", "expired", "deferred") or (
                    name == "queued" and not job_id.startswith("ok-")):
                result.unexpected.append(f"{name} {job_id}: {event.get('reply') or event}")
        seen = len(events)
        result.delivered = len(delivered)
        if result.rejected >= result.invalid and result.delivered >= result.valid:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"flood not done: {result.summary()}")
        time.sleep(0.2)


@pytest.mark.timeout(180)
def test_flood_of_invalid_jobs_rejects_each_delivers_every_valid_one_memory_bounded(
        plain_sink: SinkServer, tmp_path: Any) -> None:
    with flood_engine(str(tmp_path / "engine"), plain_sink.port) as engine:
        engine.start()
        result = run_flood(engine, plain_sink, invalid=5000, valid=200, timeout=150)
        engine.stop(timeout=30)
    assert result.unexpected == []
    assert (result.rejected, result.delivered) == (5000, 200)
    assert result.sink_messages == 200
    peak = max(result.rss_kib)
    assert len(result.rss_kib) >= 5
    assert peak - result.rss_start_kib < 64 * 1024, result.summary()  # MiB, in KiB


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.engine.test_flood", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--invalid", type=int, default=100_000)
    parser.add_argument("--valid", type=int, default=1_000)
    parser.add_argument("--timeout", type=float, default=1200.0)
    parser.add_argument("--log-level", default="warning", help="the engine's log_level")
    args = parser.parse_args(argv)
    with SinkServer(tls=False) as sink, tempfile.TemporaryDirectory(prefix="flood-") as work:
        with flood_engine(os.path.join(work, "engine"), sink.port, args.log_level) as engine:
            engine.start()
            result = run_flood(engine, sink, args.invalid, args.valid, args.timeout)
            engine.stop(timeout=60)
    report = result.summary()
    report["python"] = sys.version.split()[0]
    report["pyzmq"] = zmq.__version__
    report["log_level"] = args.log_level
    print(json.dumps(report, indent=1))
    ok = (not result.unexpected and result.rejected == args.invalid
          and result.delivered == args.valid == result.sink_messages)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
