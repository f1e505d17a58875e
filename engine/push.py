"""`mailengine push`: hand jobs to a running engine, and make sure it has them.

A job counts as accepted only when the engine publishes `queued` for its id
(it is then fsynced in the spool). Until then push re-sends it with the same id
(the engine ignores a duplicate id, and acknowledges it again), so nothing is
lost to a restart of the engine or a dropped connection. Exit status 0 means
every job was accepted; 1 that some were rejected or never acknowledged. A job
id given twice is sent again once the first is acknowledged; the engine
acknowledges the copy as a duplicate and delivers the job once.

Sources: a .eml file (or - for standard input) with --from/--to; a folder of
.eml files (envelope from --from/--to, or else from each message's From and
To headers); a .jsonl file with one job per line: the envelope fields plus
`message` (the raw message as text) or `message_file` (a path).

An engine with `security.curve.enabled` admits only known clients: give this
client's key pair (`--curve-client-key NAME.key_secret`, from `mailengine keygen`)
and the engine's public key (`--curve-server-key server.key`, by default the
`.key` next to the config's `server_secret_key`). See docs/SECURITY.md.
"""
from __future__ import annotations

import argparse
import collections
import email.parser
import email.utils
import json
import os
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import zmq

from engine import auth
from engine import config as config_mod

WINDOW = 2000  # unacknowledged jobs at once


@dataclass
class Outgoing:
    frames: list[bytes]
    sent_at: float = 0.0
    sends: int = 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser("push", help="submit jobs and wait until the engine has them")
    p.add_argument("sources", nargs="+", metavar="SOURCE",
                   help=".eml file, - (stdin), folder of .eml files, or .jsonl file")
    p.add_argument("-c", "--config", help="read the ingest and events endpoints from here")
    p.add_argument("--ingest", help="ingest endpoint (default: config's, or tcp://127.0.0.1:5570)")
    p.add_argument("--events", help="events endpoint (default: config's, or tcp://127.0.0.1:5571)")
    p.add_argument("--from", dest="sender", help="reverse-path (may be empty: --from '')")
    p.add_argument("--to", action="append", default=[], help="recipient (repeatable)")
    p.add_argument("--id", help="job id (one message only)")
    p.add_argument("--ip", help="send from this IP")
    p.add_argument("--pool", help="send from this pool's IPs")
    p.add_argument("--meta", help="JSON object echoed on every event of the job")
    p.add_argument("--expires", type=float, help="seconds the engine may keep trying")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="give up after this many seconds without progress (default 60)")
    p.add_argument("--resend", type=float, default=3.0,
                   help="re-send a job not acknowledged after this many seconds (default 3)")
    p.add_argument("--curve-server-key", metavar="FILE",
                   help="the engine's public key (server.key): talk CURVE to the engine")
    p.add_argument("--curve-client-key", metavar="FILE",
                   help="this client's key pair (NAME.key_secret, from mailengine keygen)")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        cfg = _config(args)
        ingest, events = _endpoints(args, cfg)
        curve = _curve(args, cfg)
        jobs = list(_jobs(args))
    except (ValueError, OSError, config_mod.ConfigError) as err:
        print(f"mailengine push: {err}", file=sys.stderr)
        return 2
    if not jobs:
        print("mailengine push: no jobs found", file=sys.stderr)
        return 2
    outcome = Pusher(ingest, events, args.resend, args.timeout, not args.quiet,
                     curve).push(jobs)
    return 0 if outcome else 1


