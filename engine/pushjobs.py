"""The jobs `mailengine push` sends, read from its sources one at a time.

Sources: a .eml file (or - for standard input) with --from/--to; a folder of .eml files
(envelope from --from/--to, or else from each message's From and To headers); a .jsonl
file with one job per line: the envelope fields plus `message` (the raw message as text)
or `message_file` (a path).

`Sources.jobs()` is a generator: nothing but the job being sent is held, so memory stays
flat in the number of jobs. Reading it through once (`count`) checks every job before
the first is sent. A problem is a ValueError naming the file (and line).
"""
from __future__ import annotations

import argparse
import email.parser
import email.utils
import json
import os
import sys
import uuid
from collections.abc import Iterator
from typing import Any

from engine.cliargs import UsageError

Job = tuple[str, list[bytes]]  # its id, and the frames: the envelope as JSON, the message


class Sources:
    """The sources named on the command line, with the options that make envelopes."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.paths: list[str] = list(args.sources)
        self.sender: str | None = args.sender
        self.rcpts: list[str] = list(args.to)
        self.job_id: str | None = args.id
        self.extra = {key: getattr(args, key) for key in ("ip", "pool", "expires")
                      if getattr(args, key) is not None}
        if args.meta is not None:
            self.extra["meta"] = meta(args.meta)
        # Standard input can be read only once: its message is kept (it is one job).
        self.stdin = sys.stdin.buffer.read() if "-" in self.paths else b""

    def count(self) -> int:
        """Read every job once, keeping none: how many there are. Raises ValueError at
        the first that cannot be read."""
        return sum(1 for _ in self.jobs())

    def jobs(self) -> Iterator[Job]:
        for path in self.paths:
            if path.endswith(".jsonl"):
                yield from _jsonl(path)
            elif path != "-" and os.path.isdir(path):
                for name in sorted(os.listdir(path)):
                    if name.endswith(".eml"):
                        yield self._eml(os.path.join(path, name), single=False)
            else:
                yield self._eml(path, single=len(self.paths) == 1)

    def _eml(self, path: str, single: bool) -> Job:
        message = self.stdin if path == "-" else read(path)
        sender, rcpts = self.sender, self.rcpts
        if sender is None or not rcpts:
            headers = email.parser.BytesHeaderParser().parsebytes(message)
            if sender is None:
                sender = email.utils.parseaddr(headers.get("From", ""))[1]
            if not rcpts:
                rcpts = [a for _, a in email.utils.getaddresses(headers.get_all("To", [])) if a]
        if not rcpts:
            raise ValueError(f"{path}: no recipients (give --to, or a To header)")
        job_id = self.job_id if single and self.job_id else uuid.uuid4().hex
        envelope = {"id": job_id, "from": sender, "to": rcpts, **self.extra}
        return job_id, [json.dumps(envelope).encode(), message]


def meta(text: str) -> dict[str, Any]:
    """--meta: a JSON object, or a UsageError that names the option."""
    try:
        value = json.loads(text)
    except ValueError as err:
        raise UsageError(f"--meta: not JSON ({err})") from None
    if not isinstance(value, dict):
        raise UsageError("--meta: must be a JSON object, like '{\"campaign\": \"spring\"}'")
    return value


def _jsonl(path: str) -> Iterator[Job]:
    try:
        f = open(path, encoding="utf-8")  # closed by the `with` below
    except OSError as err:
        raise ValueError(f"{path}: {err.strerror or err}") from None
    with f:
        for number, line in enumerate(_lines(f, path), 1):
            if line.strip():
                yield _jsonl_job(line, f"{path}:{number}")


def _lines(f: Any, path: str) -> Iterator[str]:
    try:
        yield from f
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def _jsonl_job(line: str, where: str) -> Job:
    try:
        job = json.loads(line)
        if "message_file" in job:
            message = read(job.pop("message_file"))
        else:
            message = job.pop("message").encode("utf-8")
    except (ValueError, KeyError, AttributeError, TypeError) as err:
        raise ValueError(f"{where}: not a job ({err})") from err
    job.setdefault("id", uuid.uuid4().hex)
    return job["id"], [json.dumps(job).encode(), message]


def read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as err:
        raise ValueError(f"{path}: {err.strerror or err}") from None
