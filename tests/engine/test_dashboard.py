"""The shipped dashboard and alert rules against what the engine emits, with a dotted
statsd.prefix (`mail.outbound`, conf/examples/two-ips.yaml's): the real engine sends to the
etsy StatsD daemon run with conf/statsd-config.js, which flushes to Debian's carbon-cache; then
graphite-web (Debian's, the render API Grafana queries) runs every query of
conf/grafana-dashboard.json and of conf/grafana-alerts.yaml over the whisper files.

Each query must find series, and its series must be named from the parts of the engine's names
(IP, provider, metric, timer statistic) or the query's own aliases: a node counted from the
start would take a part of the prefix (`mail`, `outbound`) or of the namespace (`stats`)
instead. Each alert rule is evaluated as Grafana would (reduce, then threshold) over what the
run made: the worker restart and one provider's deferrals fire, the others do not.

The run: one worker (127.0.0.2); provider 127_0_0_1 (a TLS sink) delivers, defers `defer...`
(452 4.2.2, a full mailbox: no push-back) until the recipients expire (retry every 1 s,
max_age 15 s: the supervisor's gauges, every 10 s, see the spool hold jobs), bounces
`reject...` (550), and drops the connection after a few final dots (ambiguous); provider
127_0_0_5 (a plaintext sink) blocks the IP after 3 messages (blocked, suspended); a frame that
is not a job is rejected; the worker is killed once (a restart).
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from engine import categories, metrics
from engine.testing.carbon import CarbonCache
from engine.testing.carbon import available as carbon_available
from engine.testing.harness import LocalEngine, final_outcomes, make_message
from engine.testing.limits import Block
from engine.testing.sink import SinkServer
from tests.support.dashboard import (
    PATH,
    alert_query,
    alert_rules,
    classify,
    dashboard,
    dashboard_targets,
    expand,
    interpolate,
    panels,
)
from tests.support.graphite_web import GraphiteWeb
from tests.support.graphite_web import available as graphite_web_available
from tests.support.statsd_daemon import running_statsd, statsd_daemon_dir, whisper_values

PREFIX = "mail.outbound"
IP = "127.0.0.2"
IP_SEG = metrics.ip_segment(IP)
MAIN_HOST, BLOCKING_HOST = "127.0.0.1", "127.0.0.5"
MAIN, BLOCKING = metrics.ip_segment(MAIN_HOST), metrics.ip_segment(BLOCKING_HOST)
# Dashboard series this run does not make: they need a failure it does not stage.
NOT_MADE = {"connections_stale", "connections_failed", "tls_failed", "pushback"}
TIMER_STATS = {"upper_50", "upper_95", "upper_99", "mean", "count_ps"}
# One-second slots; the daemon flushes every 2 s, so no two flushes share a slot.
CARBON_SCHEMAS = "[stats]\npattern = ^stats\nretentions = 1s:1h\n"


# --------------------------------------------------------------------------------------------
# The chain: StatsD daemon (shipped config) -> carbon-cache, and the receiving side


@pytest.fixture
def chain(tmp_path: Path) -> Iterator[tuple[int, CarbonCache]]:
    """(the StatsD daemon's UDP port, carbon-cache), skipped when a part is not installed."""
    if not carbon_available() or not shutil.which("whisper-fetch"):
        pytest.skip("needs carbon-cache and whisper-fetch (apt-get install graphite-carbon)")
    if not graphite_web_available():
        pytest.skip("needs Debian's graphite-web (apt-get install graphite-web)")
    statsd_daemon_dir()
    with CarbonCache(tmp_path / "carbon", schemas=CARBON_SCHEMAS) as carbon, \
            running_statsd(tmp_path, carbon.line_port, flush_ms=2000, dump=False) as (port, _):
        yield port, carbon


@pytest.fixture
def sinks() -> Iterator[tuple[SinkServer, SinkServer]]:
    # A full mailbox (4.2.2) is no push-back: the provider's pace stays up.
    main = SinkServer(drop_after_dot=0.05, drop_seed=7,
                      rcpt_rules={"defer": "452 4.2.2 mailbox full",
                                  "reject": "550 5.1.1 no such user"})
    blocking = SinkServer(tls=False, host=BLOCKING_HOST, policy=Block(after=3))
    with main, blocking:
        yield main, blocking


def jobs(count: int, domain: str, every: dict[int, str]) -> list[tuple[dict[str, Any], bytes]]:
    """`count` one-recipient jobs; recipient i is `<every[n]>i@` when n divides i."""
    out = []
    for i in range(count):
        local = next((name for n, name in sorted(every.items()) if i % n == 0), "user")
        rcpt = f"{local}{i}@{domain}"
        env = {"id": f"dash-{domain}-{i}-{time.time_ns()}", "from": "sender@example.test",
               "to": [rcpt]}
        out.append((env, make_message(i, 1500, rcpt=rcpt)))
    return out


def reject_a_frame(engine: LocalEngine) -> None:
    """A frame that is not a job: refused at intake (the `rejected` counter)."""
    ctx = zmq.Context()
    try:
        push = ctx.socket(zmq.PUSH)
        push.connect(str(engine.config["ingest"]))
        push.send_multipart([b"this is not JSON", b"Subject: x\r\n\r\nx\r\n"])
        push.close(linger=2000)
    finally:
        ctx.term()
    engine.wait_for(lambda evs: any(e["event"] == "rejected" for e in evs), timeout=10,
                    what="a rejected event")


def restart_the_worker(engine: LocalEngine) -> None:
    """SIGKILL the worker; return once the supervisor has restarted it."""
    pid = engine.status()["workers"][IP]["pid"]
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while True:
        worker = engine.status()["workers"][IP]
        if worker["ready"] and worker["pid"] not in (pid, None):
            return
        assert time.monotonic() < deadline, f"worker not restarted: {worker}"
        time.sleep(0.1)


def wait_for_whisper(whisper: Path, path: str, done: Any, timeout: float = 30) -> list[float]:
    deadline = time.monotonic() + timeout
    while not done(values := whisper_values(whisper, path)):
        assert time.monotonic() < deadline, f"{path}: {values}"
        time.sleep(0.5)
    return values


def run_the_engine(local_engine: Any, statsd_port: int, carbon: CarbonCache,
                   sinks: tuple[SinkServer, SinkServer]) -> LocalEngine:
    main, blocking = sinks
    extra = {"statsd": {"enabled": True, "host": "127.0.0.1", "port": statsd_port,
                        "prefix": PREFIX},
             "routes": {"main.test": f"{MAIN_HOST}:{main.port}",
                        "blocking.test": f"{BLOCKING_HOST}:{blocking.port}"},
             "retry": {"schedule": ["1s"], "max_age": "15s"},
             "pool": {"max_connections": 2}}
    engine = local_engine(main.port, route=None, extra=extra)
    blocked_jobs = jobs(12, "blocking.test", {})
    main_jobs = jobs(150, "main.test", {4: "defer", 25: "reject"})
    assert engine.push(main_jobs + blocked_jobs, timeout=30)
    reject_a_frame(engine)
    # Every recipient final: the deferred ones and those held by the block expire.
    engine.wait_final(len(main_jobs) + len(blocked_jobs), timeout=60)
    restart_the_worker(engine)
    counted = f"stats_counts.{PREFIX}.supervisor.all.worker_restarts"
    wait_for_whisper(carbon.whisper, counted, lambda values: sum(values) >= 1)
    return engine


# --------------------------------------------------------------------------------------------
# What a query's series may be called


def allowed_words(query: str) -> set[str]:
    """The parts a series of `query` may be named from: the engine's name parts, and the words
    of the query's own quoted strings (its aliases)."""
    words = {IP_SEG, MAIN, BLOCKING, "supervisor", "all", *metrics.KINDS, *TIMER_STATS,
             *categories.CATEGORIES}
    for literal in re.findall(r"'([^']*)'", query):
        words.update(re.split(r"[\s.]+", literal))
    return words


def check_series(query: str, series: list[dict[str, Any]]) -> None:
    made = [s for s in series if any(v is not None for v, _t in s["datapoints"])]
    assert made, f"no series with a value: {query}"
    for one in made:
        name = one["target"]
        words = set(re.split(r"[\s.]+", name)) - {""}
        unknown = words - allowed_words(query)
        assert not unknown, f"{query}\n  series {name!r}: {sorted(unknown)} is no part of a name"


def path_exists(whisper: Path, path: str) -> bool:
    pattern = str(whisper.joinpath(*path.split("."))) + ".wsp"
    return bool(glob.glob(pattern))


# --------------------------------------------------------------------------------------------
# Grafana's reduce and threshold expressions, as the shipped rules use them


def reduce(values: list[float], reducer: str) -> float | None:
    if not values:
        return None
    return {"last": values[-1], "min": min(values), "max": max(values), "sum": sum(values),
            "mean": sum(values) / len(values)}[reducer]


def evaluate(rule: dict[str, Any], series: list[dict[str, Any]]) -> dict[str, tuple[float, bool]]:
    """series name -> (the reduced value, whether the rule's condition holds for it)."""
    exprs = {d["refId"]: d["model"] for d in rule["data"] if d["datasourceUid"] == "__expr__"}
    condition = exprs[rule["condition"]]
    assert condition["type"] == "threshold"
    reduction = exprs[condition["expression"]]
    assert reduction["type"] == "reduce" and reduction["settings"]["mode"] == "dropNN"
    (check,) = condition["conditions"]
    kind, (limit,) = check["evaluator"]["type"], check["evaluator"]["params"]
    out = {}
    for one in series:
        value = reduce([v for v, _t in one["datapoints"] if v is not None], reduction["reducer"])
        if value is not None:
            out[one["target"]] = (value, value > limit if kind == "gt" else value < limit)
    return out


# --------------------------------------------------------------------------------------------


@pytest.mark.timeout(240)
def test_every_panel_and_alert_rule_reads_what_the_engine_emits_with_a_dotted_prefix(
        tmp_path, local_engine, chain, sinks):
    statsd_port, carbon = chain
    started = int(time.time()) - 5
    engine = run_the_engine(local_engine, statsd_port, carbon, sinks)
    events = engine.events()
    outcomes = {e["event"] for e in final_outcomes(events).values()}
    assert {"delivered", "bounced", "expired"} <= outcomes, outcomes
    assert any(e.get("ambiguous") for e in events), "no ambiguous attempt"

    with GraphiteWeb(tmp_path / "graphite-web", carbon.whisper, carbon.query_port) as web:
        until = int(time.time()) + 5

        # The variables list the run's IP and provider under the dotted prefix.
        assert set(web.find(f"stats.gauges.{PREFIX}.*")) == {IP_SEG, "supervisor"}
        assert set(web.find(f"stats.timers.{PREFIX}.{IP_SEG}.*")) == {MAIN, BLOCKING}

        # Every panel's query: series, named from the engine's parts.
        values = {"prefix": PREFIX, "ip": "*", "provider": "*", "datasource": "graphite"}
        checked = set()
        for title, query in dashboard_targets():
            one = interpolate(query, values)
            check_series(one, web.render([one], started, until))
            for path in PATH.findall(one):
                for single in expand(path):
                    metric = classify(single.replace(PREFIX, "prefix"))[1][3]
                    assert path_exists(carbon.whisper, single) or metric in NOT_MADE, \
                        f"{title}: {single} is not in Graphite"
                    checked.add(metric)
        # No series drawn twice in a panel: each panel's queries rendered together (the
        # memory panel's `$ip` = * took the supervisor's series too, beside its own query).
        for panel in panels(dashboard()):
            queries = [interpolate(t["target"], values) for t in panel.get("targets", [])]
            names = [s["target"] for s in web.render(queries, started, until)] if queries else []
            assert len(names) == len(set(names)), f"{panel['title']}: a series twice: {names}"
        assert checked >= {"delivered", "deferred", "bounced", "expired", "ambiguous",
                           "throttled", "blocked", "suspended", "allowed_rate", "spool_depth",
                           "oldest_queued_age", "worker_restarts", "delivery_time",
                           "queued", "rejected", "plaintext", "tls_negotiated", "ip_down",
                           "memory_rss", "bounced_category", "deferred_category",
                           "expired_category"}, checked

        # Every alert rule's query, over its own time range, evaluated as Grafana would.
        results = {}
        for rule in alert_rules():
            query, data = alert_query(rule, PREFIX)
            span = data["relativeTimeRange"]
            series = web.render([query], until - span["from"], until - span["to"])
            check_series(query, series)
            tags = [repr(sorted(s.get("tags", {}).items())) for s in series]
            assert len(set(tags)) == len(tags), f"{rule['uid']}: Grafana cannot tell apart {tags}"
            results[rule["uid"]] = evaluate(rule, series)
            if rule["uid"] == "mailengine-oldest-queued-age":
                oldest = [v for s in series for v, _t in s["datapoints"] if v is not None]
    print(results)
    assert results["mailengine-worker-restarts"] == {"worker restarts": (1.0, True)}
    deferral = results["mailengine-deferral-ratio"]
    assert deferral[MAIN][1], deferral  # a quarter of the recipients deferred until expiry
    assert BLOCKING not in deferral  # a dozen attempts: under the rule's 100
    ((age, old),) = results["mailengine-oldest-queued-age"].values()
    assert age < 600 and not old  # seconds at most; 0 once the spool is empty
    assert max(oldest) > 0  # while the blocked jobs waited
    assert not any(fires for _v, fires in results["mailengine-spool-growth"].values())
    with contextlib.suppress(Exception):
        engine.stop(timeout=20)


# --------------------------------------------------------------------------------------------
# The cluster dashboard (conf/grafana-dashboard-cluster.json): two hosts, one filter

CLUSTER = "mail"  # each host's statsd.prefix: mail.<host>
HOSTS = {"mta-a": "127.0.0.2", "mta-b": "127.0.0.3"}


def panel_series(web: GraphiteWeb, panel: dict[str, Any], values: dict[str, str],
                 span: tuple[int, int]) -> list[str]:
    """The names of a panel's series that have a value, its queries rendered together."""
    queries = [interpolate(t["target"], values) for t in panel.get("targets", [])]
    series = web.render(queries, *span) if queries else []
    return [s["target"] for s in series if any(v is not None for v, _t in s["datapoints"])]


@pytest.mark.timeout(180)
def test_the_cluster_dashboard_shows_the_hosts_it_is_asked_for(tmp_path, local_engine, chain):
    from tests.support.cluster_dashboard import CLUSTER_DASHBOARD
    statsd_port, carbon = chain
    started = int(time.time()) - 5
    with SinkServer(rcpt_rules={"reject": "550 5.1.1 no such user"}) as sink:
        for host, ip in HOSTS.items():
            engine = local_engine(sink.port, ips=(ip,), extra={"statsd": {
                "enabled": True, "host": "127.0.0.1", "port": statsd_port,
                "prefix": f"{CLUSTER}.{host}"}})
            assert engine.push(jobs(10, "example.test", {5: "reject"}), timeout=30)
            engine.wait_final(10, timeout=30)
        for host, ip in HOSTS.items():
            for path in (f"stats.gauges.{CLUSTER}.{host}.supervisor.all.spool_depth",
                         f"stats_counts.{CLUSTER}.{host}.{metrics.ip_segment(ip)}.{MAIN}"
                         ".delivered"):
                wait_for_whisper(carbon.whisper, path, bool)
    board = json.loads(CLUSTER_DASHBOARD.read_text(encoding="utf-8"))
    segments = {host: metrics.ip_segment(ip) for host, ip in HOSTS.items()}
    with GraphiteWeb(tmp_path / "graphite-web", carbon.whisper, carbon.query_port) as web:
        span = (started, int(time.time()) + 5)
        # The variables: the hosts, then the chosen host's IPs.
        assert set(web.find(f"stats.gauges.{CLUSTER}.*")) == set(HOSTS)
        assert set(web.find(f"stats.gauges.{CLUSTER}.mta-a.*")) == {segments["mta-a"],
                                                                     "supervisor"}
        base = {"prefix": CLUSTER, "ip": "*", "provider": "*", "datasource": "graphite"}
        shown: dict[str, dict[str, list[str]]] = {}
        for chosen in ("mta-a", "mta-b", "*"):
            shown[chosen] = {p["title"]: panel_series(web, p, {**base, "host": chosen}, span)
                             for p in panels(board)}
    for chosen, other in (("mta-a", "mta-b"), ("mta-b", "mta-a")):
        for title, names in shown[chosen].items():
            words = {w for name in names for w in re.split(r"[\s.]+", name)}
            assert not words & {other, segments[other]}, f"{chosen}: {title}: {names}"
        assert shown[chosen]["Spool depth"] == [f"{chosen} recipients pending"]
        assert segments[chosen] in " ".join(shown[chosen]["Recipients per second by outcome,"
                                                          " per IP"])
    both = shown["*"]
    assert sorted(both["Spool depth"]) == ["mta-a recipients pending", "mta-b recipients pending"]
    assert sorted(both["Intake: jobs per second"]) == ["mta-a queued", "mta-b queued"]
    assert {n.split(".")[0] for n in both["Recipients per second by outcome, per IP"]} == \
        set(segments.values())
    assert any("mta-a" in n for n in both["Refusals per second by category"])
    for title, names in both.items():
        assert len(names) == len(set(names)), f"{title}: a series twice: {names}"
