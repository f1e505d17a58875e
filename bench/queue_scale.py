"""Cost as the queue grows: fresh mail with N recipients waiting (issue #19, item 1).

`python -m bench.queue_scale [--max-n 1000000] [--window 100000] [--docs]`

For each N (0, 10k, 100k, 1M, up to `--max-n`), with the engine stopped, the spool is
filled up to N waiting recipients **directly through engine/spool.py** (`Spool.accept`
then `Spool.record` of a 451 deferral, in transactions of FILL_CHUNK jobs), not through
ZeroMQ, which would take most of the run at 1M: the rows are those of real deferrals
(one attempt counted, the 451 reply kept). One recipient per job, over DOMAINS domains
(`d<k>.wait.test`) routed to a receiver on 127.0.0.5 that answers 451 to every recipient;
each one's next attempt spread evenly over the coming WAIT_SPAN hours, as deferrals made
over the last hours are, so none is due while the fresh mail is measured. The spool grows
from one N to the next (the fresh mail of the previous N has left it).

Then, at each N:

1. **Restart**: a producer sends one fresh job to the stopped engine's ingest (ZeroMQ
   keeps it until the socket is bound), the spool's files are dropped from the page cache
   (as after a reboot), `mailengine run` starts; the time from the start to the supervisor
   answering with its workers ready, and to that job's `delivered`.
2. **Burst**: FRESH_BURST 5 KB jobs to `fresh.test` (Postfix's smtp-sink on 127.0.0.1)
   sent at once: intake rate (first send to last `queued`), delivery rate (first send to
   last `delivered`); BURSTS times, the median kept.
3. **Paced**: PACED_RATE jobs/s for PACED_SECONDS: delivery time p50/p99 (the events'
   `delay_ms`, queued to the final reply) and the intake latency of each job (send to its
   `queued` event): its maximum bounds any stall of intake (a WAL checkpoint, a count).
4. The supervisor's and the worker's RSS (and the supervisor's peak), the spool's file
   size (database + WAL), and the time of `mailengine status` and `mailengine queue`
   (the command, Python's start included, and the control request alone).

`--window K` adds a row at the largest N: K of the waiting recipients become due together
(a provider's deferral window ending), a few seconds after the start, while the paced fresh
mail flows: the fresh mail's p50/p99 then, and how fast the K went out (their attempts per
second, from their `deferred` events: a herd or a spread).

Loopback only; bounded (each phase has a deadline; about 10 minutes with `--max-n
1000000` on 2 cores, most of it filling the spool). Writes bench/results/queue_scale.json;
`--docs` writes docs/PERFORMANCE.md ("Cost as the queue grows") and docs/img/queue-scale.svg
(drawn by hand: the engine's Python may have no matplotlib). `--render-only` rewrites them
from the JSON.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import Any

from bench.common import (
    ROOT,
    SENDER,
    PostfixSink,
    Producer,
    cpu_now,
    log,
    machine,
    other_load,
    percentile,
    write_section,
)
from engine import controlclient
from engine.job import Job
from engine.protocol import Status
from engine.reply import Reply
from engine.spool import RcptUpdate, Spool
from engine.spoolfile import WAL_CHECKPOINT_BYTES
from engine.testing.harness import LocalEngine, make_message
from engine.testing.sink import SinkServer

LEVELS = (0, 10_000, 100_000, 1_000_000)
DOMAINS = 10_000
WAIT_SPAN = 4 * 3600.0  # next attempts spread over the coming hours
WAIT_FIRST = 600.0  # the earliest next attempt, seconds after the fill
WAIT_SIZE = 1000  # bytes of each waiting message (the spool holds them all)
FRESH_SIZE = 5000
FRESH_DOMAIN = "fresh.test"
FRESH_BURST = 3000
BURSTS = 5  # bursts per level: the median is shown (the machine is shared)
PROFILE_SECONDS = 10  # py-spy on the supervisor from the first burst (`--profile`)
# The supervisor's functions whose share of its CPU samples `--profile` keeps.
PROFILED = ("Results.flush", "Intake.take", "Dispatcher.dispatch_due", "Supervisor.tick",
            "Supervisor._housekeeping", "Spool.stats", "Spool.due", "Spool.accept",
            "Spool.record")
PACED_RATE = 200.0
PACED_SECONDS = 15.0
LOAD_APART = 0.10  # other load this far apart (share of the cores): a comparison says little
STALL_MS = 100.0  # an intake wait longer than this is a stall (issue #19's bound)
# Fresh mail is starved by a window ending if its p99 is over twice the empty spool's and
# this much above it: with an empty spool's p99 of a few ms, twice it is within the figures'
# resolution (whole milliseconds) and the supervisor's turn (~10 ms), not a starvation.
STARVED_ABOVE_MS = 50.0
PACED_WAIT = 60.0  # seconds after the last paced send for the rest to be delivered
START_WAIT = 60.0  # seconds after the start for the job sent before it
FILL_CHUNK = 10_000  # jobs per transaction of the fill
DEFER_HOST = "127.0.0.5"
WINDOW_LEAD = 30.0  # seconds from writing the window's next attempts to their moment
WINDOW_INTO_PACED = 3.0  # the window ends this long after the paced fresh mail starts
DEFERRAL = Reply(451, "4.3.0", "try later")
DELIVERED = Reply(250, "2.0.0", "ok")
MAX_AGE = 5 * 86400.0
RESULTS = os.path.join(ROOT, "bench", "results", "queue_scale.json")
# The window row before and after first attempts went before retries (`limits.retry_share`):
# {"command", "date", "before": row, "after": row}, written by hand from two runs.
WINDOW_FIX = os.path.join(ROOT, "bench", "results", "queue_scale_window.json")
# The spool's counts kept rather than counted (`Spool.stats`) and the queue summary's read:
# {"command", "before_commit", "before_date", "after_commit", "date", "before": rows,
# "after": rows}, the rows of two runs of the same command, written by hand.
COUNTS_FIX = os.path.join(ROOT, "bench", "results", "queue_scale_counts.json")
CHECKPOINTS = 3  # WAL checkpoints timed per level (`checkpoint_costs`)
CHECKPOINT_BATCH = 64  # fresh jobs per commit while they are timed
DOC = os.path.join(ROOT, "docs", "PERFORMANCE.md")
IMG = os.path.join(ROOT, "docs", "img", "queue-scale.svg")
HEADING = "## Cost as the queue grows"


# -- pure helpers (tests/unit/test_bench_queue_scale.py) ------------------------------------


def waiting_rcpt(index: int, domains: int = DOMAINS) -> tuple[str, str]:
    """The job id and the recipient of waiting recipient `index`: domains in turn."""
    return f"wait-{index}", f"defer{index}@d{index % domains}.wait.test"


def spread(index: int, count: int, now: float, first: float = WAIT_FIRST,
           span: float = WAIT_SPAN) -> float:
    """The next attempt of waiting recipient `index` of `count`: evenly over
    [now + first, now + first + span), in an order that is not the domains' (a stride
    coprime with most counts), so each domain's recipients are spread over the span too."""
    if count <= 0:
        raise ValueError("count must be positive")
    slot = (index * 7919) % count
    return now + first + span * slot / count


