"""A burst's first deliveries: from the push to the 1st and the 250th `delivered` (issue #19,
item 5).

`python -m bench.burst [--count 10000] [--bursts 3] [--label now] [--docs]`

The whole engine (`mailengine run`: supervisor, durable spool, one worker, events log) and
Postfix's `smtp-sink` on loopback, the engine's defaults otherwise. One message goes through
first (the worker has met the host: a connection is open), then, after a second with the
ingest socket idle, a producer pushes `count` 5 KB jobs at once; when all are final, the
next burst, after another idle second. Times are from the producer's first send (wall clock)
to each event's `ts` (the engine's clock on the same machine, in milliseconds): the first
`queued`, the first `delivered`, the 250th `delivered`, the last one; and how long the push
itself took (the producer hands 10,000 jobs to ZeroMQ).

Bounded: about 5 s per burst of 10,000. `--docs` writes the figures into
docs/PERFORMANCE.md ("A burst's first deliveries" section, one row per `--label`, kept across
runs in bench/results/burst.json).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time
from typing import Any

from bench.common import (
    ROOT,
    PostfixSink,
    Producer,
    Rows,
    cpu_seconds,
    engine_config,
    engine_pids,
    job,
    log,
    running_engine,
    shown_command,
)

NTH = 250  # the target's count: the first 250 delivered
IDLE = 1.0  # seconds the ingest socket is idle before each burst
RESULTS = os.path.join(ROOT, "bench", "results", "burst.json")
DOC = os.path.join(ROOT, "docs", "PERFORMANCE.md")
HEADING = "## A burst's first deliveries"


def one_burst(producer: Producer, tag: str, count: int, pids: dict[str, int]
              ) -> dict[str, Any]:
    """Push `count` jobs at once; the burst's times (ms from the first send), and the CPU
    time each process of `pids` (the supervisor, the worker, smtp-sink, this producer) spent
    per job from the push until all were final: on 2 cores, what the burst's first 250 need
    of them all together bounds how soon they can be delivered. The frames are made first:
    the push is ZeroMQ's sends alone (on 2 cores the producer's CPU is taken from the
    engine's)."""
    jobs = [job(i, tag) for i in range(count)]
    for envelope, message in jobs:  # as Producer.send, but for the send itself
        producer.frames[envelope["id"]] = [json.dumps(envelope).encode(), message]
        producer.unqueued.add(envelope["id"])
    frames = [producer.frames[envelope["id"]] for envelope, _ in jobs]
    cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    started = time.time()
    for job_frames in frames:
        producer.push.send_multipart(job_frames)
    pushed = time.time()
    producer.sent_at.update(dict.fromkeys(producer.unqueued, started))
    producer.wait_queued(timeout=120)
    producer.wait_final([envelope["id"] for envelope, _ in jobs], timeout=120, poll=0.05)
    cpu_us = {name: round((cpu_seconds(pid) - cpu_before[name]) / count * 1e6, 1)
              for name, pid in pids.items()}
    mine = {i: e for i, e in producer.final.items() if i.startswith(tag + "-")}
    delivered = sorted(e["ts"] for e in mine.values() if e["event"] == "delivered")
    queued_at = {i: e["ts"] for i, e in producer.queued.items() if i.startswith(tag + "-")}
    queued = min(queued_at.values())
    # When the worker had each reply: its `queued` (the commit) plus the event's delay_ms
    # (from acceptance to the final reply); the event's own `ts` is when the supervisor
    # recorded it, so the two apart are the time the result waited to be recorded.
    replied = sorted(queued_at[i] + e["delay_ms"] / 1000 for i, e in mine.items()
                     if e["event"] == "delivered")
    if len(delivered) < NTH:
        raise RuntimeError(f"{tag}: only {len(delivered)} delivered")

    def ms(ts: float) -> float:
        return round((ts - started) * 1000, 1)
    return {"push_ms": ms(pushed), "first_queued_ms": ms(queued),
            "first_delivered_ms": ms(delivered[0]), "nth_delivered_ms": ms(delivered[NTH - 1]),
            "nth_replied_ms": ms(replied[NTH - 1]),
            "last_delivered_ms": ms(delivered[-1]), "delivered": len(delivered),
            "supervisor_cpu_us": cpu_us["supervisor"], "cpu_us": cpu_us,
            "all_cpu_us": round(sum(cpu_us.values()), 1)}


