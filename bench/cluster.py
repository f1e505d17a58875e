"""Three engines, one Redis, one shared limit: issue #18's "Must show" with figures.

`python -m bench.cluster [--label now] [--docs]`

The scenario of tests/engine/test_cluster.py, timed, one phase after another: three whole
engines (`mailengine run`, sending from 127.0.0.2, .3 and .4, each with its own spool and
sockets, `cluster.retry: 1s` as the test), one real redis-server on loopback, one receiver
(engine.testing.sink) that refuses past 60 messages/s from all senders together, and the
provider's `cluster_rate: 60`. Every push is `mailengine push`'s Pusher to the three hosts
(one PUSH socket to every ingest, every host's events followed, a job re-sent until some
host says `queued`).

0. a job re-sent to another host: acknowledged there as a duplicate, delivered once;
1. *shared*: 3,000 jobs pushed over the three, SHARED seconds;
2. *Redis killed* (SIGKILL): FALLBACK seconds;
3. *Redis back* (started again, empty, on the same port; the phase begins as it is started)
   and 4,500 more jobs: BACK seconds; the time until every worker's `cluster_mode` gauge
   says shared again;
4. *one engine killed -9* (host0, with mail in its spool) and 600 new jobs, which go to the
   other two: KILLED seconds;
5. *engine restarted* (host0, on its spool as the kill left it): RESTARTED seconds; then
   every acknowledged job is waited for at the receiver (the drain).

Per phase: messages/s at the receiver (average, the busiest and the quietest 5 s window,
each host's share), measured from SETTLE seconds after the phase began (the change itself
is not the steady state); the receiver's refusals; copies delivered twice; jobs of the
phase's push never delivered (lost: must be 0); Redis's work per message (the commands it
processed, scripts' included: INFO commandstats) and its round trips per message where the
engines' metrics time them (the workers' leases: their `cluster_lease` timer over StatsD);
the engines' log lines of pace and mode changes. And the other load on the machine during
the run (bench.run's other_load).

Bounded: about 3 minutes and a half. `--docs` writes docs/PERFORMANCE.md's "Three engines,
one Redis" section from every row kept in bench/results/cluster.json (one per `--label`).
"""
from __future__ import annotations

import argparse
import bisect
import collections
import contextlib
import functools
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.common import ROOT, Rows, StatsdCatcher, log, shown_command
from engine.push import Pusher
from engine.testing.harness import LocalEngine, make_message
from engine.testing.sink import SinkServer
from tests.support.redis import RedisServer, missing
from tests.support.wait import until

IPS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
PROVIDER = "127.0.0.1"  # an IP literal route: its own provider
LIMIT = 60  # messages/s, for the three hosts together (the receiver's and the cluster's)
WINDOW = 5.0  # s: the window of the busiest and quietest rates
SETTLE = 2.0  # s after a phase began before its rates count (as the test: past leased turns)
SHARED, FALLBACK, BACK, KILLED, RESTARTED = 30.0, 15.0, 25.0, 20.0, 20.0  # s, each phase
FIRST_PUSH = 3000  # jobs for the shared phase and Redis's absence (50 s at the limit)
SECOND_PUSH = 4500  # pushed when Redis is back: every host busy until the restart's end
NEW_MAIL = 600  # pushed while host0 is down: for the other two
BACK_WITHIN = 10.0  # s: the Must show's bound for the shared limit to come back
RESULTS = os.path.join(ROOT, "bench", "results", "cluster.json")
DOC = os.path.join(ROOT, "docs", "PERFORMANCE.md")
HEADING = "## Three engines, one Redis: a shared limit, Redis lost, an engine killed"
RESENT = "resent-1@a.test"  # the job re-sent to another host
ASKED = ("info", "ping")  # Redis commands of the benchmark's own (counts, RedisServer's check)
PHASES = ("shared", "redis killed", "redis back", "engine killed", "engine restarted")


# -- the figures (pure: tests/unit/test_bench_cluster.py) -------------------------------------


