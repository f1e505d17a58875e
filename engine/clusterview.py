"""`mailengine status --cluster` and `mailengine queue --cluster`: every host at once.

The hosts are the config's `cluster.hosts` (docs/SCALING.md, "One view"): each one's
control endpoint and, for a tcp control socket with `control.curve`, that host's control
public key; the operator's key pair is `--curve-client-key`, else this host's
`control.curve.client_key`. Every host is asked at the same time (a thread each), each
with the command's `--timeout`, so the whole view takes the time of the slowest answer
and never more than the time-out: a host that does not answer (stopped, unreachable,
refusing the key) is shown so, and the exit status says the view is partial.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from engine import cliargs, controlclient, status_cluster
from engine import config as config_mod
from engine.config import ClusterHostConfig
from engine.queue_cli import counted, span

if TYPE_CHECKING:
    from engine.auth import CurveClient

EXIT_ALL, EXIT_PARTIAL = 0, 1  # every host answered; one did not (2: a usage error)
EVENTS = ("delivered", "deferred", "bounced", "expired")  # the totals `status` shows


@dataclass(frozen=True)
class Target:
    """A host to ask: its name, control endpoint and CURVE keys (None: a plain socket)."""

    name: str
    endpoint: str
    curve: CurveClient | None


@dataclass(frozen=True)
class Answer:
    """One host's answer (`figures`), or why there is none (`error`)."""

    host: str
    endpoint: str
    figures: dict[str, Any] | None = None
    error: str | None = None


def targets(args: argparse.Namespace) -> list[Target]:
    """The hosts of the config's `cluster.hosts`, with their keys; cliargs.UsageError for
    --control given too, a config that lists none, or keys that cannot be used."""
    if getattr(args, "control", None) is not None:
        raise cliargs.UsageError("--cluster asks the hosts of cluster.hosts; --control names"
                                 " one engine: give one of them")
    if getattr(args, "curve_server_key", None) is not None:
        raise cliargs.UsageError("--cluster takes each host's key from its curve_server_key in"
                                 " cluster.hosts, not --curve-server-key")
    try:
        cfg = config_mod.load(getattr(args, "config", None))
    except config_mod.ConfigError as err:
        raise cliargs.UsageError(str(err)) from None
    if not cfg.cluster.hosts:
        raise cliargs.UsageError("--cluster: the config lists no cluster.hosts (each host's"
                                 " name and control endpoint; docs/SCALING.md)")
    client_key = getattr(args, "curve_client_key", None) or cfg.control_curve.client_key
    return [Target(host.name, host.control, _curve(host, client_key))
            for host in cfg.cluster.hosts]


def _curve(host: ClusterHostConfig, client_key: str) -> CurveClient | None:
    """The CURVE keys for `host`: its curve_server_key and the operator's pair."""
    if not host.curve_server_key:
        return None
    if not client_key:
        raise cliargs.UsageError(
            f"cluster.hosts {host.name} speaks CURVE: give --curve-client-key"
            " NAME.key_secret, or set control.curve.client_key")
    from engine import auth
    if not auth.available():
        raise cliargs.UsageError("this libzmq has no CURVE support (zmq.has('curve') is False)")
    try:
        return auth.CurveClient.from_files(host.curve_server_key, client_key)
    except auth.KeyFileError as err:
        raise cliargs.UsageError(f"cluster.hosts {host.name}: {err}") from None


def ask_all(hosts: list[Target], request: dict[str, Any], timeout: float) -> list[Answer]:
    """Every host's answer to `request`, asked in parallel, in the order of `hosts`."""
    with ThreadPoolExecutor(max_workers=min(32, len(hosts))) as pool:
        return list(pool.map(lambda host: ask_one(host, request, timeout), hosts))


