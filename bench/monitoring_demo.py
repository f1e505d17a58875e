"""Pictures of the shipped dashboard from a real run: engine -> StatsD -> carbon -> graphite-web.

One command starts, all on loopback and in a temporary folder:

- carbon-cache (Debian's `graphite-carbon`, started by engine/testing/carbon.py) with a
  throwaway config: one-second slots (`retentions = 1s:6h`) and docs/MONITORING.md's
  aggregation rules;
- the etsy StatsD daemon (npm `statsd`, installed once into ~/.cache/mailengine-tests like
  tests/engine/test_metrics.py does), flushing every 2 s with percentThreshold [50, 95, 99] to that
  carbon-cache, legacy namespace (what conf/grafana-dashboard.json queries);
- three receiving "providers": a DNS server (tests/support/dnsserver.py) answers MX records under
  `.test` whose hosts map, through the engine's `providers` table, to google, microsoft and
  yahoo; each provider is an SMTP sink (engine/testing/sink.py) on its own loopback address
  (127.0.0.11-13, one port) that answers the final dot after a per-provider delay (google
  ~15 ms, microsoft ~100 ms, yahoo ~40 ms, each +-50 %), with STARTTLS except yahoo. Every sink
  refuses recipients by local part (`RCPT_RULES`: a full mailbox and "try later" deferred, an
  unknown user, spam and DMARC refusals bounced: five refusal categories); google drops the
  connection after 1 % of final dots (ambiguous attempts); yahoo allows each sending IP 1
  message per second (421 past it: throttles) and blocks an IP for 20 s after 80 accepted
  messages (554 "blocked using zen.spamhaus.org" at the banner: the engine suspends sending
  from that IP to yahoo for `throttle.block_suspend`, 30 s here);
- the real engine (`mailengine run` through LocalEngine), statsd.prefix `mail.outbound` (a dotted
  one, as conf/examples/two-ips.yaml), two workers sending from 127.0.0.2 and 127.0.0.3, at most
  4 connections per IP x provider, 200 jobs in flight per worker, retries after 10 s and 20 s
  and a 60 s lifetime, so that the deferred recipients expire within the run;
- a producer: a steady flow of jobs (about 4 % of recipients deferred, 4 % bounced, one job in
  five with three recipients) that changes pace, with a burst of 1000 jobs at once, a few frames
  that are not jobs (rejected at intake), and, halfway, a SIGKILL of the worker of 127.0.0.3 (the
  supervisor restarts it).

Once every recipient is final it starts graphite-web (Debian's `graphite-web`, through
tests/support/graphite_web.py, over the run's whisper files, on 127.0.0.1) and renders every
panel of conf/grafana-dashboard.json from the panel's own queries, the `prefix` variable
replaced by the run's prefix and `ip`, `provider` by All (`*`), with its render API
(`/render?target=...&format=png`) into docs/img/dashboard-NN-<title>.png (NN: the panel's
place in the dashboard), plus the same queries as JSON for the figures written to
docs/img/monitoring-run.json.

    python -m bench.monitoring_demo              # about 5 minutes
    python -m bench.monitoring_demo --keep       # keep the temporary folder (whisper files...)
    python -m bench.monitoring_demo --render-only /tmp/mailengine-monitoring-XXXX  # re-render

The sinks' addresses are loopback, which the engine refuses as MX destinations by default: the
run allows exactly those three (`security.allowed_destinations`).

Needs: apt-get install graphite-carbon graphite-web nodejs npm (and the engine's Python
packages). Nothing is sent anywhere but loopback.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

from engine.testing import limits
from engine.testing import sink as sink_mod
from engine.testing.carbon import CarbonCache
from engine.testing.harness import LocalEngine, final_outcomes, make_message
from engine.testing.sink import SinkServer
from tests.support import graphite_web
from tests.support.dashboard import dashboard, interpolate, panels
from tests.support.dnsserver import DnsServer
from tests.support.graphite_web import GraphiteWeb

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "mail.outbound"  # conf/examples/two-ips.yaml's: the dashboard must hold a dotted one
IPS = ("127.0.0.2", "127.0.0.3")
IP_SHARE = (0.6, 0.4)  # of the jobs, per sending IP
KILLED_IP = "127.0.0.3"  # its worker is SIGKILLed halfway (worker restarts)
STATSD_NPM_VERSION = "0.9.0"  # what tests/engine/test_metrics.py runs
FLUSH_MS = 2000

# provider -> (sink address, recipient domains and their MX host, final-dot delay, STARTTLS)
PROVIDERS: dict[str, dict[str, Any]] = {
    "google": {"address": "127.0.0.11", "delay": 0.015, "tls": True, "share": 0.5,
               "domains": {"gmail.test": "gmail-smtp-in.l.google.test",
                           "corp-on-workspace.test": "aspmx.l.google.test"}},
    "microsoft": {"address": "127.0.0.12", "delay": 0.100, "tls": True, "share": 0.3,
                  "domains": {"hotmail.test": "hotmail-test.olc.protection.outlook.test"}},
    "yahoo": {"address": "127.0.0.13", "delay": 0.040, "tls": False, "share": 0.2,
              "domains": {"yahoo.test": "mta5.am0.yahoodns.test"}},
}
# MX host suffix -> provider, added to the engine's table (config key `providers`)
PROVIDER_SUFFIXES = {"google.test": "google", "outlook.test": "microsoft",
                     "yahoodns.test": "yahoo"}
# Local part prefix -> (the sinks' reply at RCPT, share of the recipients); the rest are
# accepted. The category each gets (engine/categories.py) is in the comment.
RCPT_RULES: dict[str, tuple[str, float]] = {
    "full": ("452 4.2.2 mailbox full", 0.02),  # quota-issues, deferred until it expires
    "defer": ("451 4.3.0 try later", 0.02),  # other, deferred until it expires
    "unknown": ("550 5.1.1 no such user", 0.02),  # bad-mailbox
    "spam": ("550 5.7.1 Message rejected as spam by content filter", 0.01),  # spam-related
    "dmarc": ("550 5.7.26 Unauthenticated email is not accepted due to the sender domain's"
              " DMARC policy", 0.01),  # authentication-failed
}
THREE_RCPT_SHARE = 0.2
AMBIGUOUS_SHARE = 0.01  # google drops the connection after this share of final dots
YAHOO_RATE = 1.0  # messages per second per sending IP, then 421
YAHOO_BLOCK_AFTER, YAHOO_BLOCK_FOR = 80, 20.0  # accepted messages, then blocked this long
BLOCK_SUSPEND = "30s"


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --------------------------------------------------------------------------------------------
# Processes


class Processes:
    """Child processes started here, each stopped (TERM, then KILL) at the end."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.stops: list[Callable[[], None]] = []  # of launchers that own their process

    def later(self, stop: Callable[[], None]) -> None:
        """Call `stop` in stop_all, after the processes started here are stopped."""
        self.stops.append(stop)

    def start(self, what: str, cmd: list[str], log_path: Path, **kwargs: Any
              ) -> subprocess.Popen[bytes]:
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, **kwargs)
        self.procs.append((what, proc))
        return proc

    def stop_all(self) -> None:
        for _what, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for _what, proc in reversed(self.procs):
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        for stop in reversed(self.stops):
            stop()


