"""`mailengine queue --cluster retry|bounce|delete|suspend|resume`: one operator's command
run on every host of `cluster.hosts`.

The queue of each host is its own (its spool: docs/SCALING.md, "What stays local"); this
module runs the same command on all of them at once, as engine.clusterview asks them for
the views: a thread per host, each host asked again until nothing more matches there
(engine.queue_cli does the same for one host), each request within `--timeout`. Every
host's answer is printed, one line each; a host that did not answer (down, unreachable,
refusing the key) or refused the command is named on a line of its own and makes the exit
status 1, the others done all the same.

- A bounce or delete that matches more than one job over the whole cluster asks once
  (`--yes` does not), after a dry run on every host; then only the hosts that counted
  something are asked to do it (one that did not answer the dry run is left alone).
- `suspend` and `resume` take a provider and no sending IP: every sending IP of every host
  (an IP is one host's: run the command on that host). `resume` here also lifts the
  provider's suspension from the cluster's Redis (a block one host published, followed by
  all), so that no worker follows it again (engine.cluster_suspend).
"""
from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from engine import cliargs, clusterview
from engine.clusterview import Target
from engine.queue_cli import EXIT_NOT_DONE, EXIT_OK, EXIT_USAGE, confirmed, counted, span, where

COUNTS = ("jobs", "rcpts", "in_flight")  # what a retry, bounce or delete answers, added up


@dataclass
class Outcome:
    """One host's part: what it did (`done`, added up over its requests) or why it did not
    (`error`; some of it may have been done before)."""

    host: str
    done: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def hosts_for(args: argparse.Namespace) -> list[Target] | int:
    """The hosts of the config, or the exit status after saying what is wrong."""
    try:
        return clusterview.targets(args)
    except cliargs.UsageError as err:
        return cliargs.fail("queue", err)


def run_everywhere(hosts: list[Target], request: dict[str, Any],
                   timeout: float) -> list[Outcome]:
    """`request` on every host at once, each until nothing more matches there."""
    with ThreadPoolExecutor(max_workers=min(32, len(hosts))) as pool:
        return list(pool.map(lambda host: _until_done(host, request, timeout), hosts))


def _until_done(host: Target, request: dict[str, Any], timeout: float) -> Outcome:
    outcome = Outcome(host.name)
    while True:
        answer = clusterview.ask_one(host, request, timeout)
        if answer.figures is None:
            outcome.error = answer.error
            return outcome
        for key, value in answer.figures.items():
            if key in COUNTS:
                outcome.done[key] = outcome.done.get(key, 0) + int(value)
            elif key != "more":
                outcome.done[key] = value
        if not answer.figures.get("more"):
            return outcome


def _timeout(args: argparse.Namespace) -> float:
    return float(getattr(args, "timeout", 10.0))


# -- retry, bounce, delete ----------------------------------------------------------------


def change(args: argparse.Namespace, request: dict[str, Any], target: dict[str, Any],
           what: str, none: str) -> int:
    """`queue --cluster retry|bounce|delete`: `request` on every host (a bounce or delete
    confirmed once, first); `what` says what became of the recipients."""
    if "ip" in target:
        return cliargs.fail("queue", "--ip names one host's sending IP: run the command on"
                                     " that host, without --cluster")
    hosts = hosts_for(args)
    if isinstance(hosts, int):
        return hosts
    failed: list[Outcome] = []
    if request.get("command") != "queue_retry" and not getattr(args, "yes", False):
        chosen = _confirm(hosts, request, target, args)
        if isinstance(chosen, int):
            return chosen
        hosts, failed = chosen
    outcomes = run_everywhere(hosts, request, _timeout(args)) + failed
    return _report(args, outcomes, target, what, none)


def _confirm(hosts: list[Target], request: dict[str, Any], target: dict[str, Any],
             args: argparse.Namespace) -> tuple[list[Target], list[Outcome]] | int:
    """A dry run on every host, and the question asked once for all of them: the hosts
    with something to do and those that did not answer; or the exit status."""
    counts = run_everywhere(hosts, {**request, "dry_run": True}, _timeout(args))
    failed = [o for o in counts if o.error is not None]
    found = {o.host: o.done for o in counts if o.error is None and o.done.get("jobs")}
    jobs = sum(done["jobs"] for done in found.values())
    rcpts = sum(done["rcpts"] for done in found.values())
    if jobs == 0:
        print(f"mailengine queue: {where(target)}: nothing waits there on"
              f" {len(hosts) - len(failed)} of {len(hosts)} hosts", file=sys.stderr)
        _say_failed(failed)
        return EXIT_NOT_DONE
    each = ", ".join(f"{host} {counted(done['jobs'], 'job')}" for host, done in found.items())
    left = "".join(f"; {o.host} did not answer: left alone" for o in failed)
    if jobs > 1 and not confirmed(args.verb, f"{jobs} jobs ({counted(rcpts, 'recipient')})"
                                             f" at {where(target)} on"
                                             f" {counted(len(found), 'host')} ({each}{left})"):
        return EXIT_NOT_DONE if sys.stdin.isatty() else EXIT_USAGE
    return [h for h in hosts if h.name in found], failed


