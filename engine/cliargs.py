"""What every `mailengine` command shares in reading its arguments.

The rule: a bad option, file or endpoint is one line on standard error naming it, and
exit status 2; never a usage dump, never a traceback. `Parser` makes argparse's own
errors one line; `duration` reads "30", "500ms" or "5m" as the config does; `connect`
turns libzmq's refusal of an endpoint into such a line.
"""
from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from typing import NoReturn

import zmq

from engine import config as config_mod


class UsageError(ValueError):
    """A bad option, file or endpoint: the message names it; exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (argparse prints the whole usage first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def duration(positive: bool = True) -> Callable[[str], float]:
    """An argparse type: seconds from "30", "1.5", "500ms", "30s", "5m", "2h" or "1d"."""
    def read(text: str) -> float:
        try:
            value: str | float = float(text)
        except ValueError:
            value = text
        try:
            seconds = config_mod.parse_duration(value, "value")
        except config_mod.ConfigError as err:
            raise argparse.ArgumentTypeError(str(err).removeprefix("value: ")) from None
        if positive and seconds <= 0:
            raise argparse.ArgumentTypeError(f"must be more than 0 seconds (got {text!r})")
        return seconds
    read.__name__ = "duration"
    return read


_TCP = re.compile(r"tcp://(?:[^;]+;)?(\[[^\]]+\]|[^:\[\]]+):(\d+)")


def connect(sock: zmq.Socket, endpoint: str, option: str) -> None:
    """`sock.connect(endpoint)`, or a UsageError naming `option` when libzmq refuses the
    endpoint (libzmq takes a tcp port above 65535, and fails later: refused here too)."""
    match = _TCP.fullmatch(endpoint)
    if endpoint.startswith("tcp://") and (match is None or not 0 < int(match[2]) < 65536):
        raise UsageError(f"{option} {endpoint}: not tcp://HOST:PORT")
    try:
        sock.connect(endpoint)
    except zmq.ZMQError as err:
        raise UsageError(f"{option} {endpoint}: not an endpoint to connect to"
                         f" ({zmq.strerror(err.errno or 0)}; give tcp://HOST:PORT or"
                         f" ipc:///PATH)") from None


def fail(command: str, problem: object) -> int:
    """Say `problem` on one line for `command`; the exit status of a usage error."""
    print(f"mailengine {command}: {problem}", file=sys.stderr)
    return 2