class Pusher:
    def __init__(self, ingest: str, events: str, resend: float, timeout: float,
                 progress: bool, curve: auth.CurveClient | None = None) -> None:
        self.ctx = zmq.Context()
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.RCVHWM, 0)
        for topic in (b"queued", b"rejected"):
            self.sub.setsockopt(zmq.SUBSCRIBE, topic)
        self.push_sock = self.ctx.socket(zmq.PUSH)
        if curve is not None:
            curve.secure(self.sub)
            curve.secure(self.push_sock)
        self.sub.connect(events)
        self.push_sock.setsockopt(zmq.LINGER, 2000)
        self.push_sock.setsockopt(zmq.SNDTIMEO, 1000)
        self.push_sock.connect(ingest)
        self.resend = resend
        self.timeout = timeout
        self.progress = progress

    def push(self, jobs: list[tuple[str, list[bytes]]]) -> bool:
        """Send every job until it is queued or rejected; True if all were queued."""
        time.sleep(0.2)  # let the subscription reach the engine before its replies do
        waiting = collections.deque(jobs)
        held: list[tuple[str, list[bytes]]] = []
        out: dict[str, Outgoing] = {}
        accepted, rejected = 0, []
        last_progress = time.monotonic()
        while waiting or held or out:
            self._fill(waiting, held, out)
            self._send_due(out)
            got = self._receive(out)
            for event in got:
                if event["event"] == "queued":
                    accepted += 1
                else:
                    rejected.append(event)
            if got:
                last_progress = time.monotonic()
                self._show(accepted + len(rejected), len(jobs))
            elif time.monotonic() - last_progress > self.timeout:
                break
        unanswered = [*out, *(job_id for job_id, _ in held), *(job_id for job_id, _ in waiting)]
        self._finish(accepted, rejected, unanswered, len(jobs))
        self.ctx.destroy(linger=1000)
        return accepted == len(jobs)

    @staticmethod
    def _fill(waiting: collections.deque[tuple[str, list[bytes]]],
              held: list[tuple[str, list[bytes]]], out: dict[str, Outgoing]) -> None:
        """Move jobs into the window of unacknowledged ones.

        Regression (a job id given twice made push exit 1 with "0 not acknowledged"):
        the second copy replaced the first in the window, so one acknowledgement
        answered both and the count fell short. A job whose id is out already is held
        until that one is answered, then sent on its own; the engine acknowledges it
        as a duplicate (and does not deliver it again).
        """
        still_held = []
        for job_id, frames in held:
            if job_id in out:
                still_held.append((job_id, frames))
            else:
                out[job_id] = Outgoing(frames)
        held[:] = still_held
        while waiting and len(out) < WINDOW:
            job_id, frames = waiting.popleft()  # a deque: list.pop(0) is quadratic
            if job_id in out:
                held.append((job_id, frames))
            else:
                out[job_id] = Outgoing(frames)

    def _send_due(self, out: dict[str, Outgoing]) -> None:
        now = time.monotonic()
        for item in out.values():
            if item.sends == 0 or now - item.sent_at >= self.resend:
                try:
                    self.push_sock.send_multipart(item.frames)
                except zmq.Again:  # engine not there yet: try again next turn
                    return
                item.sent_at, item.sends = now, item.sends + 1

    def _receive(self, out: dict[str, Outgoing]) -> list[dict[str, Any]]:
        got: list[dict[str, Any]] = []
        if not self.sub.poll(100):
            return got
        while True:
            try:
                _, body = self.sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return got
            event = json.loads(body)
            if out.pop(event.get("id"), None) is not None:
                got.append(event)

    def _show(self, done: int, total: int) -> None:
        if not self.progress or total < 2:
            return
        width = 40
        filled = int(width * done / total)
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} ")
        sys.stderr.flush()

    def _finish(self, accepted: int, rejected: list[dict[str, Any]],
                unanswered: list[str], total: int) -> None:
        """`unanswered`: every job not acknowledged, also those never sent (regression:
        only the window's were counted, so a timeout on a big run under-reported)."""
        if self.progress and total >= 2:
            sys.stderr.write("\n")
        for event in rejected:
            print(f"rejected {event.get('id')}: {event.get('error')}", file=sys.stderr)
        for job_id in unanswered:
            print(f"not acknowledged {job_id}: is the engine running?", file=sys.stderr)
        if self.progress:
            print(f"{accepted} of {total} accepted, {len(rejected)} rejected,"
                  f" {len(unanswered)} not acknowledged", file=sys.stderr)


