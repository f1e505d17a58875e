"""The fault soak (issue #14): 20,000 jobs through the whole engine while a script breaks the
machine under it, then an accounting of every job, and of every copy the receiver got twice.

The engine (`mailengine run` through LocalEngine: a supervisor, two workers for 127.0.0.2 and
127.0.0.3) sends to a recording sink on loopback (STARTTLS, PIPELINING, CHUNKING) that takes
1% of the messages and then drops the connection instead of replying to the final dot (seeded:
engine/testing/sink.py `drop_after_dot`). Recipients' domains are found through a real DNS
server (MX -> mx.soak.test -> 127.0.0.1, TTL 2 s, so the cache does not hide an outage); the
spool lives on its own small tmpfs. A producer pushes the jobs at a steady pace over the
window, re-sending each until it sees `queued` (docs/EVENTS.md), while the fault script
strikes at seeded moments (bench/faults.py): kill -9 of a worker (3 times) and of the
supervisor (twice, restarted at once on the same spool), the spool's filesystem full for
10 s (twice), DNS down for 5 s. Then the soak waits until every accepted recipient has its
final event, or the spool is empty, or the hard deadline.

The accounting (bench/soak_ledger.py) compares the events log, the sink and the engine's
log. The issue's result: 0 accepted jobs lost, every job has its final event, and the
duplicates at the receiver equal the ambiguous count; each duplicate the engine did not
count is attributed to the fault whose window produced it. `--docs` writes the section
"Fault soak" of docs/PERFORMANCE.md.

Needs root (the tmpfs mount). About 10 minutes at the default size on 2 cores:

    python3 -m bench.fault_soak                       # 20,000 jobs over 480 s
    python3 -m bench.fault_soak --jobs 2000 --seed 7  # a quick run (~3 min)
    python3 -m bench.fault_soak --docs
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from types import FrameType
from typing import Any

from bench.common import Producer, cpu_now, log, machine, other_load, write_section
from bench.faults import (
    DISK,
    DNS,
    SUPERVISOR,
    WORKER,
    Fault,
    Injector,
    SmallFilesystem,
    Strike,
    SwitchableDns,
    plan,
)
from bench.soak_ledger import (
    AMBIGUOUS,
    COUNTED,
    ENGINE_COUNTED,
    RESENT,
    UNEXPLAINED,
    Ledger,
    account,
)
from engine.testing.harness import LocalEngine
from engine.testing.sink import SinkServer
from tests.support.statsd_catcher import StatsdCatcher

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs", "PERFORMANCE.md")
SECTION = "## Fault soak"
IPS = ["127.0.0.2", "127.0.0.3"]
DOMAINS = 40
MX = "mx.soak.test"
DNS_TTL = 2  # seconds: short, so that lookups go on while DNS is down
DROP = 0.01  # the sink drops this share of connections after the final dot
SHARE_TWO_RCPTS = 0.1  # jobs with a second recipient, at another domain
SHARE_REFUSED = 0.01  # recipients the sink refuses (550): they bounce
MESSAGE_BYTES = 1500
SPOOL_FS = 64 << 20  # the spool's tmpfs
RATE = 40.0  # jobs per second the producer aims at, within the window's bounds
WINDOW = (150.0, 480.0)  # seconds of production, at least and at most
DRAIN = 240.0  # seconds after production for the last jobs to end, at most
QUIET_CHECKS = 3  # an empty spool this many checks in a row (1 s apart): nothing more comes


@dataclass
class Soak:
    """One run's inputs and what it saw."""

    jobs: int
    seed: int
    window: float
    started: float = 0.0
    production_s: float = 0.0
    drained_s: float = 0.0
    finished: str = ""  # how the wait for final events ended


# -- the jobs ---------------------------------------------------------------------------------


def make_jobs(count: int, seed: int) -> list[tuple[dict[str, Any], bytes]]:
    """Seeded jobs: one recipient (a tenth two, at two domains), 1% refused by the sink; the
    Message-ID's local part is the job id (how the sink's copies are told apart)."""
    rng = random.Random(seed)
    jobs = []
    for i in range(count):
        domain = i % DOMAINS
        rcpts = [f"{'reject-' if rng.random() < SHARE_REFUSED else ''}u{i}@d{domain}.soak.test"]
        if rng.random() < SHARE_TWO_RCPTS:
            rcpts.append(f"v{i}@d{(domain + 1) % DOMAINS}.soak.test")
        job_id = f"j{i}"
        jobs.append(({"id": job_id, "from": "soak@sender.test", "to": rcpts},
                     _message(job_id, rcpts)))
    return jobs