def window_extremes(times: Sequence[float], start: float, end: float,
                    window: float = WINDOW) -> tuple[int, int] | None:
    """The most and the fewest of the sorted `times` in any `window` seconds [t, t+window)
    lying within [start, end); None when [start, end) is shorter than one window. The count
    only changes as a window's start passes an event (one fewer) or its end reaches one (one
    more): the most is at a window starting at an event (or at `end - window`), the fewest
    at a window starting just past one (or at `start`)."""
    last = end - window
    if last < start:
        return None

    def count(at: float, past: bool = False) -> int:
        """Events in [at, at + window), or in (at, at + window] when `past`."""
        side = bisect.bisect_right if past else bisect.bisect_left
        return side(times, at + window) - side(times, at)

    first = bisect.bisect_left(times, start)
    starts = times[first:bisect.bisect_right(times, last)]  # windows [t, t + window)
    pasts = times[first:bisect.bisect_left(times, last)]  # (t, t + window]: within too
    most = max([count(start), count(last)] + [count(t) for t in starts])
    fewest = min([count(start), count(last)] + [count(t, past=True) for t in pasts])
    return most, fewest


def between(times: Iterable[float], start: float, end: float) -> list[float]:
    return sorted(t for t in times if start <= t < end)


def phase_rates(accepts: dict[str, list[float]], start: float, end: float,
                settle: float = SETTLE, window: float = WINDOW) -> dict[str, Any]:
    """Messages/s the receiver accepted in [start + settle, end): on average, in the busiest
    and the quietest `window`, and each sender's share of them."""
    since = start + settle
    mine = {ip: between(times, since, end) for ip, times in accepts.items()}
    every = sorted(t for times in mine.values() for t in times)
    extremes = window_extremes(every, since, end, window)
    span = end - since
    return {"seconds": round(span, 2), "messages": len(every),
            "average": round(len(every) / span, 2) if span > 0 else None,
            "busiest": extremes[0] / window if extremes else None,
            "quietest": extremes[1] / window if extremes else None,
            "share": {ip: round(len(times) / len(every), 3) if every else 0.0
                      for ip, times in mine.items()}}


def copies_twice(arrivals: Iterable[tuple[float, str]]) -> list[tuple[float, str]]:
    """Of every (time, recipient) the receiver took, in order of time, the copies after the
    first of a recipient: the duplicates delivered, each when it arrived."""
    seen: set[str] = set()
    again = []
    for at, rcpt in sorted(arrivals):
        if rcpt in seen:
            again.append((at, rcpt))
        seen.add(rcpt)
    return again


# -- the scenario ------------------------------------------------------------------------------


def job(job_id: str, index: int) -> tuple[str, list[bytes]]:
    envelope = {"id": job_id, "from": "sender@example.test", "to": [f"{job_id}@a.test"]}
    return job_id, [json.dumps(envelope).encode(), make_message(index, 1000)]


@dataclass
class Push:
    """One push of `count` jobs over the hosts up: what each host acknowledged."""

    prefix: str
    count: int
    by_host: dict[str, int]
    acknowledged: int

    @property
    def rcpts(self) -> set[str]:
        return {f"{self.prefix}-{i}@a.test" for i in range(self.count)}


