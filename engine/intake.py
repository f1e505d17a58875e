"""Intake: jobs from producers into the spool, where they become durable.

The ingest socket (a ZeroMQ PULL) is read in batches, each accepted and handed out
before the next is read (`Ramp` sizes them): few jobs (FIRST_BATCH) after the socket was
found empty, so the first jobs of a burst are committed and handed out at once instead of
waiting for the commit of a thousand others; twice as many at each read while the burst
lasts, up to ROOM_BATCH while the workers have room (the supervisor's turns stay short)
and INTAKE_BATCH once they are full (what is read then waits in memory anyway), so that
large batches amortize the commits. Each job is parsed and checked (engine.job: a line
over 998 octets is refused, or re-encoded under `limits.long_lines: encode`); one whose
`ip` or `pool` this engine does not have is refused too. A refused job gets a `rejected`
event that says why, and disturbs nothing else. The valid ones of a batch are written to
the spool in one transaction (group commit); only once that has returned are they
*accepted*, and `queued` is published for each (and only then are they handed out). A
job the spool already holds or finished recently (a producer re-sending one whose `queued`
it missed) is acknowledged again with `queued` and `"duplicate": true`, and not spooled
twice.

In a cluster (`cluster.redis`, engine.cluster_dedup), the batch's ids are also claimed in
Redis first, in one round trip: a job another host accepted within the duplicate window is
acknowledged as a duplicate and not spooled here; one another host is spooling this
instant is not acknowledged (its producer sends it again). Redis unreachable: the spool's
own check alone.

A batch the spool cannot write (a full disk, an I/O error) is not acknowledged:
no `queued`, so its producers send it again; the supervisor stops reading the
ingest socket until the spool is tried again (engine.spoolhealth).
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import zmq

from engine import crash, events, logs, sockets
from engine.clock import EngineClock
from engine.cluster import Cluster
from engine.cluster_dedup import SharedIds
from engine.config import Config
from engine.job import Job, JobRejected, parse_job
from engine.metrics import Metrics
from engine.spool import Pending, Spool, SpoolDamaged, SpoolError
from engine.spoolhealth import SpoolHealth

log = logging.getLogger("mailengine.supervisor")

INTAKE_BATCH = 1000  # jobs per group commit at most
FIRST_BATCH = 32  # ...after the socket was found empty
ROOM_BATCH = 128  # ...while the workers have room for more
INGEST_HWM = 10000  # jobs waiting in the ingest socket before PULL stops reading (TCP pushes back)

Publish = Callable[[events.Event], None]


class Intake:
    """Reads the ingest socket; `take()` accepts what is waiting there."""

    def __init__(self, sock: zmq.Socket, cfg: Config, spool: Spool, publish: Publish,
                 metrics: Metrics, health: SpoolHealth | None = None,
                 clock: EngineClock | None = None) -> None:
        self.sock = sock
        self._clock = clock or EngineClock()  # the time the spool is written in
        self.cfg = cfg
        self._spool = spool
        self._publish = publish
        self._metrics = metrics
        self._health = health or SpoolHealth(metrics)
        # The cluster's ids (engine.cluster_dedup): changed at a restart only.
        self.cluster = Cluster(cfg.cluster, cfg.hostname, metrics) if cfg.cluster.redis else None
        self._shared = SharedIds(self.cluster, metrics) if self.cluster is not None else None
        self.ramp = Ramp()

    @property
    def open(self) -> bool:
        """Whether to read the ingest socket now (not while the spool cannot be written,
        except to try it again)."""
        return self._health.may_write("intake")

    def take(self, room: int = 0) -> list[Pending]:
        """Accept the jobs waiting (up to a batch, `Ramp`; `room`: jobs the workers can
        take now): durable, `queued` published. Returns them as the spool now holds them:
        every recipient pending, no attempt yet."""
        return self.accept(self._receive(self.ramp.size(room)))[0]

    def accept(self, batch: list[list[bytes]]) -> tuple[list[Pending], set[str]]:
        """`take` for jobs as multipart frames (the ingest socket's, or the engine's own:
        TLS-RPT's mailed reports, engine.tlsrpt_store); also returns the ids of the jobs
        the spool now holds (new, or already there)."""
        jobs = [job for frames in batch if (job := self._validate(frames)) is not None]
        if self._shared is not None:
            jobs = self._not_elsewhere(jobs, self._shared)
        if not jobs:
            return [], set()
        accepted_at = self._clock.now()
        done, accepted = self._spool_what_fits(jobs, accepted_at)
        crash.point("after_spool_commit", len(done))
        if self._shared is not None and done:
            self._shared.confirm(job.id for job in done)
        fresh = {id(job) for job in accepted}
        for job in done:
            # A re-sent job the spool holds (or finished) is acknowledged again,
            # so a producer that missed the first `queued` stops re-sending.
            self._publish(events.queued(job, duplicate=id(job) not in fresh))
        self._metrics.incr("queued", "all", len(accepted))
        max_age = self.cfg.retry.max_age
        return [Pending(job, accepted_at,
                        accepted_at + (job.expires if job.expires is not None else max_age),
                        job.rcpts, dict.fromkeys(job.rcpts, 0)) for job in accepted], \
            {job.id for job in done}

    def _not_elsewhere(self, jobs: list[Job], shared: SharedIds) -> list[Job]:
        """The jobs this host may spool: those another host of the cluster accepted are
        acknowledged as duplicates, those it is spooling now are left to their producers'
        next try (engine.cluster_dedup)."""
        claims = shared.claim([job.id for job in jobs])
        for job in jobs:
            if job.id in claims.elsewhere:
                self._publish(events.queued(job, duplicate=True))
        skip = claims.elsewhere | claims.pending
        return [job for job in jobs if job.id not in skip] if skip else jobs

    def _spool_what_fits(self, jobs: list[Job], now: float) -> tuple[list[Job], list[Job]]:
        """Spool the batch in one transaction; when the spool cannot take it (a full disk,
        an I/O error), as much of it as it can take, in halves, in order: a batch larger
        than the space left would otherwise fail again at every try. Returns the jobs the
        spool now has (acknowledge them) and those it took as new; the rest are not
        acknowledged, and their producers send them again."""
        done: list[Job] = []
        fresh: list[Job] = []
        chunks = [jobs]
        while chunks:
            chunk = chunks.pop()
            try:
                fresh += self._spool.accept(chunk, now, self.cfg.retry.max_age)
            except SpoolDamaged:
                raise  # not a passing failure: the supervisor stops (engine.supervisor)
            except SpoolError as err:
                if len(chunk) > 1:
                    half = len(chunk) // 2
                    chunks += [chunk[half:], chunk[:half]]  # the first half first
                    continue
                self._health.failed("intake", err)
                refused = len(jobs) - len(done)
                self._metrics.incr("intake_refused", "all", refused)
                log.info(logs.kv("intake_refused", jobs=refused, error=err))
                break
            done += chunk
        else:
            self._health.succeeded()
        return done, fresh

    def _receive(self, most: int) -> list[list[bytes]]:
        """The multipart messages waiting, up to `most` (recv with int flags)."""
        batch = []
        sock = self.sock
        for _ in range(most):
            try:
                frames = [sock.recv(sockets.NOBLOCK)]
            except zmq.Again:
                break
            while sock.getsockopt(sockets.RCVMORE):
                frames.append(sock.recv(sockets.NOBLOCK))
            batch.append(frames)
        self.ramp.read(len(batch), most)
        return batch

    def _validate(self, frames: list[bytes]) -> Job | None:
        try:
            limits = self.cfg.limits
            job = parse_job(frames, limits.max_message_size, limits.max_recipients,
                            long_lines=limits.long_lines)
            self._check_route(job)
            return job
        except JobRejected as err:
            log.info(logs.kv("rejected", id=err.job_id, reason=err.reason))
            self._metrics.incr("rejected", "all")
            self._publish(events.rejected(err.job_id, err.meta, err.reason))
            return None

    def _check_route(self, job: Job) -> None:
        """A job for a sending IP or pool this engine does not have is refused now, not
        left to wait in the spool for a worker that will never come."""
        if job.ip is not None and job.ip not in {ip.address for ip in self.cfg.ips}:
            raise JobRejected(f"ip {job.ip} is not one of this engine's sending IPs",
                              job.id, dict(job.meta))
        if job.pool is not None and job.pool not in self.cfg.ip_pools:
            raise JobRejected(f"unknown pool {job.pool!r} (configured: "
                              f"{', '.join(sorted(self.cfg.ip_pools))})", job.id, dict(job.meta))
        dkim = self.cfg.dkim
        if job.dkim_domain is not None and not (dkim.enabled and job.dkim_domain in dkim.domains):
            raise JobRejected(f"dkim_domain {job.dkim_domain} has no keys in dkim.domains",
                              job.id, dict(job.meta))


class Ramp:
    """How many jobs the next read of the ingest socket takes at most.

    A read that found fewer jobs than it asked for left the socket empty: the burst is over
    (or has not begun), and the next read starts again at `first`. A read that got all it
    asked for means a burst is on: the size doubles, up to `most`. While the workers have
    room, reads take `with_room` at most: each batch goes out as soon as it is committed,
    and the supervisor's turns stay short (~10 ms), so that the results of the first
    deliveries are recorded between them, not after the commit of a thousand jobs. Once the
    workers are full, what is read waits in memory until results free room: a large batch
    costs those jobs nothing, and saves commits (an fsync each)."""

    def __init__(self, first: int = FIRST_BATCH, with_room: int = ROOM_BATCH,
                 most: int = INTAKE_BATCH) -> None:
        self.first, self.with_room, self.most = first, with_room, most
        self._size = first

    def size(self, room: int) -> int:
        """The next read's most, `room` the jobs the workers can take now."""
        return min(self._size, self.with_room) if room > 0 else self._size

    def read(self, count: int, asked: int) -> None:
        """A read got `count` of the `asked` jobs."""
        self._size = min(2 * self._size, self.most) if count >= asked else self.first