# -- reading jobs ----------------------------------------------------------------


def _config(args: argparse.Namespace) -> config_mod.Config | None:
    path = args.config or os.environ.get(config_mod.ENV_VAR)
    if path is None and os.path.exists(config_mod.DEFAULT_PATH):
        path = config_mod.DEFAULT_PATH
    return config_mod.load(path) if path else None


def _endpoints(args: argparse.Namespace, cfg: config_mod.Config | None) -> tuple[str, str]:
    ingest, events = "tcp://127.0.0.1:5570", "tcp://127.0.0.1:5571"
    if cfg is not None:
        ingest, events = cfg.ingest, cfg.events
    return args.ingest or ingest, args.events or events


def _curve(args: argparse.Namespace, cfg: config_mod.Config | None) -> auth.CurveClient | None:
    """CURVE keys when the flags or the engine's config ask for them; ValueError if half-given."""
    server_key = args.curve_server_key
    if server_key is None and cfg is not None and cfg.security.curve.enabled:
        server_key = auth.public_file_for(cfg.security.curve.server_secret_key)
    if server_key is None and args.curve_client_key is None:
        return None
    if args.curve_client_key is None:
        raise ValueError("the engine speaks CURVE: give --curve-client-key NAME.key_secret"
                         " (make a pair with `mailengine keygen NAME`; the engine must list"
                         " NAME.key in security.curve.allowed_clients)")
    if server_key is None:
        raise ValueError("--curve-client-key needs --curve-server-key (the engine's server.key)")
    if not auth.available():
        raise ValueError("this libzmq has no CURVE support (zmq.has('curve') is False)")
    return auth.CurveClient.from_files(server_key, args.curve_client_key)


def _jobs(args: argparse.Namespace) -> Iterator[tuple[str, list[bytes]]]:
    for source in args.sources:
        if source.endswith(".jsonl"):
            yield from _jsonl(source)
        elif os.path.isdir(source):
            for name in sorted(os.listdir(source)):
                if name.endswith(".eml"):
                    yield _eml(args, os.path.join(source, name), single=False)
        else:
            yield _eml(args, source, single=len(args.sources) == 1)


def _eml(args: argparse.Namespace, path: str, single: bool) -> tuple[str, list[bytes]]:
    message = sys.stdin.buffer.read() if path == "-" else _read(path)
    sender, rcpts = args.sender, args.to
    if sender is None or not rcpts:
        headers = email.parser.BytesHeaderParser().parsebytes(message)
        if sender is None:
            sender = email.utils.parseaddr(headers.get("From", ""))[1]
        if not rcpts:
            rcpts = [a for _, a in email.utils.getaddresses(headers.get_all("To", [])) if a]
    if not rcpts:
        raise ValueError(f"{path}: no recipients (give --to, or a To header)")
    envelope: dict[str, Any] = {"id": (args.id if single and args.id else uuid.uuid4().hex),
                                "from": sender, "to": rcpts}
    for key in ("ip", "pool", "expires"):
        if getattr(args, key) is not None:
            envelope[key] = getattr(args, key)
    if args.meta:
        envelope["meta"] = json.loads(args.meta)
    return envelope["id"], [json.dumps(envelope).encode(), message]


def _jsonl(path: str) -> Iterator[tuple[str, list[bytes]]]:
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                job = json.loads(line)
                if "message_file" in job:
                    message = _read(job.pop("message_file"))
                else:
                    message = job.pop("message").encode("utf-8")
            except (ValueError, KeyError, AttributeError, TypeError) as err:
                raise ValueError(f"{path}:{number}: not a job ({err})") from err
            job.setdefault("id", uuid.uuid4().hex)
            yield job["id"], [json.dumps(job).encode(), message]


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()