class Cluster:
    """The receiver, Redis, the three engines and a StatsD listener, with what each phase
    needs: pushes, Redis's command count, the workers' gauges and leases."""

    def __init__(self, workdir: str, stack: contextlib.ExitStack) -> None:
        self.receiver = SinkServer(tls=False, rate_limit=LIMIT, rate_burst=10, per_ip=False)
        stack.callback(self.receiver.stop)
        self.redis = stack.enter_context(RedisServer())
        self.statsd = StatsdCatcher()
        stack.callback(self.statsd.close)
        self.engines = [self._engine(workdir, i, ip) for i, ip in enumerate(IPS)]
        for engine in self.engines:
            stack.callback(engine.cleanup)
            engine.start()

    def _engine(self, workdir: str, index: int, ip: str) -> LocalEngine:
        return LocalEngine(os.path.join(workdir, f"engine{index}"), self.receiver.port,
                           ips=(ip,), route=None, extra={
                               "routes": {"a.test": PROVIDER},
                               "cluster": {"redis": self.redis.url, "host": f"host{index}",
                                           "retry": "1s"},
                               "shaping": {"providers": {PROVIDER: {"cluster_rate": LIMIT}}},
                               "statsd": {"enabled": True, "host": "127.0.0.1",
                                          "port": self.statsd.port,
                                          "prefix": f"bench.host{index}"}})

    def push(self, prefix: str, count: int) -> Push:
        """`count` jobs, `mailengine push`'s way, to every host (those down get none)."""
        pusher = Pusher([str(e.config["ingest"]) for e in self.engines],
                        [str(e.config["events"]) for e in self.engines], resend=2.0,
                        timeout=60)
        tally = pusher.push((job(f"{prefix}-{i}", i) for i in range(count)), count)
        by_host = {f"host{i}": tally.by_host.get(str(e.config["ingest"]), 0)
                   for i, e in enumerate(self.engines)}
        log(f"pushed {prefix}: {tally.accepted} of {count} acknowledged, {by_host}")
        return Push(prefix, count, by_host, tally.accepted)

    def redis_calls(self) -> collections.Counter[str]:
        """Commands Redis processed since it started, by name (this INFO not yet counted)."""
        stats = self.redis.client().info("commandstats")  # type: ignore[attr-defined]
        return collections.Counter({name.removeprefix("cmdstat_"): int(figures["calls"])
                                    for name, figures in stats.items()})

    def leases(self, start: float, end: float) -> int:
        """The workers' leases of the cluster rate (one round trip each) in [start, end)."""
        with self.statsd.lock:
            return sum(1 for t, name, kind, _ in self.statsd.samples
                       if kind == "ms" and name.endswith(".cluster_lease") and start <= t < end)

    def shared_again(self, since: float) -> dict[str, float]:
        """Each process whose `cluster_mode` gauge said shared (2) since `since`: when."""
        first: dict[str, float] = {}
        with self.statsd.lock:
            for t, name, kind, value in self.statsd.samples:
                if kind == "g" and name.endswith(".cluster_mode") and value == 2 and t >= since:
                    first.setdefault(name.rsplit(".", 2)[0], t)
        return first

    def resent_as_duplicate(self) -> bool:
        """A job delivered by host0, then re-sent to host1: acknowledged as a duplicate."""
        resent = [({"id": "resent-1", "from": "sender@example.test", "to": [RESENT]},
                   make_message(0, 1000))]
        first, other = self.engines[0], self.engines[1]
        if not first.push(resent):
            return False
        first.wait_final(1, timeout=30)
        if not other.push(resent):
            return False
        events = other.wait_for(lambda evs: any(e["event"] == "queued" for e in evs),
                                timeout=10, what="queued")
        return [(e["event"], e["id"], e.get("duplicate")) for e in events] == \
            [("queued", "resent-1", True)]

    def arrivals(self) -> list[tuple[float, str]]:
        return [(m.received, r) for m in self.receiver.messages for r in m.rcpt_tos]

    def story(self, rcpt: str, since: float) -> dict[str, Any]:
        """A recipient's copies at the receiver (s from `since`, sender) and its events at
        every host: to tell a duplicate's cause."""
        copies = [(round(m.received - since, 2), m.peer[0]) for m in self.receiver.messages
                  if rcpt in m.rcpt_tos]
        events = [(f"host{i}", e["event"], round(e["ts"] - since, 2),
                   bool(e.get("possible_duplicate")))
                  for i, engine in enumerate(self.engines) for e in engine.events()
                  if e.get("rcpt") == rcpt or (e["event"] == "queued" and
                                               f"{e['id']}@a.test" == rcpt)]
        return {"rcpt": rcpt, "copies": copies, "events": events}

    def flagged(self) -> set[str]:
        """Recipients the engines said might be delivered twice (a delivery cut short)."""
        return {e["rcpt"] for engine in self.engines for e in engine.events()
                if e.get("possible_duplicate") or e.get("ambiguous")}


