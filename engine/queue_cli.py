"""`mailengine queue`: what waits, and the operator's hand on it, over the control socket.

The supervisor's side is engine.queue_admin; docs/OPERATIONS.md, "The queue", is the
runbook. A bounce or delete that matches more than one job asks first (`--yes` does not);
a retry, bounce or delete by domain goes on asking the engine until nothing more matches
(each request changes at most a bounded number of recipients, so the engine's loop never
stalls on one).
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from engine import cliargs, controlclient, status

EXIT_OK, EXIT_NOT_DONE, EXIT_USAGE = 0, 1, 2


def add_parser(sub: Any) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", default=argparse.SUPPRESS,
                        help="read the control endpoint from here")
    common.add_argument("--control", default=argparse.SUPPRESS,
                        help="control endpoint (default: the config's)")
    common.add_argument("--timeout", type=cliargs.duration(), default=argparse.SUPPRESS,
                        help="give up on an answer after this long (default 10s)")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print the engine's answer as JSON")
    common.add_argument("--cluster", action="store_true", default=argparse.SUPPRESS,
                        help="every host of cluster.hosts at once (in parallel, each within"
                             " --timeout), each host's answer shown; exit status 1 when a"
                             " host did not answer or did not do it (docs/SCALING.md)")
    controlclient.add_options(common, default=argparse.SUPPRESS)
    queue = sub.add_parser(
        "queue", parents=[common], help="show what waits; retry, bounce, delete, suspend",
        description="Without a command: what waits, per sending IP x provider x domain"
                    " (recipients, jobs, the oldest, the next try, the last reply) and the"
                    " suspensions in force. Exit status: 0 done, 1 nothing matched, not"
                    " everything done, or no answer, 2 a bad option. See"
                    " docs/OPERATIONS.md, \"The queue\".")
    queue.add_argument("--limit", type=int, default=argparse.SUPPRESS,
                       help="show this many domains at most (default 100; per host with"
                            " --cluster)")
    queue.set_defaults(func=_summary)
    commands = queue.add_subparsers(metavar="COMMAND")

    show = commands.add_parser("show", parents=[common], help="one job, as the spool holds it",
                               description="One job: its sender, meta, age, expiry and each"
                                           " recipient's state, attempts and last reply.")
    show.add_argument("id", metavar="ID")
    show.set_defaults(func=_show)

    retry = commands.add_parser("retry", parents=[common],
                                help="try now: a job, a domain or a provider",
                                description="Make recipients due now (their attempt counts"
                                            " stay). A suspended provider stays suspended:"
                                            " `queue resume` lifts it.")
    _target_args(retry, provider=True)
    retry.set_defaults(func=_retry)

    for name, verb, event in (("bounce", "bounce", "bounced"),
                              ("delete", "delete", "expired")):
        ending = commands.add_parser(
            name, parents=[common], help=f"{verb} a job or a domain's recipients now",
            description=f"End recipients now, each with its final `{event}` event (reply"
                        f" {'550 5.0.0' if name == 'bounce' else '451 4.0.0'}, saying the"
                        " operator did it). A job a worker is delivering right now is left"
                        " alone (run it again). Asks first when more than one job matches.")
        _target_args(ending, provider=False)
        ending.add_argument("-y", "--yes", action="store_true",
                            help="do not ask, even when many jobs match")
        ending.set_defaults(func=_end, verb=verb, event=event)

    for name, short, what in (("suspend", "stop sending to a provider from a sending IP",
                               "Stop sending to PROVIDER from IP (without IP: from every"
                               " sending IP; with --cluster: of every host; its recipients"
                               " wait, no attempt counted), for --for (default 1h, so a"
                               " forgotten suspension ends). It stays on the hosts it was"
                               " run on (docs/SCALING.md)."),
                              ("resume", "lift a provider's suspension at a sending IP",
                               "Lift any suspension of PROVIDER at IP (without IP: at every"
                               " sending IP; the operator's, a throttle rule's or a"
                               " block's) and retry its recipients now. With --cluster: on"
                               " every host, and a block published in the cluster's Redis"
                               " is lifted there too.")):
        hold = commands.add_parser(name, parents=[common], help=short,
                                   description=what)
        hold.add_argument("ip", metavar="IP", nargs="?",
                          help="a sending IP of the engine (default: every one)")
        hold.add_argument("provider", metavar="PROVIDER",
                          help="as `status` and `queue` show it, e.g. google")
        if name == "suspend":
            hold.add_argument("--for", dest="seconds", type=cliargs.duration(), default=3600.0,
                              help="how long (e.g. 30m, 2h, 1d; default 1h)")
        hold.set_defaults(func=_hold, command=name)


def _target_args(parser: argparse.ArgumentParser, provider: bool) -> None:
    parser.add_argument("id", metavar="ID", nargs="?", help="a job id")
    parser.add_argument("--domain", help="every recipient at this domain")
    if provider:
        parser.add_argument("--provider", help="every domain whose mail went to this"
                                               " provider (since the engine started)")
        parser.add_argument("--ip", help="with --provider: only through this sending IP")


# -- talking to the engine ----------------------------------------------------------------


class NoAnswer(Exception):
    pass


def ask(args: argparse.Namespace, request: dict[str, Any]) -> dict[str, Any]:
    """The engine's answer to `request`; NoAnswer if none came in time, UsageError for a
    bad endpoint or config, RuntimeError with the engine's `error`."""
    if getattr(args, "cluster", False):  # `queue --cluster show`: a job is one host's
        raise cliargs.UsageError("--cluster goes with the summary and the commands that"
                                 " change the queue; `show` asks the job's own host (its -c"
                                 " or --control)")
    endpoint, option, curve = status.target(args)
    timeout = getattr(args, "timeout", 10.0)
    try:
        answer = controlclient.request(endpoint, request, timeout, option, curve)
    except controlclient.Refused as err:
        raise NoAnswer(str(err)) from None
    except TimeoutError as err:
        raise NoAnswer(f"{err}; is the engine running?") from None
    if "error" in answer:
        raise RuntimeError(answer["error"])
    return answer


