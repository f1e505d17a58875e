"""The supervisor's CPU per job at intake, in process (issue #19, item 5).

`python -m bench.intake_cost [--jobs 20000] [--runs 5] [--size 5000] [--meta] [--profile]`

The real path, without the rest of the engine: `count` 5 KB jobs (one recipient each, as
bench/burst.py pushes them) wait in a ZeroMQ ingest socket (inproc, pushed before the clock
starts), and `Intake.take` reads, parses, spools (a real spool in a temporary folder: SQLite,
WAL, fsync per commit) and announces them (`queued` on a real PUB socket and in an events
log) until none is left. The figure is this process's CPU time (`time.process_time`: what
other processes do on the machine is not counted, though they still slow it through the
caches, so the least of the runs is shown too) per job, the median of `runs` runs, each
with a new spool. Two batch sizes, as `intake.Ramp` reads them: 128 (the workers have room,
as at a burst's start) and 1,000 (they are full). Then the parts alone, on the same jobs:
parsing (`job.parse_job`), the spool's insert (`Spool.accept`, batches of 128), the `queued`
events.

`--meta` gives each envelope a small `meta` (a campaign and a user id), as many producers
send. `--profile` adds cProfile's top functions (by own time) of one run of the whole take.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import zmq

from engine import config as config_mod
from engine import events
from engine.config import Config
from engine.events import EventPublisher
from engine.intake import Intake
from engine.job import Job, parse_job
from engine.metrics import Metrics
from engine.spool import Spool
from engine.testing.harness import make_message

SENDER = "bench@mailengine.test"
BATCHES = {"128 a read (workers with room)": 1, "1,000 a read (workers full)": 0}


def frames(count: int, size: int, meta: bool = False) -> list[list[bytes]]:
    """The jobs as a producer sends them: envelope (JSON) and message."""
    out = []
    for i in range(count):
        rcpt = f"user{i}@example.test"
        envelope: dict[str, object] = {"id": f"bench-{i}", "from": SENDER, "to": [rcpt]}
        if meta:
            envelope["meta"] = {"campaign": "spring-2026", "user": i}
        out.append([json.dumps(envelope).encode(), make_message(i, size, SENDER, rcpt)])
    return out


def config(workdir: str) -> Config:
    return config_mod.from_dict({
        "ingest": "inproc://ingest", "events": "inproc://events",
        "events_log": os.path.join(workdir, "events.jsonl"),
        "spool": os.path.join(workdir, "spool"), "run_dir": workdir,
        "ips": [{"address": "127.0.0.2"}], "statsd": {"enabled": False}})


class Setup:
    """A fresh spool, events publisher and ingest socket pair in `workdir`."""

    def __init__(self, workdir: str) -> None:
        self.cfg = config(workdir)
        self.ctx = zmq.Context()
        self.pull = self.ctx.socket(zmq.PULL)
        self.pull.setsockopt(zmq.RCVHWM, 0)
        self.pull.bind(self.cfg.ingest)
        self.push = self.ctx.socket(zmq.PUSH)
        self.push.setsockopt(zmq.SNDHWM, 0)
        self.push.connect(self.cfg.ingest)
        self.pub = self.ctx.socket(zmq.PUB)
        self.pub.bind(self.cfg.events)
        self.events = EventPublisher(self.pub, self.cfg.events_log)
        self.spool = Spool(self.cfg.spool)
        self.intake = Intake(self.pull, self.cfg, self.spool, self.events.publish,
                             Metrics(None, "127.0.0.2"))

    def close(self) -> None:
        self.spool.close()
        self.events.close()
        self.ctx.destroy(linger=0)


def cpu_per_job(count: int, work: Callable[[], None]) -> float:
    started = time.process_time()
    work()
    return (time.process_time() - started) / count * 1e6


def take_all(setup: Setup, jobs: list[list[bytes]], room: int) -> Callable[[], None]:
    for job_frames in jobs:
        setup.push.send_multipart(job_frames)

    def work() -> None:
        taken = 0
        while taken < len(jobs):
            taken += len(setup.intake.take(room))
    return work


def parse_all(jobs: list[list[bytes]], cfg: Config) -> Callable[[], None]:
    limits = cfg.limits

    def work() -> None:
        for job_frames in jobs:
            parse_job(job_frames, limits.max_message_size, limits.max_recipients,
                      long_lines=limits.long_lines)
    return work


def spool_all(setup: Setup, parsed: list[Job]) -> Callable[[], None]:
    def work() -> None:
        now = time.time()
        for i in range(0, len(parsed), 128):
            setup.spool.accept(parsed[i:i + 128], now, setup.cfg.retry.max_age)
    return work


def queued_all(setup: Setup, parsed: list[Job]) -> Callable[[], None]:
    def work() -> None:
        for job in parsed:
            setup.events.publish(events.queued(job))
    return work


def measure(name: str, runs: int, count: int,
            prepare: Callable[[Setup], Callable[[], None]]) -> float:
    """Median CPU µs per job of `runs` runs, each in a new folder (a new spool)."""
    figures = []
    for _ in range(runs):
        workdir = tempfile.mkdtemp(prefix="mailengine-intake-cost-")
        setup = Setup(workdir)
        try:
            figures.append(cpu_per_job(count, prepare(setup)))
        finally:
            setup.close()
            shutil.rmtree(workdir, ignore_errors=True)
    median = statistics.median(figures)
    print(f"{name:<44} {median:6.1f} µs a job, least {min(figures):5.1f}  (runs: "
          f"{', '.join(f'{f:.1f}' for f in figures)})", flush=True)
    return median


def profile(jobs: list[list[bytes]]) -> None:
    workdir = tempfile.mkdtemp(prefix="mailengine-intake-cost-")
    setup = Setup(workdir)
    try:
        work = take_all(setup, jobs, 1)
        profiler = cProfile.Profile()
        profiler.runcall(work)
    finally:
        setup.close()
        shutil.rmtree(workdir, ignore_errors=True)
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(25)
    print(out.getvalue())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.intake_cost", description=__doc__)
    parser.add_argument("--jobs", type=int, default=20000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--size", type=int, default=5000, help="message bytes")
    parser.add_argument("--meta", action="store_true", help="a meta in each envelope")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args(argv)
    jobs = frames(args.jobs, args.size, args.meta)
    print(f"{args.jobs} jobs of {len(jobs[0][1])} bytes{', with meta' if args.meta else ''},"
          f" median of {args.runs} runs, CPU time of this process", flush=True)
    for label, room in BATCHES.items():
        measure(f"Intake.take, {label}", args.runs, args.jobs,
                lambda setup, room=room: take_all(setup, jobs, room))
    cfg = config(tempfile.gettempdir())
    measure("  parse_job", args.runs, args.jobs, lambda setup: parse_all(jobs, cfg))
    limits = cfg.limits
    parsed = [parse_job(f, limits.max_message_size, limits.max_recipients) for f in jobs]
    measure("  Spool.accept, 128 a batch", args.runs, args.jobs,
            lambda setup: spool_all(setup, parsed))
    measure("  queued events", args.runs, args.jobs, lambda setup: queued_all(setup, parsed))
    if args.profile:
        profile(jobs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