NOTABLE = re.compile(r"^(\S+ \S+) \S+ (\S+)\[\d+\] (event=(?:rate_decreased|rate_increased|"
                     r"provider_ceiling_shared|cluster_mode|handed_out_at_start)\b.*)$")


def notable(engine: LocalEngine, since: float) -> list[str]:
    """The engine's log lines of pace and mode changes, each with its seconds from `since`
    (the log's local time), cut short: what moved its rate."""
    found = []
    with open(engine.log_path, encoding="utf-8", errors="replace") as f:
        for text in f:
            match = NOTABLE.match(text.rstrip("\n"))
            if match is None:
                continue
            stamp, _, millis = match.group(1).partition(",")
            at = time.mktime(time.strptime(stamp, "%Y-%m-%d %H:%M:%S")) + int(millis) / 1000
            if at >= since:
                found.append(f"{at - since:.2f} {match.group(2)} {match.group(3)[:160]}")
    return found[:40]


def sleep_until(moment: float) -> None:
    """The scenario's own clock: a phase lasts its seconds (the figures are what happens
    meanwhile)."""
    time.sleep(max(0.0, moment - time.time()))


@dataclass
class Timeline:
    """What the scenario did, and when: each phase's start (Unix time), Redis's commands in
    each phase it was up, each phase's push, when each worker shared again after Redis's
    restart, the re-sent job's acknowledgement, host0's events before its kill."""

    marks: dict[str, float] = field(default_factory=dict)
    calls: dict[str, collections.Counter[str]] = field(default_factory=dict)
    pushes: dict[str, Push] = field(default_factory=dict)
    again: dict[str, float] = field(default_factory=dict)
    duplicate_acknowledged: bool = False
    held_events: int = 0

    def begin(self, phase: str) -> float:
        self.marks[phase] = time.time()
        log(phase)
        return self.marks[phase]


def scenario(cluster: Cluster) -> Timeline:
    line = Timeline()
    line.duplicate_acknowledged = cluster.resent_as_duplicate()
    log(f"re-sent job acknowledged as a duplicate: {line.duplicate_acknowledged}")
    counted = cluster.redis_calls()
    start = line.begin("shared")
    line.pushes["shared"] = cluster.push("s", FIRST_PUSH)
    sleep_until(start + SHARED)
    line.calls["shared"] = cluster.redis_calls() - counted
    cluster.redis.kill()
    sleep_until(line.begin("redis killed") + FALLBACK)
    back = line.begin("redis back")  # before it answers: a worker may be back at once
    cluster.redis.start()  # empty, on the same port
    counted = cluster.redis_calls()
    line.pushes["redis back"] = cluster.push("b", SECOND_PUSH)
    workers = {f"bench.host{i}.{ip.replace('.', '_')}" for i, ip in enumerate(IPS)}
    with contextlib.suppress(TimeoutError):  # the figures say how long it took, or that not
        until(lambda: workers <= cluster.shared_again(back).keys(), timeout=30,
              what="every worker sharing again")
    line.again = cluster.shared_again(back)
    sleep_until(back + BACK)
    line.calls["redis back"], counted = phase_calls(cluster, counted)
    line.held_events = len(cluster.engines[0].events())  # what host0 said before its kill
    cluster.engines[0].kill()
    start = line.begin("engine killed")
    line.pushes["engine killed"] = cluster.push("k", NEW_MAIL)
    sleep_until(start + KILLED)
    line.calls["engine killed"], counted = phase_calls(cluster, counted)
    cluster.engines[0].start()  # on its spool, as the kill left it
    sleep_until(line.begin("engine restarted") + RESTARTED)
    line.calls["engine restarted"], counted = phase_calls(cluster, counted)
    line.begin("drain")
    wanted = {RESENT}.union(*(p.rcpts for p in line.pushes.values()))
    with contextlib.suppress(TimeoutError):  # what never came is counted lost
        until(lambda: wanted <= {r for _, r in cluster.arrivals()}, timeout=180,
              what="every job delivered", interval=0.5)
    line.begin("end")
    return line