def _run(args: argparse.Namespace, request: dict[str, Any]) -> dict[str, Any] | int:
    """`ask`, or the exit status after saying why it failed."""
    try:
        return ask(args, request)
    except cliargs.UsageError as err:
        return cliargs.fail("queue", err)
    except (NoAnswer, RuntimeError) as err:
        print(f"mailengine queue: {err}", file=sys.stderr)
        return EXIT_NOT_DONE


def _print_json(args: argparse.Namespace, answer: dict[str, Any]) -> bool:
    if getattr(args, "json", False):
        print(json.dumps(answer))
        return True
    return False


# -- the commands -------------------------------------------------------------------------


def _summary(args: argparse.Namespace) -> int:
    if getattr(args, "cluster", False):
        from engine import clusterview
        return clusterview.queue(args)
    answer = _run(args, {"command": "queue", "limit": getattr(args, "limit", 100)})
    if isinstance(answer, int):
        return answer
    if not _print_json(args, answer):
        print(render_summary(answer))
    return EXIT_OK


def render_summary(answer: dict[str, Any]) -> str:
    rows = answer["rows"]
    waiting = sum(row["rcpts"] for row in rows)
    lines = [f"{counted(waiting, 'recipient')} waiting for {counted(len(rows), 'domain')}"
             + ("" if len(rows) == answer["domains"] else f" (of {answer['domains']})")
             + f"; {counted(answer['in_flight'], 'job')} in flight"]
    if not answer["complete"]:
        lines.append(f"(counted from the oldest {answer['scanned']} recipients waiting only)")
    for held in answer["suspended"]:
        lines.append(f"SUSPENDED {held['ip']} x {held['provider']} for"
                     f" {span(held['for'])} (by {held['by']})")
    if rows:
        lines += ["", f"{'ip':<16}{'provider':<20}{'domain':<28}{'rcpts':>7}{'jobs':>7}"
                      f"{'oldest':>8}{'next':>7}  last reply"]
    for row in rows:
        reply = row["last_reply"]
        said = "-" if reply is None else " ".join(
            str(part) for part in (reply["code"], reply["enhanced"], reply["text"]) if part)
        if row["last_reply_age"] is not None:
            said += f" ({span(row['last_reply_age'])} ago)"
        lines.append(f"{row['ip'] or '-':<16}{(row['provider'] or '-')[:19]:<20}"
                     f"{row['domain'][:27]:<28}{row['rcpts']:>7}{row['jobs']:>7}"
                     f"{span(row['oldest_age']):>8}{span(row['next_in']):>7}  {said[:100]}")
    return "\n".join(lines)


