"""The `mailengine` command: run, push, status, queue, check-config, spool, keygen, dkim,
demo."""
from __future__ import annotations

import argparse
import functools
import json
import signal
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from engine import __version__, cliargs
from engine import config as config_mod
from engine.spoolfile import SpoolError

if TYPE_CHECKING:
    from engine.startcheck import Busy

RUNNING_ENGINE_WAIT = 2.0  # seconds for a running engine to answer check-config's `status`


def main(argv: list[str] | None = None) -> int:
    if (sys.argv[1:] if argv is None else argv)[:1] == ["run"]:
        _hold_signals()
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130


def _hold_signals() -> None:
    """`run`: SIGHUP and SIGUSR1 wait (blocked) until the supervisor's loop handles them
    (engine.supervisor.HELD_AT_START). Their default action ends the process: a
    logrotate's SIGUSR1 that came during the start used to kill the engine."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP, signal.SIGUSR1})


def _parser() -> argparse.ArgumentParser:
    parser = cliargs.Parser(prog="mailengine", description=__doc__)
    parser.add_argument("--version", action="version", version=f"mailengine {__version__}")
    sub = parser.add_subparsers(metavar="COMMAND")

    run = sub.add_parser("run", help="run the engine (supervisor and workers) in the foreground",
                         description="Run the engine in the foreground: the supervisor and one"
                                     " worker per sending IP, until SIGTERM or SIGINT, which"
                                     " drain it; SIGHUP reloads the config. The start-up checks"
                                     " of check-config come first. Exit status: 0 stopped,"
                                     " 1 could not start, 2 a bad config, a host that lacks"
                                     " what it needs, or a damaged spool (not worth a restart).")
    _config_arg(run)
    run.set_defaults(func=_run)

    check = sub.add_parser("check-config", help="validate a config file and print it in full",
                           description="Validate a config file and print the effective"
                                       " config; then check this host: the sending IPs are"
                                       " its own, smtp.ca_file loads, the spool, run_dir and"
                                       " events_log can be written, the endpoints are free"
                                       " (or held by the engine running this config). Exit"
                                       " status 2 with one line per problem.")
    _config_arg(check)
    check.add_argument("-q", "--quiet", action="store_true", help="print nothing when valid")
    check.add_argument("--no-host-check", action="store_true",
                       help="check the file only, not this host (for a file meant for"
                            " another machine)")
    check.set_defaults(func=_check_config)

    from engine import push
    push.add_parser(sub)

    _spool_parser(sub)

    from engine import status
    status.add_parser(sub)

    from engine import queue_cli
    queue_cli.add_parser(sub)

    keygen = sub.add_parser("keygen", help="make a CURVE key pair for the engine or a client",
                            description="Write NAME.key (the public key: give it to the other"
                                        " side) and NAME.key_secret (both keys: keep it, mode"
                                        " 0600). See docs/SECURITY.md.")
    keygen.add_argument("name", metavar="NAME", help="e.g. server, or the producer's name")
    keygen.add_argument("--dir", default=".", help="where to write the files (default: here)")
    keygen.set_defaults(func=_keygen)

    _dkim_parser(sub)

    demo = sub.add_parser("demo", help="deliver a few hundred messages to a local SMTP server"
                                       " and show what happened",
                          description="Start an engine and a local SMTP sink in a temporary"
                                      " folder, deliver messages through them and show the"
                                      " events and figures.")
    demo.add_argument("-n", "--messages", type=int, default=300,
                      help="how many messages (default 300)")
    demo.add_argument("--keep", action="store_true", help="keep the demo's folder")
    demo.set_defaults(func=_demo)

    # Internal (bin/mailengine-worker runs it; `run` starts workers): with no `help`,
    # argparse leaves it out of the list (help=SUPPRESS shows "==SUPPRESS==" before 3.13).
    worker = sub.add_parser("worker", description="One delivery worker, started by `run`.")
    worker.add_argument("rest", nargs=argparse.REMAINDER)
    worker.set_defaults(func=_worker)
    return parser


def _spool_parser(sub: Any) -> None:
    spool = sub.add_parser("spool", help="check a spool, or salvage a damaged one",
                           description="Check a spool, or move what is readable in a damaged"
                                       " one into a new spool. See docs/SPOOL.md, \"A damaged"
                                       " spool\".")
    spool.set_defaults(func=lambda _: _usage(spool))
    commands = spool.add_subparsers(metavar="COMMAND")
    check = commands.add_parser(
        "check", help="say what is readable in the spool (safe while the engine runs)",
        description="Read the spool read-only, run SQLite's integrity check and count the"
                    " jobs and recipients that can be read. Exit status: 0 healthy,"
                    " 1 damaged, 2 no spool or a bad config.")
    _spool_args(check)
    check.set_defaults(func=_spool_check)
    salvage = commands.add_parser(
        "salvage", help="copy what is readable into a new spool (the engine stopped)",
        description="Copy every readable job with its recipients' progress, the finished"
                    " ids and the corrupt rows into a new spool, and put it in place; the"
                    " damaged file is kept as spool.db.damaged-<UTC time>. Refused while"
                    " an engine runs on the spool. Exit status: 0 all saved, 1 something"
                    " lost (the readable rest is in place), 2 nothing done (no spool, in"
                    " use, a bad config, the new spool could not be written).")
    _spool_args(salvage)
    salvage.add_argument("--dry-run", action="store_true",
                         help="only say what would be saved and lost; change nothing")
    salvage.set_defaults(func=_spool_salvage)


def _dkim_parser(sub: Any) -> None:
    dkim = sub.add_parser("dkim", help="make a DKIM key, or print the DNS records of the"
                                       " configured ones",
                          description="DKIM keys: see docs/CONFIG.md (dkim) and"
                                      " docs/SECURITY.md.")
    dkim.set_defaults(func=lambda _: _usage(dkim))
    commands = dkim.add_subparsers(metavar="COMMAND")
    keygen = commands.add_parser(
        "keygen", help="write a new private key (mode 0600) and print its DNS TXT record",
        description="Write DOMAIN.SELECTOR.pem (the private key, mode 0600, never"
                    " overwritten) and print the TXT record to publish at"
                    " SELECTOR._domainkey.DOMAIN, and the lines to add to dkim.domains.")
    keygen.add_argument("domain", metavar="DOMAIN", help="the signing domain (d=)")
    keygen.add_argument("selector", metavar="SELECTOR", help="the selector (s=), e.g. s2026a")
    keygen.add_argument("--algorithm", choices=("rsa", "ed25519"), default="rsa",
                        help="rsa (rsa-sha256, the default) or ed25519 (ed25519-sha256, to"
                             " dual-sign beside an RSA key)")
    keygen.add_argument("--bits", type=int, choices=(1024, 2048, 3072, 4096), default=2048,
                        help="RSA key size (default 2048)")
    keygen.add_argument("--dir", default=".", help="where to write the key (default: here)")
    keygen.set_defaults(func=_dkim_keygen)
    records = commands.add_parser(
        "records", help="print the TXT record of every configured key (all must be published)",
        description="Load every key of the config's dkim section and print its TXT record,"
                    " saying which sign today. Exit status 2 if a key cannot be loaded.")
    _config_arg(records)
    records.set_defaults(func=_dkim_records)


def _spool_args(parser: argparse.ArgumentParser) -> None:
    _config_arg(parser)
    parser.add_argument("--spool", metavar="DIR", help="the spool folder (default: the"
                                                       " config's `spool`)")


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def _config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", default=None,
                        help=f"config file (default: ${config_mod.ENV_VAR} or "
                             f"{config_mod.DEFAULT_PATH})")


def _run(args: argparse.Namespace) -> int:
    from engine import supervisor
    return supervisor.main(args.config)


def _check_config(args: argparse.Namespace) -> int:
    try:
        cfg = config_mod.load(args.config)
    except config_mod.ConfigError as err:
        print(f"mailengine: {err}", file=sys.stderr)
        return 2
    for warning in cfg.warnings:  # it loads: still valid, exit 0
        print(f"mailengine: warning: {warning}", file=sys.stderr)
    if not args.no_host_check and _host_lacks(cfg):
        return 2
    if not args.quiet:
        print(json.dumps(_shown_config(cfg), indent=2))
    return 0


def _shown_config(cfg: config_mod.Config) -> dict[str, Any]:
    """The effective config as check-config prints it: a Redis password left out (the
    output goes to terminals, tickets and CI logs)."""
    from engine.cluster import shown
    plain = config_mod.to_dict(cfg)
    cluster = plain.get("cluster")
    if isinstance(cluster, dict) and cluster.get("redis"):
        cluster["redis"] = shown(cluster["redis"])
    return plain


def _host_lacks(cfg: config_mod.Config) -> bool:
    """Say what this host lacks for `cfg` (engine.startcheck); True if anything.

    An endpoint in use is fine when the engine running this config holds it (a
    `systemctl reload` checks the file while it runs): the engine that answers `status`
    on the config's `control`, its pid's sockets matched in /proc."""
    from engine import startcheck
    problems = startcheck.problems(cfg, is_ours=_running_engine(cfg))
    for problem in problems:
        print(f"mailengine: {problem}", file=sys.stderr)
    return bool(problems)


def _running_engine(cfg: config_mod.Config) -> Callable[[Busy], bool]:
    """Whether a busy endpoint is held by the engine answering on the config's `control`
    (asked once, and only if an endpoint is busy; with control.curve, with its
    client_key)."""
    from engine import controlclient, startcheck, status

    @functools.cache
    def engine_pid() -> int | None:
        try:
            curve = controlclient.curve_from(argparse.Namespace(), cfg)
            return int(status.query(cfg.control, RUNNING_ENGINE_WAIT, curve=curve)["pid"])
        except (TimeoutError, ValueError, KeyError, TypeError,  # none, or not an engine
                controlclient.Refused):  # no key of ours to ask it with (UsageError too)
            return None

    def is_ours(busy: Busy) -> bool:
        pid = engine_pid()
        return pid is not None and startcheck.held_by(busy, pid)
    return is_ours


def _spool_check(args: argparse.Namespace) -> int:
    from engine import salvage
    directory = _spool_dir(args, "check")
    if directory is None:
        return 2
    try:
        found = salvage.check(directory)
    except (SpoolError, OSError) as err:
        print(f"mailengine spool check: {err}", file=sys.stderr)
        return 2
    print("\n".join(salvage.check_report(found, directory)))
    return 0 if found.healthy else 1


def _spool_salvage(args: argparse.Namespace) -> int:
    from engine import salvage
    directory = _spool_dir(args, "salvage")
    if directory is None:
        return 2
    try:
        found = salvage.salvage(directory, dry_run=args.dry_run)
    except (SpoolError, OSError) as err:
        print(f"mailengine spool salvage: {err}", file=sys.stderr)
        return 2
    print("\n".join(salvage.salvage_report(found, directory, args.dry_run)))
    return 1 if found.lost_anything else 0


def _spool_dir(args: argparse.Namespace, command: str) -> str | None:
    """--spool, else the config's `spool`; None (and the reason said) when neither."""
    if args.spool:
        return str(args.spool)
    try:
        return config_mod.load(args.config).spool
    except config_mod.ConfigError as err:
        print(f"mailengine spool {command}: {err}", file=sys.stderr)
        return None