def rate(count: int, seconds: float) -> float:
    """Per second; nan for an empty or instant interval."""
    return count / seconds if count and seconds > 0 else float("nan")


def stall_starts(times: Sequence[float], gap: float = 1.0) -> list[float]:
    """The starts of the runs of `times` (seconds) closer than `gap` to each other: one
    per stall of intake, for the jobs it held up."""
    starts: list[float] = []
    last = None
    for t in sorted(times):
        if last is None or t - last > gap:
            starts.append(round(t, 2))
        last = t
    return starts


def inclusive_shares(collapsed: Sequence[str], names: Sequence[str]) -> dict[str, float]:
    """From py-spy's raw (collapsed) stacks, "frame;frame;... count" per line, the share
    of the samples each function of `names` was on the stack (0 to 1), and "samples"."""
    total = 0
    counts = dict.fromkeys(names, 0)
    for line in collapsed:
        stack, _, n = line.rstrip().rpartition(" ")
        if not stack or not n.isdigit():
            continue
        total += int(n)
        on_stack = {frame.split(" (")[0] for frame in stack.split(";")}
        for name in names:
            if name in on_stack:
                counts[name] += int(n)
    shares: dict[str, float] = {name: c / total if total else 0.0 for name, c in counts.items()}
    shares["samples"] = total
    return shares


def per_second_peak(times: Sequence[float]) -> tuple[int, float]:
    """The busiest one-second bin of `times` (its count) and the span they cover."""
    if not times:
        return 0, 0.0
    first = min(times)
    bins: dict[int, int] = {}
    for t in times:
        key = int(t - first)
        bins[key] = bins.get(key, 0) + 1
    return max(bins.values()), max(times) - first


# -- filling the spool ------------------------------------------------------------------------


def fill(spool_dir: str, start: int, stop: int, total: int, now: float) -> float:
    """Add waiting recipients start..stop-1 (of `total`, for their spread) to the spool:
    accepted, then deferred once with a 451; seconds it took."""
    message = make_message(0, WAIT_SIZE, SENDER, "defer@d0.wait.test")
    began = time.perf_counter()
    with Spool(spool_dir) as spool:
        for low in range(start, stop, FILL_CHUNK):
            chunk = [waiting_rcpt(i) for i in range(low, min(low + FILL_CHUNK, stop))]
            jobs = [Job(id=job_id, sender=SENDER, rcpts=(rcpt,), message=message)
                    for job_id, rcpt in chunk]
            spool.accept(jobs, now, MAX_AGE)
            spool.record([RcptUpdate(job_id, rcpt, Status.DEFERRED,
                                     next_attempt=spread(low + k, total, now), reply=DEFERRAL)
                          for k, (job_id, rcpt) in enumerate(chunk)], now)
    return time.perf_counter() - began


def make_due(spool_dir: str, count: int, at: float) -> float:
    """Move the next attempt of the first `count` waiting recipients to `at`, all at once
    (a deferral window ending); seconds it took."""
    began = time.perf_counter()
    with Spool(spool_dir) as spool:
        for low in range(0, count, FILL_CHUNK):
            spool.record([RcptUpdate(*waiting_rcpt(i), Status.DEFERRED, next_attempt=at,
                                     reply=DEFERRAL, count_attempt=False)
                          for i in range(low, min(low + FILL_CHUNK, count))], at)
    return time.perf_counter() - began


# -- measuring ----------------------------------------------------------------------------------


def spool_costs(spool_dir: str) -> dict[str, float]:
    """What the supervisor's spool reads cost on this spool, timed alone (the engine
    stopped): the open (its quick_check) with the file out of the page cache, then in it,
    `stats` (each housekeeping turn and each
    `status`), `by_domain` (the queue summary), `due` with nothing due, `latest_now`."""
    def timed(call: Any) -> float:
        began = time.perf_counter()
        call()
        return time.perf_counter() - began

    out: dict[str, float] = {}
    evict(spool_dir)
    out["open_cold_s"] = timed(lambda: Spool(spool_dir).close())
    began = time.perf_counter()
    with Spool(spool_dir) as spool:
        out["open_s"] = time.perf_counter() - began
        now = time.time()
        out["stats_s"] = timed(spool.stats)
        out["by_domain_s"] = timed(lambda: spool.by_domain(100_000))
        out["due_s"] = timed(lambda: spool.due(now, 1000))
        out["latest_now_s"] = timed(spool.latest_now)
        out.update(checkpoint_costs(spool))
    return out


def checkpoint_costs(spool: Spool) -> dict[str, float]:
    """What a WAL checkpoint costs on this spool: intake's and results' commits (batches of
    CHECKPOINT_BATCH fresh 5 KB jobs accepted, then delivered) with the automatic
    checkpoint off, and the checkpoint SQLite would run in a commit (PASSIVE) run by hand,
    timed alone, each time the WAL holds its threshold (engine.spoolfile
    WAL_CHECKPOINT_BYTES), CHECKPOINTS times. The longest checkpoint and the longest commit."""
    conn = spool._conn  # the bench's own reach into the spool's connection
    (auto,) = conn.execute("PRAGMA wal_autocheckpoint").fetchone()
    conn.execute("PRAGMA wal_autocheckpoint = 0")
    message = make_message(0, FRESH_SIZE, SENDER, "ckpt@fresh.test")
    checkpoints: list[float] = []
    commits: list[float] = []
    batch = 0
    tag = time.time_ns()  # ids of their own at each level (the spool dedupes finished ids)

    def commit_batch() -> None:
        nonlocal batch
        jobs = [Job(id=f"ckpt-{tag}-{batch}-{i}", sender=SENDER, rcpts=(f"c{i}@fresh.test",),
                    message=message) for i in range(CHECKPOINT_BATCH)]
        batch += 1
        began = time.perf_counter()
        spool.accept(jobs, time.time(), MAX_AGE)
        commits.append(time.perf_counter() - began)
        began = time.perf_counter()
        spool.record([RcptUpdate(j.id, j.rcpts[0], Status.DELIVERED, reply=DELIVERED)
                      for j in jobs], time.time())
        commits.append(time.perf_counter() - began)

    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        # The WAL restarts from its beginning after a checkpoint (its file keeps its size):
        # how much a batch writes is measured once, from an empty WAL.
        while os.path.getsize(spool.path + "-wal") < WAL_CHECKPOINT_BYTES:
            commit_batch()
        per_checkpoint = batch
        for _ in range(CHECKPOINTS):
            began = time.perf_counter()
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            checkpoints.append(time.perf_counter() - began)
            for _ in range(per_checkpoint):
                commit_batch()
    finally:
        conn.execute(f"PRAGMA wal_autocheckpoint = {auto}")
    return {"checkpoint_max_s": max(checkpoints),
            "checkpoint_median_s": statistics.median(checkpoints),
            "checkpoint_commit_max_s": max(commits)}


