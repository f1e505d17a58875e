"""What the outbox and the hand-out marks cost the supervisor's spool (issue #14).

Each final result now writes its event's text into the spool with its outcome (engine.outbox),
and each hand-out writes a mark before the task leaves (`Spool.mark_handed_out`, a transaction
without fsync). This measures the spool's side of one message, as the supervisor does it under
load, with and without them, side by side in one run: for each round, accept a batch of 5 KB
jobs, hand them out (marked, or not), record their deliveries in groups of RESULTS_GROUP (with
their final events, or without), and every so often confirm the outbox (the events log fsynced,
the rows deleted). The two variants alternate round by round, so that what the machine does
meanwhile hits both alike; CPU time (user + system) per message is the figure that depends
least on it, wall time includes the fsyncs.

    python3 -m bench.outbox_cost              # ~1 min
    python3 -m bench.outbox_cost --docs       # and write the section of docs/PERFORMANCE.md
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import tempfile
import time
from typing import Any

from bench.common import log, machine, write_section
from engine import events
from engine.events import EventPublisher
from engine.job import Job
from engine.metrics import Metrics
from engine.outbox import Outbox
from engine.protocol import Attempt, Status
from engine.reply import Reply
from engine.spool import RcptUpdate, Spool

DOCS = os.path.join(os.path.dirname(__file__), "..", "docs", "PERFORMANCE.md")
SECTION = "## What the outbox and the hand-out marks cost"
BATCH = 500  # jobs accepted per intake batch
GROUP = 100  # results per commit (the supervisor's group commit under load)
ROUNDS = 60  # per variant
MESSAGE = b"Subject: outbox cost\r\n\r\n" + b"x" * 4900 + b"\r\n"
OK = Reply(250, "2.0.0", "Ok: queued as 4ABCDEF")


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _event(job: Job, now: float) -> events.Event:
    attempt = Attempt(job_id=job.id, rcpt=job.rcpts[0], status=Status.DELIVERED, reply=OK,
                      ip="127.0.0.2", provider="example.test", mx="mx.example.test", ts=now,
                      tls="TLSv1.3", conn_reused=True)
    return events.attempt_event(attempt, Status.DELIVERED, {"campaign": "c-17"}, 1, now - 0.5)


def one_round(spool: Spool, box: Outbox | None, publisher: EventPublisher, tag: str
              ) -> tuple[float, float]:
    """One batch through the spool; (CPU seconds, wall seconds) it took."""
    now = time.time()
    jobs = [Job(id=f"{tag}-{i}", sender="s@example.test", rcpts=(f"r{i}@example.test",),
                message=MESSAGE) for i in range(BATCH)]
    cpu, wall = _cpu(), time.perf_counter()
    spool.accept(jobs, now, 86400.0)
    outboxed = box is not None
    for start in range(0, BATCH, GROUP):
        group = jobs[start:start + GROUP]
        if outboxed:
            spool.mark_handed_out([j.id for j in group])
        finals = [_event(j, now) for j in group]
        spool.record([RcptUpdate(j.id, j.rcpts[0], Status.DELIVERED, reply=OK) for j in group],
                     now, finals if outboxed else ())
        for event in finals:
            publisher.publish(event)
    if box is not None:
        box.confirm()
    else:
        publisher.sync()
    return _cpu() - cpu, time.perf_counter() - wall


def measure(rounds: int) -> dict[str, Any]:
    workdir = tempfile.mkdtemp(prefix="mailengine-outbox-cost-")
    try:
        samples: dict[str, list[tuple[float, float]]] = {"without": [], "with": []}
        spools = {name: Spool(os.path.join(workdir, name)) for name in samples}
        publishers = {name: EventPublisher(None, os.path.join(workdir, f"{name}.jsonl"))
                      for name in samples}
        boxes = {"without": None,
                 "with": Outbox(spools["with"], publishers["with"], Metrics(None, "supervisor"))}
        for r in range(rounds + 1):  # the first round of each warms up, not counted
            for name in (("with", "without") if r % 2 else ("without", "with")):
                taken = one_round(spools[name], boxes[name], publishers[name], f"r{r}")
                if r:
                    samples[name].append(taken)
        for spool in spools.values():
            spool.close()
        for publisher in publishers.values():
            publisher.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    out: dict[str, Any] = {}
    for name, taken in samples.items():
        out[name] = {"cpu_us": statistics.median(c for c, _ in taken) / BATCH * 1e6,
                     "wall_us": statistics.median(w for _, w in taken) / BATCH * 1e6}
    return out


def render(result: dict[str, Any], info: dict[str, Any], command: str) -> str:
    without, with_ = result["without"], result["with"]
    rows = [(name, figures) for name, figures in (("without (before issue #14's last step)",
                                                    without),
                                                   ("with the outbox and the marks", with_))]
    table = "\n".join(f"| {name} | {f['cpu_us']:.0f} | {f['wall_us']:.0f} |" for name, f in rows)
    return f"""{SECTION}

*Command:* `{command}` · *date:* {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} ·
*machine:* {info['cpu']}, Python {info['python']}

The spool's side of one 5 KB message in the supervisor (accepted in batches of {BATCH}, its
delivery recorded in groups of {GROUP}, the events log synced once a batch), without and with
the outbox (the final event's text in the recording transaction, the rows deleted at the
confirm) and the hand-out mark (a transaction without fsync per group handed out), the two
variants alternating round by round, median of {ROUNDS} rounds each
([bench/outbox_cost.py](../bench/outbox_cost.py)):

| spool work per message | CPU µs | wall µs (fsyncs included) |
|---|---|---|
{table}

The outbox and the marks cost {with_['cpu_us'] - without['cpu_us']:.0f} µs of CPU per message
({100 * (with_['cpu_us'] / without['cpu_us'] - 1):+.0f}% of the spool's share), to be read against
the supervisor's whole CPU per message in the loopback table above (the spool's work is a part
of it)."""


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.outbox_cost",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--docs", action="store_true", help="write docs/PERFORMANCE.md's section")
    args = parser.parse_args()
    command = "python3 -m bench.outbox_cost" + (" --docs" if args.docs else "")
    result = measure(args.rounds)
    for name, figures in result.items():
        log(f"{name}: {figures['cpu_us']:.0f} µs CPU, {figures['wall_us']:.0f} µs wall per message")
    if args.docs:
        write_section(DOCS, SECTION, render(result, machine(), command))
        log("wrote docs/PERFORMANCE.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
