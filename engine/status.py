"""`mailengine status`: live figures from the running engine, over its control socket."""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TYPE_CHECKING, Any

from engine import cliargs, controlclient, status_cluster
from engine import config as config_mod
from engine.clock import STEP_TOLERANCE

if TYPE_CHECKING:
    from engine.auth import CurveClient


def add_parser(sub: Any) -> None:
    p = sub.add_parser("status", help="show live figures of the running engine",
                       description="Ask the running engine, over its control socket, for"
                                   " its live figures: the spool's depth, jobs in flight,"
                                   " events so far, each worker and its traffic shaping."
                                   " Exit status: 0 answered, 1 no answer (is the engine"
                                   " running?), 2 a bad option, config or endpoint."
                                   " With --cluster: every host of the config's"
                                   " cluster.hosts at once, one line each and the"
                                   " totals; exit status 1 when a host did not answer.")
    p.add_argument("-c", "--config", help="read the control endpoint from here")
    p.add_argument("--cluster", action="store_true",
                   help="ask every host of cluster.hosts (in parallel, each within"
                        " --timeout) and show them together")
    p.add_argument("--control", help="control endpoint (default: the config's)")
    p.add_argument("--json", action="store_true", help="print the raw figures as JSON")
    p.add_argument("-w", "--watch", action="store_true", help="refresh every second")
    p.add_argument("--timeout", type=cliargs.duration(), default=3.0,
                   help="give up on an answer after this long (default 3s; e.g. 500ms, 10s)")
    controlclient.add_options(p)
    p.set_defaults(func=run)


def query(endpoint: str, timeout: float = 3.0, option: str = "control",
          curve: CurveClient | None = None) -> dict[str, Any]:
    """Ask the supervisor for its figures; raises TimeoutError if it does not answer,
    controlclient.Refused if it refuses `curve`'s key, cliargs.UsageError (naming
    `option`) for an endpoint libzmq refuses."""
    return controlclient.request(endpoint, {"command": "status"}, timeout, option, curve)


def target(args: argparse.Namespace) -> tuple[str, str, CurveClient | None]:
    """The control endpoint, the name to blame for it, and the CURVE keys, from the
    options and (when they do not say it all) the config; cliargs.UsageError."""
    control, config = getattr(args, "control", None), getattr(args, "config", None)
    try:
        cfg = config_mod.load(config) if control is None or config is not None else None
    except config_mod.ConfigError as err:
        raise cliargs.UsageError(str(err)) from None
    endpoint = control or (cfg.control if cfg is not None else "")
    return (endpoint, "--control" if control else "control",
            controlclient.curve_from(args, cfg))


def run(args: argparse.Namespace) -> int:
    if args.cluster:
        from engine import clusterview
        return clusterview.status(args)
    try:
        endpoint, option, curve = target(args)
    except cliargs.UsageError as err:
        return cliargs.fail("status", err)
    previous: dict[str, Any] | None = None
    started = time.monotonic()
    while True:
        try:
            figures = query(endpoint, args.timeout, option, curve)
        except cliargs.UsageError as err:
            return cliargs.fail("status", err)
        except controlclient.Refused as err:
            print(f"mailengine status: {err}", file=sys.stderr)
            return 1
        except TimeoutError as err:
            print(f"mailengine status: {err}; is the engine running?", file=sys.stderr)
            return 1
        if args.json:
            print(json.dumps(figures))
        else:
            if args.watch:
                sys.stdout.write("\x1b[H\x1b[2J")
            print(render(figures, previous, time.monotonic() - started))
        if not args.watch:
            return 0
        previous = figures
        started = time.monotonic()
        time.sleep(1.0)


def render(figures: dict[str, Any], previous: dict[str, Any] | None, elapsed: float) -> str:
    spool = figures["spool"]
    counts = figures["events"]
    lines = [f"mailengine (pid {figures['pid']})",
             f"spool: {spool['jobs']} jobs, {spool['rcpts_pending']} recipients pending,"
             f" {spool['rcpts_deferred']} deferred",
             *_unwritable(spool),
             *_ips_down(figures["workers"]),
             *_clock_stepped(spool),
             f"in flight: {figures['in_flight']} jobs", ""]
    rates = ""
    if previous is not None and elapsed > 0:
        per_min = {k: (counts[k] - previous["events"].get(k, 0)) * 60 / elapsed for k in counts}
        rates = "   per minute: " + ", ".join(f"{k} {v:.0f}" for k, v in per_min.items()
                                              if k in ("delivered", "deferred", "bounced"))
    lines.append("totals: " + ", ".join(f"{k} {v}" for k, v in counts.items()) + rates)
    lines.append("")
    lines.append(f"{'ip':<18}{'alive':<7}{'held':<6}{'pid':<9}{'jobs':>6}{'conns':>7}"
                 f"{'restarts':>10}")
    for ip, w in sorted(figures["workers"].items()):
        lines.append(f"{ip:<18}{'yes' if w['alive'] else 'NO':<7}"
                     f"{'NO' if w.get('ip_down') else 'yes':<6}{w['pid']!s:<9}"
                     f"{w['jobs']:>6}{w['connections_open']:>7}{w['restarts']:>10}")
    shaping = render_shaping(figures["workers"])
    if shaping:
        lines += ["", *shaping]
    cluster = status_cluster.render(figures)
    if cluster:
        lines += ["", *cluster]
    return "\n".join(lines)


