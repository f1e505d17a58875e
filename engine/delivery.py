"""Delivering one job's recipients: per domain, across MX hosts, on pooled connections.

For each recipient domain (in parallel greenlets): resolve the destination,
then try its MX hosts in order. A host that cannot be reached (connect error,
421 or 554 banner, TLS required but absent, pool in connect backoff) passes the
recipients to the next host; once a transaction runs, its replies are the
recipients' outcomes. A pooled connection found dead at the start of a
transaction (or failing its check before reuse, engine.pool) is replaced by a fresh
one without counting an attempt. A connect or DNS lookup that fails because the worker
is out of file descriptors is waited out and tried again (engine.descriptors), no
attempt counted. While the host does not hold the sending IP (engine.sendingip), nothing is
tried: the recipients go back to the spool, no attempt counted, and the supervisor hands
them to another IP of their pool.

At the worker's drain deadline (SIGTERM) its greenlets are killed with `Stopping`: what a
transaction had to report by then (its outcome, or an ambiguous deferral once its end of
message was written) is reported before the greenlet ends (`Unreported`); a recipient
whose message the server cannot have is not reported, and stays pending in the spool.

The TLS policy of each domain's delivery is decided once per try (engine.tlspolicy: the
config's exceptions, MTA-STS, the job's REQUIRETLS, smtp.tls): it says which MX hosts mail
may go to and the connections' TLS mode (part of the pool key); each attempt reports the
policy and whether the session's certificate verified (`tls_policy`, `tls_verified`).
With TLS-RPT on (`tlsrpt`, engine.tlsrpt), each session's outcome is counted for the
domain's report: a connection's first transaction for the domain, a host given up for a
TLS reason (the error engine.connector tagged), a policy that allows no MX host.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from functools import partial

import gevent

from engine import classify, logs, tlsrpt
from engine.config import ThrottleConfig
from engine.connector import Connector
from engine.descriptors import Descriptors
from engine.dkim import WireSigner
from engine.gate import NoSlot
from engine.memo import Memo
from engine.metrics import Metrics
from engine.mx import Destination, MxHost, Resolver
from engine.pool import DestinationPool, PoolKey, StaleTurn
from engine.pools import Pools
from engine.protocol import Attempt, Status, Task
from engine.provider import DEFAULT_PROVIDERS, provider_of
from engine.reply import Blame, DeliveryError, DescriptorsExhausted, Reply, SendingIpGone
from engine.sendingip import RETRY_AFTER
from engine.shaping import (
    BLOCK,
    CLEAN,
    PUSHBACK,
    Deferral,
    ProviderShaper,
    Shaping,
    ShapingPlan,
    Verdict,
)
from engine.smtp import Connection, RcptResult, StaleConnection, Stopping, send_mail
from engine.smtp.transaction import Sign
from engine.tlspolicy import DANE, MTA_STS, REQUIRETLS, SKIPPED, Decision, TlsPolicies

log = logging.getLogger("mailengine.delivery")

# How many pooled connections may turn out stale for one message before the
# host counts as failing (each costs no attempt, but must not loop for ever).
MAX_STALE_RETRIES = 3
# How many times a throttled recipient goes again from the worker, at its next turn, before
# it goes back to the spool (see _deliver_domain).
THROTTLED_TRIES = 30
# Entries of the per-MX-host caches (provider names, pool keys) before they are emptied.
HOST_CACHE_SIZE = 10000


Report = Callable[[list[Attempt]], None]

# One transaction's results, the connection's TLS version and whether it was reused, the
# epoch of the turn it went out on (engine.shaping), its time in seconds, and whether the
# connection's certificate verified.
_Sent = tuple[list[RcptResult], str | None, bool, int, float, bool | None]



class Unreported(Stopping):
    """`Stopping`, carrying the attempts the greenlet owes the supervisor: its domain's
    `_deliver_domain` reports them, and the greenlet ends."""

    def __init__(self, attempts: list[Attempt]) -> None:
        super().__init__()
        self.attempts = attempts


class Deliverer:
    def __init__(self, source_ip: str, tls_mode: str, resolver: Resolver,
                 connector: Connector, pools: Pools, metrics: Metrics,
                 shaping: Shaping | None = None,
                 providers: Mapping[str, str] = DEFAULT_PROVIDERS,
                 policies: TlsPolicies | None = None,
                 dkim: WireSigner | None = None) -> None:
        self.source_ip = source_ip
        self.tls_mode = tls_mode
        self.resolver = resolver
        self.connector = connector
        self.pools = pools
        self.metrics = metrics
        # Without a plan: the pool's connection limits per provider, no pace, no caps.
        self.shaping = shaping or Shaping(ShapingPlan(
            pool=pools.settings, throttle=ThrottleConfig(slow_start=False)))
        self.providers = providers
        # Without: smtp.tls for every domain, no MTA-STS.
        self.policies = policies or TlsPolicies(tls_mode, mta_sts=None)
        self.dkim = dkim  # signs each message as it goes out (engine.dkim), if configured
        self.descriptors = Descriptors(metrics)  # waits for file descriptors
        self.tlsrpt: tlsrpt.Sessions | None = None  # TLS-RPT's session counts (None: off)
        # Per MX host, worked out once rather than per message (pure functions of the
        # host; the caches are emptied when full).
        self._provider_names: Memo[str, str] = Memo(HOST_CACHE_SIZE)
        self._pool_keys: Memo[tuple[str, int, str], PoolKey] = Memo(HOST_CACHE_SIZE)

    def deliver(self, task: Task, report: Report) -> None:
        """Deliver every recipient of `task`; `report` gets each domain's results."""
        try:
            self._deliver(task, report)
        finally:
            if self.dkim is not None:  # its signed forms are kept while it is in flight
                self.dkim.forget(task.job_id, task.handout, task.message)

    def _deliver(self, task: Task, report: Report) -> None:
        by_domain: dict[str, list[str]] = {}
        for rcpt in task.rcpts:
            by_domain.setdefault(_domain(rcpt), []).append(rcpt)
        if len(by_domain) == 1:
            # The usual job, one domain: run it in the caller's greenlet (the worker gives
            # each task its own); a greenlet of its own to join would cost a spawn and two
            # switches per message for nothing.
            ((domain, rcpts),) = by_domain.items()
            self._deliver_domain(task, domain, rcpts, report)
            return
        greenlets = [gevent.spawn(self._deliver_domain, task, domain, rcpts, report)
                     for domain, rcpts in by_domain.items()]
        try:
            gevent.joinall(greenlets)
        except gevent.GreenletExit as stop:  # the task is killed (Stopping): its domains too,
            gevent.killall(greenlets, type(stop))  # each reporting what it owes
            raise

    def _deliver_domain(self, task: Task, domain: str, rcpts: list[str],
                        report: Report) -> None:
        """Deliver to one domain's recipients. A throttled recipient goes back into its
        provider's line, first, and is sent again as soon as the allowed rate gives it a
        turn (no attempt counted): after a push-back it is the probe, so one message knocks
        while the provider refuses, not a new one each time. Each throttled try is reported
        (its `deferred` event names the trigger) with `retried`: the worker keeps it. When
        its next turn is not near (a suspension, a long wait), or after THROTTLED_TRIES
        throttles in a row, it goes back to the spool, due at its turn."""
        again, guessed = False, frozenset[str]()
        try:
            for _ in range(THROTTLED_TRIES):
                attempts, retriable = self._attempt_domain(task, domain, rcpts, again, guessed)
                if not retriable:
                    report(attempts)
                    return
                retry = [replace(a, retried=True) for a in attempts if self._again(a)]
                report([a for a in attempts if not self._again(a)] + retry)
                if not retry:
                    return
                rcpts, again = [a.rcpt for a in retry], True
                guessed = frozenset(a.rcpt for a in retry if a.trigger == PUSHBACK)
            report([_back_to_spool(a) for a in retry])
        except Unreported as stop:  # the worker's drain deadline: report, then end
            report(stop.attempts)
            raise
        except Exception as exc:  # a bug of ours defers, it never loses or bounces mail
            reply = classify.internal_error(exc)
            report(self._outcomes(task, [RcptResult(r, reply) for r in rcpts], None, domain,
                                  None, False))

    def _attempt_domain(self, task: Task, domain: str, rcpts: list[str],
                        again: bool = False, guessed: frozenset[str] = frozenset()
                        ) -> tuple[list[Attempt], bool]:
        """One try of `rcpts`, across the domain's MX hosts. `again`: the recipients were
        throttled and go again, first in line. `guessed`: those of them throttled by
        behaviour alone (engine.pushback): refused again, they are judged as Task.tried
        recipients are (by the next transaction of another message). A receiver that
        refuses some mailboxes every time (451, words no rule knows) made them the probe for
        ever: each refusal of theirs renewed the push-back, and no other message went.
        Returns the attempts, and whether the
        throttled among them may go again from here: those a transaction's replies
        throttled, not those no host of the provider would let in (the pools back off)."""
        sending_ip = self.connector.sending_ip
        if sending_ip.error is not None:  # known gone: not even a lookup
            return self._not_held(task, rcpts, domain, Reply.local(451, "4.4.1",
                                                                   sending_ip.error)), False
        started = time.monotonic()
        try:
            dest = self._destination(domain)
        except DescriptorsExhausted as err:  # waited WAIT_MAX: back to the spool
            return self._not_held(task, rcpts, domain, err.reply), False
        except DeliveryError as err:
            return self._outcomes(task, [RcptResult(r, err.reply) for r in rcpts], None,
                                  domain, None, False), False
        provider = self._provider(dest.hosts[0].name) if dest.hosts else dest.domain
        self.metrics.timing("dns", provider, (time.monotonic() - started) * 1000.0)
        decision = self.policies.decide(dest.domain, provider, task.requiretls, dest.routed,
                                        dest, task.tls_optional)
        if decision.refusal is not None:  # forced DANE over an MX answer not authenticated
            return self._unprotected(task, rcpts, dest.domain, provider, decision), False
        hosts = [host for host in dest.hosts if decision.allows(host.name)]
        if not hosts:  # MTA-STS enforce: not one MX host the policy names
            self.metrics.incr("mta_sts_refused", provider)
            reply = classify.sts_no_mx(dest.domain, [h.name for h in dest.hosts]).reply
            if self.tlsrpt is not None:
                self.tlsrpt.failure(dest.domain, decision.report_policy(),
                                    tlsrpt.VALIDATION_FAILURE, None, None, reply.text)
            return self._outcomes(task, [RcptResult(r, reply) for r in rcpts], None, provider,
                                  None, False, decision=decision), False
        shaper = self.shaping.get(provider)
        epoch = shaper.turn(again, first=again)  # waiting for a turn is not an attempt
        if isinstance(epoch, Deferral):
            return self._not_now(task, rcpts, provider, epoch), False
        # What this turn counted against the caps (None: a throttled message, counted when
        # it first went): given back below if the message goes back untried.
        counted = None if again else shaper.counted
        last: DeliveryError | None = None
        last_host: str | None = None
        refusals: list[Reply] = []
        verdict = CLEAN
        for host in hosts:
            try:
                sent = self._via_host_in_time(task, rcpts, host, provider, shaper, dest.routed,
                                              epoch, decision, dest.domain)
            except (SendingIpGone, DescriptorsExhausted) as err:  # the worker's own trouble:
                # no other host would do better, nothing can leave now
                shaper.give_back(counted)
                return self._not_held(task, rcpts, provider, err.reply), False
            except DeliveryError as err:
                if self.tlsrpt is not None:
                    self._session_failed(dest.domain, decision, host, err)
                if err.blame is Blame.MESSAGE:  # the same at every host: it is the outcome
                    return self._outcomes(task, [RcptResult(r, err.reply) for r in rcpts],
                                          host.name, provider, None, False, shaper), False
                last, last_host = err, host.name
                refusals.append(err.reply)
                verdict = self._judge_session(shaper, err.reply, provider, epoch)
                if shaper.suspended:
                    break  # a block, a rule that suspends: no other host of it either
                continue
            if isinstance(sent, Deferral):  # no cluster slot, or a turn again not now
                shaper.give_back(counted)
                return self._not_now(task, rcpts, provider, sent), False
            results, tls, reused, epoch, seconds, verified = sent
            self._policy_kept(decision, host, provider, verified)
            try:
                verdict = self._judge(shaper, results, provider, epoch, seconds,
                                      task.tried, guessed)
            except Stopping:  # killed waiting for a verdict: the replies came, say them
                raise Unreported(self._outcomes(task, results, host.name, provider, tls,
                                                reused, decision=decision,
                                                verified=verified)) from None
            return self._outcomes(task, results, host.name, provider, tls, reused, shaper,
                                  verdict, decision, verified), True
        assert last is not None
        reply = self._refused(decision, dest.domain, provider, refusals)
        return self._outcomes(task, [RcptResult(r, reply) for r in rcpts], last_host,
                              provider, None, False, shaper, verdict, decision), False

    def _unprotected(self, task: Task, rcpts: list[str], domain: str, provider: str,
                     decision: Decision) -> list[Attempt]:
        """The recipients deferred with `decision.refusal`: no MX host could be trusted."""
        reply = decision.refusal
        assert reply is not None
        self.metrics.incr("dane_refused", provider)
        if self.tlsrpt is not None:
            self.tlsrpt.failure(domain, tlsrpt.NO_POLICY_JSON, tlsrpt.DANE_REQUIRED, None,
                                None, reply.text)
        return self._outcomes(task, [RcptResult(r, reply) for r in rcpts], None, provider,
                              None, False, decision=decision)

    def _refused(self, decision: Decision, domain: str, provider: str,
                 refusals: list[Reply]) -> Reply:
        """The outcome when no MX host took the mail, `refusals` each host's reason. A 5xx at
        every door defers (classify.refused_at_every_host), but for REQUIRETLS: when every
        host said it does not offer it, the recipients bounce 5.7.30 (RFC 8689 5). Under an
        MTA-STS policy the reason says so."""
        if decision.policy == MTA_STS:
            self.metrics.incr("mta_sts_refused", provider)
        elif decision.policy == REQUIRETLS:
            self.metrics.incr("requiretls_refused", provider)
        elif decision.policy == "verify":
            self.metrics.incr("tls_verify_refused", provider)
        elif decision.policy == DANE:
            self.metrics.incr("dane_refused", provider)
        last = refusals[-1]
        if decision.requiretls and all(r.status == "5.7.30" for r in refusals):
            return last
        if decision.policy == MTA_STS:
            return classify.sts_refused(domain, classify.refused_at_every_host(last))
        return classify.refused_at_every_host(last)  # a 5xx at every door defers

    def _policy_kept(self, decision: Decision, host: MxHost, provider: str,
                     verified: bool | None) -> None:
        """Count a session under an enforcing policy; for an MTA-STS policy in testing
        mode, report what enforcing it would have refused (delivered all the same)."""
        if decision.policy == MTA_STS:
            self.metrics.incr("mta_sts_ok", provider)
        elif decision.policy == REQUIRETLS:
            self.metrics.incr("requiretls_ok", provider)
        elif decision.policy == "verify":
            self.metrics.incr("tls_verify_ok", provider)
        elif decision.policy == DANE and verified:  # not a host without TLSA records
            self.metrics.incr("dane_ok", provider)
        elif decision.policy in SKIPPED:  # the message said TLS-Required: No
            self.metrics.incr("tls_policy_skipped", provider)
        shortfall = decision.shortfall(host.name, verified)
        if shortfall is not None:
            self.metrics.incr("mta_sts_testing_failed", provider)
            sts = decision.sts
            log.warning(logs.kv("mta_sts_testing_failure", ip=self.source_ip, mx=host.name,
                                domain=sts.domain if sts else None, why=shortfall))

    def _session_kept(self, domain: str, decision: Decision, host: MxHost,
                      conn: Connection) -> None:
        """TLS-RPT: a connection carried mail for `domain`, the first time: a success, or
        what the domain's policy in testing mode would have refused, or (no policy) a
        server without STARTTLS. Plaintext by our own choice is not counted."""
        assert self.tlsrpt is not None
        peer = conn.peer[0] if conn.peer else None
        shortfall = decision.shortfall(host.name, bool(conn.tls_verified))
        if shortfall is not None:  # MTA-STS testing: reported, delivered all the same
            result = (tlsrpt.VALIDATION_FAILURE if conn.tls_version is not None
                      or conn.has_extn("starttls") else tlsrpt.STARTTLS_NOT_SUPPORTED)
            self.tlsrpt.failure(domain, decision.report_policy(), result, host.name, peer,
                                shortfall)
        elif conn.tls_version is not None:
            self.tlsrpt.success(domain, decision.report_policy(self._tlsa(decision, host),
                                                               host.name))
        elif decision.mode != "none" and not conn.has_extn("starttls"):
            self.tlsrpt.failure(domain, decision.report_policy(),
                                tlsrpt.STARTTLS_NOT_SUPPORTED, host.name, peer, None)

    def _session_failed(self, domain: str, decision: Decision, host: MxHost,
                        err: DeliveryError) -> None:
        """TLS-RPT: `host` failed; counted if engine.connector tagged the error (a session
        that failed for a TLS reason, counted once)."""
        assert self.tlsrpt is not None
        if not self.tlsrpt.tagged(err):
            return
        self.tlsrpt.failed(domain, decision.report_policy(self._tlsa(decision, host),
                                                          host.name), host.name, err)

    def _tlsa(self, decision: Decision, host: MxHost) -> tuple[str, ...]:
        """`host`'s usable TLSA records as text ("3 1 1 <hex>"), under DANE; else ()."""
        dane = self.connector.dane
        if decision.policy != DANE or dane is None:
            return ()
        try:
            records = dane.records(host.name)  # the resolver's cache has them
        except DeliveryError:
            return ()
        return tuple(f"{r.usage} {r.selector} {r.mtype} {r.data.hex()}" for r in records)

    def _destination(self, domain: str) -> Destination:
        """The domain's destination; a lookup short of file descriptors is tried again
        (up to descriptors.WAIT_MAX)."""
        since = self.descriptors.now()
        while True:
            try:
                return self.resolver.destination(domain)
            except DescriptorsExhausted as err:
                self.descriptors.wait(domain, err, since)

    def _via_host_in_time(self, task: Task, rcpts: list[str], host: MxHost, provider: str,
                          shaper: ProviderShaper, routed: bool, epoch: int,
                          decision: Decision, domain: str = "") -> _Sent | Deferral:
        """`_via_host`, tried again after a wait while the worker is out of file descriptors:
        that is raised before any transaction (connect, DNS), so nothing was sent. After
        descriptors.WAIT_MAX, DescriptorsExhausted."""
        since = self.descriptors.now()
        while True:
            try:
                return self._via_host(task, rcpts, host, provider, shaper, routed, epoch,
                                      decision, domain)
            except DescriptorsExhausted as err:
                self.descriptors.wait(provider, err, since)

    def _via_host(self, task: Task, rcpts: list[str], host: MxHost, provider: str,
                  shaper: ProviderShaper, routed: bool, epoch: int,
                  decision: Decision, domain: str = "") -> _Sent | Deferral:
        """Send on a pooled connection to `host`: the results, or (the provider pushed back
        meanwhile, and the turn taken again is not now) a Deferral; connection-level
        failures raise. `routed`: a configured route, exempt from the prohibited-destination
        check."""
        if not routed:
            # Before the pool: a refusal from inside the pool's factory would put the pool in
            # connect backoff, and a route to the same host and port shares that pool.
            self.connector.check_destination(host)
        pool = self._pool(host, provider, shaper, routed, decision)
        stale: StaleConnection | None = None
        tries = 0
        while tries < MAX_STALE_RETRIES:
            # Regression (throttle storm): every message that took its turn before the
            # provider pushed back, at the old or unlimited rate, and then waited for a
            # connection, still went out, drew its own throttle and cut the rate again. A
            # turn taken before a throttle is taken again, never while holding a
            # connection (five greenlets sleeping on theirs stalled everyone for seconds).
            if shaper.epoch != epoch:
                turn = shaper.turn(again=True)
                if isinstance(turn, Deferral):
                    return turn
                epoch = turn
            waited = time.monotonic()
            try:
                with pool.connection(partial(shaper.holds, epoch)) as (conn, reused):
                    if shaper.epoch != epoch:
                        continue  # throttled while we waited: give it back, take the turn again
                    self.metrics.timing("pool_wait", provider,
                                        (time.monotonic() - waited) * 1000.0)
                    return self._transaction(task, rcpts, conn, reused, host, provider,
                                             decision, domain, epoch)
            except StaleTurn:
                continue  # throttled while we waited: nothing opened, take the turn again
            except NoSlot:  # the cluster's connections stayed taken for max_wait
                return Deferral(time.time() + shaper.max_wait, "cluster connections")
            except StaleConnection as err:
                self.metrics.incr("connections_stale", provider)
                stale = err
                tries += 1
        assert stale is not None
        raise stale

    def _transaction(self, task: Task, rcpts: list[str], conn: Connection, reused: bool,
                     host: MxHost, provider: str, decision: Decision, domain: str,
                     epoch: int) -> _Sent:
        """One message on a checked-out connection: its results (StaleConnection: the
        server had closed it, nothing was sent)."""
        if reused:
            self.metrics.incr("connections_reused", provider)
        started = time.monotonic()
        try:
            results = send_mail(conn, task.sender, rcpts, task.message, task.smtputf8,
                                task.eightbit, task.requiretls, self._signing(task, provider))
        except Stopping as stop:
            if stop.results is None:  # the server cannot have it: nothing to say
                raise
            raise Unreported(self._outcomes(task, stop.results, host.name, provider,
                                            conn.tls_version, reused, decision=decision,
                                            verified=bool(conn.tls_verified))) from None
        seconds = time.monotonic() - started
        self.metrics.timing("transaction", provider, seconds * 1000.0)
        if self.tlsrpt is not None and self.tlsrpt.first(conn, domain):
            self._session_kept(domain, decision, host, conn)
        return results, conn.tls_version, reused, epoch, seconds, bool(conn.tls_verified)

    def _signing(self, task: Task, provider: str) -> Sign | None:
        """What signs the message once send_mail has converted it, if it must be."""
        if self.dkim is None:
            return None
        return self.dkim.for_task(task.job_id, task.handout, task.message, provider,
                                  task.dkim_domain)

    def _pool(self, host: MxHost, provider: str, shaper: ProviderShaper,
              routed: bool, decision: Decision) -> DestinationPool:
        """The pool of `host`'s connections in the decision's TLS mode, made on first use
        with the provider's limits."""
        key = self._pool_key(host, decision.pool_mode)
        pool = self.pools.find(key)
        if pool is None:
            settings = replace(self.pools.settings,
                               max_connections=shaper.limits.max_connections,
                               max_messages=shaper.limits.max_messages)
            pool = self.pools.get(key, lambda: self.connector.open(host, provider, routed,
                                                                   decision.mode,
                                                                   decision.requiretls),
                                  settings, shaper.gate,
                                  lambda conn: self._check_failed(conn, provider))
        return pool

    def _check_failed(self, conn: Connection, provider: str) -> None:
        """An idle connection did not answer its check before reuse (engine.pool): it is
        dropped, and the message takes another one; no attempt."""
        self.metrics.incr("connections_check_failed", provider)
        peer = conn.peer or ("", 0)
        log.info(logs.kv("connection_check_failed", ip=self.source_ip, mx=peer[0],
                         port=peer[1], provider=provider))

    def _judge_session(self, shaper: ProviderShaper, reply: Reply, provider: str,
                       epoch: int) -> Verdict:
        """A host refused the session or the transaction as a whole ("421 too many"): about
        the sender, whoever the recipients are."""
        return self._verdict(shaper, shaper.judge([reply], epoch), provider)

    def _judge(self, shaper: ProviderShaper, results: Sequence[RcptResult], provider: str,
               epoch: int, seconds: float | None, tried: frozenset[str],
               guessed: frozenset[str]) -> Verdict:
        """What one transaction's replies say about the pace (engine.shaping.ProviderShaper.
        judge). A recipient refused before (`tried`: on a counted attempt; `guessed`:
        throttled by behaviour alone here) may be refused again for its own mailbox's
        reasons: when a batch of them came due together, their refusals in a row looked like
        push-back, and a receiver with no limit at all was held to a probe at a time."""
        if not tried and not guessed:  # the usual task: first tries only
            return self._verdict(shaper, shaper.judge([r.reply for r in results], epoch,
                                                      seconds), provider)
        before = tried | guessed
        replies = [r.reply for r in results if r.reply.ok or r.rcpt not in before]
        repeated = [r for r in results if not r.reply.ok and r.rcpt in before]
        return self._verdict(shaper, shaper.judge(
            replies, epoch, seconds, [r.reply for r in repeated],
            guessed=any(r.rcpt in guessed for r in repeated)), provider)

    def _verdict(self, shaper: ProviderShaper, verdict: Verdict, provider: str) -> Verdict:
        """A first refusal's verdict is awaited here, holding no connection, until the next
        transaction's; a throttle is counted."""
        if verdict.pending:
            verdict = shaper.verdict()
        if verdict.trigger is not None:
            self.metrics.incr("throttled", provider)
            if verdict.trigger == BLOCK:
                self.metrics.incr("blocked", provider)
            elif verdict.trigger == PUSHBACK:
                self.metrics.incr("pushback", provider)
        return verdict

    def _again(self, attempt: Attempt) -> bool:
        """Throttled, and sent again from here at its next turn: not a block (the IP is
        suspended), nor when `throttle.retry_after` asks for a wait (the spool keeps it)."""
        return (attempt.throttled and attempt.trigger != BLOCK
                and self.shaping.plan.throttle.retry_after <= 0)

    def _provider(self, mx_host: str) -> str:
        provider = self._provider_names.get(mx_host)
        if provider is None:
            provider = self._provider_names.keep(mx_host, provider_of(mx_host, self.providers))
        return provider

    def _pool_key(self, host: MxHost, mode: str) -> PoolKey:
        key = self._pool_keys.get((host.name, host.port, mode))
        if key is None:
            key = self._pool_keys.keep((host.name, host.port, mode),
                                       PoolKey(self.source_ip, host.name, host.port, mode))
        return key

    def _outcomes(self, task: Task, results: Sequence[RcptResult], mx: str | None,
                  provider: str, tls: str | None, reused: bool,
                  shaper: ProviderShaper | None = None,
                  verdict: Verdict = CLEAN, decision: Decision | None = None,
                  verified: bool | None = None) -> list[Attempt]:
        """Attempts from replies. A throttled recipient (`verdict`) is deferred, never
        bounced, until the provider's turn comes back (no attempt counted). `decision`: the
        TLS policy that applied; `verified`: the session's certificate verified (None: no
        session)."""
        policy = None if decision is None else decision.policy
        throttled = _throttled(results, shaper, verdict)
        retry_at = shaper.resume_at() if shaper is not None and throttled else None
        now = time.time()
        attempts = []
        for result in results:
            hit = result.rcpt in throttled
            status = Status.DEFERRED if hit else classify.status(result.reply)
            attempts.append(Attempt(job_id=task.job_id, rcpt=result.rcpt, status=status,
                                    reply=result.reply, ip=self.source_ip, mx=mx,
                                    provider=provider, tls=tls, conn_reused=reused,
                                    ambiguous=result.ambiguous, ts=now, throttled=hit,
                                    trigger=verdict.trigger if hit else None,
                                    retry_at=retry_at if hit else None,
                                    tls_policy=policy, tls_verified=verified))
            self.metrics.incr(status.value, provider)
            if result.ambiguous:
                self.metrics.incr("ambiguous", provider)
            if status is not Status.DEFERRED:
                self.metrics.timing("delivery_time", provider, (now - task.queued_ts) * 1000.0)
        return attempts

    def _not_now(self, task: Task, rcpts: list[str], provider: str,
                 wait: Deferral) -> list[Attempt]:
        """Shaping says not yet: back to the spool, due at `wait.retry_at`; no attempt."""
        reply = classify.not_yet(provider, wait.reason)
        now = time.time()
        return [Attempt(job_id=task.job_id, rcpt=r, status=Status.DEFERRED, reply=reply,
                        ip=self.source_ip, provider=provider, ts=now, attempted=False,
                        retry_at=wait.retry_at) for r in rcpts]

    def _not_held(self, task: Task, rcpts: list[str], provider: str,
                  reply: Reply) -> list[Attempt]:
        """The worker's own trouble (`reply`): the host does not hold the sending IP, or
        descriptors stayed short for descriptors.WAIT_MAX. Back to the spool, due again in
        RETRY_AFTER seconds, no attempt; for the IP, by then the supervisor knows, and hands
        them to another IP of their pool (or keeps them for this one)."""
        now = time.time()
        return [Attempt(job_id=task.job_id, rcpt=r, status=Status.DEFERRED, reply=reply,
                        ip=self.source_ip, provider=provider, ts=now, attempted=False,
                        retry_at=now + RETRY_AFTER) for r in rcpts]


