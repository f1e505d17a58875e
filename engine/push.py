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

Several hosts (docs/SCALING.md): --ingest given once per host, and --events as
many times, in the same order (host N's ingest, then host N's events). One PUSH
socket is connected to every ingest (ZeroMQ deals the jobs round the hosts it is
connected to, never to one it is not: ZMQ_IMMEDIATE), and the answers are read
from every host's events; a job counts as accepted when any host says `queued`
(or `queued` with `duplicate`), and a job not answered is re-sent, with the same
id, to whichever host the socket deals it to next. The summary counts the jobs
each host accepted.

An engine with `security.curve.enabled` admits only known clients: give this
client's key pair (`--curve-client-key NAME.key_secret`, from `mailengine keygen`)
and the engine's public key (`--curve-server-key server.key`, by default the
`.key` next to the config's `server_secret_key`; with several hosts, once for all
or once per --ingest, in its order). See docs/SECURITY.md.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from engine import auth, cliargs
from engine import config as config_mod
from engine.pushjobs import Job, Sources
from engine.pushreport import Progress, Tally

WINDOW = 2000  # jobs read and not yet answered, at most
CONNECT_WAIT = 2.0  # s, with several hosts: for every ingest to connect before sending
SCHEMES = ("tcp://", "ipc://")  # what an endpoint may be


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
    p.add_argument("--ingest", action="append",
                   help="ingest endpoint (default: config's, or tcp://127.0.0.1:5570);"
                        " once per host to spread the jobs over several hosts")
    p.add_argument("--events", action="append",
                   help="events endpoint (default: config's, or tcp://127.0.0.1:5571);"
                        " with several --ingest, one per --ingest, in the same order")
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
    p.add_argument("--curve-server-key", metavar="FILE", action="append",
                   help="the engine's public key (server.key): talk CURVE to the engine;"
                        " with several hosts, once for all or once per --ingest")
    p.add_argument("--curve-client-key", metavar="FILE",
                   help="this client's key pair (NAME.key_secret, from mailengine keygen)")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no progress, and no summary when every job was accepted")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        cfg = _config(args)
        ingest, events = _endpoints(args, cfg)
        curve = _curve(args, cfg, len(ingest))
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
    where = ", ".join(ingest)
    progress = Progress(sys.stderr, not args.quiet, where)
    tally = pusher.push(sources.jobs(), total, progress)
    if not args.quiet or tally.exit_status():
        first, *details = tally.lines(where)
        print("\n".join([f"mailengine push: {first}", *details]), file=sys.stderr)
    return tally.exit_status()


class Pusher:
    """Sends jobs to one engine, or to several hosts (one ingest and one events endpoint
    each, in the same order; one CURVE client for all, or one per host)."""

    def __init__(self, ingest: str | Sequence[str], events: str | Sequence[str],
                 resend: float, timeout: float,
                 curve: auth.CurveClient | Sequence[auth.CurveClient | None] | None = None,
                 names: tuple[str, str] = ("ingest", "events")) -> None:
        """`names`: how the user gave the endpoints (an option, or the config's key),
        to name the one libzmq refuses (a cliargs.UsageError)."""
        self.ingest = [ingest] if isinstance(ingest, str) else list(ingest)
        self.events = [events] if isinstance(events, str) else list(events)
        if len(self.ingest) != len(self.events) or not self.ingest:
            raise cliargs.UsageError(f"give one {names[1]} endpoint per {names[0]} endpoint,"
                                     " in the same order")
        curves = (list(curve) if isinstance(curve, Sequence)
                  else [curve] * len(self.ingest))
        self.ctx = zmq.Context()
        self.monitor: zmq.Socket | None = None
        try:
            self.subs = [self._subscriber(e, c, names[1])
                         for e, c in zip(self.events, curves, strict=True)]
            self.push_sock = self.ctx.socket(zmq.PUSH)
            self.push_sock.setsockopt(zmq.LINGER, 2000)
            self.push_sock.setsockopt(zmq.SNDTIMEO, 1000)
            if len(self.ingest) > 1:
                # Deal jobs only to hosts connected now: not into the queue of one that is
                # down, where they would wait for it (re-sent, they reach another host).
                self.push_sock.setsockopt(zmq.IMMEDIATE, 1)
                self.monitor = self.push_sock.get_monitor_socket(
                    zmq.EVENT_HANDSHAKE_SUCCEEDED)
            for endpoint, client in zip(self.ingest, curves, strict=True):
                if client is not None:  # options are taken at connect: a key per host
                    client.secure(self.push_sock)
                cliargs.connect(self.push_sock, endpoint, names[0])
        except BaseException:
            self.ctx.destroy(linger=0)
            raise
        self.poller = zmq.Poller()
        for sub in self.subs:
            self.poller.register(sub, zmq.POLLIN)
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

    def _wait_for_hosts(self) -> None:
        """With several hosts: until every ingest has connected, or CONNECT_WAIT, so that
        the first jobs are not all dealt to the first host up. A host still down then is
        left out until it connects (its jobs go to the others)."""
        monitor = self.monitor
        if monitor is None:
            return
        up: set[str] = set()
        deadline = time.monotonic() + CONNECT_WAIT
        while len(up) < len(self.ingest):
            left = deadline - time.monotonic()
            if left <= 0 or not monitor.poll(int(left * 1000) + 1):
                break
            event = recv_monitor_message(monitor)
            up.add(event["endpoint"].decode(errors="replace"))
        self.push_sock.disable_monitor()
        monitor.close(linger=0)
        self.monitor = None

    def push(self, jobs: Iterable[Job], total: int | None = None,
             progress: Progress | None = None) -> Tally:
        """Send every job until it is queued or rejected, reading `jobs` as the window
        has room: at most WINDOW jobs are held (sent and unanswered, or waiting for an
        earlier job of the same id). `total`: the number of jobs, when known."""
        time.sleep(0.2)  # let the subscription reach the engine before its replies do
        self._wait_for_hosts()
        source = iter(jobs)
        window = Window()
        tally = Tally(total or 0, hosts=list(self.ingest))
        last_answer = time.monotonic()
        while True:
            self._fill(window, source, tally)
            if window.empty():
                break
            self._send_due(window.out)
            got = self._receive(window.out)
            for host, event in got:
                if event["event"] == "queued":
                    tally.accept(self.ingest[host])
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

    def _receive(self, out: dict[str, Outgoing]) -> list[tuple[int, dict[str, Any]]]:
        """The answers to jobs in `out` (taken out of it), each with the index of the host
        that gave it; a later answer from another host to a job answered is ignored."""
        got: list[tuple[int, dict[str, Any]]] = []
        ready = dict(self.poller.poll(100))
        for host, sub in enumerate(self.subs):
            if sub not in ready:
                continue
            while True:
                try:
                    _, body = sub.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                event = json.loads(body)
                if out.pop(event.get("id"), None) is not None:
                    got.append((host, event))
        return got


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