def _unwritable(spool: dict[str, Any]) -> list[str]:
    """The warning line while spool writes fail (engine.spoolhealth); none otherwise."""
    if spool.get("writable", True):
        return []
    return [f"SPOOL NOT WRITABLE for {spool.get('failing_for')}s ({spool.get('error')}):"
            f" intake paused, {spool.get('results_unrecorded', 0)} results waiting in memory"]


def _ips_down(workers: dict[str, Any]) -> list[str]:
    """A warning line per sending IP the host does not hold (engine.sendingip)."""
    return [f"SENDING IP {ip} DOWN for {w.get('ip_down_for')}s ({w.get('ip_error')}):"
            f" no new jobs for it; its pools' mail goes to their other IPs"
            for ip, w in sorted(workers.items()) if w.get("ip_down")]


def _clock_stepped(spool: dict[str, Any]) -> list[str]:
    """The line after a step of the wall clock (engine.clock); none otherwise."""
    apart = float(spool.get("clock_apart", 0.0))
    if abs(apart) <= STEP_TOLERANCE:
        return []
    return [f"CLOCK STEPPED: the wall clock is {abs(apart):.0f}s"
            f" {'ahead of' if apart > 0 else 'behind'} the engine's time (due times and"
            " expiry keep to the engine's; the spool rejoins the wall clock at a stop)"]


def render_shaping(workers: dict[str, Any]) -> list[str]:
    """Traffic shaping per sending IP x provider (docs/SHAPING.md): the phase, the allowed
    rate and the limit learned, the rate actually sent over the last 10 s, the configured
    maximum, messages waiting for a turn, the seconds left of a suspension, throttles (and
    blocks) received, connections open / allowed and, for an IP warming up, messages sent
    today / today's cap. Only the providers with something to show (engine.shaping_idle);
    a line says how many idle ones were left out."""
    rows = [(ip, provider, state) for ip, w in sorted(workers.items())
            for provider, state in sorted((w.get("shaping") or {}).items())]
    idle = _idle_providers(workers)
    if not rows:
        return idle
    lines = ["shaping (per sending IP x provider):",
             f"{'ip':<18}{'provider':<24}{'phase':<10}{'allowed':>10}{'limit':>10}"
             f"{'current':>10}{'max':>10}{'waiting':>9}{'suspended':>11}{'throttles':>11}"
             f"{'conns':>8}{'today':>12}"]
    return lines + [_shaping_row(ip, provider, st) for ip, provider, st in rows] + idle


def _idle_providers(workers: dict[str, Any]) -> list[str]:
    """How many providers each worker holds but left out of its shaping figures."""
    idle = {ip: int(w.get("shaping_idle") or 0) for ip, w in sorted(workers.items())}
    total = sum(idle.values())
    if not total:
        return []
    per_ip = ", ".join(f"{ip} {count:,}" for ip, count in idle.items() if count)
    return [f"{total:,} idle providers not shown ({per_ip}): nothing sent in the last 10 s,"
            " no connection, nothing waiting, suspended, throttled or learned"]


def _shaping_row(ip: str, provider: str, st: dict[str, Any]) -> str:
    cap = st.get("daily_cap")
    today = f"{st.get('sent_today', 0)}/{cap}" if cap is not None else "-"
    suspended = st.get("suspended_for", 0)
    conns = f"{st.get('connections', 0)}/{st.get('max_connections', '-')}"
    throttles = f"{st.get('throttles', 0)}" + (f"/{st['blocks']}b" if st.get("blocks") else "")
    return (f"{ip:<18}{provider[:23]:<24}{st.get('phase', '-')!s:<10}"
            f"{_rate(st.get('allowed_rate', 0)):>10}{_rate(st.get('limit') or 0, '-'):>10}"
            f"{st.get('current_rate', 0):>8.1f}/s{_rate(st.get('max_rate', 0)):>10}"
            f"{st.get('waiting', 0):>9}{f'{suspended:.1f}s' if suspended else '-':>11}"
            f"{throttles:>11}{conns:>8}{today:>12}")


def _rate(value: float, none: str = "unlimited") -> str:
    """Messages per second; 0 means no limit (shown as `none`)."""
    return f"{value:.1f}/s" if value else none