def wait_for_text(log_path: Path, text: str, proc: subprocess.Popen[bytes], what: str,
                  timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in log_path.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start; {log_path}:\n"
                               + log_path.read_text(errors="replace")[-2000:])
        time.sleep(0.1)


def check_tools() -> None:
    missing = [tool for tool in ("carbon-cache", "node", "npm") if not shutil.which(tool)]
    if not graphite_web.available():
        missing.append("graphite-web")
    if missing:
        sys.exit(f"missing: {', '.join(missing)}; install them with\n"
                 "  apt-get install graphite-carbon graphite-web nodejs npm")


# -- carbon-cache -----------------------------------------------------------------------------

# StatsD flushes every 2 s into 1 s slots: no two flushes share a slot (a flush in a slot
# already written would overwrite it), and every other slot is empty (the graphs connect
# across them: lineMode=connected).
CARBON_SCHEMAS = "[stats]\npattern = ^stats(_counts)?\\.\nretentions = 1s:6h\n\n" \
                 "[default]\npattern = .*\nretentions = 60s:1d\n"
# docs/MONITORING.md's rules (they matter for roll-ups into coarser archives).
CARBON_AGGREGATION = """[min]
pattern = \\.lower(_\\d+)?$
xFilesFactor = 0.1
aggregationMethod = min

[max]
pattern = \\.upper(_\\d+)?$
xFilesFactor = 0.1
aggregationMethod = max

[sum]
pattern = \\.sum(_\\d+)?$
xFilesFactor = 0
aggregationMethod = sum

[count]
pattern = \\.count$
xFilesFactor = 0
aggregationMethod = sum

[count_legacy]
pattern = ^stats_counts\\.
xFilesFactor = 0
aggregationMethod = sum

[default_average]
pattern = .*
xFilesFactor = 0.3
aggregationMethod = average
"""