def _keygen(args: argparse.Namespace) -> int:
    from engine import auth
    if not auth.available():
        print("mailengine keygen: this libzmq has no CURVE support", file=sys.stderr)
        return 1
    try:
        public, secret = auth.keygen(args.name, args.dir)
    except (auth.KeyFileError, OSError) as err:  # a folder or file it cannot use
        print(f"mailengine keygen: {err}", file=sys.stderr)
        return 2
    print(f"public key: {public}\nsecret key: {secret} (mode 0600: keep it private)")
    return 0


def _dkim_keygen(args: argparse.Namespace) -> int:
    import os

    from engine import dkim
    from engine.config.names import is_hostname
    domain = args.domain.lower().rstrip(".")
    if not is_hostname(domain) or "." not in domain:
        return cliargs.fail("dkim keygen", f"{args.domain!r} is not a domain name (IDN in its"
                                           " xn-- form)")
    if not dkim.is_selector(args.selector):
        return cliargs.fail("dkim keygen", f"{args.selector!r} is not a selector (DNS labels:"
                                           " letters, digits and -)")
    path = os.path.join(args.dir, f"{domain}.{args.selector}.pem")
    key = dkim.generate(args.algorithm, args.bits)
    try:
        dkim.write_key(key, path)
    except FileExistsError:
        return cliargs.fail("dkim keygen", f"{path} exists; not overwritten")
    except OSError as err:
        return cliargs.fail("dkim keygen", f"{path}: {err.strerror or err}")
    print(f"private key: {path} (mode 0600: keep it private, owned by the engine's user)")
    print("publish in DNS:")
    print(dkim.zone_line(domain, args.selector, dkim.dns_record(key)))
    print("then add to the config (dkim.domains):")
    print(f"  {domain}:\n    keys:\n      - {{selector: {args.selector},"
          f" key_file: {os.path.abspath(path)}}}")
    return 0


def _dkim_records(args: argparse.Namespace) -> int:
    from engine import dkim
    try:
        cfg = config_mod.load(args.config)
        keys = dkim.load_keys(cfg.dkim)
    except (config_mod.ConfigError, dkim.DkimKeyError) as err:
        return cliargs.fail("dkim records", err)
    signing = dkim.signing_today(keys)
    for domain_keys in keys.values():
        for key in domain_keys:
            state = "signs today" if key in signing else "published, not signing today"
            print(f"; {key.domain} {key.selector} {key.algorithm}: {state}")
            print(dkim.zone_line(key.domain, key.selector, dkim.dns_record(key.key)))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from engine import demo
    return demo.main(args.messages, args.keep)


def _worker(args: argparse.Namespace) -> int:
    import os

    from engine.workers import worker_entry
    # A worker must patch before anything else imports socket: a fresh interpreter, through
    # the one entry point that patches (bin/mailengine-worker).
    os.execv(sys.executable, [sys.executable, worker_entry(), *args.rest])
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main())
