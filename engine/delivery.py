"""Delivering one job's recipients: per domain, across MX hosts, on pooled connections.

For each recipient domain (in parallel greenlets): resolve the destination,
then try its MX hosts in order. A host that cannot be reached (connect error,
421 or 554 banner, TLS required but absent, pool in connect backoff) passes the
recipients to the next host; once a transaction runs, its replies are the
recipients' outcomes. A pooled connection found dead at the start of a
transaction is replaced by a fresh one without counting an attempt.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import gevent

from engine.connector import Connector
from engine.metrics import Metrics
from engine.mx import Destination, MxHost, Resolver
from engine.outcome import Attempt, Status
from engine.pool import PoolKey, Pools
from engine.provider import provider_of
from engine.reply import Blame, DeliveryError, Reply
from engine.smtp import RcptResult, StaleConnection

# How many pooled connections may turn out stale for one message before the
# host counts as failing (each costs no attempt, but must not loop for ever).
MAX_STALE_RETRIES = 3


@dataclass(frozen=True)
class Task:
    """One delivery attempt of a job, as the supervisor hands it to a worker."""

    job_id: str
    sender: str
    rcpts: tuple[str, ...]
    message: bytes
    queued_ts: float
    smtputf8: bool = False
    eightbit: bool = False


Report = Callable[[list[Attempt]], None]


class Deliverer:
    def __init__(self, source_ip: str, tls_mode: str, resolver: Resolver,
                 connector: Connector, pools: Pools, metrics: Metrics) -> None:
        self.source_ip = source_ip
        self.tls_mode = tls_mode
        self.resolver = resolver
        self.connector = connector
        self.pools = pools
        self.metrics = metrics

    def deliver(self, task: Task, report: Report) -> None:
        """Deliver every recipient of `task`; `report` gets each domain's results."""
        by_domain: dict[str, list[str]] = {}
        for rcpt in task.rcpts:
            by_domain.setdefault(_domain(rcpt), []).append(rcpt)
        greenlets = [gevent.spawn(self._deliver_domain, task, domain, rcpts, report)
                     for domain, rcpts in by_domain.items()]
        gevent.joinall(greenlets)

    def _deliver_domain(self, task: Task, domain: str, rcpts: list[str],
                        report: Report) -> None:
        try:
            attempts = self._attempt_domain(task, domain, rcpts)
        except Exception as exc:  # a bug of ours defers, it never loses or bounces mail
            reply = Reply(451, "4.3.0", f"internal error: {type(exc).__name__}: {exc}"[:300])
            attempts = self._outcomes(task, [RcptResult(r, reply) for r in rcpts], None,
                                      domain, None, False)
        report(attempts)

    def _attempt_domain(self, task: Task, domain: str, rcpts: list[str]) -> list[Attempt]:
        started = time.monotonic()
        try:
            dest = self.resolver.destination(domain)
        except DeliveryError as err:
            return self._outcomes(task, [RcptResult(r, err.reply) for r in rcpts], None,
                                  domain, None, False)
        provider = _provider(dest)
        self.metrics.timing("dns", provider, (time.monotonic() - started) * 1000.0)
        last: DeliveryError | None = None
        last_host: str | None = None
        for host in dest.hosts:
            try:
                return self._via_host(task, rcpts, host, provider)
            except DeliveryError as err:
                if err.blame is Blame.MESSAGE:  # the same at every host: it is the outcome
                    return self._outcomes(task, [RcptResult(r, err.reply) for r in rcpts],
                                          host.name, provider, None, False)
                last, last_host = err, host.name
        assert last is not None
        reply = last.reply
        if reply.permanent:
            # Every host refused us at the door (554 banner: often a blocklist of our IP).
            # That says nothing final about the recipients: defer, never bounce.
            reply = Reply(451, "4.4.0", f"no MX host would take the mail; last said: {reply}")
        return self._outcomes(task, [RcptResult(r, reply) for r in rcpts], last_host,
                              provider, None, False)

    def _via_host(self, task: Task, rcpts: list[str], host: MxHost,
                  provider: str) -> list[Attempt]:
        """Send on a pooled connection to `host`; connection-level failures raise."""
        key = PoolKey(self.source_ip, host.name, host.port, self.tls_mode)
        pool = self.pools.get(key, lambda: self.connector.open(host, provider))
        stale: StaleConnection | None = None
        for _ in range(MAX_STALE_RETRIES):
            waited = time.monotonic()
            with pool.connection() as (conn, reused):
                self.metrics.timing("pool_wait", provider, (time.monotonic() - waited) * 1000.0)
                if reused:
                    self.metrics.incr("connections_reused", provider)
                started = time.monotonic()
                try:
                    results = conn.send_mail_tx(task.sender, rcpts, task.message,
                                                task.smtputf8, task.eightbit)
                except StaleConnection as err:
                    self.metrics.incr("connections_stale", provider)
                    stale = err
                    continue
                self.metrics.timing("transaction", provider, (time.monotonic() - started) * 1000.0)
                return self._outcomes(task, results, host.name, provider, conn.tls_version,
                                      reused)
        assert stale is not None
        raise stale

    def _outcomes(self, task: Task, results: Sequence[RcptResult], mx: str | None,
                  provider: str, tls: str | None, reused: bool) -> list[Attempt]:
        now = time.time()
        attempts = []
        for result in results:
            status = _status(result.reply)
            attempts.append(Attempt(task.job_id, result.rcpt, status, result.reply,
                                    self.source_ip, mx, provider, tls, reused,
                                    result.ambiguous, now))
            self.metrics.incr(status.value, provider)
            if result.ambiguous:
                self.metrics.incr("ambiguous", provider)
            if status is not Status.DEFERRED:
                self.metrics.timing("delivery_time", provider, (now - task.queued_ts) * 1000.0)
        return attempts


def _status(reply: Reply) -> Status:
    if reply.ok:
        return Status.DELIVERED
    if reply.permanent:
        return Status.BOUNCED
    return Status.DEFERRED


def _domain(rcpt: str) -> str:
    return rcpt.rpartition("@")[2].lower()


def _provider(dest: Destination) -> str:
    return provider_of(dest.hosts[0].name) if dest.hosts else dest.domain
