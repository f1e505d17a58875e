"""The supervisor: intake, the spool, one worker process per sending IP, events.

One thread, one ZeroMQ poll loop (no gevent here: the work is small batches of
SQLite writes and socket shuffling). Each turn it

1. drains the ingest socket: validates each job, writes the valid ones to the
   spool in one transaction (group commit) and only then publishes `queued`;
   invalid ones get a `rejected` event and disturb nothing else;
2. drains the results socket, and records each recipient's outcome in the spool
   (group commit: results that came within RESULTS_WINDOW share one transaction),
   then publishes its event (deferred past the job's expiry become `expired`);
3. hands due jobs to the worker of their IP (or the least busy live IP of their
   pool), at most `limits.max_in_flight` each: every tick, and as soon as recorded
   results have freed a good share of that room;
4. restarts dead workers, with backoff; what they had in flight is simply due
   again (the spool never marks anything in flight).

SIGTERM drains: intake stops, in-flight transactions finish (up to
`drain_timeout`), workers exit, the rest stays spooled. SIGHUP reloads the
config: workers are replaced gracefully, IPs added or removed.
"""
from __future__ import annotations

import logging
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Container, Mapping
from dataclasses import dataclass, field
from typing import Any

import zmq

from engine import auth, events, gctune, logs, protocol, retry
from engine import config as config_mod
from engine.config import Config
from engine.job import MAX_ENVELOPE_SIZE, Job, JobRejected, parse_job
from engine.metrics import Metrics
from engine.protocol import Attempt, Status
from engine.reply import Reply
from engine.spool import Pending, RcptUpdate, Spool, SpoolError

log = logging.getLogger("mailengine.supervisor")

TICK = 0.2  # seconds between housekeeping turns
INTAKE_BATCH = 1000  # jobs per group commit at most
RESULTS_BATCH = 2000
# Group commit of results: under load a result waits at most this long (seconds) for others
# to share its spool transaction, unless RESULTS_GROUP of them are waiting. One commit (an
# fsync and every page it touched) per ~8 results was the supervisor's largest cost per
# message. A result that finds the spool idle for a window is recorded at once: no added
# latency at low rates.
RESULTS_WINDOW = 0.02
RESULTS_GROUP = 500
RESTART_BACKOFF = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
STABLE_AFTER = 60.0  # a worker up this long has its restart backoff reset
PARK_TIME = 2.0  # seconds a job no worker could take is passed over
UNSENT_MAX_BYTES = 64 * 1024 * 1024  # messages of never-dispatched jobs kept in memory
EXPIRED_REPLY = Reply(451, "4.4.7", "message expired: not delivered within its time")
_EXPIRED = Status.EXPIRED.value  # an enum's .value is a Python-level property
# int flags: pyzmq's flag enums cost a Python-level `|` on every send.
_NOBLOCK = int(zmq.NOBLOCK)
_MORE_NOBLOCK = int(zmq.SNDMORE) | int(zmq.NOBLOCK)
_RCVMORE = int(zmq.RCVMORE)
# High-water marks, in messages: what a socket queues before it pushes back (PULL stops
# reading, so TCP pushes back on the producer) or drops (PUB, per subscriber).
INGEST_HWM = 10000  # jobs waiting in the ingest socket
EVENTS_HWM = 10000  # events queued for one slow subscriber; the log still has them all
RESULTS_HWM = 10000  # worker results waiting to be recorded
CONTROL_MAX_REQUEST = 64 * 1024  # bytes: a status request is a few dozen


@dataclass
class InFlight:
    """A job handed to a worker, until every recipient of the task has a result."""

    ip: str
    meta: Mapping[str, Any]  # the job's, shared (never changed)
    queued_ts: float
    expires_ts: float
    attempts: dict[str, int]  # attempts before this one, per rcpt still out
    started: float = field(default_factory=time.monotonic)