def start_carbon(procs: Processes, home: Path) -> tuple[int, int, Path]:
    """(line receiver port, cache query port, whisper folder)."""
    carbon = CarbonCache(home, schemas=CARBON_SCHEMAS, aggregation=CARBON_AGGREGATION).start()
    procs.later(carbon.stop)
    return carbon.line_port, carbon.query_port, carbon.whisper


# -- the StatsD daemon ------------------------------------------------------------------------


def statsd_package() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    prefix = cache / "mailengine-tests" / f"statsd-{STATSD_NPM_VERSION}"
    stats_js = prefix / "node_modules" / "statsd" / "stats.js"
    if not stats_js.exists():
        log(f"npm install statsd@{STATSD_NPM_VERSION} into {prefix}")
        prefix.mkdir(parents=True, exist_ok=True)
        subprocess.run([shutil.which("npm") or "npm", "install", "--prefix", str(prefix),
                        "--no-audit", "--no-fund", "--ignore-scripts",
                        f"statsd@{STATSD_NPM_VERSION}"], check=True, timeout=300)
    return stats_js.parent


def start_statsd(procs: Processes, home: Path, carbon_port: int) -> int:
    package = statsd_package()
    port = free_port(socket.SOCK_DGRAM)
    config = {"port": port, "address": "127.0.0.1", "mgmt_address": "127.0.0.1",
              "mgmt_port": free_port(), "flushInterval": FLUSH_MS,
              "percentThreshold": [50, 95, 99], "backends": ["./backends/graphite"],
              "graphiteHost": "127.0.0.1", "graphitePort": carbon_port,
              "graphite": {"legacyNamespace": True}}
    config_js = home / "statsd-config.js"
    config_js.write_text(f"({json.dumps(config, indent=2)})\n", encoding="utf-8")
    console = home / "statsd.log"
    proc = procs.start("statsd", [shutil.which("node") or "node", "stats.js", str(config_js)],
                       console, cwd=package)
    wait_for_text(console, "server is up", proc, "statsd")
    return port


# --------------------------------------------------------------------------------------------
# The receiving side: DNS and one sink per provider


class _SlowHandler(sink_mod._SinkHandler):
    """The sink's handler, answering the final dot after a delay (a busy receiving server)."""

    def __init__(self, sink: SinkServer, delay: float) -> None:
        super().__init__(sink)
        self.delay = delay

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        await asyncio.sleep(self.delay * random.uniform(0.5, 1.5))
        return await super().handle_DATA(server, session, envelope)


class ProviderSink(SinkServer):
    def __init__(self, host: str, port: int, delay: float, tls: bool, **options: Any) -> None:
        self.delay = delay
        super().__init__(tls=tls, host=host, port=port, hostname=f"sink-{host}.test",
                         rcpt_rules={local: reply for local, (reply, _) in RCPT_RULES.items()},
                         **options)

    def _new_session(self) -> Any:
        return sink_mod._SinkSMTP(self, _SlowHandler(self, self.delay), loop=self._loop,
                                  **self._smtp_options)


