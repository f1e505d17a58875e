"""Many destinations: one burst to N domains, each with its own MX host (issue #19, item 3).

`python -m bench.many_destinations [--domains 10000] [--label now] [--docs]`

The whole engine (`mailengine run`, one worker on 127.0.0.2) resolving through a real DNS
server on loopback (tests/support/dnsserver.py, each answer held `--dns-delay` seconds as a
recursive resolver's would be): domain `d<i>.test` has MX `mx.d<i>.test` (a provider of its
own: its own connection gate and shaper), whose A record is one of 127.0.1.1-127.0.1.4, where
four Postfix `smtp-sink`s listen on one port.
One 2 KB message per domain, pushed at once; then, once all are delivered, the same again
(every answer still within its TTL: the second burst should ask DNS nothing); then nothing
until the idle connections and empty pools are reclaimed (`pool.idle_timeout`, shortened).

Measured: DNS queries in flight at once (peak, counted at the server) and in all, the
resolver's cache hits and joined lookups (the worker's own counts, from `mailengine status`),
pools (destinations) and open SMTP connections (the worker's sockets to the sinks' port, from
/proc/net/tcp) at their peak and after the idle time, the worker's RSS before, at its peak
(and per 1,000 destinations) and after the idle time, the time to deliver each burst and its
rate, and the `status` answer (its size as JSON, the time to get it) after the first burst
and after the idle time. The providers' shaping state is forgotten after the same idle time
as the pools (`shaping.forget_after`, where the engine has it).

`--docs` writes docs/PERFORMANCE.md ("Many destinations", one row per `--label`, kept in
bench/results/many_destinations.json).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

from bench import idle_gauges
from bench.common import (
    ROOT,
    SENDER,
    SMTP_SINK,
    Producer,
    Rows,
    log,
    shown_command,
)
from engine.config import ShapingConfig
from engine.testing.harness import LocalEngine, make_message
from tests.support.dnsserver import DnsServer

RESULTS = os.path.join(ROOT, "bench", "results", "many_destinations.json")
DOC = os.path.join(ROOT, "docs", "PERFORMANCE.md")
HEADING = "## Many destinations"
SINK_ADDRESSES = ("127.0.1.1", "127.0.1.2", "127.0.1.3", "127.0.1.4")


def zone(domains: int) -> dict[str, Any]:
    records: dict[str, Any] = {}
    for i in range(domains):
        records[f"d{i}.test"] = {"MX": [(10, f"mx.d{i}.test")]}
        records[f"mx.d{i}.test"] = {"A": [SINK_ADDRESSES[i % len(SINK_ADDRESSES)]]}
    return records


class Sinks:
    """One smtp-sink per address in SINK_ADDRESSES, all on one port."""

    def __init__(self) -> None:
        if not os.path.exists(SMTP_SINK):
            raise RuntimeError(f"{SMTP_SINK} not found (apt-get install postfix)")
        self.procs: list[subprocess.Popen[bytes]] = []
        for _ in range(20):
            self.port = _free_port(SINK_ADDRESSES[0])
            try:
                for address in SINK_ADDRESSES:
                    self._start(address)
                return
            except OSError:
                self.stop()
        raise OSError("no port free on every sink address")

    def _start(self, address: str) -> None:
        cmd = [SMTP_SINK] + (["-u", "nobody"] if os.geteuid() == 0 else [])
        proc = subprocess.Popen([*cmd, f"{address}:{self.port}", "1000"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(proc)
        deadline = time.monotonic() + 10
        while not _listening(address, self.port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise OSError(f"smtp-sink on {address}:{self.port} did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(5)
        self.procs = []


def _free_port(address: str) -> int:
    import socket
    with socket.create_server((address, 0)) as s:
        return int(s.getsockname()[1])


def _listening(address: str, port: int) -> bool:
    import socket
    try:
        socket.create_connection((address, port), timeout=1).close()
        return True
    except OSError:
        return False


def open_connections(port: int) -> int:
    """Established TCP connections from 127.0.0.2 to `port` (the worker's to the sinks)."""
    count = 0
    with open("/proc/net/tcp", encoding="ascii") as f:
        next(f)
        for line in f:
            fields = line.split()
            local, remote, state = fields[1], fields[2], fields[3]
            if state == "01" and local.startswith("0200007F:") \
                    and int(remote.split(":")[1], 16) == port:
                count += 1
    return count


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class Sampler:
    """Every `period` s: the worker's status figures, RSS and open connections; peaks kept."""

    def __init__(self, engine: LocalEngine, port: int, period: float = 0.25) -> None:
        self.engine, self.port, self.period = engine, port, period
        self.peak = {"connections": 0, "destinations": 0, "rss_mb": 0.0}
        self.last: dict[str, Any] = {}
        self.last_worker: dict[str, Any] = {}  # its latest status figures
        self._worker: dict[str, Any] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def sample(self, ask: bool = True) -> dict[str, Any]:
        """`ask`: the engine's status too (the worker reports once a second, and the
        status carries every provider's shaping state: asked once a second at most)."""
        if ask or not self._worker:
            self._worker = next(iter(self.engine.status(timeout=30)["workers"].values()))
        worker = self.last_worker = self._worker
        now = {"connections": open_connections(self.port),
               "destinations": worker.get("destinations", 0), "rss_mb": rss_mb(worker["pid"]),
               "dns": worker.get("dns", {}), "connections_reported": worker["connections_open"]}
        for key in self.peak:
            self.peak[key] = max(self.peak[key], now[key])
        self.last = now
        return now

    def _run(self) -> None:
        turn = 0
        while not self._stop.wait(self.period):
            turn += 1
            try:
                self.sample(ask=turn % round(1 / self.period) == 0)
            except (OSError, TimeoutError, StopIteration):
                pass

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def status_cost(engine: LocalEngine, times: int = 3) -> dict[str, float]:
    """The `status` answer: its size as JSON (KB) and the time to get it (ms, the median
    of `times` asks), with the shaping providers it lists and leaves out (idle)."""
    took, answer = [], {}
    for _ in range(times):
        started = time.perf_counter()
        answer = engine.status(timeout=30)
        took.append(time.perf_counter() - started)
    worker = next(iter(answer["workers"].values()))
    return {"kb": round(len(json.dumps(answer)) / 1024, 1),
            "ms": round(1000 * sorted(took)[len(took) // 2], 1),
            "providers_shown": len(worker.get("shaping") or {}),
            "providers_idle": worker.get("shaping_idle")}


def forgets_providers() -> bool:
    """Whether the engine under test forgets idle providers' shaping state (a config key
    that engines before it do not know, and would refuse)."""
    return "forget_after" in {f.name for f in dataclasses.fields(ShapingConfig)}


def burst(producer: Producer, tag: str, domains: int) -> dict[str, float]:
    ids = []
    frames = []
    for i in range(domains):
        rcpt = f"user@d{i}.test"
        envelope = {"id": f"{tag}-{i}", "from": SENDER, "to": [rcpt]}
        producer.frames[envelope["id"]] = [json.dumps(envelope).encode(),
                                           make_message(i, 2000, SENDER, rcpt)]
        producer.unqueued.add(envelope["id"])
        ids.append(envelope["id"])
        frames.append(producer.frames[envelope["id"]])
    deferred_before = producer.deferred
    started = time.time()
    for job_frames in frames:
        producer.push.send_multipart(job_frames)
    producer.sent_at.update(dict.fromkeys(ids, started))
    producer.wait_queued(timeout=300)
    producer.wait_final(ids, timeout=600, poll=0.1)
    mine = [producer.final[i] for i in ids]
    delivered = sorted(e["ts"] for e in mine if e["event"] == "delivered")
    took = (delivered[-1] - started) if delivered else float("nan")
    return {"delivered": len(delivered), "final": len(mine), "seconds": round(took, 2),
            "deferred": producer.deferred - deferred_before,
            "rate": round(len(delivered) / took, 1) if delivered else 0.0}


def run(workdir: str, domains: int, dns_delay: float, idle_timeout: float,
        max_in_flight: int | None) -> dict[str, Any]:
    log(f"many destinations: {domains} domains, DNS delay {dns_delay * 1000:.0f} ms")
    dns_cfg: dict[str, Any] = {"nameservers": ["127.0.0.1"]}
    if max_in_flight is not None:
        dns_cfg["max_in_flight"] = max_in_flight
    sinks = Sinks()
    shutil.rmtree(workdir, ignore_errors=True)
    with DnsServer(zone(domains), ttl=3600, delay=dns_delay) as dns:
        dns_cfg["port"] = dns.port
        extra: dict[str, Any] = {
            "log_level": "warning", "dns": dns_cfg,
            "security": {"allow_private_destinations": True},
            "pool": {"idle_timeout": idle_timeout}}
        if forgets_providers():
            extra["shaping"] = {"forget_after": idle_timeout}
        engine = LocalEngine(workdir, sinks.port, route=None, extra=extra)
        try:
            engine.start()
            producer = Producer(engine)
            sampler = Sampler(engine, sinks.port)
            baseline = sampler.sample()
            dns.peak_in_flight = 0
            first = burst(producer, "first", domains)
            after_first = sampler.sample()
            status_first = status_cost(engine)
            log(f"status after the first burst: {status_first}")
            queries_first = len(dns.queries)
            by_type: dict[str, int] = {}
            for _, rdtype in dns.queries:
                by_type[rdtype] = by_type.get(rdtype, 0) + 1
            peak_first = dns.peak_in_flight
            log(f"first burst: {first}, {queries_first} DNS queries, peak {peak_first}")
            second = burst(producer, "second", domains)
            after_second = sampler.sample()
            queries_second = len(dns.queries) - queries_first
            log(f"second burst: {second}, {queries_second} DNS queries")
            peaks = dict(sampler.peak)
            sampler.stop()
            reclaim_started = time.monotonic()
            deadline = reclaim_started + idle_timeout * 3 + 20
            while True:
                now = sampler.sample()
                idle = sampler.last_worker.get("shaping_idle") or 0
                shown = len(sampler.last_worker.get("shaping") or {})
                forgotten = not forgets_providers() or idle + shown == 0
                if now["connections"] == 0 and now["destinations"] == 0 and forgotten:
                    break
                if time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            reclaimed = dict(now, seconds=round(time.monotonic() - reclaim_started, 1))
            log(f"after the idle time: {reclaimed}")
            status_idle = status_cost(engine)
            log(f"status after the idle time: {status_idle}")
            producer.close()
            engine.stop()
        finally:
            engine.cleanup()
            sinks.stop()
    grown = peaks["rss_mb"] - baseline["rss_mb"]
    return {
        "domains": domains, "dns_delay_ms": dns_delay * 1000, "idle_timeout": idle_timeout,
        "max_in_flight": max_in_flight,
        "first": first, "second": second,
        "dns": {"queries_first": queries_first, "queries_second": queries_second,
                "by_type_first": by_type,
                "peak_in_flight_server": peak_first,
                "worker_after_first": after_first["dns"], "worker_after_second":
                    after_second["dns"]},
        "peak": peaks, "reclaimed": reclaimed,
        "status": {"after_first": status_first, "after_idle": status_idle},
        "rss_mb": {"baseline": round(baseline["rss_mb"], 1), "peak": round(peaks["rss_mb"], 1),
                   "per_1000": round(grown / (domains / 1000), 2),
                   "after_idle": round(reclaimed["rss_mb"], 1)},
    }


def _load(result: dict[str, Any]) -> str:
    load = result.get("other_load")
    return "n/a" if load is None else f"{100 * load:.0f}%"


def _burst(row: dict[str, Any]) -> str:
    deferred = row.get("deferred")
    counted = "deferrals not counted" if deferred is None else f"{deferred:,} deferred"
    return f"{row['seconds']} s, {row['rate']:.0f}/s, {counted}"


def _mb(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def _status(result: dict[str, Any]) -> str:
    """The status answer after the first burst and after the idle time (runs before this
    was measured: n/a)."""
    status = result.get("status")
    if not status:
        return "n/a"
    return " / ".join(
        f"{s['kb']:,.0f} KB, {s['ms']:.0f} ms ({s['providers_shown']:,},"
        f" {'n/a' if s['providers_idle'] is None else format(s['providers_idle'], ',')})"
        for s in (status["after_first"], status["after_idle"]))


def render(results: dict[str, Any]) -> str:
    lines = [HEADING, "", '<a id="bench-many-destinations"></a>', "",
             "Issue #19 item 3, `bench/many_destinations.py`: the whole engine (one worker) and"
             " a DNS server on loopback answering MX and A for N domains, each with its own MX"
             " host, whose addresses are four `smtp-sink`s on 127.0.1.1-127.0.1.4; each answer"
             " held a few ms (a resolver's recursion). One 2 KB message per domain pushed at"
             " once, then the same burst again within the TTL, then idle until reclaimed.", "",
             "| run | command | engine | date | domains | burst 1: time, rate, deferrals |"
             " burst 2: same | DNS queries burst 1 / 2 | DNS in flight peak (bound) |"
             " cache hits, joined | pools peak / after idle | connections peak / after idle (s)"
             " | worker RSS before / peak / after idle, per 1,000 |"
             " status after burst 1 / after idle: size, time (providers shown, idle) |"
             " other load |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, r in results.items():
        command = shown_command(r["command"])
        d = r["dns"]
        w = d["worker_after_second"]
        bound = r.get("max_in_flight") or ("32" if w else "none")
        # main before this work: its status said nothing of pools nor of the resolver
        pools = (f"{r['peak']['destinations']:,} / {r['reclaimed']['destinations']}" if w
                 else "n/a")
        lines.append(
            f"| {label} | `{command}` | `{r['engine']}` | {r['date']} | {r['domains']:,} |"
            f" {_burst(r['first'])} | {_burst(r['second'])} |"
            f" {d['queries_first']:,} / {d['queries_second']:,} |"
            f" {d['peak_in_flight_server']} ({bound}) |"
            f" {w.get('cache_hits', 'n/a')}, {w.get('joined', 'n/a')} |"
            f" {pools} |"
            f" {r['peak']['connections']:,} / {r['reclaimed']['connections']}"
            f" ({r['reclaimed']['seconds']}) |"
            f" {r['rss_mb']['baseline']:.0f} / {r['rss_mb']['peak']:.0f} /"
            f" {_mb(r['rss_mb'].get('after_idle'))} MB, {r['rss_mb']['per_1000']:.1f} MB |"
            f" {_status(r)} |"
            f" {_load(r)} |")
    lines += ["", PROSE]
    idle = idle_gauges.render()  # the providers' StatsD gauges (bench/idle_gauges.py)
    lines += idle
    return "\n".join(lines) + "\n"


PROSE = """\
Each run: one worker on 127.0.0.2, DNS answers held 20 ms (`--dns-delay`), TTL an hour,
`pool.idle_timeout` shortened to 30 s (`--idle-timeout`) so that reclaiming is seen within the
run; every domain is a provider of its own (its own connection gate and shaper), the worst
case for per-destination state. "DNS in flight" is counted at the DNS server (it runs in the
benchmark's process, a thread per query); cache hits and joined lookups are the worker's own
counts (its `status`), as are pools; connections are the worker's established sockets to the
sinks (/proc/net/tcp, every 0.25 s); RSS is the worker's VmRSS. Each domain costs three
queries: its MX, its MX host's A, its MTA-STS TXT record (`_mta-sts.<domain>`, NXDOMAIN here).
A deferred message is retried after the engine's first retry step, so deferrals stretch a
burst.

*Before* (main at 72de926, from a `git archive` of it): nothing bounded DNS queries but the
worker's tasks in flight (`limits.max_in_flight`, 1,000): 67-81 out at once at 2,000 domains
and 150 at 10,000, and some of them timed out (`451 4.4.3 DNS lookup for dN.test failed: timed
out`, seen in the events of these runs; the resolver here answers every query, so the
losses were on the way: UDP buffers, the 2 cores): those messages were deferred and retried,
and **10,000 domains took 317 s, the same again 333 s** (2,000: 155 deferred, 67 s). The
second burst of 2,000, nothing deferred, still took 39 s against 3-6 s after the change;
these runs do not say why (its 2,000 idle connections were each checked with an RSET
before reuse, idle over 2 s, a round trip on loopback). Two messages to one domain at once
asked the same name twice (tests/engine/test_many_destinations.py fails so on main's
resolver). The cache held 10,000 answers, a third of what 10,000 domains need: **the second
burst to the same 10,000 domains, all within their TTL, asked DNS 30,000 times again**. Every
destination kept its idle connection for `idle_timeout`, whatever the number: all 2,000 at
2,000 domains; at 10,000, at the rate the burst went, ~1,000 idle and ~1,000 busy (2,041 at
the peak), and with the default 60 s and a faster burst one per destination, thousands. Pools
and connections were reclaimed after the idle time. Worker RSS from 52 to 333 MB at 10,000
domains (28 MB per 1,000 destinations).

*What changed:* `dns.max_in_flight` (default 32, engine/mx.py): at most that many queries out
per worker, the rest wait their turn (untimed: a wait is local congestion and defers
nothing), and a name being asked is not asked again (the callers wanting it meanwhile wait for
that answer; counted as `joined`). `dns.cache_size` 50,000 (was 10,000; ~0.8 KB an answer).
`pool.max_idle` (default 1,000, engine/pools.py): idle connections across the worker's
destinations; past it the one idle longest is closed at once, and its empty pool is forgotten
at the next reap, so open connections stay under `max_idle` plus the busy ones (one per task
in flight at most).

*After:* DNS in flight never above 32 at the server and nothing deferred; the second burst
asked DNS nothing (all 50,000 of its lookups from the cache); at 10,000 domains at most
1,965-1,979 connections (1,000 idle and the busy ones) and 3,218-3,359 pools at once, none
left ~32 s after the burst; **10,000 domains in 76-101 s (98-132/s), the same again in
34-87 s**, and 15-16 MB of worker RSS per 1,000 destinations (52 MB before the burst, 203-209
MB at its peak; 33 per 1,000 at 2,000 domains, where the growth that is not per destination
weighs more). Which change bought how much time these runs do not separate (the DNS
timeouts and retries most visibly; the other load differed too).

*Idle providers (what was left of item 3):* main at 34a0f87 (row "before forgetting") kept
every provider's shaping state (engine/shaping.py: pacer, adaptive rate, caps, gate...) for the
worker's life and sent all of it to the supervisor every second: at 10,000 providers the
`status` answer was **2.75 MB, 440 ms** after the first burst (the worker still busy) and
**135 ms** after the idle time, still listing all 10,000; RSS 205 MB at the peak and **194 MB
after the idle time**. *What changed* (engine/shaping_idle.py, docs/SHAPING.md): the worker's
report, hence `status`, lists only the providers with something to show (mail in the last
10 s, waiting, connections open, suspended, throttled, a limit learned) and counts the others
(`shaping_idle`); a provider unused for `shaping.forget_after` (default 5 minutes; 30 s in
these runs, the same as the pools' idle time, so providers done early in a burst were
forgotten before its end) with nothing to keep is dropped, and made anew with its learned
rate when mail comes again. *After* (row "forgetting idle providers"): **279 KB, 15 ms** after
the first burst (1,009 providers listed: those with a connection open or mail in the last 10
s; 483 idle ones counted; the rest already forgotten), **0.7 KB, 1 ms** after the idle time
(none held); RSS 175 MB at the peak and **166 MB after the idle time**. The first run of the
change (row "forgetting, shapers freed by the collector only") grew more than main (246 MB
peak, 240 MB after idle): the gate and the pacer held each shaper in a reference cycle, which a
worker's collector, tuned to rarely run a full collection (engine/gctune.py), did not free, and
the second burst made 10,000 new shapers on top; they now hold it weakly, and a forgotten
shaper is freed at once (tests/unit/test_shaping_idle.py). RSS is still not given back to the
system after the idle time (CPython keeps its arenas; the DNS cache holds its 30,000 answers
for their TTL): what the idle time frees is used again by the next burst. The rate still falls
with the number of new destinations (each is a new connection and three lookups). The runs'
other load was 55-65% of the 2 cores (other sessions' tests and benchmarks).
Bounds asserted without timing: tests/engine/test_many_destinations.py (150 domains, two
messages each, DNS bound 4 counted at the server, each name asked once, pools and
connections reclaimed after a 1 s idle time, providers forgotten after `forget_after` 1 s,
status listing none), tests/unit/test_pool.py (`max_idle`) and tests/unit/test_shaping_idle.py
(what is kept, what is forgotten and made anew, what is listed).

*Commands:* `python -m bench.many_destinations --label NAME [--domains N] [--idle-timeout S]`
in a tree (`--docs` writes this section, `--render-only` rewrites it from
bench/results/many_destinations.json); the `before` rows from a snapshot of main: `git
archive 72de926 engine conf bin | tar -x -C SNAP; cd SNAP; BENCH_ENGINE_REV=72de9265ff30
PYTHONPATH=REPO python -m bench.many_destinations ...` (the 34a0f87 row: `git archive 34a0f87
engine conf bin`, `BENCH_ENGINE_REV=34a0f87d0a3c`, the benchmark of this tree measuring it).
About 4-5 minutes for 10,000 domains, 1-2 minutes for 2,000.
"""


ROWS = Rows("python -m bench.many_destinations", RESULTS, DOC, HEADING, render)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=ROWS.prog, description=__doc__)
    parser.add_argument("--domains", type=int, default=10000)
    parser.add_argument("--dns-delay", type=float, default=0.02,
                        help="seconds each DNS answer is held (default 0.02)")
    parser.add_argument("--idle-timeout", type=float, default=5.0,
                        help="pool.idle_timeout for the run (default 5 s)")
    parser.add_argument("--max-in-flight", type=int, default=None,
                        help="dns.max_in_flight (default: the engine's)")
    ROWS.add_options(parser)
    args = parser.parse_args(argv)
    if args.render_only:
        ROWS.write_doc()
        return 0
    workdir = tempfile.mkdtemp(prefix="mailengine-many-")
    ROWS.record(args, argv, functools.partial(run, workdir, args.domains, args.dns_delay,
                                              args.idle_timeout, args.max_in_flight))
    return 0


if __name__ == "__main__":
    sys.exit(main())