@dataclass
class WorkerHandle:
    ip: str
    tasks: zmq.Socket | None = None
    generation: int = 0
    proc: subprocess.Popen[bytes] | None = None
    jobs: set[str] = field(default_factory=set)
    started: float = 0.0
    failures: int = 0
    restart_at: float = 0.0
    retiring: bool = False  # removed from the config: drain, then forget it
    replacing: bool = False  # draining for a reload: a fresh worker follows at once
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def ready(self) -> bool:
        """Alive, connected, and said hello: a task sent now reaches it. (A PUSH to a
        socket nobody has connected to yet cannot send, and the job would wait.)

        Alive as last seen by `Supervisor._check_workers` (every tick), not with a
        waitpid per dispatched job: a task sent to a worker that has just died dies
        with its socket, and the job is due again once the death is seen."""
        proc = self.proc
        return (proc is not None and proc.returncode is None and not self.retiring
                and not self.replacing and self.stats.get("pid") == proc.pid)


class Supervisor:
    def __init__(self, cfg: Config, config_path: str | None) -> None:
        self.cfg = cfg
        self.config_path = config_path
        # Keys first: a missing key is a config error, found before anything is touched.
        self.curve = auth.CurveServer(cfg.security.curve) if cfg.security.curve.enabled else None
        self.zctx = zmq.Context()
        self.spool = Spool(cfg.spool, on_corrupt=self._on_corrupt)
        self.metrics = Metrics.create(cfg.statsd.host, cfg.statsd.port, cfg.statsd.prefix,
                                      "supervisor", cfg.statsd.enabled)
        self.metrics.batched()  # packed into few packets, sent at the end of each loop pass
        os.makedirs(cfg.run_dir, exist_ok=True)
        try:
            self._bind_public(cfg)
        except BaseException:
            self._close_public()
            raise
        _end_torn_line(cfg.events_log)
        self.events = events.EventPublisher(self.pub, cfg.events_log)
        self.results = self._bind(zmq.PULL, self._endpoint("results"), {zmq.RCVHWM: RESULTS_HWM})
        self.workers: dict[str, WorkerHandle] = {}
        self.in_flight: dict[str, InFlight] = {}
        self.counters: dict[str, int] = {name: 0 for name in events.EVENT_NAMES}
        self._stopping = False
        self._reload = False
        self._last_due = 0.0
        self._parked: dict[str, float] = {}  # job id -> until (monotonic)
        # Jobs accepted and not yet handed to a worker, as the spool holds them (see
        # _remember_unsent): dispatched from here rather than read back from SQLite.
        self._unsent: dict[str, Pending] = {}
        self._unsent_bytes = 0
        # Results received and not yet recorded (see RESULTS_WINDOW), since when.
        self._results: list[Attempt] = []
        self._results_since = 0.0
        self._results_flushed = 0.0  # when results were last recorded (monotonic)

    # -- sockets ---------------------------------------------------------------

    def _bind_public(self, cfg: Config) -> None:
        """The sockets producers and subscribers reach: bounded, and CURVE when configured.

        The ZAP handler starts before the first bind: a CURVE handshake that found none
        would be let in unchecked. A frame larger than any valid job (ZMQ_MAXMSGSIZE) makes
        ZeroMQ drop that producer's connection instead of buffering it.
        """
        if self.curve is not None:
            self.curve.start(self.zctx)
            log.info(logs.kv("curve_enabled", clients=len(self.curve.clients),
                             allowed_clients=cfg.security.curve.allowed_clients))
        max_frame = cfg.limits.max_message_size + MAX_ENVELOPE_SIZE
        self.ingest = self._bind(zmq.PULL, cfg.ingest,
                                 {zmq.RCVHWM: INGEST_HWM, zmq.MAXMSGSIZE: max_frame}, curve=True)
        self.pub = self._bind(zmq.PUB, cfg.events, {zmq.SNDHWM: EVENTS_HWM}, curve=True)
        self.control = self._bind(zmq.REP, cfg.control,
                                  {zmq.RCVHWM: 100, zmq.MAXMSGSIZE: CONTROL_MAX_REQUEST})

    def _close_public(self) -> None:
        if self.curve is not None:
            self.curve.stop()
        self.zctx.destroy(linger=0)

    def _bind(self, kind: int, endpoint: str, options: dict[int, int] | None = None,
              curve: bool = False) -> zmq.Socket:
        sock = self.zctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 1000)
        for option, value in (options or {}).items():
            sock.setsockopt(option, value)
        if curve and self.curve is not None:
            self.curve.secure(sock)
        if endpoint.startswith("ipc://"):
            path = endpoint[len("ipc://"):]
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            if os.path.exists(path):
                os.unlink(path)  # left by a process that died
        sock.bind(endpoint)
        return sock

    def _endpoint(self, name: str) -> str:
        return f"ipc://{os.path.join(self.cfg.run_dir, name)}.sock"

    # -- life cycle ------------------------------------------------------------

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGINT, self._on_term)
        signal.signal(signal.SIGHUP, self._on_hup)
        for ip in self.cfg.ips:
            self._add_worker(ip.address)
        stats = self.spool.stats()
        log.info(logs.kv("started", pid=os.getpid(), ips=len(self.cfg.ips),
                         spooled_jobs=stats.jobs, ingest=self.cfg.ingest))
        poller = zmq.Poller()
        for sock in (self.ingest, self.results, self.control):
            poller.register(sock, zmq.POLLIN)
        # While results are held for the group commit, the results socket is not watched:
        # what arrives meanwhile is read once, when the window closes, instead of waking the
        # loop for every frame (a wakeup per frame was a context switch per few messages).
        holding = zmq.Poller()
        for sock in (self.ingest, self.control):
            holding.register(sock, zmq.POLLIN)
        # The supervisor's objects are long-lived (jobs in memory, in flight) or die young
        # without cycles: the default thresholds made the collector rescan the first kind
        # over and over, a few per cent of the CPU at high rates.
        gctune.settle_for_a_long_run()
        last_tick = 0.0
        while not self._stopping:
            if self._results:
                timeout = max(0.0, self._results_since + RESULTS_WINDOW - time.monotonic())
                ready = dict(holding.poll(math.ceil(timeout * 1000)))
            else:
                ready = dict(poller.poll(int(TICK * 1000)))
            # Results before intake: a result waiting in a socket is a delivered message
            # nobody has recorded yet, which a crash would send again.
            if self.results in ready:
                self._collect()
            if self._results and self._results_due():
                self._collect()  # what came during the window
                self._flush_results()
            if self.ingest in ready:
                self._intake()
            if self.control in ready:
                self._answer_control()
            if self._reload:
                self._reload = False
                self._reload_config()
            if time.monotonic() - last_tick >= TICK:
                last_tick = time.monotonic()
                self._tick()
            self.events.flush()
            self.metrics.flush()
        return self._shutdown()

    def _on_term(self, signum: int, frame: object) -> None:
        self._stopping = True

    def _on_hup(self, signum: int, frame: object) -> None:
        self._reload = True

    def _shutdown(self) -> int:
        """Drain: no more intake or dispatch; let in-flight finish; stop workers."""
        log.info(logs.kv("draining", in_flight=len(self.in_flight)))
        self.ingest.close(linger=0)
        deadline = time.monotonic() + self.cfg.drain_timeout
        for handle in self.workers.values():
            self._signal(handle, signal.SIGTERM)
        self._flush_results()
        while time.monotonic() < deadline and any(h.alive for h in self.workers.values()):
            if self.results.poll(100):
                self._collect()
                self._flush_results()
        # Regression (a result sent just before its worker exited was not recorded,
        # so that message went out again after the restart): a worker's last results
        # can still be on their way through the socket when its exit is seen. Read
        # until the socket stays quiet (a bounded wait).
        quiet_by = time.monotonic() + 2.0
        while time.monotonic() < quiet_by and self.results.poll(200):
            self._collect()
            self._flush_results()
        for handle in self.workers.values():
            if handle.alive and handle.proc is not None:
                handle.proc.kill()
                handle.proc.wait(5)
        self.events.flush()
        self.events.close()
        self.metrics.flush()
        left = self.spool.stats()
        self.spool.close()
        log.info(logs.kv("stopped", jobs_spooled=left.jobs, rcpts_pending=left.rcpts_pending))
        if self.curve is not None:
            self.curve.stop()
        self.zctx.destroy(linger=1000)
        return 0

    # -- intake ----------------------------------------------------------------

    def _intake(self) -> None:
        jobs: list[Job] = []
        ingest = self.ingest
        for _ in range(INTAKE_BATCH):
            try:  # recv_multipart, with int flags (see _NOBLOCK)
                frames = [ingest.recv(_NOBLOCK)]
            except zmq.Again:
                break
            while ingest.getsockopt(_RCVMORE):
                frames.append(ingest.recv(_NOBLOCK))
            job = self._validate(frames)
            if job is not None:
                jobs.append(job)
        if not jobs:
            return
        accepted_at = time.time()
        accepted = self.spool.accept(jobs, accepted_at, self.cfg.retry.max_age)
        fresh = {id(job) for job in accepted}
        for job in jobs:
            # A re-sent job the spool holds (or finished) is acknowledged again,
            # so a producer that missed the first `queued` stops re-sending.
            self._publish(events.queued(job, duplicate=id(job) not in fresh))
        self.metrics.incr("queued", "all", len(accepted))
        max_age = self.cfg.retry.max_age
        room = self._free_room()  # once the workers are full, the rest is not even tried
        for job in accepted:
            # Every recipient pending since `accepted_at`, no attempt: the spool's record.
            pending = Pending(job, accepted_at,
                              accepted_at + (job.expires if job.expires is not None
                                             else max_age),
                              job.rcpts, dict.fromkeys(job.rcpts, 0))
            # Remembered first: _dispatch forgets a job it hands out or expires.
            self._remember_unsent(pending)
            if room > 0 and self._dispatch(pending):
                room -= 1

    def _validate(self, frames: list[bytes]) -> Job | None:
        try:
            job = parse_job(frames, self.cfg.limits.max_message_size,
                            self.cfg.limits.max_recipients)
            self._check_route(job)
            return job
        except JobRejected as err:
            log.info(logs.kv("rejected", id=err.job_id, reason=err.reason))
            self.metrics.incr("rejected", "all")
            self._publish(events.rejected(err.job_id, err.meta, err.reason))
            return None

    def _check_route(self, job: Job) -> None:
        if job.ip is not None and job.ip not in self._configured_ips():
            raise JobRejected(f"ip {job.ip} is not one of this engine's sending IPs",
                              job.id, dict(job.meta))
        if job.pool is not None and job.pool not in self.cfg.pools:
            raise JobRejected(f"unknown pool {job.pool!r} (configured: "
                              f"{', '.join(sorted(self.cfg.pools))})", job.id, dict(job.meta))

    def _configured_ips(self) -> set[str]:
        return {ip.address for ip in self.cfg.ips}

    # -- dispatch ----------------------------------------------------------------

    def _remember_unsent(self, pending: Pending) -> None:
        """Keep a just-accepted job in memory until it is handed out (or expires).

        A job the worker had no room for at intake used to be read back from SQLite,
        message included, when it came due. Until its first dispatch the spool's
        record of it is exactly what was accepted (every recipient pending since
        `accepted_at`, no attempt), so `Spool.due` takes it from here instead. The
        spool stays the record: it still decides what is due and in what order, and
        after a restart everything is read from it. Bounded by UNSENT_MAX_BYTES; a job
        beyond that is simply read back as before.
        """
        size = len(pending.job.message)
        if self._unsent_bytes + size > UNSENT_MAX_BYTES:
            return
        self._unsent[pending.job.id] = pending
        self._unsent_bytes += size

    def _forget_unsent(self, job_id: str) -> None:
        pending = self._unsent.pop(job_id, None)
        if pending is not None:
            self._unsent_bytes -= len(pending.job.message)

    def _free_room(self) -> int:
        """Jobs the ready workers can take now, together."""
        return sum(self._room(h) for h in self.workers.values() if h.ready)

    def _dispatch_due(self) -> None:
        room = self._free_room()
        if room <= 0:
            return
        now = time.monotonic()
        self._parked = {j: t for j, t in self._parked.items() if t > now}
        skip = _Either(self.in_flight, self._parked)
        for pending in self.spool.due(time.time(), room, skip, self._unsent):
            if not self._dispatch(pending):
                # Its IP is down or full: look past it next turn, so it cannot
                # hold back the jobs of other IPs behind it.
                self._parked[pending.job.id] = now + PARK_TIME

    def _dispatch(self, pending: Pending) -> bool:
        """Hand `pending` to a worker; False leaves it spooled for a later turn."""
        if time.time() >= pending.expires_ts:
            self._expire(pending)
            return False
        job = pending.job
        handle = self._choose_worker(job)
        if handle is None:
            return False
        header = protocol.task_header(job.id, job.sender, pending.rcpts, pending.queued_ts,
                                  job.smtputf8, job.eightbit)
        sock = handle.tasks
        assert sock is not None
        try:  # a multipart message is queued whole or not at all: the first part decides
            sock.send(header, _MORE_NOBLOCK)
        except zmq.Again:
            return False
        sock.send(job.message, _NOBLOCK)
        self._forget_unsent(job.id)  # from now on, the spool has its progress
        handle.jobs.add(job.id)
        # The job's meta is never changed (events copy it), so it is shared, not copied.
        self.in_flight[job.id] = InFlight(handle.ip, job.meta, pending.queued_ts,
                                          pending.expires_ts, dict(pending.attempts))
        return True

    def _choose_worker(self, job: Job) -> WorkerHandle | None:
        if job.ip is not None:
            handle = self.workers.get(job.ip)
            if handle is not None and handle.ready and self._room(handle) > 0:
                return handle
            return None
        best: WorkerHandle | None = None
        for ip in self.cfg.pools.get(job.pool or "default", ()):
            handle = self.workers.get(ip)
            if (handle is not None and handle.ready and self._room(handle) > 0
                    and (best is None or len(handle.jobs) < len(best.jobs))):
                best = handle  # the least busy: spread the load
        return best

    def _room(self, handle: WorkerHandle) -> int:
        return self.cfg.limits.max_in_flight - len(handle.jobs)

    def _expire(self, pending: Pending) -> None:
        self._forget_unsent(pending.job.id)
        now = time.time()
        updates = [RcptUpdate(pending.job.id, r, Status.EXPIRED, reply=EXPIRED_REPLY)
                   for r in pending.rcpts]
        self.spool.record(updates)
        for rcpt in pending.rcpts:
            attempt = Attempt(job_id=pending.job.id, rcpt=rcpt, status=Status.EXPIRED,
                              reply=EXPIRED_REPLY, ip="", ts=now)
            self._publish(events.attempt_event(attempt, Status.EXPIRED, pending.job.meta,
                                               pending.attempts.get(rcpt, 0),
                                               pending.queued_ts))

    # -- results -------------------------------------------------------------------

    def _collect(self) -> None:
        """Read the results waiting (up to a batch) into `_results`, to be recorded by
        `_flush_results` within RESULTS_WINDOW."""
        attempts = self._results
        if not attempts:
            self._results_since = time.monotonic()
        for _ in range(RESULTS_BATCH):
            try:
                frame = self.results.recv(_NOBLOCK)
            except zmq.Again:
                break
            try:
                msg = protocol.decode(frame)
                if msg["type"] == "result":
                    attempts.extend(map(protocol.attempt_from_row, msg["attempts"]))
                elif msg["type"] == "stats" and msg.get("ip") in self.workers:
                    self._worker_stats(self.workers[msg["ip"]], msg)
            except (ValueError, KeyError, TypeError) as exc:
                log.error(logs.kv("bad_result", error=exc))

    def _results_due(self) -> bool:
        """Whether to record the results held now: enough of them, the window is over,
        or the spool recorded nothing for a window (low rates wait for nothing)."""
        now = time.monotonic()
        return (len(self._results) >= RESULTS_GROUP
                or now - self._results_since >= RESULTS_WINDOW
                or now - self._results_flushed >= RESULTS_WINDOW)

    def _flush_results(self) -> None:
        """Record the results collected, then hand out what their room allows.

        Must run before anything that forgets a job in flight (`_worker_died`): a
        final result held here for a job handed out again would send it twice."""
        if not self._results:
            return
        attempts, self._results = self._results, []
        self._record(attempts)
        self._results_flushed = time.monotonic()
        # Room freed: refill now rather than at the next tick, once it is worth a query.
        ready = sum(1 for h in self.workers.values() if h.ready)
        if self._free_room() * 4 >= ready * self.cfg.limits.max_in_flight:
            self._dispatch_due()

    def _record(self, attempts: list[Attempt]) -> None:
        """Spool first, then events: an event never announces what could be lost."""
        now = time.time()
        planned = [self._plan(a, now) for a in attempts]
        self.spool.record([update for update, _ in planned if update is not None])
        for attempt, (_, event) in zip(attempts, planned, strict=True):
            if event is not None:
                self._publish(event)
            self._settle(attempt)

    def _plan(self, attempt: Attempt,
              now: float) -> tuple[RcptUpdate | None, events.Event | None]:
        """The spool update and the event for one result."""
        flight = self.in_flight.get(attempt.job_id)
        if flight is None or attempt.rcpt not in flight.attempts:
            # A late result (its worker was declared dead): keep a final outcome,
            # so the recipient is not sent twice; a deferral changes nothing.
            if attempt.status.final:
                return RcptUpdate(attempt.job_id, attempt.rcpt, attempt.status,
                                  reply=attempt.reply), None
            return None, None
        number = flight.attempts[attempt.rcpt] + 1
        # Shaping's waits (not attempted) and throttles cost no attempt: they say
        # nothing about the recipient, only about our pace.
        counts = attempt.attempted and not attempt.throttled
        status, next_at = attempt.status, None
        if status is Status.DEFERRED:
            if attempt.retry_at is not None:
                next_at = attempt.retry_at if attempt.retry_at < flight.expires_ts else None
            else:
                next_at = retry.next_attempt(self.cfg.retry.schedule, number, now,
                                             flight.expires_ts)
            if next_at is None:
                status = Status.EXPIRED
        update = RcptUpdate(attempt.job_id, attempt.rcpt, status, next_attempt=next_at,
                            reply=attempt.reply, count_attempt=counts)
        if not attempt.attempted and status is Status.DEFERRED:
            return update, None  # not tried: nothing happened that a subscriber must hear
        event = events.attempt_event(attempt, status, flight.meta, number, flight.queued_ts,
                                     next_at)
        return update, event

    def _settle(self, attempt: Attempt) -> None:
        flight = self.in_flight.get(attempt.job_id)
        if flight is None:
            return
        flight.attempts.pop(attempt.rcpt, None)
        if not flight.attempts:
            del self.in_flight[attempt.job_id]
            handle = self.workers.get(flight.ip)
            if handle is not None:
                handle.jobs.discard(attempt.job_id)

    def _publish(self, event: events.Event) -> None:
        name = event[0]
        if name in self.counters:
            self.counters[name] += 1
        if name == _EXPIRED:
            self.metrics.incr("expired", "all")
        self.events.publish(event)

    def _worker_stats(self, handle: WorkerHandle, stats: dict[str, Any]) -> None:
        was_ready = handle.ready
        handle.stats = stats
        if handle.ready and not was_ready:
            # A (re)started worker: what waited for it is dispatchable now.
            log.info(logs.kv("worker_ready", ip=handle.ip, pid=stats.get("pid")))
            self._parked.clear()
            self._dispatch_due()

    def _on_corrupt(self, job_id: str, reason: str) -> None:
        log.error(logs.kv("spool_corrupt", id=job_id, reason=reason))

    # -- workers -------------------------------------------------------------------

    def _add_worker(self, ip: str) -> None:
        handle = WorkerHandle(ip)
        self.workers[ip] = handle
        self._start_worker(handle)

    def _start_worker(self, handle: WorkerHandle) -> None:
        """Spawn a worker with a task socket of its own: tasks queued for a dead
        predecessor die with its socket (they are still due in the spool)."""
        handle.generation += 1
        endpoint = self._endpoint(f"worker-{handle.ip}-{handle.generation}")
        handle.tasks = self._bind(zmq.PUSH, endpoint)
        handle.tasks.setsockopt(zmq.SNDHWM, self.cfg.limits.max_in_flight * 2 + 100)
        cmd = [sys.executable, "-m", "engine.workerproc", "--ip", handle.ip,
               "--tasks", endpoint,
               "--results", self._endpoint("results"), "--parent-pid", str(os.getpid())]
        if self.config_path:
            cmd += ["--config", self.config_path]
        handle.proc = subprocess.Popen(cmd, env=self._worker_env())
        handle.started = time.monotonic()
        log.info(logs.kv("worker_spawned", ip=handle.ip, pid=handle.proc.pid))

    def _worker_env(self) -> dict[str, str]:
        env = dict(os.environ)
        # The worker must import this very engine, wherever it was started from.
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        return env

    def _check_workers(self) -> None:
        now = time.monotonic()
        for handle in list(self.workers.values()):
            if handle.proc is not None and handle.proc.poll() is not None:
                self._worker_died(handle, now)
            if handle.proc is None and not handle.retiring and now >= handle.restart_at:
                self._start_worker(handle)
            if handle.retiring and handle.proc is None:
                del self.workers[handle.ip]

    def _worker_died(self, handle: WorkerHandle, now: float) -> None:
        assert handle.proc is not None
        code = handle.proc.returncode
        expected = handle.retiring or handle.replacing
        if now - handle.started >= STABLE_AFTER or handle.replacing:
            handle.failures = 0
        delay = 0.0 if handle.replacing else \
            RESTART_BACKOFF[min(handle.failures, len(RESTART_BACKOFF) - 1)]
        if not expected:
            handle.failures += 1
        handle.replacing = False
        handle.restart_at = now + delay
        handle.proc = None
        lost = list(handle.jobs)
        for job_id in lost:  # still pending in the spool: due again at once
            self.in_flight.pop(job_id, None)
        handle.jobs.clear()
        self._close_tasks(handle)
        level = logging.INFO if expected else logging.ERROR
        log.log(level, logs.kv("worker_exited", ip=handle.ip, code=code, requeued=len(lost),
                               restart_in=None if handle.retiring else delay))

    def _close_tasks(self, handle: WorkerHandle) -> None:
        if handle.tasks is not None:
            endpoint = handle.tasks.getsockopt_string(zmq.LAST_ENDPOINT)
            handle.tasks.close(linger=0)
            handle.tasks = None
            path = endpoint[len("ipc://"):]
            if endpoint.startswith("ipc://") and os.path.exists(path):
                os.unlink(path)

    def _signal(self, handle: WorkerHandle, signum: int) -> None:
        if handle.alive and handle.proc is not None:
            handle.proc.send_signal(signum)

    # -- reload ----------------------------------------------------------------------

    def _reload_config(self) -> None:
        try:
            new = config_mod.load(self.config_path)
        except config_mod.ConfigError as err:
            log.error(logs.kv("reload_refused", error=err))
            return
        for key in ("ingest", "events", "control", "spool", "run_dir", "events_log"):
            if getattr(new, key) != getattr(self.cfg, key):
                log.warning(logs.kv("reload_needs_restart", key=key))
        if (new.security.curve.enabled, new.security.curve.server_secret_key,
                new.security.allow_plain_remote) != (
                self.cfg.security.curve.enabled, self.cfg.security.curve.server_secret_key,
                self.cfg.security.allow_plain_remote):
            log.warning(logs.kv("reload_needs_restart", key="security"))
        self._reload_clients(new.security.curve.allowed_clients)
        old_ips = set(self.workers)
        self.cfg = new
        new_ips = self._configured_ips()
        for ip in old_ips - new_ips:  # removed: drain and forget
            self.workers[ip].retiring = True
            self._signal(self.workers[ip], signal.SIGTERM)
        for ip in old_ips & new_ips:  # kept: a fresh worker reads the new config
            self.workers[ip].replacing = True
            self._signal(self.workers[ip], signal.SIGTERM)
        for ip in new_ips - old_ips:
            self._add_worker(ip)
        log.info(logs.kv("reloaded", ips=len(new_ips), added=len(new_ips - old_ips),
                         removed=len(old_ips - new_ips)))

    def _reload_clients(self, folder: str) -> None:
        """A new allow-list of CURVE clients takes effect at once; a bad one is ignored."""
        if self.curve is None:
            return
        try:
            count = self.curve.reload_clients(folder)
        except config_mod.ConfigError as err:
            log.error(logs.kv("curve_clients_unchanged", error=err))
            return
        log.info(logs.kv("curve_clients_reloaded", clients=count))

    # -- housekeeping --------------------------------------------------------------

    def _tick(self) -> None:
        # Before _check_workers (see _flush_results): every result already here is recorded,
        # those still in the socket (unwatched while results are held) included.
        self._collect()
        self._flush_results()
        self._check_workers()
        self._dispatch_due()
        now = time.monotonic()
        if now - self._last_due >= 10.0:
            self._last_due = now
            self.spool.prune_finished(time.time())
            stats = self.spool.stats()
            self.metrics.gauge("spool_depth", "all", stats.rcpts_pending)
            self.metrics.memory()

    # -- control -----------------------------------------------------------------------

    def _answer_control(self) -> None:
        try:
            request = self.control.recv_json(zmq.NOBLOCK)
        except zmq.Again:
            return
        except ValueError:
            self.control.send_json({"error": "request is not JSON"})
            return
        if isinstance(request, dict) and request.get("command") == "status":
            self.control.send_json(self.status())
        else:
            self.control.send_json({"error": "unknown command; try {\"command\": \"status\"}"})

    def status(self) -> dict[str, Any]:
        stats = self.spool.stats()
        return {
            "pid": os.getpid(),
            "spool": {"jobs": stats.jobs, "rcpts_pending": stats.rcpts_pending,
                      "rcpts_deferred": stats.rcpts_deferred,
                      "oldest_queued_ts": stats.oldest_queued_ts},
            "in_flight": len(self.in_flight),
            "events": dict(self.counters),
            "workers": {ip: {"alive": h.alive, "ready": h.ready,
                             "pid": h.proc.pid if h.proc else None,
                             "jobs": len(h.jobs), "restarts": h.failures,
                             "connections_open": h.stats.get("connections_open", 0),
                             "in_flight": h.stats.get("in_flight", 0),
                             "shaping": h.stats.get("shaping", {})}
                        for ip, h in self.workers.items()},
        }