def run(workdir: str, count: int, bursts: int) -> dict[str, Any]:
    log(f"burst: {bursts} bursts of {count} jobs, smtp-sink on loopback")
    with PostfixSink() as sink, \
            running_engine(workdir, sink.port, engine_config(sink.port, {})) as engine:
        producer = Producer(engine)
        producer.send(*job(0, "warm"))
        producer.wait_final(["warm-0"], 30)
        pids = {**engine_pids(engine), "smtp-sink": sink.proc.pid, "producer": os.getpid()}
        rows = []
        for n in range(bursts):
            time.sleep(IDLE)
            rows.append(one_burst(producer, f"burst{n}", count, pids))
            log(f"burst {n}: {rows[-1]}")
        producer.close()
    return {"count": count, "bursts": rows}


def _median(rows: list[dict[str, float]], key: str) -> float:
    values = sorted(r[key] for r in rows)
    return values[len(values) // 2]


def _cell(rows: list[dict[str, float]], key: str) -> str:
    each = ", ".join(f"{row[key]:.0f}" for row in rows)
    return f"{_median(rows, key):.0f} ms ({each})"


def _optional_cell(rows: list[dict[str, float]], key: str) -> str:
    """`_cell` for a figure the older rows lack."""
    return _cell(rows, key) if all(key in row for row in rows) else "-"


def _cpu_cell(rows: list[dict[str, Any]], key: str) -> str:
    """Microseconds of CPU a job (`key` a row's figure, or a process's in its `cpu_us`);
    "-" for the rows from before it was recorded."""
    values = [row.get(key, row.get("cpu_us", {}).get(key)) for row in rows]
    if any(value is None for value in values):
        return "-"
    each = ", ".join(f"{value:.0f}" for value in values)
    return f"{sorted(values)[len(values) // 2]:.0f} µs ({each})"


def _worker(rows: list[dict[str, Any]]) -> str:
    """The (one) worker's key in the rows' `cpu_us`."""
    names = [name for name in rows[0].get("cpu_us", {}) if name.startswith("worker")]
    return names[0] if names else "worker"


def render(results: dict[str, Any]) -> str:
    lines = [HEADING, "", '<a id="bench-burst"></a>', "",
             "Issue #19 item 5, `bench/burst.py`: the whole engine and Postfix's `smtp-sink`"
             " on loopback, the engine's defaults; one message first (a connection is open),"
             " then, after a second with the ingest socket idle, 10,000 5 KB jobs pushed at"
             " once, five bursts a run. Milliseconds from the producer's first send to the"
             " events' `ts`; each cell is the median of the run's bursts, every burst's figure"
             " in brackets. Target: the 250th `delivered` within 50 ms. *Supervisor CPU*: the"
             " supervisor process's CPU time (/proc) from the push until the burst's last"
             " final event, per job (intake, hand-out and results; recorded since the"
             " `intake-cpu` rows). *Reply at the worker*: when the worker had the reply (the"
             " job's `queued` plus the event's `delay_ms`), the event's `ts` being when the"
             " supervisor recorded it (recorded since the `quiet` rows). *Worker CPU* and"
             " *all four*: the same for the worker, and for the supervisor, the worker,"
             " smtp-sink and the producer together (the scheduler's nanoseconds of every"
             " thread; recorded since the `cpu` rows): 250 jobs need 250 times that of the"
             " machine's 2 cores.", "",
             "| run | command | engine | date | push took | first `queued` | first `delivered`"
             f" | {NTH}th `delivered` | {NTH}th reply at the worker | last `delivered`"
             " | supervisor CPU a job | worker CPU a job | all four's CPU a job | other load |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, r in results.items():
        rows = r["bursts"]
        command = shown_command(r["command"])
        lines.append(f"| {label} | `{command}` | `{r['engine']}` | {r['date']} |"
                     f" {_cell(rows, 'push_ms')} | {_cell(rows, 'first_queued_ms')} |"
                     f" {_cell(rows, 'first_delivered_ms')} | {_cell(rows, 'nth_delivered_ms')} |"
                     f" {_optional_cell(rows, 'nth_replied_ms')} |"
                     f" {_cell(rows, 'last_delivered_ms')} |"
                     f" {_cpu_cell(rows, 'supervisor_cpu_us')} |"
                     f" {_cpu_cell(rows, _worker(rows))} | {_cpu_cell(rows, 'all_cpu_us')} |"
                     f" {100 * r.get('other_load', float('nan')):.0f}% |")
    lines += ["", PROSE]
    return "\n".join(lines) + "\n"


PROSE = """\
*Before* (`before`: main at 83d9656, from a `git archive` of it): traced with timestamps in
the supervisor (not committed, a first run whose producer made each job's frames as it
pushed), it woke at the burst's first job and read what had come by then (1 job, then 84),
then 589 jobs, then 1,000 at a time, each batch committed whole before any of it was handed
out and before any result was recorded in between: 70-165 ms a read, at ~85-100 us of the
supervisor's CPU a 5 KB job (parsing ~45 us, the spool's insert ~25 us). With the frames made
before the push (the rows here), more of the burst is waiting at the first reads, and the
first `delivered` waits for their commits: 7-149 ms, medians 73 and 108 ms.

*What changed* (engine/intake.py, `Ramp`): a read takes 32 jobs after the socket was found
empty, and twice as many at each read while the burst lasts: up to 128 while the workers
have room (a supervisor turn of ~10 ms, results recorded between turns), up to 1,000 once they
are full (what is read then waits in memory anyway, and a large batch saves commits). Each
batch is committed before its `queued` and its hand-out, as before.
tests/conversation/test_intake_burst.py pushes 300 jobs that all wait in the socket: the first
32 are handed out while the other 268 are not committed (with the old single drain, all 300
were); tests/engine/test_crash_points.py strikes the whole engine right after a commit in a
burst: every job announced is in the spool, the struck batch is there unannounced, the first
job was handed out, the burst's last job not committed.

*After* (`after`): the first `delivered` within 9-75 ms, medians 14 and 15 ms. **The 250th
is not within 50 ms** on this machine: 239-652 ms (medians 319 and 338 ms) against 230-641 ms
(297 and 566) before, no difference these runs can show (23-55% other load): the target is
not met. Traced as above: the supervisor hands out 225 jobs by ~60 ms and 480 by ~100 ms, but
the results come back slowly, because for the first few hundred milliseconds four busy
processes share the 2 cores: the producer handing 10,000 jobs to ZeroMQ (the push column),
the supervisor (~85-100 us a job at intake, ~40 us a result), the worker (~150 us a message)
and smtp-sink, besides other agents' work (other load). 250 messages need ~35 ms of the
supervisor's CPU and ~40 ms of the worker's, more than 50 ms of work for the core or so left
to them. What would get there: less CPU a job at intake (job parsing, the spool's insert:
engine/job.py, engine/spool.py, not changed here), and a producer on other cores.

*Cost:* reads of at most 128 while the workers have room cost the supervisor ~3% more CPU a
job than reads of 1,000 (inproc ingest, 5 KB jobs, this machine: ~88 us a job at 128, ~85 us
at 1,000, ~98 us at 32), and one commit (an fsync) per 128 jobs: 32 would have capped intake
near 3,200 jobs/s on a disk whose fsync takes 10 ms, while the workers, starving, kept room.

*Less CPU a job at intake* (session 4, branch `intake-cpu`; the rows `before, main 34a0f87`
to `after again, intake-cpu`, each `before` run followed by an `after` run). Profiled first,
in process, with `python -m bench.intake_cost` (bench/intake_cost.py: 20,000 5 KB jobs
through the real `Intake.take`, spool and events; this process's CPU time per job; rounds of
`before` and `after` interleaved, each the median of three runs, a load average of 1.3-4.3
from other agents): at main ~60-86 us a job in reads of 128, parsing 26-39 us, the spool's
insert 23-28 us, the `queued` events 3-6 us. py-spy over it: the spool's commit 28% (SQLite
writing the WAL frames, the fsync), `normalise_message`'s three `bytes.count` 15%, the jobs'
insert 8%, the envelope's checks and the Job's construction most of the rest. What changed:
the CRLF check is two regex scans for a bare CR and a bare LF (the three counts looked at
every byte three times: ~10 -> ~8 us a 5 KB message on this pyenv Python, 25-31 -> 12-17 us
on Debian's under load, whose `bytes.count` is slower); the meta's JSON text is made once
per job, by its check, and reused by the `queued` event and the spool's envelope
(`Job.meta_json`); `parse_job` fills the Job at once instead of the frozen dataclass's
twelve `object.__setattr__`. Every job is still checked as before, committed (fsynced)
before its `queued`, and de-duplicated. (On the way, a regression fixed: the spool's
hand-formatted envelope left out `requiretls` and `dkim_domain`, so a job read back from the
spool, a retry or after a restart, went without REQUIRETLS.) *Measured*, medians of the
rounds' medians: without a meta (five rounds), parsing 34 -> 27 us a job, the whole take in
reads of 128 76 -> 70 us and of 1,000 72 -> 68 us, the spool's insert unchanged (27 and 28):
parsing a fifth less, intake within the noise (round by round: 86, 78, 61, 60, 76 before;
70, 56, 75, 72, 70 after). With a `meta` in each envelope (`--meta`, two rounds): the take
in reads of 128 90 and 80 -> 66 and 57 us, of 1,000 87 and 81 -> 59 and 62 us (parsing 36
and 33 -> 31 and 24, the spool 29 and 27 -> 25 and 24): about a quarter less. In the bursts,
the supervisor's CPU per job over the whole path (intake, hand-out, results) was 177 and 191
us (medians) before and 143 and 189 after: no difference these runs can show (it depends on
more than intake: likely, a run with less other load, as `after again`, records its results
in smaller groups, more commits a job; not measured).

**The 250th `delivered` is still not within 50 ms:** 308-1202 ms before, 142-1175 ms after
(35-73% other load). What remains is not intake alone: 250 deliveries cost the supervisor
~15 ms at intake (~60 us a job) and ~10 ms of results (~40 us each), the worker ~40 ms (~150
us a message), besides the producer's push and smtp-sink, on 2 cores that other agents kept
35-73% busy. Per result, the meta's text now travels with the hand-out
(`InFlight.meta_json`) instead of being encoded again for each delivery event:
`events.attempt_event` 5.2-5.3 -> 3.2-3.5 us with a two-field meta (timeit, this machine;
after the burst rows, whose jobs have no meta). Next at intake: SQLite's insert and commit
(~25 us a 5 KB job: the job's row and five index entries, its 16 KiB pages written to the
WAL) would need a different layout of the spool.

**Session 5: where the 250th's time goes, and the floor** (the rows from `quiet, main
fb43a69` on). On a quiet machine (1% other load) the 250th `delivered` came at 201-456 ms
(median 303): no better than under load. The new column splits it: in the `reply column`
run (50% other load) the worker had the 250th reply at 195-468 ms and the supervisor
recorded it 10-150 ms later, the results waiting behind the intake reads of the rest of the
burst (up to 1,000 jobs a read, ~70-100 ms each, once the worker is full). Traced by hand
on the quiet machine (each job's `queued` and its event's `delay_ms`), the burst's 250th job
was committed and announced at 75-164 ms: taking in the first 250 alone already exceeds
the target while the producer pushes the other 9,750 onto the same two cores. **The
floor** (`the floor: a burst of 250`, `--count 250`: nothing else to take in, 1% other
load): the 250th `delivered` at 123-143 ms (median 128), the worker's 250th reply at 100-146
ms; by hand, all 250 `queued` by 24-54 ms. That is the worker's own pace from a standing
start (one connection open, the others opened as the burst needs them; the same with slow
start off, 76-98 ms to the 250th reply by hand), against smtp-sink on the other core: ~70-100
ms for 250 deliveries with nothing else to do, more than the 50 ms the target allows for
everything. The best loopback figure of one worker at full speed (6,320 messages/s, 4
sessions already open: [Throughput on loopback](#bench-loopback)) would still take 40 ms for
250, leaving 10 ms for intake, hand-out and recording. So no change to intake or dispatch
meets the target on this 2-core machine: the first job goes out 2-9 ms after the push and
the first `delivered` comes at 9-36 ms (the issue's point: no worker idle while the first
batch commits), but the 250th needs more messages a second from one worker, or a machine
with a core each for the producer, the supervisor, the worker and the receiver.

**Session 6: the CPU budget** (the `cpu` rows, 0-1% other load). The CPU each process spends
per job, now measured for all four (the scheduler's nanoseconds of every thread; the clock
ticks of /proc, 10 ms, were a quarter of what 250 jobs cost). A burst of 250 alone: the
supervisor 208 us a job, the worker 315, smtp-sink 56, the producer 35: **586 us a job
(521-729), 147 ms of CPU (130-182) for the 250, where 2 cores give 100 ms in 50 ms**. In the
bursts of 10,000: 517 us a job (493-543), 129 ms for the first 250 alone, while the producer
pushes and the supervisor takes in the other 9,750 on the same cores. So no order of the
work meets the target on this machine. Nor would cores alone: the supervisor is one thread,
and its share, 172-208 us a job, is 43-52 ms for 250 (py-spy on it during bursts: recording
results 39% of its time, SQLite's update of the recipients, the finished job's delete and
the outbox; taking jobs in 38%; the commits, `Spool._write`, 16% of the whole): with a core
for each process it would also need its work per job cut by a third or so. Found on the way
(py-spy on the worker during the same bursts): reading `TLS-Required: No` scanned each
message's body to its end for every task (3% of the worker's CPU); it now stops at the
header block (engine/protocol.py, 7.3 -> 1.7 us a 5 KB message).

*Commands:* `python -m bench.burst --label NAME` in a tree (`--docs` writes this section,
`--render-only` rewrites it from bench/results/burst.json); the `before` rows from a
snapshot of main: `git archive 83d9656 engine conf bin | tar -x -C SNAP; cd SNAP;
BENCH_ENGINE_REV=83d965627b6b PYTHONPATH=SNAP:REPO python -m bench.burst --bursts 5` (34a0f87
for session 4's rows), each `before` run followed by an `after` run; `bench.intake_cost`
the same way (`PYTHONPATH=SNAP:REPO python -m bench.intake_cost --runs 3`); the floor:
`python -m bench.burst --count 250 --bursts 5 --label NAME`. *Other load* is
the share of the machine's cores other processes kept busy during the run.
"""


ROWS = Rows("python -m bench.burst", RESULTS, DOC, HEADING, render)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=ROWS.prog, description=__doc__)
    parser.add_argument("--count", type=int, default=10000)
    parser.add_argument("--bursts", type=int, default=3)
    return ROWS.main(parser, argv, lambda args: functools.partial(
        run, tempfile.mkdtemp(prefix="mailengine-burst-"), args.count, args.bursts))


if __name__ == "__main__":
    sys.exit(main())
