"""Pictures of the monitoring chain from a real run: engine -> StatsD -> carbon -> graphite-web.

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
  ~15 ms, microsoft ~100 ms, yahoo ~40 ms, each +-50 %), with STARTTLS except yahoo; local
  parts `defer...` get 451 and `reject...` 550;
- the real engine (`mailengine run` through LocalEngine), two workers sending from 127.0.0.2
  and 127.0.0.3, at most 4 connections per IP x provider, 200 jobs in flight per worker,
  retries after 10 s and 20 s and a 60 s lifetime, so that the deferred recipients expire
  within the run;
- a producer: a steady flow of jobs (about 5 % of recipients deferred, 3 % bounced, one job in
  five with three recipients) that changes pace, with a burst of 2000 jobs at once in the
  middle, which fills the spool and makes the workers wait for pooled connections.

Once every recipient is final it starts graphite-web (Debian's `graphite-web`, Django, with its
own settings pointing at the run's whisper files, on 127.0.0.1) and fetches the dashboard's key
panels from its render API (`/render?target=...&format=png`) into docs/img/monitoring-*.png,
plus the same targets as JSON for the figures written to docs/img/monitoring-run.json.

    python -m bench.monitoring_demo              # about 4 minutes
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
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

from engine.testing import sink as sink_mod
from engine.testing.carbon import CarbonCache
from engine.testing.harness import LocalEngine, final_outcomes, make_message
from engine.testing.sink import SinkServer
from tests.support.dnsserver import DnsServer

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "mailengine"
IPS = ("127.0.0.2", "127.0.0.3")
IP_SHARE = (0.6, 0.4)  # of the jobs, per sending IP
STATSD_NPM_VERSION = "0.9.0"  # what tests/engine/test_metrics.py runs
FLUSH_MS = 2000
DEBIAN_PYTHON = "/usr/bin/python3"  # graphite-web is a Debian package of Debian's Python

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
DEFER_SHARE, REJECT_SHARE, THREE_RCPT_SHARE = 0.05, 0.03, 0.2

COLORS = {"google": ("#9ecae1", "#3182bd", "#08306b"),
          "microsoft": ("#fdae6b", "#e6550d", "#7f2704"),
          "yahoo": ("#bcbddc", "#756bb1", "#3f007d")}


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
    graphite_web = subprocess.run([DEBIAN_PYTHON, "-c", "import graphite, django, cairo"],
                                  capture_output=True, check=False) \
        if os.path.exists(DEBIAN_PYTHON) else None
    if graphite_web is None or graphite_web.returncode != 0:
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


# -- graphite-web ------------------------------------------------------------------------------

GRAPHITE_SETTINGS = """# graphite-web settings for this run only (GRAPHITE_SETTINGS_MODULE)
SECRET_KEY = "mailengine-monitoring-demo"
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
DEBUG = False
TIME_ZONE = "UTC"
CONF_DIR = {home!r}
STORAGE_DIR = {storage!r}
WHISPER_DIR = {whisper!r}
STANDARD_DIRS = [{whisper!r}]
LOG_DIR = {home!r} + "/log"
INDEX_FILE = {home!r} + "/index"
CARBONLINK_HOSTS = {hosts!r}
DATABASES = {{"default": {{"ENGINE": "django.db.backends.sqlite3",
                         "NAME": {home!r} + "/graphite.db"}}}}