def phase_calls(cluster: Cluster, counted: collections.Counter[str]
                ) -> tuple[collections.Counter[str], collections.Counter[str]]:
    """Redis's commands since `counted`, and its count now."""
    now = cluster.redis_calls()
    return now - counted, now


def phase_row(cluster: Cluster, line: Timeline, name: str, start: float, end: float,
              twice: list[tuple[float, str]], flagged: set[str], received: set[str]
              ) -> dict[str, Any]:
    """One phase's figures: [start, end) at the receiver, at Redis and over StatsD."""
    accepts = {ip: cluster.receiver.accept_times(ip) for ip in IPS}
    row = phase_rates(accepts, start, end)
    messages = len(between((t for times in accepts.values() for t in times), start, end))
    refused = between(cluster.receiver.throttle_times(), start, end)
    row["refusals"] = len(refused)
    row["refused_at_s"] = [round(t - start, 2) for t in refused[:10]]  # from the phase's start
    again = [r for at, r in twice if start <= at < end]
    row["twice"], row["twice_unflagged"] = len(again), len(set(again) - flagged)
    row["leases_per_message"] = \
        round(cluster.leases(start, end) / messages, 3) if messages else None
    row["redis_commands_per_message"] = None
    if name in line.calls:
        theirs = {c: n for c, n in line.calls[name].most_common() if c not in ASKED}
        row["redis_commands"] = theirs
        if messages:
            row["redis_commands_per_message"] = round(sum(theirs.values()) / messages, 3)
    if name in line.pushes:
        push = line.pushes[name]
        row["pushed"] = {"jobs": push.count, "acknowledged": push.acknowledged,
                         "by_host": push.by_host, "lost": len(push.rcpts - received)}
    return row


def figures(cluster: Cluster, line: Timeline) -> dict[str, Any]:
    arrivals = cluster.arrivals()
    twice, flagged = copies_twice(arrivals), cluster.flagged()
    received = {r for _, r in arrivals}
    unflagged = sorted({r for _, r in twice} - flagged)
    bounds = [line.marks[p] for p in PHASES] + [line.marks["drain"]]
    back, drain = line.marks["redis back"], line.marks["drain"]
    return {
        "limit": LIMIT, "window": WINDOW, "settle": SETTLE,
        "starts_s": {name: round(at - line.marks["shared"], 2)  # from the shared phase's
                     for name, at in line.marks.items()},
        "phases": {name: phase_row(cluster, line, name, start, end, twice, flagged, received)
                   for name, start, end in zip(PHASES, bounds, bounds[1:], strict=False)},
        "duplicate_acknowledged": line.duplicate_acknowledged,
        "resent_delivered": sum(1 for _, r in arrivals if r == RESENT),
        "shared_again_s": {name.removeprefix("bench."): round(t - back, 2)
                           for name, t in sorted(line.again.items())},
        "drain_s": round(max((at for at, _ in arrivals), default=drain) - drain, 1),
        "host0_restarted_delivered": sum(
            1 for e in cluster.engines[0].events()[line.held_events:]
            if e["event"] == "delivered"),
        "twice": len(twice), "twice_unflagged": len(unflagged),
        "twice_unflagged_stories": [cluster.story(r, line.marks["shared"])
                                    for r in unflagged[:5]],
        "lost": len(({RESENT}.union(*(p.rcpts for p in line.pushes.values()))) - received),
        "refusals": len(cluster.receiver.throttle_times()),
        "log": {f"host{i}": notable(engine, line.marks["shared"])
                for i, engine in enumerate(cluster.engines)},
    }


def run(workdir: str) -> dict[str, Any]:
    log(f"cluster: three engines, one Redis, a receiver at {LIMIT}/s; about 3 minutes")
    with contextlib.ExitStack() as stack:
        cluster = Cluster(workdir, stack)
        result = figures(cluster, scenario(cluster))
        for engine in cluster.engines:  # reaped: their CPU is this run's, not other load
            with contextlib.suppress(Exception):
                engine.stop(timeout=30)
    return result