def ask_one(host: Target, request: dict[str, Any], timeout: float) -> Answer:
    """One host's answer to `request`, or why there is none."""
    try:
        figures = controlclient.request(host.endpoint, request, timeout,
                                        f"cluster.hosts {host.name}", host.curve)
    except (TimeoutError, controlclient.Refused, cliargs.UsageError) as err:
        return Answer(host.name, host.endpoint, error=str(err))
    if "error" in figures:
        return Answer(host.name, host.endpoint, error=f"the engine said: {figures['error']}")
    return Answer(host.name, host.endpoint, figures=figures)


def exit_status(answers: Iterable[Answer]) -> int:
    """0 when every host answered, 1 when one did not (the view is partial)."""
    return EXIT_ALL if all(a.figures is not None for a in answers) else EXIT_PARTIAL


def as_json(answers: list[Answer], totals: dict[str, Any]) -> str:
    """{"hosts": {name: answer or {"error": ...}}, "answered": n, "listed": n, "totals"}"""
    return json.dumps({
        "hosts": {a.host: a.figures if a.figures is not None
                  else {"error": a.error, "control": a.endpoint} for a in answers},
        "answered": sum(a.figures is not None for a in answers), "listed": len(answers),
        "totals": totals})


# -- status --cluster ---------------------------------------------------------------------


def status(args: argparse.Namespace) -> int:
    """`mailengine status --cluster`."""
    try:
        hosts = targets(args)
    except cliargs.UsageError as err:
        return cliargs.fail("status", err)
    while True:
        answers = ask_all(hosts, {"command": "status"}, args.timeout)
        if args.json:
            print(as_json(answers, status_totals(answers)))
        else:
            if args.watch:
                sys.stdout.write("\x1b[H\x1b[2J")
            print(render_status(answers))
        if not args.watch:
            return exit_status(answers)
        time.sleep(1.0)


def host_figures(figures: dict[str, Any]) -> dict[str, int]:
    """The numbers of one host's row: workers, spool, in flight and event counts."""
    workers = figures.get("workers") or {}
    spool, counts = figures.get("spool") or {}, figures.get("events") or {}
    return {"workers": len(workers),
            "workers_alive": sum(bool(w.get("alive")) for w in workers.values()),
            "jobs": int(spool.get("jobs", 0)),
            "rcpts_pending": int(spool.get("rcpts_pending", 0)),
            "rcpts_deferred": int(spool.get("rcpts_deferred", 0)),
            "in_flight": int(figures.get("in_flight", 0)),
            **{name: int(counts.get(name, 0)) for name in EVENTS}}


def status_totals(answers: list[Answer]) -> dict[str, int]:
    """The hosts that answered, added up."""
    totals = dict.fromkeys(host_figures({}), 0)
    for answer in answers:
        if answer.figures is not None:
            for key, value in host_figures(answer.figures).items():
                totals[key] = totals.get(key, 0) + value
    return totals


_STATUS_HEAD = (f"{'host':<20}{'state':<13}{'workers':>8}{'jobs':>8}{'pending':>9}"
                f"{'deferred':>10}{'in flight':>10}{'delivered':>11}{'deferred':>10}"
                f"{'bounced':>9}{'expired':>9}")


def render_status(answers: list[Answer]) -> str:
    answered = sum(a.figures is not None for a in answers)
    lines = [f"cluster: {answered} of {len(answers)} hosts answered", "",
             f"{'':<41}{'spool':<37}events since start", _STATUS_HEAD]
    lines += [_status_row(a.host, _state(a.figures), host_figures(a.figures))
              if a.figures is not None else f"{a.host[:19]:<20}UNREACHABLE"
              for a in answers]
    lines.append(_status_row("total", f"{answered}/{len(answers)} up",
                             status_totals(answers)))
    lines += [f"{a.host}: {a.error}" for a in answers if a.figures is None]
    cluster = status_cluster.hosts_lines({a.host: a.figures for a in answers
                                          if a.figures is not None})
    return "\n".join([*lines, *(["", *cluster] if cluster else [])])