def _endpoints(args: argparse.Namespace,
               cfg: config_mod.Config | None) -> tuple[list[str], list[str]]:
    """The ingest and events endpoints, one of each per host, in the same order. One
    host: an option given overrides the config's (or the default) endpoint. Several
    hosts (--ingest more than once): --events as many times. A UsageError otherwise, or
    for an endpoint not tcp:// or ipc://, or one given twice."""
    ingest, events = "tcp://127.0.0.1:5570", "tcp://127.0.0.1:5571"
    if cfg is not None:
        ingest, events = cfg.ingest, cfg.events
    ingests: list[str] = args.ingest or [ingest]
    eventss: list[str] = args.events or [events]
    if len(ingests) > 1 or len(eventss) > 1:
        if len(ingests) != len(eventss) or not args.events or not args.ingest:
            raise cliargs.UsageError(
                f"{len(ingests)} ingest and {len(eventss)} events endpoints: with several"
                " hosts, give --ingest and --events once per host, in the same order")
    for option, endpoints in (("--ingest", ingests), ("--events", eventss)):
        for endpoint in endpoints:
            if not endpoint.startswith(SCHEMES):
                raise cliargs.UsageError(f"{option} {endpoint}: not an endpoint to connect to"
                                         " (give tcp://HOST:PORT or ipc:///PATH)")
            if endpoints.count(endpoint) > 1:
                raise cliargs.UsageError(f"{option} {endpoint}: given twice")
    return ingests, eventss


def _curve(args: argparse.Namespace, cfg: config_mod.Config | None,
           hosts: int = 1) -> list[auth.CurveClient | None]:
    """CURVE keys, one client per host, when the flags or the engine's config ask for
    them (one --curve-server-key for every host, or one per host); ValueError if
    half-given."""
    server_keys: list[str] = args.curve_server_key or []
    if not server_keys and cfg is not None and cfg.security.curve.enabled:
        server_keys = [auth.public_file_for(cfg.security.curve.server_secret_key)]
    if not server_keys and args.curve_client_key is None:
        return [None] * hosts
    if args.curve_client_key is None:
        raise ValueError("the engine speaks CURVE: give --curve-client-key NAME.key_secret"
                         " (make a pair with `mailengine keygen NAME`; the engine must list"
                         " NAME.key in security.curve.allowed_clients)")
    if not server_keys:
        raise ValueError("--curve-client-key needs --curve-server-key (the engine's server.key)")
    if len(server_keys) not in (1, hosts):
        raise cliargs.UsageError(f"{len(server_keys)} --curve-server-key for {hosts} hosts:"
                                 " give one for all, or one per --ingest in its order")
    if not auth.available():
        raise ValueError("this libzmq has no CURVE support (zmq.has('curve') is False)")
    if len(server_keys) == 1:
        return [auth.CurveClient.from_files(server_keys[0], args.curve_client_key)] * hosts
    return [auth.CurveClient.from_files(key, args.curve_client_key) for key in server_keys]