"""


def start_graphite_web(procs: Processes, home: Path, whisper: Path, carbon_query: int) -> str:
    """graphite-web (Django's runserver) on 127.0.0.1 reading `whisper`; its base URL."""
    (home / "log").mkdir(parents=True)
    (home / "me_graphite_settings.py").write_text(GRAPHITE_SETTINGS.format(
        home=str(home), storage=str(whisper.parent), whisper=str(whisper),
        hosts=[f"127.0.0.1:{carbon_query}"] if carbon_query else []),
        encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(PYTHONPATH=str(home), GRAPHITE_SETTINGS_MODULE="me_graphite_settings",
               DJANGO_SETTINGS_MODULE="graphite.settings")
    console = home / "graphite-web.log"
    with open(console, "ab") as out:
        subprocess.run([DEBIAN_PYTHON, "-m", "django", "migrate", "--run-syncdb", "-v", "0"],
                       env=env, stdout=out, stderr=subprocess.STDOUT, check=True, timeout=120)
    port = free_port()
    proc = procs.start("graphite-web", [DEBIAN_PYTHON, "-m", "django", "runserver",
                                        "--noreload", f"127.0.0.1:{port}"], console, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(f"{base}/metrics/find?query=stats", timeout=5) as r:
                if json.load(r):
                    return base
        except (OSError, ValueError):
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"graphite-web did not start; {console}:\n"
                               + console.read_text(errors="replace")[-2000:])
        time.sleep(0.3)


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
    def __init__(self, host: str, port: int, delay: float, tls: bool) -> None:
        self.delay = delay
        super().__init__(tls=tls, host=host, port=port, hostname=f"sink-{host}.test")

    def _new_session(self) -> Any:
        return sink_mod._SinkSMTP(self, _SlowHandler(self, self.delay), loop=self._loop,
                                  **self._smtp_options)


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
                sinks[provider] = ProviderSink(spec["address"], port, spec["delay"], spec["tls"])
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
        self.kinds: collections.Counter[str] = collections.Counter()
        self._domains = [(d, spec["share"] / len(spec["domains"]))
                         for spec in PROVIDERS.values() for d in spec["domains"]]

    def job(self, phase: str = "steady") -> list[bytes]:
        rng = self.rng
        domain = rng.choices([d for d, _ in self._domains], [w for _, w in self._domains])[0]
        rcpts = []
        for _ in range(3 if rng.random() < THREE_RCPT_SHARE else 1):
            roll = rng.random()
            kind = "defer" if roll < DEFER_SHARE else \
                "reject" if roll < DEFER_SHARE + REJECT_SHARE else "user"
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

    def run(self, schedule: list[tuple[float, float]], bursts: dict[float, int],
            stop: threading.Event) -> None:
        """schedule: (until second, jobs per second); bursts: second -> jobs at once."""
        started = time.monotonic()
        owed = 0.0
        pending = dict(bursts)
        last = started
        for until, rate in schedule:
            while not stop.is_set():
                now = time.monotonic()
                elapsed = now - started
                if elapsed >= until:
                    break
                for at in [at for at in pending if elapsed >= at]:
                    log(f"burst: {pending[at]} jobs at once")
                    self.send(pending.pop(at), "burst")
                owed += rate * (now - last)
                last = now
                whole = int(owed)
                self.send(whole)
                owed -= whole
                time.sleep(0.05)

    def close(self) -> None:
        self.ctx.destroy(linger=5000)


# --------------------------------------------------------------------------------------------
# The graphs: the dashboard's key panels, through graphite-web's render API

M = PREFIX


def per_provider(metric: str, stat: str, label: str, lines: list[str]) -> None:
    """One line per provider and percentile: the maximum over the sending IPs."""
    for provider, (light, mid, dark) in COLORS.items():
        for pct, color in (("50", light), ("95", mid), ("99", dark)):
            target = f"color(maxSeries(stats.timers.{M}.*.{provider}.{metric}.{stat}_{pct}),"\
                     f"'{color}')"
            if pct == "99":
                target = f"dashed({target},4)"
            lines.append(f"alias({target},'{provider} {label}{pct}')")


def delivery_targets() -> list[str]:
    lines: list[str] = []
    per_provider("delivery_time", "upper", "p", lines)
    return lines


def pool_wait_targets() -> list[str]:
    # The dashboard's panel: p95 and mean (here the larger of the two IPs' per provider).
    lines: list[str] = []
    for provider, (light, mid, _dark) in COLORS.items():
        for stat, label, color in (("upper_95", "p95", mid), ("mean", "mean", light)):
            lines.append(f"alias(color(maxSeries(stats.timers.{M}.*.{provider}.pool_wait.{stat}),"
                         f"'{color}'),'{provider} {label}')")
    return lines


def outcome_targets() -> list[str]:
    # The dashboard's query (sumSeriesWithWildcards over providers), one IP at a time so each
    # line gets its colour; the rarer outcomes on the right axis.
    ip_colors = {"127_0_0_2": "#2ca02c", "127_0_0_3": "#1f77b4"}
    lines = []
    for ip, color in ip_colors.items():
        lines.append(f"color(alias(sumSeriesWithWildcards(stats.{M}.{ip}.*.delivered, 3),"
                     f"'{ip.replace('_', '.')} delivered'),'{color}')")
    rare = {"deferred": ("#ff7f0e", "#d62728"), "bounced": ("#9467bd", "#8c564b")}
    for outcome, colors in rare.items():
        for ip, color in zip(ip_colors, colors, strict=True):
            lines.append(f"alias(secondYAxis(color(sumSeriesWithWildcards("
                         f"stats.{M}.{ip}.*.{outcome}, 3),'{color}')),"
                         f"'{ip.replace('_', '.')} {outcome} (right axis)')")
    lines.append(f"alias(secondYAxis(color(dashed(stats.{M}.supervisor.all.expired,3),"
                 f"'#000000')),'expired, all IPs (right axis)')")
    return lines


def ratio(numerator: str, denominator: str, bins: str) -> str:
    def binned(path: str) -> str:
        return f"summarize(sumSeries({path}),'{bins}','sum',true)"
    return f"asPercent({binned(numerator)},{binned(denominator)})"


def connection_targets() -> list[str]:
    counts = f"stats_counts.{M}.*.*"
    reuse = ratio(f"{counts}.connections_reused",
                  f"{counts}.{{connections_reused,connections_opened}}", "10s")
    tls = ratio(f"{counts}.tls_negotiated", f"{counts}.connections_opened", "10s")
    lines = [f"color(lineWidth(alias({reuse},'connection reuse ratio (%)'),2),'#2ca02c')",
             f"color(lineWidth(alias({tls},'TLS share of new connections (%)'),2),'#000000')"]
    for provider, (_light, mid, _dark) in COLORS.items():
        opened = f"summarize(sumSeries(stats_counts.{M}.*.{provider}.connections_opened)," \
                 "'10s','sum',true)"
        lines.append(f"alias(secondYAxis(color(lineWidth(transformNull({opened},0),1),'{mid}')),"
                     f"'{provider}: new connections per 10 s (right axis)')")
    return lines


def spool_targets() -> list[str]:
    return [f"color(lineWidth(alias(stats.gauges.{M}.supervisor.all.spool_depth,"
            "'spool depth: recipients pending'),2),'#000000')",
            f"aliasByNode(stats.gauges.{M}.*.all.in_flight, 3)"]


def memory_targets() -> list[str]:
    return [f"aliasByNode(stats.gauges.{M}.*.all.memory_rss, 3)"]


GRAPHS: list[dict[str, Any]] = [
    {"file": "monitoring-delivery-time.png", "targets": delivery_targets,
     "title": "Delivery time (queued to final reply) p50 / p95 / p99 per provider, max of the"
              " 2 IPs", "vtitle": "ms (log scale)", "params": {"logBase": "10"}},
    {"file": "monitoring-outcomes.png", "targets": outcome_targets,
     "title": "Recipients per second by outcome, per sending IP",
     "vtitle": "delivered per second", "params": {"vtitleRight": "deferred / bounced / expired"
                                                  " per second", "yMin": "0",
                                                  "yMinRight": "0"}},
    {"file": "monitoring-connections.png", "targets": connection_targets,
     "title": "Connection reuse ratio and TLS share of new connections, in 10 s bins",
     "vtitle": "%", "params": {"yMinLeft": "0", "yMaxLeft": "100", "yMinRight": "0",
                               "vtitleRight": "new connections per 10 s"}},
    {"file": "monitoring-spool.png", "targets": spool_targets,
     "title": "Spool depth (recipients, reported every 10 s) and jobs in flight per worker",
     "vtitle": "", "params": {"yMin": "0"}},
    {"file": "monitoring-pool-wait.png", "targets": pool_wait_targets,
     "title": "Pool wait (checking out a connection) p95 and mean per provider, max of the"
              " 2 IPs", "vtitle": "ms (log scale)", "params": {"logBase": "10"}},
    {"file": "monitoring-memory.png", "targets": memory_targets,
     "title": "Memory (RSS) per process, reported every 10 s (binary units)", "vtitle": "",
     "params": {"yUnitSystem": "binary", "yMin": "0"}},
]

STYLE = {"width": "1000", "height": "420", "bgcolor": "white", "fgcolor": "black",
         "majorGridLineColor": "#bbbbbb", "minorGridLineColor": "#eeeeee",
         "fontName": "DejaVu Sans", "fontSize": "11", "lineWidth": "1.5",
         "lineMode": "connected", "tz": "UTC", "hideLegend": "false", "xFormat": "%H:%M:%S"}


def render(base: str, targets: list[str], start: int, end: int, fmt: str,
           params: dict[str, str] | None = None) -> bytes:
    query = [("target", t) for t in targets] + [("from", str(start)), ("until", str(end)),
                                                ("format", fmt)]
    if fmt == "png":
        query += list({**STYLE, **(params or {})}.items())
    url = f"{base}/render?{urllib.parse.urlencode(query)}"
    with urllib.request.urlopen(url, timeout=60) as response:
        return bytes(response.read())


def series_figures(raw: bytes) -> dict[str, dict[str, float]]:
    out = {}
    for series in json.loads(raw):
        values = [v for v, _t in series["datapoints"] if v is not None]
        if values:
            out[series["target"]] = {"min": round(min(values), 2),
                                     "median": round(percentile(values, 50), 2),
                                     "max": round(max(values), 2),
                                     "mean": round(sum(values) / len(values), 2),
                                     "points": len(values)}
    return out


def render_all(base: str, start: int, end: int, out_dir: Path) -> dict[str, Any]:
    """Every graph as PNG into `out_dir`; the figures of its series (from format=json)."""
    figures: dict[str, Any] = {}
    for graph in GRAPHS:
        targets = graph["targets"]()
        png = render(base, targets, start, end, "png",
                     {"title": graph["title"], "vtitle": graph["vtitle"], **graph["params"]})
        (out_dir / graph["file"]).write_bytes(png)
        figures[graph["file"]] = series_figures(render(base, targets, start, end, "json"))
        log(f"{out_dir / graph['file']}: {len(png) // 1024} KB")
    return figures


def render_kept(home: Path, out_dir: Path) -> int:
    """--render-only: the graphs again from a folder that --keep kept (no new run)."""
    start, end = json.loads((home / "window.json").read_text(encoding="utf-8"))
    procs = Processes()
    scratch = Path(tempfile.mkdtemp(prefix="mailengine-graphite-web-"))
    try:
        base = start_graphite_web(procs, scratch, home / "carbon" / "storage" / "whisper", 0)
        render_all(base, start, end, out_dir)
    finally:
        procs.stop_all()
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


# --------------------------------------------------------------------------------------------
# The run


def traffic_plan(duration: float) -> tuple[list[tuple[float, float]], dict[float, int]]:
    """(until second, jobs per second) pieces and second -> burst size, scaled to `duration`."""
    f = duration / 150.0
    return ([(30 * f, 8.0), (90 * f, 15.0), (120 * f, 25.0), (150 * f, 10.0)],
            {45 * f: 2000})


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
        }
        if _has_destination_check():  # MX hosts at loopback addresses are refused by default
            extra["security"] = {"allowed_destinations": [
                spec["address"] for spec in PROVIDERS.values()]}
        engine = LocalEngine(str(home / "engine"), smtp_port, ips=IPS, route=None, extra=extra)
        engine.start()
        log(f"engine up: workers {', '.join(IPS)}; config {engine.config_path}")

        producer = Producer(str(engine.config["ingest"]), args.seed)
        schedule, bursts = traffic_plan(args.duration)
        t_start = time.time()
        stop = threading.Event()
        log(f"traffic for {args.duration:.0f} s: {schedule}, bursts {bursts}")
        try:
            producer.run(schedule, bursts, stop)
        finally:
            stop.set()
            producer.close()
        t_traffic_end = time.time()
        log(f"sent {producer.sent_jobs} jobs, {producer.sent_rcpts} recipients"
            f" ({dict(producer.kinds)}); waiting for every recipient to be final")
        events = engine.wait_for(
            lambda evs: len(final_outcomes(evs)) >= producer.sent_rcpts, timeout=180,
            what=f"{producer.sent_rcpts} final outcomes")
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

        base = start_graphite_web(procs, home / "graphite-web", whisper, carbon_query)
        log(f"graphite-web at {base}")
        start, end = int(t_start) - 5, int(t_end)
        (home / "window.json").write_text(json.dumps([start, end]), encoding="utf-8")
        figures = render_all(base, start, end, out_dir)
        summary = summarize_events(events)
        totals = graphite_totals(base, start, end)
        result = {
            "command": "python -m bench.monitoring_demo" + (
                f" --duration {args.duration:g}" if args.duration != 150 else ""),
            "window_utc": [time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
                           for t in (start, end)],
            "traffic": {"schedule_jobs_per_s": schedule, "bursts": bursts,
                        "jobs": producer.sent_jobs, "recipients": producer.sent_rcpts,
                        "local_parts": dict(producer.kinds),
                        "seconds_of_traffic": round(t_traffic_end - t_start, 1),
                        "seconds_until_all_final": round(t_final - t_start, 1)},
            "setup": {"ips": list(IPS), "providers": {
                p: {"sink": s["address"], "final_dot_delay_ms": s["delay"] * 1000,
                    "starttls": s["tls"], "domains": list(s["domains"])}
                for p, s in PROVIDERS.items()},
                "statsd_flush_ms": FLUSH_MS, "whisper_retention": "1s:6h",
                "engine_extra_config": extra},
            "events": summary,
            "graphite_totals": totals,
            "graphite": figures,
        }
        (out_dir / "monitoring-run.json").write_text(json.dumps(result, indent=1) + "\n",
                                                     encoding="utf-8")
        print(json.dumps({"events": summary, "graphite_totals": totals,
                          "graphite": figures}, indent=1))
        if args.hold:
            log(f"graphite-web stays at {base} for {args.hold:.0f} s (Ctrl-C to end)")
            with contextlib.suppress(KeyboardInterrupt):
                time.sleep(args.hold)
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
    per_ip: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    delays: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
    tls_by_provider: dict[str, collections.Counter[str]] = collections.defaultdict(
        collections.Counter)
    reused = 0
    for event in events:
        counts[event["event"]] += 1
        if "ip" in event and event["event"] in ("delivered", "deferred", "bounced"):
            per_ip[event["ip"]][event["event"]] += 1
            tls_by_provider[event["provider"]][str(event.get("tls"))] += 1
            reused += bool(event.get("conn_reused"))
        if event["event"] in ("delivered", "bounced"):
            phase = (event.get("meta") or {}).get("phase", "?")
            delays[(phase, event["provider"])].append(float(event["delay_ms"]))
    attempts = sum(sum(c.values()) for c in per_ip.values())
    return {
        "events": dict(counts),
        "per_ip": {ip: dict(c) for ip, c in sorted(per_ip.items())},
        "final_delay_ms": {
            f"{phase} jobs, {provider}": {
                "n": len(v), "p50": round(percentile(v, 50)), "p95": round(percentile(v, 95)),
                "p99": round(percentile(v, 99)), "max": round(max(v))}
            for (phase, provider), v in sorted(delays.items())},
        "tls_per_provider": {p: dict(c) for p, c in sorted(tls_by_provider.items())},
        "attempts_on_reused_connections_pct": round(100 * reused / max(1, attempts), 1),
    }


def graphite_totals(base: str, start: int, end: int) -> dict[str, float]:
    """Every counter of the run summed in Graphite (stats_counts: per flush)."""
    names = {"queued": f"stats_counts.{M}.supervisor.all.queued",
             "expired": f"stats_counts.{M}.supervisor.all.expired"}
    for metric in ("delivered", "deferred", "bounced", "connections_opened",
                   "connections_reused", "tls_negotiated", "tls_unverified", "plaintext"):
        names[metric] = f"sumSeries(stats_counts.{M}.*.*.{metric})"
    out = {}
    for key, target in names.items():
        series = json.loads(render(base, [target], start, end, "json"))
        out[key] = sum(v for s in series for v, _t in s["datapoints"] if v is not None)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=150.0,
                        help="seconds of traffic (default 150); the run ends about 80 s later")
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