def _back_to_spool(attempt: Attempt) -> Attempt:
    """A recipient throttled again and again: the spool keeps it until its turn (its last
    throttle was reported already: this is no new attempt, and no new event)."""
    return replace(attempt, attempted=False, retried=False)



def _throttled(results: Sequence[RcptResult], shaper: ProviderShaper | None,
               verdict: Verdict) -> set[str]:
    """The recipients a verdict throttles: every one for a block; for push-back, those
    refused as engine.classify.refusal says; for a rule, those whose reply matches one."""
    trigger = verdict.trigger
    if trigger is None or shaper is None:
        return set()
    # An ambiguous loss (the server may have the message) is never throttled: a throttled
    # recipient goes again at its next turn, no attempt counted, and that would be a
    # duplicate sent at once and counted nowhere. It is deferred by the retry schedule;
    # the loss still counts for the provider's pace (`judge` saw it).
    results = [r for r in results if not r.ambiguous]
    if trigger == BLOCK:
        return {r.rcpt for r in results}
    if trigger == PUSHBACK:
        return {r.rcpt for r in results if classify.refusal(r.reply)}
    return {r.rcpt for r in results if shaper.match(r.reply) is not None}


def _domain(rcpt: str) -> str:
    return rcpt.rpartition("@")[2].lower()