class BlockFor(limits.Open):
    """After `after` accepted messages from a client IP, that IP is blocked for `lasting`
    seconds (the banner answers a block-list refusal), then counted again from zero."""

    def __init__(self, after: int, lasting: float) -> None:
        self.after = after
        self.lasting = lasting
        self.accepted: collections.Counter[str] = collections.Counter()
        self.since: dict[str, float] = {}

    def _refusal(self, client_ip: str, now: float) -> str | None:
        since = self.since.get(client_ip)
        if since is not None and now - since >= self.lasting:
            del self.since[client_ip]
            self.accepted[client_ip] = 0
            since = None
        if since is None and self.accepted[client_ip] >= self.after:
            self.since[client_ip] = since = now
        if since is None:
            return None
        return f"554 5.7.1 Service unavailable; Client host [{client_ip}] blocked using" \
               " zen.spamhaus.org"

    def on_connect(self, client_ip: str, open_connections: int, now: float) -> str | None:
        return self._refusal(client_ip, now)

    def on_mail(self, client_ip: str, now: float) -> str | None:
        refusal = self._refusal(client_ip, now)
        if refusal is None:
            self.accepted[client_ip] += 1
        return refusal


def sink_options(provider: str) -> dict[str, Any]:
    if provider == "google":
        return {"drop_after_dot": AMBIGUOUS_SHARE, "drop_seed": 7}
    if provider == "yahoo":
        return {"policy": limits.Both(limits.RateLimit(YAHOO_RATE, burst=3.0),
                                      BlockFor(YAHOO_BLOCK_AFTER, YAHOO_BLOCK_FOR))}
    return {}


def _has_destination_check() -> bool:
    from engine import config as config_mod
    security = getattr(config_mod, "SecurityConfig", None)
    return security is not None and "allowed_destinations" in getattr(
        security, "__dataclass_fields__", {})


def start_sinks() -> tuple[int, dict[str, ProviderSink]]:
    """One sink per provider, on its own address and one shared port (the engine's smtp.port)."""
    for _ in range(10):
        sinks: dict[str, ProviderSink] = {}
        port = 0
        try:
            for provider, spec in PROVIDERS.items():
                sinks[provider] = ProviderSink(spec["address"], port, spec["delay"], spec["tls"],
                                               **sink_options(provider))
                port = sinks[provider].port
            return port, sinks
        except OSError:  # the port is taken on another address: try another one
            for made in sinks.values():
                made.stop()
    raise RuntimeError("no port free on all sink addresses")


def dns_zone() -> dict[str, Any]:
    zone: dict[str, Any] = {}
    for spec in PROVIDERS.values():
        for domain, mx in spec["domains"].items():
            zone[domain] = {"MX": [(10, mx)]}
            zone[mx] = {"A": [spec["address"]]}
    return zone


# --------------------------------------------------------------------------------------------
# The producer