def _state(figures: dict[str, Any]) -> str:
    """up, or what is wrong there that `mailengine status` on that host would say."""
    if not (figures.get("spool") or {}).get("writable", True):
        return "SPOOL RO"
    if any(w.get("ip_down") for w in (figures.get("workers") or {}).values()):
        return "IP DOWN"
    return "up"


def _status_row(name: str, state: str, n: dict[str, int]) -> str:
    if not n:
        return f"{name[:19]:<20}{state:<13}"
    return (f"{name[:19]:<20}{state:<13}{n['workers_alive']:>4}/{n['workers']:<3}"
            f"{n['jobs']:>8}{n['rcpts_pending']:>9}{n['rcpts_deferred']:>10}"
            f"{n['in_flight']:>10}{n['delivered']:>11}{n['deferred']:>10}"
            f"{n['bounced']:>9}{n['expired']:>9}")


# -- queue --cluster ----------------------------------------------------------------------


def queue(args: argparse.Namespace) -> int:
    """`mailengine queue --cluster`: every host's summary, merged with a host column."""
    try:
        hosts = targets(args)
    except cliargs.UsageError as err:
        return cliargs.fail("queue", err)
    request = {"command": "queue", "limit": getattr(args, "limit", 100)}
    answers = ask_all(hosts, request, getattr(args, "timeout", 3.0))
    if getattr(args, "json", False):
        print(as_json(answers, queue_totals(answers)))
    else:
        print(render_queue(answers))
    return exit_status(answers)


def queue_totals(answers: list[Answer]) -> dict[str, int]:
    up = [a.figures for a in answers if a.figures is not None]
    return {"rcpts": sum(row["rcpts"] for f in up for row in f["rows"]),
            "domains": sum(int(f["domains"]) for f in up),
            "in_flight": sum(int(f["in_flight"]) for f in up)}


def merged_rows(answers: list[Answer]) -> list[dict[str, Any]]:
    """Every host's rows, each with its `host`, the most recipients first."""
    rows = [{"host": a.host, **row} for a in answers if a.figures is not None
            for row in a.figures["rows"]]
    return sorted(rows, key=lambda row: (-row["rcpts"], row["host"], row["domain"]))


def render_queue(answers: list[Answer]) -> str:
    totals, rows = queue_totals(answers), merged_rows(answers)
    answered = sum(a.figures is not None for a in answers)
    lines = [f"{counted(totals['rcpts'], 'recipient')} waiting for"
             f" {counted(len({row['domain'] for row in rows}), 'domain')}"
             + ("" if len(rows) == totals["domains"] else f" ({len(rows)} of"
                f" {totals['domains']} rows shown)")
             + f" on {answered} of {len(answers)} hosts; {counted(totals['in_flight'], 'job')}"
               " in flight"]
    for a in answers:
        if a.figures is None:
            lines.append(f"{a.host}: UNREACHABLE ({a.error})")
            continue
        if not a.figures["complete"]:
            lines.append(f"{a.host}: counted from the oldest {a.figures['scanned']}"
                         " recipients waiting only")
        lines += [f"{a.host}: SUSPENDED {held['ip']} x {held['provider']} for"
                  f" {span(held['for'])} (by {held['by']})" for held in a.figures["suspended"]]
    if rows:
        lines += ["", f"{'host':<16}{'ip':<16}{'provider':<20}{'domain':<28}{'rcpts':>7}"
                      f"{'jobs':>7}{'oldest':>8}{'next':>7}  last reply"]
    lines += [_queue_row(row) for row in rows]
    return "\n".join(lines)


def _queue_row(row: dict[str, Any]) -> str:
    reply = row["last_reply"]
    said = "-" if reply is None else " ".join(
        str(part) for part in (reply["code"], reply["enhanced"], reply["text"]) if part)
    return (f"{row['host'][:15]:<16}{row['ip'] or '-':<16}{(row['provider'] or '-')[:19]:<20}"
            f"{row['domain'][:27]:<28}{row['rcpts']:>7}{row['jobs']:>7}"
            f"{span(row['oldest_age']):>8}{span(row['next_in']):>7}  {said[:80]}")