def _show(args: argparse.Namespace) -> int:
    answer = _run(args, {"command": "queue_show", "id": args.id})
    if isinstance(answer, int):
        return answer
    if _print_json(args, answer):
        return EXIT_OK
    flight = answer["in_flight_at"]
    lines = [f"job {answer['id']}", f"  from: {answer['from']}",
             f"  meta: {json.dumps(answer['meta'])}",
             f"  queued {span(answer['age'])} ago, expires in {span(answer['expires_in'])},"
             f" {answer['size']} bytes",
             f"  sent through: {answer['ip'] or 'pool ' + (answer['pool'] or 'default')}",
             f"  in flight now at {flight}" if flight else "  not in flight"]
    for rcpt in answer["rcpts"]:
        said = " ".join(str(part) for part in (rcpt["code"], rcpt["enhanced"], rcpt["reply"])
                        if part) or "-"
        due = "" if rcpt["next_in"] is None else f", next in {span(rcpt['next_in'])}"
        attempts = counted(rcpt["attempts"], "attempt")
        lines.append(f"  {rcpt['rcpt']}: {rcpt['status']}, {attempts}{due}; last reply: {said}")
    print("\n".join(lines))
    return EXIT_OK


def _target(args: argparse.Namespace, provider: bool = False) -> dict[str, Any] | None:
    """The request's target from ID, --domain or --provider (exactly one); None after
    saying what is wrong."""
    given = {"id": args.id, "domain": args.domain,
             **({"provider": args.provider} if provider else {})}
    chosen = {key: value for key, value in given.items() if value is not None}
    if len(chosen) != 1:
        names = "ID, --domain or --provider" if provider else "ID or --domain"
        cliargs.fail("queue", f"give one of {names}")
        return None
    if provider and args.ip is not None:
        if "provider" not in chosen:
            cliargs.fail("queue", "--ip goes with --provider")
            return None
        chosen["ip"] = args.ip
    return chosen


def where(target: dict[str, Any]) -> str:
    if "id" in target:
        return f"job {target['id']}"
    if "domain" in target:
        return f"domain {target['domain']}"
    return f"provider {target['provider']}" + (f" via {target['ip']}" if "ip" in target
                                               else "")


def _retry(args: argparse.Namespace) -> int:
    target = _target(args, provider=True)
    if target is None:
        return EXIT_USAGE
    if getattr(args, "cluster", False):
        from engine import clusteradmin
        return clusteradmin.change(args, {"command": "queue_retry", **target}, target,
                                   "due now", "nothing waits there for a later try")
    done = _repeat(args, {"command": "queue_retry", **target})
    if isinstance(done, int):
        return done
    return _report(args, done, "due now", target, "nothing waits there for a later try")


def _end(args: argparse.Namespace) -> int:
    target = _target(args)
    if target is None:
        return EXIT_USAGE
    command = f"queue_{args.verb}"
    if getattr(args, "cluster", False):
        from engine import clusteradmin
        return clusteradmin.change(args, {"command": command, **target}, target,
                                   _ended(args), "nothing waits there")
    if not args.yes:
        count = _run(args, {"command": command, **target, "dry_run": True})
        if isinstance(count, int):
            return count
        if count["jobs"] == 0:
            print(f"mailengine queue: {where(target)}: nothing waits there", file=sys.stderr)
            return EXIT_NOT_DONE
        if count["jobs"] > 1 and not confirmed(
                args.verb, f"{count['jobs']} jobs ({counted(count['rcpts'], 'recipient')}) at"
                           f" {where(target)}"):
            return EXIT_NOT_DONE if sys.stdin.isatty() else EXIT_USAGE
    done = _repeat(args, {"command": command, **target})
    if isinstance(done, int):
        return done
    return _report(args, done, _ended(args), target, "nothing waits there")