class Producer:
    """Sends jobs to the engine's ingest socket at a changing pace (a ZeroMQ PUSH socket, as
    any producer would); the events log tells which were queued."""

    def __init__(self, ingest: str, seed: int) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.PUSH)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.connect(ingest)
        self.rng = random.Random(seed)
        self.sent_jobs = 0
        self.sent_rcpts = 0
        self.not_jobs = 0
        self.kinds: collections.Counter[str] = collections.Counter()
        self._domains = [(d, spec["share"] / len(spec["domains"]))
                         for spec in PROVIDERS.values() for d in spec["domains"]]

    def local_kind(self) -> str:
        roll = self.rng.random()
        for kind, (_reply, share) in RCPT_RULES.items():
            if roll < share:
                return kind
            roll -= share
        return "user"

    def job(self, phase: str = "steady") -> list[bytes]:
        rng = self.rng
        domain = rng.choices([d for d, _ in self._domains], [w for _, w in self._domains])[0]
        rcpts = []
        for _ in range(3 if rng.random() < THREE_RCPT_SHARE else 1):
            kind = self.local_kind()
            self.kinds[kind] += 1
            rcpts.append(f"{kind}{rng.randrange(10**6)}@{domain}")
        ip = rng.choices(IPS, IP_SHARE)[0]
        self.sent_jobs += 1
        self.sent_rcpts += len(rcpts)
        env = {"id": f"mon-{self.sent_jobs}-{time.time_ns()}", "from": "news@sender.test",
               "to": rcpts, "ip": ip, "meta": {"phase": phase}}
        message = make_message(self.sent_jobs, rng.randrange(2000, 20000),
                               sender="news@sender.test", rcpt=rcpts[0])
        return [json.dumps(env).encode(), message]

    def send(self, count: int, phase: str = "steady") -> None:
        for _ in range(count):
            self.sock.send_multipart(self.job(phase))

    def send_not_a_job(self) -> None:
        """A frame that is not a job: refused at intake (the `rejected` counter)."""
        self.sock.send_multipart([b"this is not JSON", b"Subject: x\r\n\r\nx\r\n"])
        self.not_jobs += 1

    def run(self, schedule: list[tuple[float, float]],
            actions: dict[float, Callable[[], None]], stop: threading.Event) -> None:
        """schedule: (until second, jobs per second); actions: second -> what to do then."""
        started = time.monotonic()
        owed = 0.0
        pending = dict(actions)
        last = started
        for until, rate in schedule:
            while not stop.is_set():
                now = time.monotonic()
                elapsed = now - started
                if elapsed >= until:
                    break
                for at in sorted(at for at in pending if elapsed >= at):
                    pending.pop(at)()
                owed += rate * (now - last)
                last = now
                whole = int(owed)
                self.send(whole)
                owed -= whole
                time.sleep(0.05)

    def close(self) -> None:
        self.ctx.destroy(linger=5000)


def kill_worker(engine: LocalEngine, ip: str) -> None:
    """SIGKILL the worker of `ip` (the supervisor restarts it: `worker_restarts`)."""
    pid = engine.status()["workers"][ip]["pid"]
    log(f"SIGKILL the worker of {ip} (pid {pid})")
    os.kill(pid, signal.SIGKILL)


# --------------------------------------------------------------------------------------------
# The pictures: every panel of conf/grafana-dashboard.json, its own queries, through
# graphite-web's render API

# Grafana's variables for the run: the run's prefix, every IP and provider (All).
VARIABLES = {"prefix": PREFIX, "ip": "*", "provider": "*", "datasource": "graphite"}

# Graph options per the panel's unit (the queries are the dashboard's, untouched).
UNIT_PARAMS: dict[str, dict[str, str]] = {
    "ms": {"vtitle": "ms (log scale)", "logBase": "10"},
    "percent": {"vtitle": "%", "yMin": "0"},
    "s": {"vtitle": "seconds", "yMin": "0"},
    "bytes": {"vtitle": "", "yUnitSystem": "binary", "yMin": "0"},  # ticks say Mi
    "short": {"vtitle": "", "yMin": "0"},
}

# More distinct colours than Graphite's default list (panels with up to 30 series).
COLOR_LIST = ("#1f77b4,#ff7f0e,#2ca02c,#d62728,#9467bd,#8c564b,#e377c2,#7f7f7f,#bcbd22,"
              "#17becf,#aec7e8,#ffbb78,#98df8a,#ff9896,#c5b0d5,#c49c94,#f7b6d2,#393b79,"
              "#dbdb8d,#9edae5,#637939,#843c39,#7b4173,#3182bd,#e6550d,#31a354,#756bb1,"
              "#636363,#b5cf6b,#e7969c")

STYLE = {"width": "900", "bgcolor": "white", "fgcolor": "black",
         "majorGridLineColor": "#bbbbbb", "minorGridLineColor": "#eeeeee",
         "fontName": "DejaVu Sans", "fontSize": "11", "lineWidth": "1.5",
         "lineMode": "connected", "tz": "UTC", "hideLegend": "false", "xFormat": "%H:%M:%S",
         "colorList": COLOR_LIST}


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def dashboard_graphs() -> list[dict[str, Any]]:
    """Every graph panel of the dashboard: its row, id, title, unit, queries (variables
    replaced) and picture file name."""
    graphs: list[dict[str, Any]] = []
    row = ""
    for panel in panels(dashboard()):
        if panel["type"] == "row":
            row = panel["title"]
            continue
        targets = [interpolate(t["target"], VARIABLES) for t in panel.get("targets", [])
                   if not t.get("hide")]
        if not targets:
            continue
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit") or "short"
        graphs.append({"row": row, "id": panel["id"], "title": panel["title"], "unit": unit,
                       "targets": targets,
                       "file": f"dashboard-{len(graphs) + 1:02d}-{slug(panel['title'])}.png"})
    return graphs


