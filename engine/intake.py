"""Intake: jobs from producers into the spool, where they become durable.

The ingest socket (a ZeroMQ PULL) is drained in batches of up to INTAKE_BATCH
jobs. Each job is parsed and checked (engine.job: a line over 998 octets is refused, or
re-encoded under `limits.long_lines: encode`); one whose `ip` or `pool` this engine does
not have is refused too. A refused job gets a `rejected` event that
says why, and disturbs nothing else. The valid ones of a batch are written to the
spool in one transaction (group commit); only once that has returned are they
*accepted*, and `queued` is published for each. A job the spool already holds
or finished recently (a producer re-sending one whose `queued` it missed) is
acknowledged again with `queued` and `"duplicate": true`, and not spooled twice.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable

import zmq

from engine import events, logs, sockets
from engine.config import Config
from engine.job import Job, JobRejected, parse_job
from engine.metrics import Metrics
from engine.spool import Pending, Spool

log = logging.getLogger("mailengine.supervisor")

INTAKE_BATCH = 1000  # jobs per group commit at most
INGEST_HWM = 10000  # jobs waiting in the ingest socket before PULL stops reading (TCP pushes back)

Publish = Callable[[events.Event], None]


class Intake:
    """Reads the ingest socket; `take()` accepts what is waiting there."""

    def __init__(self, sock: zmq.Socket, cfg: Config, spool: Spool, publish: Publish,
                 metrics: Metrics) -> None:
        self.sock = sock
        self.cfg = cfg
        self._spool = spool
        self._publish = publish
        self._metrics = metrics

    def take(self) -> list[Pending]:
        """Accept the jobs waiting (up to a batch): durable, `queued` published. Returns
        them as the spool now holds them: every recipient pending, no attempt yet."""
        jobs = [job for frames in self._receive()
                if (job := self._validate(frames)) is not None]
        if not jobs:
            return []
        accepted_at = time.time()
        max_age = self.cfg.retry.max_age
        accepted = self._spool.accept(jobs, accepted_at, max_age)
        fresh = {id(job) for job in accepted}
        for job in jobs:
            # A re-sent job the spool holds (or finished) is acknowledged again,
            # so a producer that missed the first `queued` stops re-sending.
            self._publish(events.queued(job, duplicate=id(job) not in fresh))
        self._metrics.incr("queued", "all", len(accepted))
        return [Pending(job, accepted_at,
                        accepted_at + (job.expires if job.expires is not None else max_age),
                        job.rcpts, dict.fromkeys(job.rcpts, 0)) for job in accepted]

    def _receive(self) -> list[list[bytes]]:
        """The multipart messages waiting, up to a batch (recv with int flags)."""
        batch = []
        sock = self.sock
        for _ in range(INTAKE_BATCH):
            try:
                frames = [sock.recv(sockets.NOBLOCK)]
            except zmq.Again:
                break
            while sock.getsockopt(sockets.RCVMORE):
                frames.append(sock.recv(sockets.NOBLOCK))
            batch.append(frames)
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