# -- the section -------------------------------------------------------------------------------


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _per_message(value: float | None, none: str = "-") -> str:
    return none if value is None else f"{value:.3f}"


def _calls(r: dict[str, Any]) -> str:
    return "; ".join(f"{name}: " + ", ".join(f"{c} {n}" for c, n in
                                             list(p["redis_commands"].items())[:4])
                     for name, p in r["phases"].items() if "redis_commands" in p)


def _shares(share: dict[str, float]) -> str:
    return " / ".join(f"{100 * share[ip]:.0f}%" for ip in IPS)


def verdicts(r: dict[str, Any]) -> list[tuple[str, bool]]:
    """The Must show's checks, as the row's figures answer them."""
    shared, alone = r["phases"]["shared"], r["phases"]["redis killed"]
    again = r["shared_again_s"]
    workers = [s for name, s in again.items() if "supervisor" not in name]
    return [
        ("shared: busiest 5 s <= 63/s", (shared["busiest"] or 0) <= 63),
        ("shared: average >= 54/s", (shared["average"] or 0) >= 54),
        ("shared: no refusal", shared["refusals"] == 0),
        ("re-sent job: a duplicate, delivered once",
         r["duplicate_acknowledged"] and r["resent_delivered"] == 1),
        ("Redis killed: busiest 5 s within 110% of the limit",
         (alone["busiest"] or 0) <= 1.1 * r["limit"]),
        (f"Redis back: every worker shared within {BACK_WITHIN:.0f} s",
         len(workers) == len(IPS) and max(workers) <= BACK_WITHIN),
        ("Redis back: busiest 5 s <= 63/s", (r["phases"]["redis back"]["busiest"] or 0) <= 63),
        ("engine killed: the others took the new mail",
         r["phases"]["engine killed"]["pushed"]["by_host"]["host0"] == 0),
        ("its spooled mail delivered once it restarted", r["host0_restarted_delivered"] > 0),
        ("nothing lost", r["lost"] == 0),
        ("no copy twice the engines did not flag", r["twice_unflagged"] == 0),
    ]