def series_figures(series: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    out = {}
    for one in series:
        values = [v for v, _t in one["datapoints"] if v is not None]
        if values:
            out[one["target"]] = {"min": round(min(values), 2),
                                  "median": round(percentile(values, 50), 2),
                                  "max": round(max(values), 2),
                                  "mean": round(sum(values) / len(values), 2),
                                  "sum": round(sum(values), 2),
                                  "points": len(values)}
    return out


def render_all(web: GraphiteWeb, start: int, end: int, out_dir: Path) -> dict[str, Any]:
    """Every panel as PNG into `out_dir` (old dashboard-*.png removed first); the figures of
    its series (from format=json), per picture."""
    for old in out_dir.glob("dashboard-*.png"):
        old.unlink()
    figures: dict[str, Any] = {}
    for graph in dashboard_graphs():
        series = web.render(graph["targets"], start, end)
        shown = series_figures(series)
        # The legend under the graph: about three names a line.
        height = 330 + 19 * math.ceil(len(series) / 3)
        params = {**STYLE, **UNIT_PARAMS.get(graph["unit"], UNIT_PARAMS["short"]),
                  "title": f"{graph['row']}: {graph['title']}", "height": str(height)}
        png = web.png(graph["targets"], start, end, params)
        (out_dir / graph["file"]).write_bytes(png)
        figures[graph["file"]] = {"panel": graph["title"], "row": graph["row"],
                                  "queries": graph["targets"], "series": shown}
        note = "" if shown else "  NO VALUES"
        log(f"{graph['file']}: {len(series)} series, {len(png) // 1024} KB{note}")
    return figures


def render_kept(home: Path, out_dir: Path) -> int:
    """--render-only: the pictures again from a folder that --keep kept (no new run)."""
    start, end = json.loads((home / "window.json").read_text(encoding="utf-8"))
    scratch = Path(tempfile.mkdtemp(prefix="mailengine-graphite-web-"))
    try:
        with GraphiteWeb(scratch, home / "carbon" / "storage" / "whisper") as web:
            render_all(web, start, end, out_dir)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


# --------------------------------------------------------------------------------------------
# The run


def traffic_plan(duration: float) -> tuple[list[tuple[float, float]], dict[float, str]]:
    """(until second, jobs per second) pieces and second -> what happens then, scaled to
    `duration`."""
    f = duration / 120.0
    return ([(25 * f, 8.0), (70 * f, 15.0), (95 * f, 25.0), (120 * f, 10.0)],
            {35 * f: "burst of 1000 jobs", 20 * f: "a frame that is not a job",
             50 * f: "a frame that is not a job", 60 * f: f"SIGKILL the worker of {KILLED_IP}"})


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))]