def rss_mb(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (the peak) of a process, MB."""
    out: dict[str, float] = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) / 1024
    return out


def evict(spool_dir: str) -> None:
    """Drop the spool's files from the page cache (theirs only: POSIX_FADV_DONTNEED), so
    the next start reads them from the disk, as after a reboot."""
    for name in os.listdir(spool_dir) if os.path.isdir(spool_dir) else ():
        if name.startswith("spool.db"):
            fd = os.open(os.path.join(spool_dir, name), os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def spool_bytes(spool_dir: str) -> int:
    return sum(os.path.getsize(os.path.join(spool_dir, name)) for name in os.listdir(spool_dir)
               if name.startswith("spool.db"))


def fresh_jobs(tag: str, count: int) -> Iterator[tuple[dict[str, Any], bytes]]:
    for i in range(count):
        rcpt = f"user{i}@{FRESH_DOMAIN}"
        yield ({"id": f"{tag}-{i}", "from": SENDER, "to": [rcpt]},
               make_message(i, FRESH_SIZE, SENDER, rcpt))


def timed_cli(engine: LocalEngine, *args: str) -> float:
    """Seconds `mailengine ARGS -c CONFIG` takes, Python's start included."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    began = time.perf_counter()
    subprocess.run([sys.executable, "-m", "engine.cli", *args, "-c", engine.config_path],
                   check=True, stdout=subprocess.DEVNULL, env=env, timeout=120)
    return time.perf_counter() - began


def timed_request(engine: LocalEngine, command: str, tries: int = 3) -> float:
    """The median seconds of the control request alone."""
    spent = []
    for _ in range(tries):
        began = time.perf_counter()
        controlclient.request(str(engine.config["control"]), {"command": command}, 120.0)
        spent.append(time.perf_counter() - began)
    return statistics.median(spent)


class Scale:
    """The receivers, the engine and the spool, kept across the levels."""

    def __init__(self, workdir: str) -> None:
        self.healthy = PostfixSink()
        self.deferring = SinkServer(tls=False, host=DEFER_HOST)
        routes = {FRESH_DOMAIN: f"127.0.0.1:{self.healthy.port}",
                  "*": f"{DEFER_HOST}:{self.deferring.port}"}
        self.engine = LocalEngine(workdir, self.healthy.port, route=None,
                                  extra={"routes": routes, "log_level": "warning",
                                         "smtp": {"tls": "none"}})
        self.spool_dir = str(self.engine.config["spool"])
        self.filled = 0
        self.round = 0
        self.profile = False
        self.profile_path = os.path.join(workdir, "supervisor.raw")

    def close(self) -> None:
        self.engine.cleanup()
        self.healthy.stop()
        self.deferring.stop()

    def level(self, n: int, total: int) -> dict[str, Any]:
        """Fill up to `n`, then measure (see the module's docstring)."""
        row: dict[str, Any] = {"n": n, "fill_s": 0.0}
        if n > self.filled:
            log(f"filling {self.filled}..{n}")
            row["fill_s"] = fill(self.spool_dir, self.filled, n, total, time.time())
            self.filled = n
        load = cpu_now()
        row.update(self.restart())
        producer = Producer(self.engine)
        spy = self.spy() if self.profile else None
        try:
            bursts = [self.burst(producer) for _ in range(BURSTS)]
            if spy is not None:
                row["profile"] = self.spied(spy)
            for key in ("intake_per_s", "delivery_per_s"):
                row[key] = statistics.median(b[key] for b in bursts)
                row[key + "_each"] = [b[key] for b in bursts]
            row.update(self.paced(producer))
        finally:
            producer.close()
        row.update(self.looks())
        row["stop_s"] = self.stop()
        row["other_load"] = other_load(load)
        row.update({f"spool_{key}": value for key, value in spool_costs(self.spool_dir).items()})
        log(f"N={n}: {json.dumps(row)}")
        return row

    def spy(self) -> subprocess.Popen[bytes]:
        """py-spy on the supervisor for PROFILE_SECONDS, its raw stacks to a file."""
        assert self.engine.proc is not None
        return subprocess.Popen(["py-spy", "record", "--pid", str(self.engine.proc.pid),
                                 "--duration", str(PROFILE_SECONDS), "--rate", "200",
                                 "--format", "raw", "--output", self.profile_path,
                                 "--nonblocking"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def spied(self, spy: subprocess.Popen[bytes]) -> dict[str, float]:
        spy.wait(PROFILE_SECONDS + 30)
        with open(self.profile_path, encoding="utf-8", errors="replace") as f:
            return inclusive_shares(f.readlines(), PROFILED)

    def restart(self) -> dict[str, Any]:
        """The start: to ready, and to the delivery of a job sent before it (nan if it
        was not delivered within START_WAIT: `first_delivery_late` says so)."""
        self.round += 1
        producer = Producer(self.engine)
        try:
            first = next(fresh_jobs(f"start{self.round}", 1))
            job_id = first[0]["id"]
            producer.send(*first)
            evict(self.spool_dir)
            began = time.time()
            self.engine.start(timeout=300)
            ready = time.time() - began
            on_time = producer.wait_final([job_id], timeout=START_WAIT, strict=False)
        finally:
            producer.close()
        delivered = producer.final[job_id]["ts"] - began if on_time else float("nan")
        return {"ready_s": ready, "first_delivery_s": delivered,
                "first_delivery_late": not on_time}

    def burst(self, producer: Producer) -> dict[str, Any]:
        self.round += 1
        jobs = list(fresh_jobs(f"burst{self.round}", FRESH_BURST))
        began = time.time()
        for envelope, message in jobs:
            producer.send(envelope, message)
        producer.wait_queued(timeout=180)
        producer.wait_final([e["id"] for e, _ in jobs], timeout=180, poll=0.02)
        queued = max(producer.queued[e["id"]]["ts"] for e, _ in jobs)
        done = max(producer.final[e["id"]]["ts"] for e, _ in jobs)
        return {"intake_per_s": rate(len(jobs), queued - began),
                "delivery_per_s": rate(len(jobs), done - began)}

    def paced(self, producer: Producer) -> dict[str, Any]:
        """Delivery time of paced fresh mail; a job not final within PACED_WAIT after the
        last send counts with the time it had waited (a lower bound)."""
        self.round += 1
        count = int(PACED_RATE * PACED_SECONDS)
        jobs = list(fresh_jobs(f"paced{self.round}", count))
        producer.paced(jobs, PACED_RATE)
        ids = [e["id"] for e, _ in jobs]
        producer.wait_queued(timeout=120)
        producer.wait_final(ids, timeout=PACED_WAIT, poll=0.02, strict=False)
        now = time.time()
        delays = [producer.final[i]["delay_ms"] if i in producer.final
                  else 1000 * (now - producer.queued[i]["ts"]) for i in ids]
        delivered = sum(1 for i in ids if producer.final.get(i, {}).get("event") == "delivered")
        intake = [1000 * (producer.queued[i]["ts"] - producer.sent_at[i]) for i in ids]
        first = min(producer.sent_at[i] for i in ids)
        slow = [producer.sent_at[i] - first for i, wait in zip(ids, intake, strict=True)
                if wait > STALL_MS]
        return {"paced_sent": count, "paced_delivered": delivered,
                "intake_stalls_at_s": stall_starts(slow),
                "p50_ms": percentile(delays, 50), "p99_ms": percentile(delays, 99),
                "intake_p99_ms": percentile(intake, 99), "intake_max_ms": max(intake)}

    def looks(self) -> dict[str, Any]:
        """Memory, the spool's size, and the operator's commands' times."""
        figures = self.engine.status(timeout=120)
        assert self.engine.proc is not None
        supervisor = rss_mb(self.engine.proc.pid)
        workers = [rss_mb(w["pid"])["VmRSS"] for w in figures["workers"].values() if w["pid"]]
        return {"supervisor_rss_mb": supervisor["VmRSS"],
                "supervisor_peak_mb": supervisor["VmHWM"],
                "worker_rss_mb": max(workers) if workers else float("nan"),
                "spool_mb": spool_bytes(self.spool_dir) / 2**20,
                "rcpts_pending": figures["spool"]["rcpts_pending"],
                "status_cli_s": timed_cli(self.engine, "status"),
                "status_request_s": timed_request(self.engine, "status"),
                "queue_cli_s": timed_cli(self.engine, "queue"),
                "queue_request_s": timed_request(self.engine, "queue")}

    def stop(self) -> float:
        began = time.perf_counter()
        code = self.engine.stop(timeout=300)
        if code != 0:
            raise RuntimeError(f"engine exited {code}: {self.engine.log_tail()}")
        return time.perf_counter() - began

    def window(self, n: int, k: int) -> dict[str, Any]:
        """K waiting recipients due together (a deferral window ending) a few seconds
        into paced fresh mail, after a start: the start measured as at every level."""
        k = min(k, n)
        due_at = time.time() + WINDOW_LEAD
        row: dict[str, Any] = {"n": n, "window": k, "fill_s": make_due(self.spool_dir, k,
                                                                       due_at)}
        row.update(self.restart())
        seen = len(self.engine.events())
        wait = due_at - WINDOW_INTO_PACED - time.time()
        if wait > 0:
            time.sleep(wait)
        row["window_into_paced_s"] = due_at - time.time()
        producer = Producer(self.engine)
        try:
            row.update(self.paced(producer))
        finally:
            producer.close()
        herd = [e["ts"] for e in self.engine.events()[seen:]
                if e["event"] in ("deferred", "expired") and e["id"].startswith("wait-")]
        row["herd_attempts"] = len(herd)
        row["herd_peak_per_s"], row["herd_span_s"] = per_second_peak(herd)
        row.update(self.looks())
        row["in_flight"] = self.engine.status(timeout=120)["in_flight"]
        row["stop_s"] = self.stop()
        log(f"window: {json.dumps(row)}")
        return row


# -- the page -------------------------------------------------------------------------------


def run(levels: Sequence[int], window: int, command: str, profile: bool = False
        ) -> dict[str, Any]:
    """Every level, then the window; the results saved after each (a later failure
    keeps what was measured)."""
    workdir = tempfile.mkdtemp(prefix="mailengine-qscale-", dir="/var/tmp")
    result: dict[str, Any] = {"rows": [], "window": None, "command": command,
                              "machine": machine(),
                              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    began = time.time()
    scale = Scale(workdir)
    scale.profile = profile
    try:
        for n in levels:
            result["rows"].append(scale.level(n, max(levels)))
            save(result, began)
        if window and levels[-1] > 0:
            result["window"] = scale.window(levels[-1], window)
            save(result, began)
    finally:
        scale.close()
        subprocess.run(["rm", "-rf", workdir], check=False)
    return result


def save(result: dict[str, Any], began: float) -> None:
    result["took_s"] = time.time() - began
    tmp = RESULTS + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, RESULTS)


# What each row and picture shows: (key, label, unit).
COLUMNS = (
    ("intake_per_s", "intake (burst)", "jobs/s"),
    ("delivery_per_s", "delivery (burst)", "msg/s"),
    ("p50_ms", "delivery time p50 (paced)", "ms"),
    ("p99_ms", "delivery time p99 (paced)", "ms"),
    ("intake_max_ms", "longest intake wait (paced)", "ms"),
    ("supervisor_rss_mb", "supervisor RSS", "MB"),
    ("supervisor_peak_mb", "supervisor peak RSS", "MB"),
    ("worker_rss_mb", "worker RSS", "MB"),
    ("spool_mb", "spool file", "MB"),
    ("ready_s", "start to ready", "s"),
    ("first_delivery_s", "start to first delivery", "s"),
    ("status_request_s", "status request", "s"),
    ("status_cli_s", "`mailengine status`", "s"),
    ("queue_request_s", "queue summary request", "s"),
    ("queue_cli_s", "`mailengine queue`", "s"),
    ("spool_open_cold_s", "spool: open (quick_check), file not cached", "s"),
    ("spool_open_s", "spool: open (quick_check), file cached", "s"),
    ("spool_stats_s", "spool: stats (status, housekeeping)", "s"),
    ("spool_by_domain_s", "spool: by_domain (queue summary)", "s"),
    ("spool_due_s", "spool: due, nothing due", "s"),
    ("spool_checkpoint_max_s", "spool: WAL checkpoint (16 MB of WAL), longest of 3", "s"),
    ("spool_checkpoint_commit_max_s", "spool: commit of 64 jobs, longest meanwhile", "s"),
)
# The pictures: a title and the keys drawn in it (one line each).
PANELS = (
    ("intake and delivery, per s", ("intake_per_s", "delivery_per_s")),
    ("fresh mail delivery time, ms", ("p50_ms", "p99_ms")),
    ("longest intake wait, ms", ("intake_max_ms",)),
    ("memory (RSS), MB", ("supervisor_rss_mb", "supervisor_peak_mb", "worker_rss_mb")),
    ("spool file, MB", ("spool_mb",)),
    ("start to ready / first delivery, s", ("ready_s", "first_delivery_s")),
    ("status and queue summary, s", ("status_request_s", "status_cli_s",
                                     "queue_request_s", "queue_cli_s")),
    ("the spool's reads alone, s", ("spool_open_cold_s", "spool_open_s", "spool_stats_s",
                                    "spool_by_domain_s")),
)
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd")


def fmt(value: Any) -> str:
    if not isinstance(value, (int, float)) or value != value:
        return "-"
    if value == 0:
        return "0"
    if abs(value) < 0.01:
        return f"{value:.2g}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def n_label(n: int) -> str:
    return f"{n // 1_000_000}M" if n >= 1_000_000 and n % 1_000_000 == 0 else (
        f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n))


def svg(rows: Sequence[dict[str, Any]]) -> str:
    """Small multiples, one panel per PANELS entry, N on an even (categorical) axis."""
    width, height, cols = 330, 210, 2
    left, top, plot_w, plot_h = 55, 30, 250, 140
    labels = {key: label for key, label, _ in COLUMNS}
    count = len(PANELS)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{cols * width}" '
           f'height="{-(-count // cols) * height}" font-family="sans-serif" font-size="10">',
           '<rect width="100%" height="100%" fill="white"/>']
    xs = [left + (plot_w * i / max(1, len(rows) - 1)) for i in range(len(rows))]
    for p, (title, keys) in enumerate(PANELS):
        ox, oy = (p % cols) * width, (p // cols) * height
        values = [r.get(k) for k in keys for r in rows]
        top_value = nice_ceiling(max([v for v in values
                                      if isinstance(v, (int, float)) and v == v] or [1]))
        out.append(f'<g transform="translate({ox},{oy})">')
        out.append(f'<text x="{left}" y="16" font-weight="bold">{_esc(title)}</text>')
        out.append(f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" '
                   f'y2="{top + plot_h}" stroke="#888"/>')
        out.append(f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" '
                   'stroke="#888"/>')
        for frac in (0.0, 0.5, 1.0):
            y = top + plot_h * (1 - frac)
            out.append(f'<text x="{left - 4}" y="{y + 3:.1f}" text-anchor="end">'
                       f'{fmt(top_value * frac)}</text>')
        for x, row in zip(xs, rows, strict=True):
            out.append(f'<text x="{x:.1f}" y="{top + plot_h + 13}" text-anchor="middle">'
                       f'{n_label(row["n"])}</text>')
        out.append(f'<rect x="{left + 3}" y="{top + 1}" width="{plot_w - 6}" '
                   f'height="{11 * len(keys) + 3}" fill="white" fill-opacity="0.8"/>')
        for c, key in enumerate(keys):
            colour = COLOURS[c % len(COLOURS)]
            points = [(x, top + plot_h * (1 - r[key] / top_value)) for x, r in zip(
                xs, rows, strict=True) if isinstance(r.get(key), (int, float))
                and r[key] == r[key]]
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
            out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" '
                       'stroke-width="1.5"/>')
            out += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{colour}"/>'
                    for x, y in points]
            out.append(f'<text x="{left + 6}" y="{top + 10 + 11 * c}" fill="{colour}">'
                       f'{_esc(labels[key])}</text>')
        out.append(f'<text x="{left + plot_w / 2}" y="{top + plot_h + 26}" '
                   'text-anchor="middle">recipients waiting</text></g>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def nice_ceiling(value: float) -> float:
    """The smallest of 1, 2, 2.5, 5 x 10^k at or above `value` (an axis' top)."""
    if value <= 0:
        return 1.0
    scale = 10.0 ** math.floor(math.log10(value))
    return next(scale * m for m in (1, 2, 2.5, 5, 10) if scale * m >= value * (1 - 1e-9))


def _esc(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace("`", "")


def table(rows: Sequence[dict[str, Any]]) -> str:
    head = "| " + " | ".join(["waiting", *(n_label(r["n"]) for r in rows)]) + " |"
    lines = [head, "|" + "---|" * (len(rows) + 1)]
    for key, label, unit in COLUMNS:
        lines.append(f"| {label} ({unit}) | " + " | ".join(fmt(r.get(key)) for r in rows)
                     + " |")
    lines.append("| spool filled in (s) | " + " | ".join(fmt(r.get("fill_s")) for r in rows)
                 + " |")
    lines.append("| other load on the machine (% of its cores) | " + " | ".join(
        fmt(100 * r["other_load"]) if "other_load" in r else "-" for r in rows) + " |")
    return "\n".join(lines)


def targets(rows: Sequence[dict[str, Any]], herd: dict[str, Any] | None = None
            ) -> list[tuple[str, str, bool | None]]:
    """Issue #19 item 2's targets against the largest N measured (and the window ending,
    `herd`): (target, measured, met; None when there is nothing to compare with)."""
    base = next((r for r in rows if r["n"] == 0), None)
    big = rows[-1]
    out: list[tuple[str, str, bool | None]] = []
    if base is not None and big is not base:
        noisy = abs(big.get("other_load", 0.0) - base.get("other_load", 0.0)) > LOAD_APART
        caveat = (f"; inconclusive: the machine's other load was {fmt(100 * base['other_load'])}%"
                  f" at N = 0 and {fmt(100 * big['other_load'])}% here") if noisy else ""
        ratio = big["delivery_per_s"] / base["delivery_per_s"]
        out.append(("fresh mail >= 90% of its empty-spool rate",
                    f"{100 * ratio:.0f}% ({fmt(big['delivery_per_s'])} against"
                    f" {fmt(base['delivery_per_s'])} msg/s){caveat}",
                    None if noisy else ratio >= 0.9))
        p99 = big["p99_ms"] / base["p99_ms"]
        out.append(("p99 delivery time within 2x", f"{p99:.2f}x ({fmt(big['p99_ms'])} against"
                    f" {fmt(base['p99_ms'])} ms){caveat}", None if noisy else p99 <= 2.0))
    out.append(("supervisor memory < 300 MB", f"{fmt(big['supervisor_rss_mb'])} MB (peak"
                f" {fmt(big['supervisor_peak_mb'])})", big["supervisor_peak_mb"] < 300))
    late = big.get("first_delivery_late")
    out.append(("first delivery after a restart within 10 s",
                f"not within {START_WAIT:.0f} s" if late else
                f"{fmt(big['first_delivery_s'])} s", not late and big["first_delivery_s"] <= 10))
    worst = max(r["intake_max_ms"] for r in rows)
    checkpoint = max((r.get("spool_checkpoint_max_s") or 0.0 for r in rows), default=0.0)
    timed = f"; longest WAL checkpoint {fmt(1000 * checkpoint)} ms" if checkpoint else ""
    out.append(("intake never stalls > 100 ms (WAL checkpoints)",
                f"longest wait {fmt(big['intake_max_ms'])} ms at {n_label(big['n'])}"
                f" (worst of all rows {fmt(worst)} ms){timed}", worst <= 100))
    if herd is not None:
        starved = herd["paced_delivered"] < herd["paced_sent"] or (
            base is not None and herd["p99_ms"] > 2 * base["p99_ms"]
            and herd["p99_ms"] > base["p99_ms"] + STARVED_ABOVE_MS)
        out.append(("a window ending never starves fresh mail",
                    f"{herd['paced_delivered']} of {herd['paced_sent']} fresh delivered,"
                    f" p99 {fmt(herd['p99_ms'])} ms", not starved))
    return out


def profile_table(rows: Sequence[dict[str, Any]]) -> str:
    """`--profile`: the share of the supervisor's CPU samples in each function, per N."""
    shown = [r for r in rows if r.get("profile")]
    if not shown:
        return ""
    lines = ["", "The supervisor during the bursts (`--profile`: py-spy, 200 Hz, "
             f"{PROFILE_SECONDS} s from the first burst; % of its samples with the function on"
             " the stack; the samples are its busy time):", "",
             "| function | " + " | ".join(n_label(r["n"]) for r in shown) + " |",
             "|---|" + "---|" * len(shown)]
    lines.append("| (samples) | " + " | ".join(str(int(r["profile"]["samples"])) for r in shown)
                 + " |")
    for name in PROFILED:
        lines.append(f"| `{name}` | " + " | ".join(
            f"{100 * r['profile'][name]:.1f}%" for r in shown) + " |")
    return "\n".join(lines) + "\n"


def rate_note(rows: Sequence[dict[str, Any]]) -> str:
    """The fresh mail's burst rates against N, with their spread: on a shared machine a
    single burst says little."""
    spreads = ", ".join(
        f"{n_label(r['n'])}: {fmt(min(r['delivery_per_s_each']))}-"
        f"{fmt(max(r['delivery_per_s_each']))}" for r in rows if r.get("delivery_per_s_each"))
    ratio = rows[-1]["delivery_per_s"] / rows[0]["delivery_per_s"]
    return (f"The fresh mail's burst rate at {n_label(rows[-1]['n'])} was {100 * ratio:.0f}% of"
            f" the empty spool's (medians); the bursts' range at each N (msg/s), {spreads},"
            " shows how much of that the machine's other load explains.")


def stats_note(big: dict[str, Any], stalls: Sequence[float]) -> str:
    """What `Spool.stats` cost in this run: a count of every row before it kept its counts."""
    if big["spool_stats_s"] < 0.005:
        return f"""- **`Spool.stats` counts nothing.** The spool counts its jobs and recipients once
  when it opens and keeps the counts as it changes them (docs/SPOOL.md): {fmt(1000 *
  big['spool_stats_s'])} ms at {n_label(big['n'])} (the oldest job's time, from an index),
  for the `spool_depth` gauge every 10 s and every `mailengine status` (the request:
  {fmt(1000 * big['status_request_s'])} ms)."""
    return f"""- **`Spool.stats` is a full scan, in the supervisor's loop.** `COUNT(*)` over `jobs`
  and `COUNT(*)`, `SUM(attempts > 0)` over the pending `rcpts`: {fmt(1000 *
  big['spool_stats_s'])} ms at {n_label(big['n'])}. It runs at every housekeeping turn
  (every 10 s, for the `spool_depth` gauge) and for every `mailengine status`, and the loop
  does nothing else meanwhile: no intake, no results. That is the longest intake wait at
  {n_label(big['n'])} ({fmt(big['intake_max_ms'])} ms; the paced jobs that waited over
  {STALL_MS:.0f} ms came in {len(stalls)} stall{'' if len(stalls) == 1 else 's'}, at
  {', '.join(f'{t:.1f}' for t in stalls) or '-'} s into the {PACED_SECONDS:.0f} s run;
  housekeeping comes every 10 s) and the status request's time
  ({fmt(1000 * big['status_request_s'])} ms). Fixed since: the counts are kept as the
  spool changes (see "Counts kept, not counted" above)."""


def checkpoint_note(rows: Sequence[dict[str, Any]]) -> str:
    """Where WAL checkpoints happen and what they cost in this run, if it timed them."""
    timed = [r for r in rows if r.get("spool_checkpoint_max_s") is not None]
    if not timed:
        return ""
    big = timed[-1]
    per_n = ", ".join(f"{n_label(r['n'])}: {fmt(1000 * r['spool_checkpoint_max_s'])}"
                      for r in timed)
    return f"""
- **WAL checkpoints are short.** The only checkpoints in a running engine are SQLite's
  automatic ones (engine/spoolfile.py: each time the WAL holds
  {WAL_CHECKPOINT_BYTES // (1024 * 1024)} MB, PASSIVE, run by the commit that crosses it,
  in the supervisor's loop) and, only while the spool cannot be written, `Spool.checkpoint`
  at housekeeping. Timed alone on each spool (intake's and results' commits of
  {CHECKPOINT_BATCH} fresh 5 KB jobs, the automatic checkpoint off and the same checkpoint
  run by hand each time the WAL held its threshold, {CHECKPOINTS} times), the longest (ms)
  {per_n}. A checkpoint copies the pages the fresh mail changed (the tail of the tables,
  the indexes' hot pages), not the waiting recipients', so its cost does not grow with
  them: no fix needed. The longest plain commit meanwhile (no checkpoint in it) took
  {fmt(1000 * big['spool_checkpoint_commit_max_s'])} ms at {n_label(big['n'])}: this shared
  disk's latency (a commit waits for the WAL's fsync), which no change to the checkpoints
  removes; and the
  longest intake waits above (worst {fmt(max(r['intake_max_ms'] for r in rows))} ms) come
  with the machine's other load, not with N."""


def counts_fix() -> str:
    """`Spool.stats` and `by_domain` before and after the counts were kept (COUNTS_FIX)."""
    if not os.path.exists(COUNTS_FIX):
        return ""
    with open(COUNTS_FIX, encoding="utf-8") as f:
        fix = json.load(f)
    b = {r["n"]: r for r in fix["before"]}
    a = {r["n"]: r for r in fix["after"]}
    n = max(set(a) & set(b))

    def ms(row: dict[str, Any], key: str) -> str:
        return fmt(1000 * row[key])

    return f"""
**Counts kept, not counted** (`{fix['command']}`, twice on the same machine, shared: before
on {fix['before_commit']}, {fix['before_date']}; after on {fix['after_commit']},
{fix['date']}). `Spool.stats` keeps the spool's counts as it changes them (docs/SPOOL.md) and
`Spool.by_domain` reads the replies only for the recipient it shows per domain. At
{n_label(n)} waiting: `Spool.stats` {ms(b[n], 'spool_stats_s')} ms before, **{ms(a[n],
'spool_stats_s')} ms** after; the status request {ms(b[n], 'status_request_s')} ms before,
**{ms(a[n], 'status_request_s')} ms** after; `Spool.by_domain` {ms(b[n], 'spool_by_domain_s')}
ms before, **{ms(a[n], 'spool_by_domain_s')} ms** after, the queue summary request
{ms(b[n], 'queue_request_s')} ms before, **{ms(a[n], 'queue_request_s')} ms** after; the
longest intake wait {fmt(b[n]['intake_max_ms'])} ms before, **{fmt(a[n]['intake_max_ms'])}
ms** after (the machine's other load {fmt(100 * b[n]['other_load'])}% and
{fmt(100 * a[n]['other_load'])}% of its cores: the intake waits include what it took from
the engine). {fix.get('note', '')}
"""


def findings(result: dict[str, Any]) -> str:
    """What the figures say and where the cost comes from (the code paths are the
    engine's; the numbers are this run's)."""
    rows, herd = result["rows"], result.get("window")
    base, big = rows[0], rows[-1]
    stalls = big.get("intake_stalls_at_s", [])
    text = f"""**Where the cost comes from** (the spool's reads were also timed alone, the engine
stopped: the last rows of the table):

- **Nothing due costs nothing per waiting recipient.** `Spool.due` walks the covering index
  `jobs_due (next_attempt, id)` and stops at the first row not due: {fmt(1000 *
  big['spool_due_s'])} ms at {n_label(big['n'])} (against {fmt(1000 * base['spool_due_s'])} ms
  empty), and the supervisor holds nothing per waiting recipient (RSS
  {fmt(base['supervisor_rss_mb'])} MB empty, {fmt(big['supervisor_rss_mb'])} MB at
  {n_label(big['n'])}). {rate_note(rows)}
{stats_note(big, stalls)}
- **The queue summary reads up to 100,000 rows** (`Spool.by_domain`, `SUMMARY_SCAN`):
  bounded by design, {fmt(1000 * big['spool_by_domain_s'])} ms once 100k wait, for every
  `mailengine queue` (the replies are read only for each domain's recipient tried most;
  the rest is the scan and the join for the jobs' acceptance times). In a thread beside
  the supervisor's loop since session 6, counted by SQLite, so it no longer stops intake
  ([Looking at the queue](#bench-queue-look)).{checkpoint_note(rows)}
- **The start reads the whole file.** The open's `quick_check` (docs/SPOOL.md, "A damaged
  spool") reads every page: {fmt(big['spool_open_s'])} s with the file in the page cache at
  {n_label(big['n'])} ({fmt(big['spool_mb'])} MB), {fmt(big.get('spool_open_cold_s'))} s
  with the file out of it; after a reboot (the row "start to ready",
  the file dropped from the cache first) {fmt(big['ready_s'])} s to ready and
  {fmt(big['first_delivery_s'])} s to the first delivery. It grows with the file, so a
  spool a few times larger, or a slower disk, passes the 10 s."""
    if herd is not None and herd["paced_delivered"] < herd["paced_sent"]:
        text += f"""
- **A window ending starves the fresh mail, though the receiver sees no herd.** The
  {herd['window']:,} went out at the deferring provider's pace (slow start, 20/s: at most
  {herd['herd_peak_per_s']} in one second), so the receiver was not flooded; but only
  {herd['paced_delivered']} of the {herd['paced_sent']} fresh jobs were delivered, and
  {herd['in_flight']} jobs were in flight at the end. Two causes in the supervisor's
  dispatch: `Spool.due` hands out the oldest `next_attempt` first, so every recipient of
  the window comes before a fresh job accepted after it ended; and a worker's
  `limits.max_in_flight` (1,000) is shared by all providers, so the window's jobs, each
  waiting in the worker for its provider's turn (up to `shaping.max_wait`, 10 s, then back
  to the spool), hold every slot, and a slot freed goes to the next oldest due job, the
  window's again. The stop after it took {fmt(herd['stop_s'])} s (the drain waited for the
  jobs held for a turn)."""
        if os.path.exists(WINDOW_FIX):
            text += """ First attempts now go before retries: see "The window ending, before
  and after" above."""
    elif herd is not None:
        text += f"""
- **A window ending no longer starves the fresh mail, and the receiver sees no herd.** The
  {herd['window']:,} went out at the deferring provider's pace (slow start, 20/s: at most
  {herd['herd_peak_per_s']} in one second) while all {herd['paced_sent']} fresh jobs were
  delivered (p99 {fmt(herd['p99_ms'])} ms): retries hold at most `limits.retry_share` of a
  worker's slots ({herd['in_flight']} jobs in flight at the end), and the jobs accepted and
  never handed out go before the retries due (see "The window ending, before and after"
  above). Such a window is what the engine made of a provider's block when retries came
  due as they were deferred (`retry.next_attempt` took a `jitter`, engine/results.py
  passed none); now every deferral's next try is spread by `retry.jitter` (default 0.1:
  +-10% of the wait, a window spread over 12 min of a 1 h wait; docs/SPOOL.md), so the
  recipients one provider deferred together no longer come back in the same second. The
  stop after it took {fmt(herd['stop_s'])} s (the drain waited for the jobs held for a
  turn)."""
    return text


def window_fix() -> str:
    """The window ending measured before and after the dispatcher kept room for first
    attempts (WINDOW_FIX), or nothing."""
    if not os.path.exists(WINDOW_FIX):
        return ""
    with open(WINDOW_FIX, encoding="utf-8") as f:
        fix = json.load(f)
    b, a = fix["before"], fix["after"]

    def num(value: Any) -> str:
        return str(value) if isinstance(value, int) else fmt(value)

    def both(key: str, unit: str = "") -> str:
        return f"{num(b[key])}{unit} before, **{num(a[key])}{unit}** after"

    return f"""
**The window ending, before and after** (`{fix['command']}`, twice on the same machine,
shared: before on {fix['before_commit']}, {fix['before_date']}; after on
{fix['after_commit']}, {fix['date']}). The dispatcher now keeps room for first attempts
(engine/dispatch.py): a retry (a job with a recipient tried before) may hold at most
`limits.retry_share` (default 0.5) of a worker's `max_in_flight` slots, and each turn hands
out the jobs accepted and never handed out (held in memory) before it asks the spool,
oldest next attempt first, for at most as many as the retries have room for. Fresh mail
delivered (of {a['paced_sent']}): {both('paced_delivered')}; its delivery time p50
{both('p50_ms', ' ms')}, p99 {both('p99_ms', ' ms')} (with an empty spool in the same runs:
p99 {num(b['empty_p99_ms'])} and {num(a['empty_p99_ms'])} ms); jobs in flight at the end
{both('in_flight')}; the stop {both('stop_s', ' s')}. The window still goes out at the
deferring provider's pace (at most {num(b['herd_peak_per_s'])} and
{num(a['herd_peak_per_s'])} attempts in one second; {both('herd_attempts')} seen while the
fresh mail was measured, which ended once it was delivered: {both('herd_span_s', ' s')}).
"""


def render(result: dict[str, Any], command: str) -> str:
    rows, info = result["rows"], result["machine"]
    checks = "\n".join(f"| {t} | {m} | {'-' if ok is None else ('PASS' if ok else 'FAIL')} |"
                       for t, m, ok in targets(rows, result.get("window")))
    herd = result.get("window")
    window = "" if herd is None else f"""

**A deferral window ending** (`--window {herd['window']}`): {herd['window']:,} of the
{herd['n']:,} waiting recipients made due at the same instant (their next attempts moved
there through `Spool.record`, the engine stopped), {fmt(herd['window_into_paced_s'])} s after
the start of the paced fresh mail ({herd['paced_sent']} jobs, {PACED_RATE:.0f}/s), which was
given {PACED_WAIT:.0f} s after its last send to be delivered. Fresh mail delivered:
**{herd['paced_delivered']} of {herd['paced_sent']}**; delivery time p50
{fmt(herd['p50_ms'])} ms, p99 {fmt(herd['p99_ms'])} ms (a job not delivered counts with the
time it had waited: lower bounds); longest intake wait {fmt(herd['intake_max_ms'])} ms. The
waiting ones: {herd['herd_attempts']:,} tried again (and deferred) meanwhile, at most
{herd['herd_peak_per_s']} in one second, over {fmt(herd['herd_span_s'])} s; {herd['in_flight']}
jobs in flight at the end; supervisor RSS {fmt(herd['supervisor_rss_mb'])} MB (peak
{fmt(herd['supervisor_peak_mb'])})."""
    return f"""{HEADING}

<a id="bench-queue-scale"></a>

*Command:* `{command}` · *date:* {result['date']} · *machine:* {info['cores']} cores
({info['cpu']}), Python {info['python']}, **shared with other agents' test runs (a loaded
2-core machine)** · *took* {result['took_s']:.0f} s

Fresh mail to a healthy receiver (Postfix's smtp-sink on loopback) while N recipients wait
in the spool for 10,000 domains whose receiver (127.0.0.5) defers everything
([bench/queue_scale.py](../bench/queue_scale.py), issue #19). The waiting recipients are
written into the spool directly through engine/spool.py (`Spool.accept`, then `Spool.record`
of a 451 deferral, 10,000 jobs per transaction, the engine stopped), not pushed through
ZeroMQ, to keep the run bounded; one recipient per job of 1 KB, each one's next attempt spread
evenly over the coming 4 hours (the first 10 minutes away), so none is due while the fresh
mail is measured. At each N: a start with one job waiting in ZeroMQ and the spool's files
out of the page cache, as after a reboot (start to ready, to its delivery), a burst of
{FRESH_BURST} fresh 5 KB jobs sent at once, {BURSTS} times, the median shown (intake: first
send to last `queued`; delivery: to the last `delivered`), then {PACED_RATE:.0f} jobs/s for
{PACED_SECONDS:.0f} s (delivery time: the events' `delay_ms`; intake wait: a job's send to
its `queued`, whose longest bounds any stall of intake), then RSS, the spool's files, and the
operator's commands (the command with Python's start, and the control request alone).

![cost as the queue grows](img/queue-scale.svg)

{table(rows)}

Against issue #19's targets (item 2), the largest N measured against N = 0:

| target | measured | |
|---|---|---|
{checks}{window}
{window_fix()}{counts_fix()}{profile_table(rows)}
{findings(result)}
"""


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.queue_scale",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-n", type=int, default=LEVELS[-1],
                        help="the largest number of waiting recipients (default 1000000)")
    parser.add_argument("--window", type=int, default=0,
                        help="also: this many waiting recipients due at once, at the largest N")
    parser.add_argument("--profile", action="store_true",
                        help="py-spy on the supervisor during each level's bursts")
    parser.add_argument("--docs", action="store_true",
                        help="write docs/PERFORMANCE.md's section and docs/img/queue-scale.svg")
    parser.add_argument("--render-only", action="store_true",
                        help="write the docs from bench/results/queue_scale.json, no run")
    args = parser.parse_args()
    if args.render_only:
        with open(RESULTS, encoding="utf-8") as f:
            result = json.load(f)
    else:
        levels = [n for n in LEVELS if n <= args.max_n]
        if args.profile and shutil.which("py-spy") is None:
            parser.error("--profile needs py-spy (pip install py-spy)")
        result = run(levels, args.window,
                     shlex.join(["python3", "-m", "bench.queue_scale", *sys.argv[1:]]),
                     args.profile)
    if args.docs or args.render_only:
        write_section(DOC, HEADING, render(result, result["command"]))
        with open(IMG, "w", encoding="utf-8") as f:
            f.write(svg(result["rows"]))
        log("wrote docs/PERFORMANCE.md and docs/img/queue-scale.svg")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
