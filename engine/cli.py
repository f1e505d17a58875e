"""The `mailengine` command: run, push, status, check-config, keygen, demo."""
from __future__ import annotations

import argparse
import json
import sys

from engine import __version__
from engine import config as config_mod


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mailengine", description=__doc__)
    parser.add_argument("--version", action="version", version=f"mailengine {__version__}")
    sub = parser.add_subparsers(metavar="COMMAND")

    run = sub.add_parser("run", help="run the engine (supervisor and workers) in the foreground")
    _config_arg(run)
    run.set_defaults(func=_run)

    check = sub.add_parser("check-config", help="validate a config file and print it in full")
    _config_arg(check)
    check.add_argument("-q", "--quiet", action="store_true", help="print nothing when valid")
    check.set_defaults(func=_check_config)

    from engine import push
    push.add_parser(sub)

    from engine import status
    status.add_parser(sub)

    keygen = sub.add_parser("keygen", help="make a CURVE key pair for the engine or a client",
                            description="Write NAME.key (the public key: give it to the other"
                                        " side) and NAME.key_secret (both keys: keep it, mode"
                                        " 0600). See docs/SECURITY.md.")
    keygen.add_argument("name", metavar="NAME", help="e.g. server, or the producer's name")
    keygen.add_argument("--dir", default=".", help="where to write the files (default: here)")
    keygen.set_defaults(func=_keygen)

    demo = sub.add_parser("demo", help="deliver a few hundred messages to a local SMTP server"
                                       " and show what happened")
    demo.add_argument("-n", "--messages", type=int, default=300)
    demo.add_argument("--keep", action="store_true", help="keep the demo's folder")
    demo.set_defaults(func=_demo)

    worker = sub.add_parser("worker", help="one delivery worker (normally started by `run`)")
    worker.add_argument("rest", nargs=argparse.REMAINDER)
    worker.set_defaults(func=_worker)
    return parser


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
    if not args.quiet:
        print(json.dumps(config_mod.to_dict(cfg), indent=2))
    return 0


def _keygen(args: argparse.Namespace) -> int:
    from engine import auth
    if not auth.available():
        print("mailengine keygen: this libzmq has no CURVE support", file=sys.stderr)
        return 1
    try:
        public, secret = auth.keygen(args.name, args.dir)
    except (auth.KeyFileError, OSError) as err:
        print(f"mailengine keygen: {err}", file=sys.stderr)
        return 1
    print(f"public key: {public}\nsecret key: {secret} (mode 0600: keep it private)")
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