def run(args: argparse.Namespace) -> int:
    check_tools()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up on a kill too
    out_dir = Path(args.out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    home = Path(tempfile.mkdtemp(prefix="mailengine-monitoring-"))
    log(f"working folder {home}")
    procs = Processes()
    sinks: dict[str, ProviderSink] = {}
    engine: LocalEngine | None = None
    dns: DnsServer | None = None
    try:
        carbon_line, carbon_query, whisper = start_carbon(procs, home / "carbon")
        statsd_port = start_statsd(procs, home, carbon_line)
        log(f"carbon-cache on 127.0.0.1:{carbon_line}, statsd on udp 127.0.0.1:{statsd_port}")
        smtp_port, sinks = start_sinks()
        dns = DnsServer(dns_zone(), ttl=300)
        dns.start()
        log(f"sinks on 127.0.0.11-13 port {smtp_port}; DNS on 127.0.0.1:{dns.port}")
        extra = {
            "statsd": {"enabled": True, "host": "127.0.0.1", "port": statsd_port,
                       "prefix": PREFIX},
            "dns": {"nameservers": ["127.0.0.1"], "port": dns.port},
            "providers": PROVIDER_SUFFIXES,
            "pool": {"max_connections": 4, "max_messages": 100, "idle_timeout": "20s"},
            "retry": {"schedule": ["10s", "20s"], "max_age": "60s"},
            "limits": {"max_in_flight": 200},  # per worker: the rest of a burst waits spooled
            "throttle": {"block_suspend": BLOCK_SUSPEND},
        }
        if _has_destination_check():  # MX hosts at loopback addresses are refused by default
            extra["security"] = {"allowed_destinations": [
                spec["address"] for spec in PROVIDERS.values()]}
        engine = LocalEngine(str(home / "engine"), smtp_port, ips=IPS, route=None, extra=extra)
        engine.start()
        log(f"engine up: workers {', '.join(IPS)}; config {engine.config_path}")

        producer = Producer(str(engine.config["ingest"]), args.seed)
        schedule, plan = traffic_plan(args.duration)
        running = engine
        doers: dict[str, Callable[[], None]] = {
            "burst of 1000 jobs": lambda: producer.send(1000, "burst"),
            "a frame that is not a job": producer.send_not_a_job,
            f"SIGKILL the worker of {KILLED_IP}": lambda: kill_worker(running, KILLED_IP)}

        def doing(what: str) -> Callable[[], None]:
            def act() -> None:
                log(what)
                doers[what]()
            return act

        actions = {at: doing(what) for at, what in plan.items()}
        t_start = time.time()
        stop = threading.Event()
        log(f"traffic for {args.duration:.0f} s: {schedule}; {plan}")
        try:
            producer.run(schedule, actions, stop)
        finally:
            stop.set()
            producer.close()
        t_traffic_end = time.time()
        log(f"sent {producer.sent_jobs} jobs, {producer.sent_rcpts} recipients"
            f" ({dict(producer.kinds)}); waiting for every recipient to be final")
        try:
            events = engine.wait_for(
                lambda evs: len(final_outcomes(evs)) >= producer.sent_rcpts, timeout=180,
                what=f"{producer.sent_rcpts} final outcomes")
        except (AssertionError, TimeoutError, RuntimeError) as err:  # render what there is
            log(f"not every recipient final: {err}")
            events = engine.events()
        t_final = time.time()
        delivered = sum(1 for e in events if e["event"] == "delivered")
        if delivered < producer.kinds["user"] // 2:
            replies = collections.Counter(e.get("reply") for e in events
                                          if e["event"] == "deferred")
            raise RuntimeError(f"only {delivered} of {producer.kinds['user']} delivered;"
                               f" most common deferral: {replies.most_common(1)}")
        log(f"all final {t_final - t_traffic_end:.0f} s after the traffic stopped; letting"
            " the gauges report")
        time.sleep(12)  # spool depth and memory every 10 s, then a StatsD flush
        t_end = time.time()

        start, end = int(t_start) - 5, int(t_end)
        (home / "window.json").write_text(json.dumps([start, end]), encoding="utf-8")
        with GraphiteWeb(home / "graphite-web", whisper, carbon_query) as web:
            log(f"graphite-web at {web.base}")
            figures = render_all(web, start, end, out_dir)
            totals = graphite_totals(web, start, end)
            if args.hold:
                log(f"graphite-web stays at {web.base} for {args.hold:.0f} s (Ctrl-C to end)")
                with contextlib.suppress(KeyboardInterrupt):
                    time.sleep(args.hold)
        summary = summarize_events(events)
        result = {
            "command": "python -m bench.monitoring_demo" + (
                f" --duration {args.duration:g}" if args.duration != 120 else ""),
            "window_utc": [time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
                           for t in (start, end)],
            "statsd_prefix": PREFIX,
            "traffic": {"schedule_jobs_per_s": schedule,
                        "actions_at_s": {f"{at:g}": what for at, what in plan.items()},
                        "jobs": producer.sent_jobs, "recipients": producer.sent_rcpts,
                        "frames_not_jobs": producer.not_jobs,
                        "local_parts": dict(producer.kinds),
                        "seconds_of_traffic": round(t_traffic_end - t_start, 1),
                        "seconds_until_all_final": round(t_final - t_start, 1)},
            "setup": {"ips": list(IPS), "providers": {
                p: {"sink": s["address"], "final_dot_delay_ms": s["delay"] * 1000,
                    "starttls": s["tls"], "domains": list(s["domains"])}
                for p, s in PROVIDERS.items()},
                "rcpt_rules": {k: {"reply": r, "share": v} for k, (r, v) in RCPT_RULES.items()},
                "google_drops_after_dot": AMBIGUOUS_SHARE,
                "yahoo": {"rate_per_ip": YAHOO_RATE, "blocked_after": YAHOO_BLOCK_AFTER,
                          "blocked_for_s": YAHOO_BLOCK_FOR},
                "statsd_flush_ms": FLUSH_MS, "whisper_retention": "1s:6h",
                "engine_extra_config": extra},
            "events": summary,
            "graphite_totals": totals,
            "panels": figures,
        }
        (out_dir / "monitoring-run.json").write_text(json.dumps(result, indent=1) + "\n",
                                                     encoding="utf-8")
        print(json.dumps({"events": summary, "graphite_totals": totals}, indent=1))
        return 0
    finally:
        if engine is not None:
            with contextlib.suppress(Exception):
                engine.stop(30)
            engine.cleanup()
        procs.stop_all()
        for made in sinks.values():
            made.stop()
        if dns is not None:
            dns.stop()
        if args.keep:
            log(f"kept {home}")
        else:
            shutil.rmtree(home, ignore_errors=True)


def summarize_events(events: list[dict[str, Any]]) -> dict[str, Any]:
    """Ground truth from the events log, to compare with what Graphite shows."""
    counts: collections.Counter[str] = collections.Counter()
    per_provider: dict[str, collections.Counter[str]] = collections.defaultdict(
        collections.Counter)
    categories: dict[str, collections.Counter[str]] = collections.defaultdict(
        collections.Counter)
    ambiguous = 0
    for event in events:
        counts[event["event"]] += 1
        if event["event"] in ("delivered", "deferred", "bounced", "expired"):
            per_provider[str(event.get("provider"))][event["event"]] += 1
        if event.get("category"):
            categories[event["event"]][event["category"]] += 1
        ambiguous += bool(event.get("ambiguous"))
    return {
        "events": dict(counts),
        "per_provider": {p: dict(c) for p, c in sorted(per_provider.items())},
        "categories": {e: dict(c) for e, c in sorted(categories.items())},
        "ambiguous_attempts": ambiguous,
    }


def graphite_totals(web: GraphiteWeb, start: int, end: int) -> dict[str, float]:
    """Every counter of the run summed in Graphite (stats_counts: per flush)."""
    names = {metric: f"stats_counts.{PREFIX}.supervisor.all.{metric}"
             for metric in ("queued", "rejected", "expired", "worker_restarts")}
    for metric in ("delivered", "deferred", "bounced", "ambiguous", "throttled", "blocked",
                   "connections_opened", "connections_reused", "tls_negotiated", "plaintext"):
        names[metric] = f"sumSeries(stats_counts.{PREFIX}.*.*.{metric})"
    out = {}
    for key, target in names.items():
        series = web.render([target], start, end)
        out[key] = sum(v for s in series for v, _t in s["datapoints"] if v is not None)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=120.0,
                        help="seconds of traffic (default 120); the run ends about 90 s later")
    parser.add_argument("--out", default=str(ROOT / "docs" / "img"),
                        help="folder for the PNGs and monitoring-run.json (default docs/img)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--hold", type=float, default=0.0,
                        help="keep graphite-web running this many seconds after the render")
    parser.add_argument("--render-only", metavar="FOLDER",
                        help="no run: render again from the folder a --keep run kept")
    args = parser.parse_args(argv)
    if args.render_only:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        out_dir = Path(args.out).resolve()
        out_dir.mkdir(parents=True, exist_ok=True)
        return render_kept(Path(args.render_only), out_dir)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