def _message(job_id: str, rcpts: list[str]) -> bytes:
    head = (f"From: <soak@sender.test>\r\nTo: {', '.join(f'<{r}>' for r in rcpts)}\r\n"
            f"Subject: soak {job_id}\r\nMessage-ID: <{job_id}@soak.test>\r\n\r\n")
    line = f"{job_id} " + "0123456789abcdef" * 4 + "\r\n"
    return (head + line * max(1, (MESSAGE_BYTES - len(head)) // len(line))).encode("ascii")


def zone() -> dict[str, Any]:
    names: dict[str, Any] = {f"d{d}.soak.test": {"MX": [(10, MX)], "ttl": DNS_TTL}
                             for d in range(DOMAINS)}
    names[MX] = {"A": ["127.0.0.1"], "ttl": DNS_TTL}
    return names


def engine_extra(sink: SinkServer, dns: SwitchableDns, spool: str, statsd: StatsdCatcher
                 ) -> dict[str, Any]:
    return {
        "spool": spool,
        "smtp": {"port": sink.port, "tls": "opportunistic"},
        "dns": {"nameservers": ["127.0.0.1"], "port": dns.port, "timeout": "2s"},
        "security": {"allowed_destinations": ["127.0.0.0/8"]},  # the MX is on loopback
        "retry": {"schedule": ["2s", "5s", "10s", "20s"], "max_age": "1h"},
        "statsd": {"enabled": True, "host": "127.0.0.1", "port": statsd.port,
                   "prefix": "soak"},
        "drain_timeout": "5s",
    }


# -- the run ----------------------------------------------------------------------------------


class SoakProducer(Producer):
    """bench.common's Producer, pacing the jobs and re-sending, meanwhile, each job not
    `queued` within RESEND seconds (a dead supervisor, a full spool)."""

    def produce(self, jobs: list[tuple[dict[str, Any], bytes]], window: float) -> None:
        started = time.monotonic()
        interval = window / max(1, len(jobs))
        for i, (envelope, message) in enumerate(jobs):
            delay = started + i * interval - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            self.send(envelope, message)
            if i % 20 == 0:
                self.update()
                self.resend_stale()
            if i and i % 2000 == 0:
                log(f"{i} jobs pushed, {len(self.queued)} queued, {len(self.final)} final")

    def resend_stale(self) -> None:
        now = time.time()
        for job_id in [j for j in self.unqueued if now - self.sent_at[j] > self.RESEND]:
            self.sent_at[job_id] = now
            self.push.send_multipart(self.frames[job_id])


@dataclass
class Rig:
    """What the soak runs against: every piece real, on loopback."""

    sink: SinkServer
    dns: SwitchableDns
    statsd: StatsdCatcher
    disk: SmallFilesystem
    engine: LocalEngine


def build(stack: contextlib.ExitStack, soak: Soak, workdir: str) -> Rig:
    """The sink, the DNS server, the StatsD listener, the spool's tmpfs, the engine started
    on them; each undone by `stack`."""
    sink = stack.enter_context(SinkServer(tls=True, drop_after_dot=DROP, drop_seed=soak.seed))
    dns = stack.enter_context(SwitchableDns(zone(), negative_ttl=DNS_TTL))
    statsd = stack.enter_context(StatsdCatcher())
    disk = SmallFilesystem(os.path.join(workdir, "spoolfs"), SPOOL_FS)
    stack.callback(disk.unmount)
    engine = LocalEngine(workdir, sink.port, ips=IPS, route=None,
                         extra=engine_extra(sink, dns, os.path.join(disk.path, "spool"),
                                            statsd))
    stack.callback(engine.cleanup)
    engine.start()
    return Rig(sink, dns, statsd, disk, engine)


def run(soak: Soak, workdir: str) -> dict[str, Any]:
    jobs = make_jobs(soak.jobs, soak.seed)
    faults = plan(soak.seed, soak.window)
    with contextlib.ExitStack() as stack:
        rig = build(stack, soak, workdir)
        producer = SoakProducer(rig.engine)
        stack.callback(producer.close)
        soak.started = time.time()
        injector = Injector(faults, soak.started, rig.engine, rig.sink, rig.dns, rig.disk, IPS,
                            soak.seed, log)
        injector.start()
        stack.callback(injector.stop)
        log(f"pushing {soak.jobs} jobs over {soak.window:.0f}s; faults at "
            + ", ".join(f"{f.at:.0f}s {f.kind}" for f in faults))
        producer.produce(jobs, soak.window)
        injector.join(max(0.0, soak.started + soak.window + 60 - time.time()))
        produced(soak, producer)
        soak.finished = wait_final(rig.engine, producer, DRAIN)
        soak.drained_s = time.time() - soak.started - soak.production_s
        rig.engine.stop(60)  # SIGTERM: the last events and metrics flushed
        rig.statsd.sync()
        ledger = account({env["id"]: env["to"] for env, _ in jobs}, rig.engine.events(),
                         len(rig.engine.unparsable), rig.sink.messages,
                         [rcpt for _, rcpt, _ in rig.sink.refused], _read(rig.engine.log_path),
                         injector.strikes)
        result = report(soak, ledger, injector.strikes, rig, faults)
        result["injector_error"] = repr(injector.error) if injector.error else None
        return result


def produced(soak: Soak, producer: SoakProducer) -> None:
    """Until every job is `queued` (re-sending), at most 2 minutes: one never acknowledged
    is simply not accepted, and the accounting says so."""
    try:
        producer.wait_queued(timeout=120)
    except TimeoutError as err:
        log(f"not every job was accepted: {str(err)[:200]}")
    soak.production_s = time.time() - soak.started


def wait_final(engine: LocalEngine, producer: Producer, limit: float) -> str:
    """Until every recipient of an accepted job has a final event, or the spool stays empty
    (an event that did not come by then never will), or `limit` seconds."""
    deadline = time.monotonic() + limit
    quiet = 0
    producer.update()
    wanted = {(job_id, rcpt) for job_id in producer.queued
              for rcpt in json.loads(producer.frames[job_id][0])["to"]}
    while time.monotonic() < deadline:
        finals = {(e["id"], e["rcpt"]) for e in engine.events() if e["event"] in
                  ("delivered", "bounced", "expired")}
        if wanted <= finals:
            return "every recipient has its final event"
        try:
            figures = engine.status()
            quiet = quiet + 1 if figures["spool"]["jobs"] == 0 and not figures["in_flight"] \
                else 0
        except TimeoutError:
            quiet = 0
        if quiet >= QUIET_CHECKS:
            return (f"the spool is empty; {len(wanted - finals)} recipients without a final"
                    " event")
        time.sleep(1.0)
    return f"hard deadline ({limit:.0f}s after production)"


# -- the report -------------------------------------------------------------------------------


def report(soak: Soak, ledger: Ledger, strikes: list[Strike], rig: Rig,
           faults: list[Fault]) -> dict[str, Any]:
    engine, dns, sink = rig.engine, rig.dns, rig.sink
    engine_log = _read(engine.log_path)
    metrics = counters(rig.statsd, ("ambiguous", "duplicates", "taken_back", "resent_after_loss",
                                    "events_replayed", "delivered", "deferred"))
    lines = {name: engine_log.count(f"event={name} ") for name in
             ("started", "worker_exited", "spool_unwritable", "spool_writable",
              "handout_overdue", "task_refused", "duplicate_delivery", "events_replayed",
              "handed_out_at_start")}
    events = engine.events()
    ordinals: collections.Counter[str] = collections.Counter()
    rows = []
    for strike in strikes:
        ordinals[strike.fault.kind] += 1
        rows.append(_strike_row(strike, ordinals[strike.fault.kind], ledger, events))
    return {
        "jobs": soak.jobs, "seed": soak.seed, "window_s": soak.window,
        "production_s": round(soak.production_s, 1), "drained_s": round(soak.drained_s, 1),
        "finished": soak.finished, "ledger": ledger.as_dict(), "metrics": metrics,
        "log_lines": lines, "dns_queries": len(dns.queries), "dns_dropped": dns.dropped,
        "sink_connections": sink.connections, "faults": rows,
        "planned": [vars(f) for f in faults],
        "machine": machine(), "when": time.strftime("%Y-%m-%d %H:%M %Z",
                                                    time.localtime(soak.started)),
        "took_s": round(time.time() - soak.started, 1),
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }


def counters(statsd: StatsdCatcher, names: tuple[str, ...]) -> dict[str, int]:
    """Each counter's total over every sending IP and provider (`<prefix>.<...>.<name>`),
    in one pass over what StatsD received."""
    totals = dict.fromkeys(names, 0.0)
    for sample in statsd.samples:
        name = sample.name.rpartition(".")[2]
        if sample.kind == "counter" and name in totals:
            totals[name] += sample.number / sample.rate
    return {name: int(total) for name, total in totals.items()}


def _strike_row(strike: Strike, ordinal: int, ledger: Ledger, events: list[dict[str, Any]]
                ) -> dict[str, Any]:
    """One fault as it happened, and the duplicates the engine did not count, and the final
    events it lost, that its window produced."""
    fault, details = strike.fault, dict(strike.details)
    label = f"{fault.kind} #{ordinal}"
    if fault.kind == SUPERVISOR and "killed" in details:
        details["unrecorded"] = len(details["unrecorded"])
        details["pending_dropped"] = len(details["pending_dropped"])
        details["flags_lost"] = ledger.flags_lost.get(label, 0)
    if fault.kind == DNS:
        details["dns_deferred"] = sum(1 for e in events if e["event"] == "deferred"
                                      and e.get("enhanced") == "4.4.3"
                                      and strike.started <= e["ts"] <= strike.ended + 3)
    return {"at": fault.at, "kind": fault.kind, "seconds": fault.seconds, "label": label,
            "seen": describe(fault.kind, details),
            "uncounted_duplicates": ledger.by_cause.get(label, 0),
            "final_events_lost": ledger.no_final_by_cause.get(label, 0), "details": details}


def describe(kind: str, details: dict[str, Any]) -> str:
    """What a fault did and what the engine showed, in words, from its details."""
    if "error" in details:
        return f"**the fault failed**: {details['error']}"
    if kind == WORKER:
        return (f"worker {details['ip']} killed (its last report: {details['in_flight']} tasks"
                f" in flight, {details['connections_open']} connections); back in"
                f" {details['back_after_s']} s")
    if kind == SUPERVISOR:
        return (f"{details['in_flight']} jobs in flight; in the spool it left,"
                f" {details['pending_in_spool']} recipients pending, of which the sink had"
                f" answered {details['unrecorded']} (the 250 read, not recorded) and dropped"
                f" {details['flags_lost']} more whose ambiguous deferral was never recorded;"
                f" back in {details['back_after_s']} s")
    if kind == DISK:
        return (f"write-ahead log truncated ({details['wal_freed_bytes'] >> 20} MiB freed),"
                f" {details['ballast_bytes'] >> 20} MiB of ballast;"
                f" {details['unwritable_lines']} `spool_unwritable` line(s), intake paused"
                f" {details['paused_s']} s")
    return (f"{details['queries_dropped']} queries dropped; {details['dns_deferred']}"
            " recipient attempts deferred 4.4.3")


def verdicts(result: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """The issue's targets: (target, measured, met)."""
    led = result["ledger"]
    return [
        ("0 accepted jobs lost", f"{led['lost_count']} lost", led["lost_count"] == 0),
        ("every accepted recipient has its final event",
         f"{led['no_final_event_count']} without", led["no_final_event_count"] == 0),
        ("duplicates at the receiver = those the engine accounted for (each explained by an"
         " `ambiguous` flag, a `duplicates` count or a `possible_duplicate` flag)",
         f"{led['duplicates']} duplicates, {led['counted_by_engine']} accounted for"
         f" ({led['ambiguous_flags']} ambiguous flags)",
         led["duplicates"] == led["counted_by_engine"]),
        ("every accepted recipient has exactly one final event in the log",
         f"{led['final_twice']} with two", led["final_twice"] == 0),
    ]


def table(result: dict[str, Any]) -> str:
    led, met = result["ledger"], result["metrics"]
    final = led["final"]
    causes = led["by_cause"]
    uncounted = {c: n for c, n in causes.items() if c not in ENGINE_COUNTED}
    rows = [
        ("jobs pushed", f"{led['pushed_jobs']}"),
        ("jobs accepted (`queued`)", f"{led['accepted_jobs']} ({led['accepted_rcpts']}"
         " recipients)"),
        ("final events", f"{final.get('delivered', 0)} delivered, {final.get('bounced', 0)}"
         f" bounced, {final.get('expired', 0)} expired"),
        ("recipients without a final event", f"{led['no_final_event_count']} ("
         f"{led['no_final_at_sink']} at the receiver, {led['no_final_refused']} refused by it)"),
        ("recipients with two final events", f"{led['final_twice']}"),
        ("**lost** (accepted, not at the receiver, no final event)", f"**{led['lost_count']}**"),
        ("copies at the receiver", f"{led['receiver_copies']} ({led['dropped_by_sink']} of"
         " them taken and dropped after the final dot, unanswered)"),
        ("**duplicates at the receiver** (a copy beyond the first)", f"**{led['duplicates']}**"),
        ("**ambiguous flags** (`deferred` events with `ambiguous`)",
         f"**{led['ambiguous_flags']}** (metric `ambiguous`: {met['ambiguous']})"),
        ("duplicates explained by an ambiguous flag", f"{causes.get(AMBIGUOUS, 0)}"),
        ("duplicates counted by the supervisor (`duplicate_delivery`)",
         f"{causes.get(COUNTED, 0)} (lines: {led['counted_lines']}, metric `duplicates`:"
         f" {met['duplicates']})"),
        ("duplicates flagged `possible_duplicate` (sent again after a worker's or the"
         " supervisor's death)",
         f"{causes.get(RESENT, 0)} (metric `resent_after_loss`: {met['resent_after_loss']}"
         " recipients flagged)"),
        ("duplicates the engine did not count", f"{sum(uncounted.values())}"
         + (" (" + ", ".join(f"{c}: {n}" for c, n in sorted(uncounted.items())) + ")"
            if uncounted else "")),
        ("ambiguous flags on a message the sink dropped unanswered",
         f"{led['ambiguous_on_dropped']} (the others: messages the sink never read,"
         " pipelined behind a dropped one)"),
        ("ambiguous flags with no duplicate", f"{led['ambiguous_without_duplicate']}"),
        ("hand-outs taken back (metric `taken_back`)", f"{met['taken_back']}"),
        ("final events published again at a restart, from the spool's outbox (metric"
         " `events_replayed`)", f"{met.get('events_replayed', 0)}"),
        ("events log lines torn by a kill -9", f"{led['torn_lines']}"),
        ("how the run ended", f"{result['finished']}; production {result['production_s']} s,"
         f" then {result['drained_s']} s"),
    ]
    out = ["| | |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows]
    out += ["", "| at | fault | what happened | duplicates it left uncounted |"
            " final events it lost |", "|---|---|---|---|---|"]
    for f in result["faults"]:
        lasting = f" ({f['seconds']:g} s)" if f["seconds"] else ""
        kill = f["kind"] in (WORKER, SUPERVISOR)
        out.append(f"| {f['at']:.0f} s | {f['label']}{lasting} | {f['seen']} |"
                   f" {f['uncounted_duplicates'] if kill else '-'} |"
                   f" {f['final_events_lost'] if f['kind'] == SUPERVISOR else '-'} |")
    elsewhere = {c: n for c, n in led["no_final_by_cause"].items() if c == UNEXPLAINED}
    if elsewhere:
        out.append(f"| | (no kill) | recipients without a final event outside any kill's"
                   f" window | - | {elsewhere[UNEXPLAINED]} |")
    out += ["", "| target | measured | |", "|---|---|---|"]
    out += [f"| {t} | {m} | {'PASS' if ok else '**FAIL**'} |" for t, m, ok in verdicts(result)]
    return "\n".join(out)


def section(result: dict[str, Any], command: str) -> str:
    m = result["machine"]
    return f"""{SECTION}

*Measured {result['when']} on {m['cores']} cores ({m['cpu']}), Linux {m['kernel']}, Python
{m['python']}, gevent {m['gevent']}; other processes kept {result['other_load']:.0%} of the
cores busy meanwhile. Seed {result['seed']}; took {result['took_s']:.0f} s.*

{result['jobs']:,} jobs through the whole engine (a supervisor, workers for 127.0.0.2 and
127.0.0.3) over {result['window_s']:.0f} s, to a recording sink on loopback (STARTTLS,
PIPELINING, CHUNKING) that drops {DROP:.0%} of its connections after reading the final dot,
keeping the message and never replying; the recipients' {DOMAINS} domains are looked up in a
real DNS server (MX records, TTL {DNS_TTL} s); the spool is on a {SPOOL_FS >> 20} MiB tmpfs. A
producer re-sends each job until it sees `queued`, while the fault script
([bench/faults.py](../bench/faults.py)) strikes at seeded moments. The accounting
([bench/soak_ledger.py](../bench/soak_ledger.py)) compares the events log, the sink's copies
(by Message-ID and recipient) and the engine's log. Needs root (the tmpfs).

```
{command}
```

{table(result)}

{reading(result)}
"""


def reading(result: dict[str, Any]) -> str:
    """What the figures say, in words: where each kind of duplicate comes from."""
    led = result["ledger"]
    causes = {c: n for c, n in led["by_cause"].items() if c not in ENGINE_COUNTED}
    kills = ", ".join(f"{n} after {c}" for c, n in sorted(causes.items())) or "none"
    return f"""**Reading it.** Every duplicate the receiver got has one of three sources here.
(1) The sink's drops: a message taken, then no reply to its final dot. The engine flags each
such deferral `ambiguous` and retries it, so each is a duplicate it counted; with CHUNKING a
transaction reads its own final reply, so a flag goes with a drop one for one
({led['ambiguous_on_dropped']} of {led['ambiguous_flags']} flags on a dropped copy), unless
the process holding the deferral is killed before it is recorded ((2) and (3)): this run
dropped {led['dropped_by_sink']} copies and raised {led['ambiguous_flags']} flags. (2) A kill -9
of a worker after it read a transaction's outcome (a 250, or the drop that makes it
ambiguous) and before that result left the process (the results flusher's batch, ZeroMQ's
queue): the supervisor takes the job back and hands it out again, each recipient the dead
worker had not reported flagged `possible_duplicate` and counted (`resent_after_loss`). (3) A
kill -9 of the supervisor (its workers die with it) after a transaction's outcome was read,
by a worker or by the supervisor, and before it was committed: the restarted engine finds the
recipient pending and sends it again; the spool had marked its job handed out, so the re-send
is flagged `possible_duplicate` and counted too. At each kill the soak reads the spool the dead
engine left: the recipients pending there that the sink had answered, or dropped without a
recorded ambiguous deferral, are the duplicates to come. A final event the kill caught
between the spool's commit and its publishing is published at the restart from the spool's
outbox (`events_replayed`). Duplicates the engine did not count in this run: {kills}.

The spool's disk full is felt only when SQLite needs a new block: its write-ahead log, once
grown to the checkpoint size (16 MiB), is written over in place, and a filesystem full around
it goes unnoticed (a first run logged no `spool_unwritable` in either 10 s window). The soak
therefore checkpoints and truncates the log from its own connection before filling the disk,
as after a checkpoint that shrank the log; the engine then pauses intake (the producer's
re-sends wait) and records results once space returns. DNS down defers the recipients whose
domains' answers expired (`4.4.3`, no duplicates: nothing was sent); they go out at the next
retry."""


def write_docs(text: str) -> None:
    write_section(DOCS, SECTION, text)


@contextlib.contextmanager
def hard_timeout(seconds: float) -> Iterator[None]:
    """The soak never runs longer than this: SIGALRM raises TimeoutError in the main thread
    (the cleanup still runs: the engine killed, the tmpfs unmounted)."""
    def expired(signum: int, frame: FrameType | None) -> None:
        raise TimeoutError(f"the soak ran past its hard limit of {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(int(seconds))
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m bench.fault_soak",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--jobs", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=None, help="default: drawn, and printed")
    parser.add_argument("--window", type=float, default=None,
                        help=f"seconds of production (default: jobs / {RATE:g}, within"
                             f" {WINDOW[0]:g}-{WINDOW[1]:g})")
    parser.add_argument("--keep", action="store_true",
                        help="keep the work folder (events log, engine log, config) and say where")
    parser.add_argument("--docs", action="store_true", help=f"write the section {SECTION!r}"
                        f" of {os.path.relpath(DOCS, ROOT)}")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("needs root: the spool's filesystem is a tmpfs the soak mounts and fills")
    seed = args.seed if args.seed is not None else random.randrange(1 << 20)
    window = args.window or min(WINDOW[1], max(WINDOW[0], args.jobs / RATE))
    log(f"seed {seed}")
    workdir = tempfile.mkdtemp(prefix="soak-")
    cpu_before = cpu_now()
    try:
        with hard_timeout(window + DRAIN + 180):
            result = run(Soak(args.jobs, seed, window), workdir)
        result["other_load"] = round(other_load(cpu_before), 3)
    finally:
        if args.keep:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    given = sys.argv[1:] if argv is None else argv
    command = "python3 -m bench.fault_soak " + " ".join(a for a in given if a != "--keep")
    if "--seed" not in command:
        command += f" --seed {seed}"
    print(json.dumps(result, indent=1, default=str))
    print(table(result))
    if args.docs:
        write_docs(section(result, command.strip()))
        log(f"wrote the section {SECTION!r} of {os.path.relpath(DOCS, ROOT)}")
    return 0 if all(ok for _, _, ok in verdicts(result)) else 1


if __name__ == "__main__":
    sys.exit(main())