def _end_torn_line(path: str) -> None:
    """Regression (a kill -9 tore the events log): the supervisor may die halfway
    through writing a line; appending after it glued the next run's first event
    onto the fragment, and both were lost to every JSON-lines reader. Start the
    new run on a line of its own (the fragment stays, alone on its line)."""
    if not path:
        return
    try:
        with open(path, "rb+") as f:
            size = f.seek(0, os.SEEK_END)
            if size > 0:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    f.write(b"\n")
    except FileNotFoundError:
        pass


class _Either:
    """`x in _Either(a, b)`: in a or in b, without building a union."""

    def __init__(self, first: Container[str], second: Container[str]) -> None:
        self._first = first
        self._second = second

    def __contains__(self, item: object) -> bool:
        return item in self._first or item in self._second


def main(config_path: str | None) -> int:
    try:
        cfg = config_mod.load(config_path)
    except config_mod.ConfigError as err:
        print(f"mailengine: {err}", file=sys.stderr)
        return 2
    logs.setup(cfg.log_level, "supervisor")
    try:
        supervisor = Supervisor(cfg, config_path)
    except config_mod.ConfigError as err:  # a key file or the clients' folder
        log.error(logs.kv("start_failed", error=err))
        print(f"mailengine: {err}", file=sys.stderr)
        return 2
    except (OSError, zmq.ZMQError, SpoolError) as err:
        log.error(logs.kv("start_failed", error=err))
        print(f"mailengine: cannot start: {err}", file=sys.stderr)
        return 1
    return supervisor.run()