def _report(args: argparse.Namespace, outcomes: list[Outcome], target: dict[str, Any],
            what: str, none: str) -> int:
    done = [o for o in outcomes if o.error is None]
    total = {key: sum(int(o.done.get(key, 0)) for o in done) for key in COUNTS}
    if getattr(args, "json", False):
        print(_as_json(outcomes, total))
    else:
        for o in done:
            print(f"{o.host}: {where(target)}: {counted(o.done.get('rcpts', 0), 'recipient')}"
                  f" of {counted(o.done.get('jobs', 0), 'job')} {what}")
        print(f"cluster: {counted(total['rcpts'], 'recipient')} of"
              f" {counted(total['jobs'], 'job')} {what} on {len(done)} of"
              f" {counted(len(outcomes), 'host')}")
    status = EXIT_OK
    if total["in_flight"]:
        print(f"mailengine queue: {total['in_flight']} jobs in flight (a worker has them"
              " now) were left alone; run it again in a moment", file=sys.stderr)
        status = EXIT_NOT_DONE
    if total["rcpts"] == 0 and len(done) == len(outcomes):
        print(f"mailengine queue: {where(target)}: {none} on any host", file=sys.stderr)
        status = EXIT_NOT_DONE
    return _say_failed([o for o in outcomes if o.error is not None]) or status


def _say_failed(failed: list[Outcome]) -> int:
    """One line per host not done (stderr); EXIT_NOT_DONE if there is one."""
    for o in failed:
        some = (f" (after {counted(o.done['rcpts'], 'recipient')} done there)"
                if o.done.get("rcpts") else "")
        print(f"mailengine queue: host {o.host} NOT DONE: {o.error}{some}", file=sys.stderr)
    if failed:
        print(f"mailengine queue: not done on {', '.join(o.host for o in failed)}: run it"
              " again once they answer", file=sys.stderr)
        return EXIT_NOT_DONE
    return EXIT_OK


def _as_json(outcomes: list[Outcome], total: dict[str, int]) -> str:
    return json.dumps({"hosts": {o.host: o.done if o.error is None
                                 else {"error": o.error, "done": o.done} for o in outcomes},
                       "done": sum(o.error is None for o in outcomes),
                       "listed": len(outcomes), "totals": total})


# -- suspend, resume ----------------------------------------------------------------------


def hold(args: argparse.Namespace) -> int:
    """`queue --cluster suspend|resume PROVIDER`: at every sending IP of every host."""
    if args.ip is not None:
        return cliargs.fail("queue", "--cluster suspends or resumes PROVIDER at every sending"
                                     " IP of every host: give the provider alone (an IP is"
                                     " one host's: run the command on that host)")
    hosts = hosts_for(args)
    if isinstance(hosts, int):
        return hosts
    request: dict[str, Any] = {"command": f"queue_{args.command}", "provider": args.provider}
    if args.command == "suspend":
        request["seconds"] = args.seconds
    else:
        request["lift"] = True  # the cluster's suspension, lifted in Redis too
    outcomes = run_everywhere(hosts, request, _timeout(args))
    done = [o for o in outcomes if o.error is None]
    if getattr(args, "json", False):
        print(_as_json(outcomes, {"ips": sum(len(o.done["ips"]) for o in done)}))
    else:
        for o in done:
            print(f"{o.host}: {_held(args, o.done)}")
        verb = "suspended" if args.command == "suspend" else "resumed"
        print(f"cluster: {args.provider} {verb} on {len(done)} of"
              f" {counted(len(outcomes), 'host')}")
    for o in done:
        if o.done.get("not_running"):
            print(f"mailengine queue: host {o.host}: the workers of"
                  f" {', '.join(o.done['not_running'])} are not running now"
                  + (" (told when they are)" if args.command == "suspend" else ""),
                  file=sys.stderr)
    return _say_failed([o for o in outcomes if o.error is not None])


def _held(args: argparse.Namespace, done: dict[str, Any]) -> str:
    ips = ", ".join(done["ips"]) or "no sending IP"
    if args.command == "suspend":
        return f"{done['provider']} suspended for {span(done['seconds'])} at {ips}"
    return (f"{done['provider']} resumed at {ips}; {counted(done.get('rcpts', 0), 'recipient')}"
            f" of {counted(done.get('jobs', 0), 'job')} due now")
