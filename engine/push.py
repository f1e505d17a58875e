"""`mailengine push`: hand jobs to a running engine, and make sure it has them.

A job counts as accepted only when the engine publishes `queued` for its id
(it is then fsynced in the spool). Until then push re-sends it with the same id
(the engine ignores a duplicate id, and acknowledges it again), so nothing is
lost to a restart of the engine or a dropped connection. Exit status 0 means
every job was accepted; 1 that some were rejected or never acknowledged; 2 a bad
option, file or endpoint (nothing sent, or reading stopped: see below). A job id
given twice is sent again once the first is acknowledged; the engine
acknowledges the copy as a duplicate and delivers the job once.

Jobs stream: push reads its sources once to check and count them (a bad line
stops it before anything is sent: jobs without an `id` get a new one each run,
so a half-sent file pushed again would be sent twice), then again as it sends,
holding at most WINDOW unacknowledged jobs in memory, whatever the number of
jobs. It ends with one summary: accepted, rejected (counted by reason, with the
first few ids) and not acknowledged (a count, and the first few ids).

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
import contextlib
import json
import os
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import zmq

from engine import auth, cliargs
from engine import config as config_mod
from engine.pushjobs import Job, Sources
from engine.pushreport import Progress, Tally

WINDOW = 2000  # jobs read and not yet answered, at most


@dataclass
class Outgoing:
    frames: list[bytes]
    sent_at: float = 0.0
    sends: int = 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser("push", help="submit jobs and wait until the engine has them",
                       description="Send jobs to the running engine and wait until it has"
                                   " spooled each one (its `queued` event), re-sending the"
                                   " unacknowledged with the same id. Exit status: 0 all"
                                   " accepted, 1 some rejected or not acknowledged, 2 a bad"
                                   " option, file or endpoint. See docs/OPERATIONS.md.")
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
    p.add_argument("--expires", type=cliargs.duration(),
                   help="how long the engine may keep trying (e.g. 3600, 90m, 2d)")
    p.add_argument("--timeout", type=cliargs.duration(), default=60.0,
                   help="give up after this long without an answer (default 60s)")
    p.add_argument("--resend", type=cliargs.duration(), default=3.0,
                   help="re-send a job not acknowledged after this long (default 3s)")
    p.add_argument("--curve-server-key", metavar="FILE",
                   help="the engine's public key (server.key): talk CURVE to the engine")
    p.add_argument("--curve-client-key", metavar="FILE",
                   help="this client's key pair (NAME.key_secret, from mailengine keygen)")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no progress, and no summary when every job was accepted")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        cfg = _config(args)
        ingest, events = _endpoints(args, cfg)
        curve = _curve(args, cfg)
        sources = Sources(args)
        total = sources.count()  # every job read once: a bad one stops us before sending
    except (ValueError, OSError, config_mod.ConfigError) as err:
        return cliargs.fail("push", err)
    if not total:
        return cliargs.fail("push", "no jobs found")
    names = ("--ingest" if args.ingest else "ingest", "--events" if args.events else "events")
    try:
        pusher = Pusher(ingest, events, args.resend, args.timeout, curve, names)
    except cliargs.UsageError as err:
        return cliargs.fail("push", err)
    progress = Progress(sys.stderr, not args.quiet, ingest)
    tally = pusher.push(sources.jobs(), total, progress)
    if not args.quiet or tally.exit_status():
        first, *details = tally.lines(ingest)
        print("\n".join([f"mailengine push: {first}", *details]), file=sys.stderr)
    return tally.exit_status()


class Pusher:
    def __init__(self, ingest: str, events: str, resend: float, timeout: float,
                 curve: auth.CurveClient | None = None,
                 names: tuple[str, str] = ("ingest", "events")) -> None:
        """`names`: how the user gave the endpoints (an option, or the config's key),
        to name the one libzmq refuses (a cliargs.UsageError)."""
        self.ctx = zmq.Context()
        try:
            self.sub = self._subscriber(events, curve, names[1])
            self.push_sock = self.ctx.socket(zmq.PUSH)
            if curve is not None:
                curve.secure(self.push_sock)
            self.push_sock.setsockopt(zmq.LINGER, 2000)
            self.push_sock.setsockopt(zmq.SNDTIMEO, 1000)
            cliargs.connect(self.push_sock, ingest, names[0])
        except BaseException:
            self.ctx.destroy(linger=0)
            raise
        self.resend = resend
        self.timeout = timeout
        self.most_outstanding = 0  # the most jobs held at once: never above WINDOW

    def _subscriber(self, events: str, curve: auth.CurveClient | None,
                    name: str) -> zmq.Socket:
        sub = self.ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.RCVHWM, 0)
        for topic in (b"queued", b"rejected"):
            sub.setsockopt(zmq.SUBSCRIBE, topic)
        if curve is not None:
            curve.secure(sub)
        cliargs.connect(sub, events, name)
        return sub

    def push(self, jobs: Iterable[Job], total: int | None = None,
             progress: Progress | None = None) -> Tally:
        """Send every job until it is queued or rejected, reading `jobs` as the window
        has room: at most WINDOW jobs are held (sent and unanswered, or waiting for an
        earlier job of the same id). `total`: the number of jobs, when known."""
        time.sleep(0.2)  # let the subscription reach the engine before its replies do
        source = iter(jobs)
        window = Window()
        tally = Tally(total or 0)
        last_answer = time.monotonic()
        while True:
            self._fill(window, source, tally)
            if window.empty():
                break
            self._send_due(window.out)
            got = self._receive(window.out)
            for event in got:
                if event["event"] == "queued":
                    tally.accepted += 1
                else:
                    tally.reject(str(event.get("error")), str(event.get("id")))
            if got:
                last_answer = time.monotonic()
            elif time.monotonic() - last_answer > self.timeout:
                break
            if progress is not None:
                progress.show(tally)
        self._end(window, source, tally, total)
        if progress is not None:
            progress.end(tally)
        self.ctx.destroy(linger=1000)
        return tally

    def _fill(self, window: Window, source: Iterator[Job], tally: Tally) -> None:
        window.release_held()
        while tally.stopped is None and window.size() < WINDOW:
            try:
                job = next(source, None)
            except (ValueError, OSError) as err:  # the file changed since it was counted
                tally.stopped = str(err)
                return
            if job is None:
                return
            window.add(*job)
            self.most_outstanding = max(self.most_outstanding, window.size())

    def _end(self, window: Window, source: Iterator[Job], tally: Tally,
             total: int | None) -> None:
        """Count what was never answered: the window's, and those never read."""
        if total is None:  # unknown: read the rest to count it
            never_read = 0
            with contextlib.suppress(ValueError, OSError):
                never_read = sum(1 for _ in source)
            tally.total = tally.answered + window.size() + never_read
        tally.unanswered(window.ids(), tally.total - tally.answered)

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


class Window:
    """The jobs read and not yet answered: `out`, sent (or about to be) and waiting for
    their answer, and `held`, those whose id is out already.

    Regression (a job id given twice made push exit 1 with "0 not acknowledged"): the
    second copy replaced the first in the window, so one acknowledgement answered both
    and the count fell short. A job whose id is out already is held until that one is
    answered, then sent on its own; the engine acknowledges it as a duplicate (and does
    not deliver it again).
    """

    def __init__(self) -> None:
        self.out: dict[str, Outgoing] = {}
        self.held: list[Job] = []

    def size(self) -> int:
        return len(self.out) + len(self.held)

    def empty(self) -> bool:
        return not self.out and not self.held

    def add(self, job_id: str, frames: list[bytes]) -> None:
        if job_id in self.out:
            self.held.append((job_id, frames))
        else:
            self.out[job_id] = Outgoing(frames)

    def release_held(self) -> None:
        """Send on the held jobs whose earlier copy has been answered."""
        held, self.held = self.held, []
        for job_id, frames in held:
            self.add(job_id, frames)

    def ids(self) -> Iterator[str]:
        yield from self.out
        yield from (job_id for job_id, _ in self.held)


# -- endpoints and keys ----------------------------------------------------------


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