def render_row(label: str, r: dict[str, Any]) -> list[str]:
    lines = [f"**{label}**: `{shown_command(r['command'])}`, engine `{r['engine']}`,"
             f" {r['date']}, other load on the machine {100 * r['other_load']:.0f}% of its"
             " cores.", "",
             "| phase | seconds measured | messages/s: average | busiest 5 s | quietest 5 s"
             " | share .2 / .3 / .4 | refusals | copies twice (not flagged) | pushed: jobs"
             " (host0 / host1 / host2), lost | Redis commands a message | leases a message |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in PHASES:
        p = r["phases"][name]
        pushed = p.get("pushed")
        push_cell = "-" if pushed is None else (
            f"{pushed['jobs']} ({' / '.join(str(n) for n in pushed['by_host'].values())}),"
            f" {pushed['lost']} lost")
        commands = p["redis_commands_per_message"]
        lines.append(
            f"| {name} | {p['seconds']:.0f} | {_rate(p['average'])} | {_rate(p['busiest'])} |"
            f" {_rate(p['quietest'])} | {_shares(p['share'])} | {p['refusals']} |"
            f" {p['twice']} ({p['twice_unflagged']}) | {push_cell} |"
            f" {_per_message(commands, '- (no Redis)')} |"
            f" {_per_message(p['leases_per_message'])} |")
    again = ", ".join(f"{name} {s:.1f} s" for name, s in r["shared_again_s"].items())
    checks = "; ".join(f"{text}: {'yes' if ok else '**no**'}" for text, ok in verdicts(r))
    lines += ["", f"Shared again after Redis's restart (`cluster_mode` gauge 2, from the"
              f" restart): {again or 'none within 30 s'}. Host0 delivered"
              f" {r['host0_restarted_delivered']} jobs after its restart; the drain after the"
              f" last phase took {r['drain_s']:.0f} s. Copies twice in all: {r['twice']}"
              f" ({r['twice_unflagged']} not flagged `possible_duplicate`); jobs lost:"
              f" {r['lost']}.", "", f"Redis's commands by name (INFO commandstats): {_calls(r)}.",
              "", f"Must show: {checks}."]
    if "note" in r:  # what the run's figures need said, written into its row by hand
        lines += ["", f"*Note:* {r['note']}"]
    return lines


def render(results: dict[str, Any]) -> str:
    lines = [HEADING, "", '<a id="bench-cluster"></a>', "",
             "Issue #18's *Must show*, `bench/cluster.py`: the scenario of"
             " `tests/engine/test_cluster.py`, timed phase by phase. Three whole engines"
             " (sending from 127.0.0.2, .3, .4, each with its own spool and sockets,"
             " `cluster.retry: 1s`), one redis-server, a receiver that refuses (421) past"
             f" {LIMIT} messages/s from all senders together (a token bucket of 10), the"
             f" provider's `cluster_rate: {LIMIT}`; every push `mailengine push`'s Pusher to"
             " the three hosts (1 KB jobs). Phases: *shared* (3,000 jobs pushed, 30 s),"
             " *redis killed* (SIGKILL, 15 s), *redis back* (started again, empty, and 4,500"
             " more jobs, 25 s), *engine killed* (host0 killed -9 with mail in its spool, 600"
             " new jobs, 20 s), *engine restarted* (host0 on its spool as the kill left it,"
             " 20 s), then the drain. Rates are at the receiver (accepted MAIL FROMs), from"
             f" {SETTLE:.0f} s after each phase began; the busiest and quietest"
             f" {WINDOW:.0f} s windows lie within the phase. *Copies twice*: copies of a"
             " recipient after its first, counted in the phase they arrived; *not flagged*:"
             " of a recipient no event of the engines marked `possible_duplicate`. *Lost*:"
             " jobs a host acknowledged (`queued`) that never reached the receiver. *Redis"
             " commands a message*: commands Redis processed in the phase (INFO"
             " commandstats, the benchmark's own INFO and PING left out) over the messages"
             " the receiver took meanwhile: Redis's work, not round trips, since it counts"
             " the commands the engines' scripts run too (intake's claim and confirm are one"
             " script call a batch each, and a `SET` an id inside; a phase's push is in its"
             " count). *Round trips*: the engines' metrics time each lease of the cluster"
             " rate (`cluster_lease`), one round trip each; *leases a message* is their"
             " count over the same messages (intake's claims and the suspension polls have"
             " no metric). *Other load*: the share of the machine's 2 cores other processes"
             " kept busy during the run (bench.run's other_load; the killed engine's worker"
             " is not this process's child to reap, so its CPU, a few seconds, counts"
             " there).", ""]
    for label, row in results.items():
        lines += [*render_row(label, row), ""]
    lines += [PROSE]
    return "\n".join(lines) + "\n"


PROSE = """\
*What runs 1-4 show* (9-34% other load on the 2 cores; the first three rows with
Redis's return marked once it answered, the fourth with the return of Redis marked before it is
started, see the third run's note). **The shared limit holds**: 57.3-60.0/s on average in
the shared phase, its busiest 5 s at 60.2-61.0/s (63 allowed), its quietest 59.0-59.8/s in
three runs; each host 27-39% of it. **Redis killed**: each host goes on at its third,
58.4-60.1/s together, busiest 60.4-60.8/s (110% is 66). **Redis back**: every worker shares
again within 0.8 s of the restart (`cluster.retry: 1s`; 10 s allowed), the busiest 5 s
within 59.8-61.8/s. **One engine killed -9**: the new mail went to the other two only (300
each), which kept 60.0/s together. **Restarted**: host0 delivered the 896-1,254 jobs its
spool held. **Nothing lost** in any run; the re-sent job acknowledged as a duplicate and
delivered once in every run. **Redis**: 0.15-0.26 leases a message (bench.cluster_cost: 0.21
at 60/s); 1.8-2.2 commands a message in phases without a large push, 5-11 with one: intake's
claims, a `SET` per id to claim and one to confirm (6,100 for the 3,000 jobs), run inside
two script calls a batch.

**Runs 1-4 (before the two fixes below): "no refusal" did not hold.** The receiver refused
in every run: **at Redis's return** in all four (1, 2, 2 and 10 refusals, 0.1-1.4 s after the
restart); **at the shared phase's start** in the third (2, 0.77 s after the first push);
**15 s after host0's restart** in the fourth (15 at once). Each refusal costs more than
itself: the refused worker lowers its pace (log: `rate_decreased ... limit=12.00` to
`38.20`) and publishes the ceiling, which the others follow (`provider_ceiling_shared`), so
the three stay below the rate until the learned pace climbs back: the phase after Redis's
return averaged 42.3-57.6/s, its quietest 5 s 16.6-48.8/s; the third run's shared phase
57.3/s, quietest 46.4/s; the fourth run's restarted phase 50.9/s, quietest 27.4/s.
tests/engine/test_cluster.py counts refusals before Redis is killed only, so it would have
failed on the third run's and sees none of the others.

*Why, at Redis's return:* each worker tries Redis again at its own `cluster.retry`, so for up
to that long some are back and others are not (second run: host1 back at +0.2 s and refused
at +0.31 s, host2 and host0 back at +0.7 and +0.8 s, host2 refused at +1.39 s). A worker back
on an empty Redis leased from a schedule that starts at Redis's present and knows no other
member yet (its share the whole rate), while those still in fallback sent their third: more
than the rate, past the receiver's bucket of 10. **Fixed** (engine/cluster_rate.py,
*rejoining*): a worker back from fallback keeps to its fallback share for `cluster.retry` +
`cluster.lease`, or until as many workers lease from Redis as it last saw; it leases the
turns of that span at the rate and takes every `members`-th, so its messages go spaced at
its share, each at a turn Redis holds for it (a first version that took a whole batch at the
rate's spacing, a third as many, still refused 6 times at the return: a burst past the
bucket). Tested in tests/conversation/test_cluster.py (a worker back alone keeps to its
third until the others could be back: 61 in a second without the fix, at most 23 with it).
**Run 5**, after it (7% other load): no refusal in any phase; Redis back 59.95/s, busiest
60.4/s, quietest 59.6/s, every worker shared again within 0.76 s. The refusals at the
shared phase's start (run 3) and after host0's restart (run 4) were not traced and did not
come back in run 5; one run says little of something seen once in four.

**Copies twice**: two in the second and two in the fourth run; three flagged
`possible_duplicate`, one not (second run, `b-1734`: the receiver took host0's copy just
before the kill, host0 never reported it, and its second copy went 71 s later without the
flag). The flag was on the events of the first hand-out after the loss only, and that
hand-out went back to the spool untried (host0 restarted with its backlog and a third of the
rate: a message whose turn is beyond `shaping.max_wait` returns to the spool, with no
event). **Fixed** (engine.dispatch `untried`): a recipient sent again after a loss whose
hand-out goes back untried keeps the mark for its next hand-out (docs/EVENTS.md;
tests/conversation/test_supervisor_parts.py fails without it). The engine test, which
asserts that every copy twice is flagged, failed so once in CI before the fix (three copies
of host0's first jobs, unflagged).

*Command:* `python -m bench.cluster --label NAME` (`--docs` writes this section,
`--render-only` rewrites it from bench/results/cluster.json); needs redis-server and
redis-py, as the cluster tests. About 3 minutes and a half a run.
"""


ROWS = Rows("python -m bench.cluster", RESULTS, DOC, HEADING, render)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=ROWS.prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    ROWS.add_options(parser)
    args = parser.parse_args(argv)
    if args.render_only:
        ROWS.write_doc()
        return 0
    problem = missing()
    if problem is not None:
        print(f"bench.cluster: {problem}", file=sys.stderr)
        return 2
    workdir = tempfile.mkdtemp(prefix="mailengine-cluster-")
    try:
        ROWS.record(args, argv, functools.partial(run, workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