def _ended(args: argparse.Namespace) -> str:
    return f"{args.verb}d, each with its `{args.event}` event" if args.verb == "delete" \
        else f"bounced, each with its `{args.event}` event"


def confirmed(verb: str, what: str) -> bool:
    """Whether the operator says yes to `verb` `what` (asked on a terminal only)."""
    if not sys.stdin.isatty():
        print(f"mailengine queue: {what} match; add --yes to {verb} them all",
              file=sys.stderr)
        return False
    print(f"{verb} {what}? [y/N] ", end="", file=sys.stderr, flush=True)
    if sys.stdin.readline().strip().lower() in ("y", "yes"):
        return True
    print("mailengine queue: nothing done", file=sys.stderr)
    return False


def _repeat(args: argparse.Namespace, request: dict[str, Any]) -> dict[str, Any] | int:
    """Ask until nothing more matches; the answers added up."""
    total = {"jobs": 0, "rcpts": 0, "in_flight": 0}
    while True:
        answer = _run(args, request)
        if isinstance(answer, int):
            return answer if total["rcpts"] == 0 else _partial(total, answer)
        for key in total:
            total[key] += int(answer.get(key, 0))
        if not answer.get("more"):
            return total


def _partial(total: dict[str, int], status: int) -> int:
    print(f"mailengine queue: stopped after {total['rcpts']} recipients of"
          f" {total['jobs']} jobs", file=sys.stderr)
    return status


def _report(args: argparse.Namespace, done: dict[str, Any], what: str,
            target: dict[str, Any], none: str) -> int:
    if not _print_json(args, done):
        print(f"{where(target)}: {counted(done['rcpts'], 'recipient')} of"
              f" {counted(done['jobs'], 'job')} {what}")
    if done["in_flight"]:
        print(f"mailengine queue: {done['in_flight']} jobs in flight (a worker has them"
              " now) were left alone; run it again in a moment", file=sys.stderr)
        return EXIT_NOT_DONE
    if done["rcpts"] == 0:
        print(f"mailengine queue: {where(target)}: {none}", file=sys.stderr)
        return EXIT_NOT_DONE
    return EXIT_OK


def _hold(args: argparse.Namespace) -> int:
    if getattr(args, "cluster", False):
        from engine import clusteradmin
        return clusteradmin.hold(args)
    request = {"command": f"queue_{args.command}", "provider": args.provider,
               **({"ip": args.ip} if args.ip is not None else {})}
    if args.command == "suspend":
        request["seconds"] = args.seconds
    answer = _run(args, request)
    if isinstance(answer, int):
        return answer
    if _print_json(args, answer):
        return EXIT_OK
    at = args.ip or ", ".join(answer.get("ips") or []) or "no sending IP"
    if args.command == "suspend":
        print(f"{at} x {answer['provider']} suspended for {span(answer['seconds'])}"
              " (`mailengine queue resume` lifts it)")
    else:
        print(f"{at} x {answer['provider']} resumed; {counted(answer['rcpts'], 'recipient')}"
              f" of {counted(answer['jobs'], 'job')} due now")
    for ip in answer.get("not_running") or []:
        print(f"mailengine queue: the worker of {ip} is not running now"
              + (" (told when it is)" if args.command == "suspend" else ""), file=sys.stderr)
    return EXIT_OK


def counted(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def span(seconds: float | None) -> str:
    """45s, 12m, 3h05m, 2d04h."""
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02}m"
    return f"{s // 86400}d{s % 86400 // 3600:02}h"
