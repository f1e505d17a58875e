"""Every StatsD metric the engine emits, declared and documented in one place.

Names are ``<prefix>.<ip>.<provider>.<name>``; the dots of an IP become ``_``
(``127.0.0.2`` -> ``127_0_0_2``). Process-wide figures use the provider
``all``; the supervisor uses ``supervisor`` in place of an IP, and its counts of
refusals by category (engine.categories) the category in place of the provider
(``<prefix>.supervisor.bad-mailbox.bounced_category``). Timers are in
milliseconds. StatsD is UDP, fire and forget: a StatsD host that is down or slow
never slows delivery, and a send error is swallowed.

`docs/METRICS.md` lists the same table for operators; `tests/unit/test_metrics.py`
keeps the two in step.
"""
from __future__ import annotations

import logging
import resource
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from engine.memo import Memo

log = logging.getLogger("mailengine.metrics")


# Where a metric is emitted, which fixes the two middle parts of its name.
PER_PROVIDER = "ip_provider"  # a worker, per provider: <prefix>.<ip>.<provider>.<name>
PER_IP = "ip"  # a worker, process-wide: <prefix>.<ip>.all.<name>
SUPERVISOR = "supervisor"  # the supervisor: <prefix>.supervisor.all.<name>
EVERY_PROCESS = "process"  # each worker and the supervisor: both of the above
# The supervisor, per refusal category: <prefix>.supervisor.<category>.<name>
PER_CATEGORY = "category"

PATTERNS = {
    PER_PROVIDER: ("<prefix>.<ip>.<provider>.{name}",),
    PER_IP: ("<prefix>.<ip>.all.{name}",),
    SUPERVISOR: ("<prefix>.supervisor.all.{name}",),
    EVERY_PROCESS: ("<prefix>.<ip>.all.{name}", "<prefix>.supervisor.all.{name}"),
    PER_CATEGORY: ("<prefix>.supervisor.<category>.{name}",),
}

UNITS = {"timer": "ms", "counter": "count", "gauge": ""}


@dataclass(frozen=True)
class Metric:
    name: str
    kind: str  # "timer" | "counter" | "gauge"
    doc: str
    scope: str = PER_PROVIDER  # one of the keys of PATTERNS
    unit: str = ""  # "" -> UNITS[kind]

    @property
    def patterns(self) -> tuple[str, ...]:
        """The full names, e.g. ``<prefix>.<ip>.<provider>.delivered``."""
        return tuple(p.format(name=self.name) for p in PATTERNS[self.scope])

    @property
    def units(self) -> str:
        return self.unit or UNITS[self.kind]


DECLARED: tuple[Metric, ...] = (
    # timers
    Metric("delivery_time", "timer", "from queued to the final reply (delivered or bounced),"
           " per recipient; deferrals are not timed"),
    Metric("pool_wait", "timer", "checking a connection out of the pool: includes opening a"
           " new one, and waiting while max_connections are busy"),
    Metric("dns", "timer", "resolving the recipient domain's destination (MX lookup or"
           " route; cache hits included)"),
    Metric("connect", "timer", "TCP connect and the banner, each connection that got a banner"
           " (a retry after a TLS failure included)"),
    Metric("tls_handshake", "timer", "STARTTLS, the TLS handshake and the EHLO after it"
           " (successful upgrades only)"),
    Metric("ehlo", "timer", "the first EHLO (or HELO) of a connection"),
    Metric("transaction", "timer", "MAIL through the final reply, one message"),
    Metric("cluster_lease", "timer", "a lease of turns of the provider's cluster-wide rate"
           " from Redis (one round trip for a batch of messages; engine.cluster_rate)"),
    Metric("cluster_connections_call", "timer", "a round trip to Redis for the provider's"
           " cluster-wide connection slots: asking for one before a connection opens, giving"
           " one back, renewing the lease (engine.cluster_connections)"),
    Metric("cluster_connections_wait", "timer", "from the first caller refused a cluster"
           " connection slot of the provider to the next slot granted (or the callers gone"
           " back to the spool): one per episode of waiting (log line"
           " cluster_connections_full)"),
    Metric("cluster_hourly_lease", "timer", "a lease of a block of the provider's cluster-wide"
           " hourly budget from Redis (one round trip for a block of messages;"
           " engine.cluster_hourly)"),
    # counters
    Metric("delivered", "counter", "recipients delivered (2xx)"),
    Metric("deferred", "counter", "recipient attempts deferred (4xx or no answer)"),
    Metric("bounced", "counter", "recipients bounced (5xx)"),
    Metric("expired", "counter", "recipients expired: still undelivered when the job's time"
           " ran out", SUPERVISOR),
    Metric("bounced_category", "counter", "bounced recipients by the category of their refusal"
           " (engine.categories: bad-mailbox, blocklisted, ...)", PER_CATEGORY),
    Metric("deferred_category", "counter", "deferred recipient attempts by the category of"
           " their refusal", PER_CATEGORY),
    Metric("expired_category", "counter", "expired recipients by the category of their last"
           " refusal (message-expired when none was)", PER_CATEGORY),
    Metric("throttled", "counter", "transactions the provider pushed back on: a throttle rule,"
           " refusals recognised as push-back by behaviour, or a block"),
    Metric("pushback", "counter", "of the throttled: refusals in a row after accepted mail,"
           " recognised as push-back by behaviour, whatever their words"),
    Metric("blocked", "counter", "refusals saying the sending IP is blocked or listed: the"
           " IP x provider is suspended for throttle.block_suspend"),
    Metric("ambiguous", "counter", "recipient attempts deferred as possible duplicates: the"
           " end of the message was written and no reply to it came (connection lost or"
           " timed out, reused or not; or the worker's drain deadline)"),
    Metric("connections_opened", "counter", "new SMTP connections ready for MAIL (a TLS"
           " attempt retried on a fresh connection counts once)"),
    Metric("connections_reused", "counter", "messages sent on an already used connection"),
    Metric("connections_stale", "counter", "reused connections found dead at the start of a"
           " transaction, before the end of the message was written or with the server's 421"
           " farewell (replaced; no attempt counted)"),
    Metric("connections_check_failed", "counter", "idle connections that did not answer"
           " RSET within pool.reuse_check_timeout before reuse (half-open, or closed by the"
           " server): dropped, another one used; no attempt counted"),
    Metric("fd_exhausted", "counter", "connects or DNS lookups that failed because the worker"
           " is out of file descriptors (EMFILE, ENFILE): waited out and tried again; no"
           " attempt counted"),
    Metric("connections_failed", "counter", "connections to an MX address that could not be"
           " made ready (connect, banner, EHLO or required TLS failed)"),
    Metric("tls_negotiated", "counter", "connections upgraded with STARTTLS"),
    Metric("tls_failed", "counter", "TLS handshakes that failed (host then sent plaintext)"),
    Metric("tls_unverified", "counter", "TLS connections whose certificate did not verify"),
    Metric("plaintext", "counter", "connections that stayed plaintext"),
    Metric("mta_sts_ok", "counter", "transactions sent under an enforced MTA-STS policy (to an"
           " MX host it names, over TLS with a certificate valid for that host)"),
    Metric("mta_sts_refused", "counter", "deliveries an enforced MTA-STS policy stopped: no MX"
           " host it names, or none reachable over TLS with a valid certificate (deferred"
           " 4.7.x, never sent in plaintext)"),
    Metric("mta_sts_testing_failed", "counter", "transactions sent under an MTA-STS policy in"
           " testing mode that enforcing it would have refused (MX host not named, or no"
           " verified TLS): delivered all the same, logged as mta_sts_testing_failure"),
    Metric("providers_forgotten", "counter", "providers whose shaping state the worker dropped,"
           " idle for shaping.forget_after with nothing to keep (made anew with what it"
           " learned when mail comes again)", PER_IP),
    Metric("mta_sts_fetched", "counter", "MTA-STS policies fetched over HTTPS (new, changed"
           " id, or expired)", PER_IP),
    Metric("mta_sts_fetch_failed", "counter", "MTA-STS policy fetches that failed (HTTPS, a"
           " redirect, not text/plain, too large, too slow, not a valid policy): a cached"
           " policy keeps applying; without one the domain has none", PER_IP),
    Metric("tls_verify_ok", "counter", "transactions sent under a `verify` policy (smtp.tls or"
           " a tls_policy exception) over TLS with a valid certificate"),
    Metric("tls_verify_refused", "counter", "deliveries a `verify` policy stopped: no MX host"
           " reachable over TLS with a valid certificate (deferred)"),
    Metric("dane_ok", "counter", "transactions sent under DANE over TLS with a certificate"
           " that matched the MX host's TLSA records"),
    Metric("dane_refused", "counter", "deliveries DANE stopped: no MX host reachable over TLS"
           " with a certificate matching its TLSA records, or (DANE forced) none with TLSA"
           " records or an MX answer not DNSSEC-authenticated (deferred 4.7.5, never sent in"
           " plaintext)"),
    Metric("tls_policy_skipped", "counter", "transactions sent without the receiver's DANE or"
           " enforced MTA-STS policy because the message says TLS-Required: No (RFC 8689 5)"),
    Metric("requiretls_ok", "counter", "transactions of REQUIRETLS jobs sent (verified TLS,"
           " MAIL with REQUIRETLS)"),
    Metric("requiretls_refused", "counter", "deliveries of REQUIRETLS jobs no MX host could"
           " take: bounced 5.7.30 when every host lacks REQUIRETLS, else deferred"),
    Metric("dkim_signed", "counter", "messages signed with DKIM as they went out (once per"
           " hand-out and form, 7-bit or not; a dual-signed message counts once)"),
    Metric("dkim_failed", "counter", "messages of a DKIM signing domain with no key valid"
           " that day: deferred (451 4.3.5), or sent unsigned where the domain's"
           " unsigned_ok allows it"),
    Metric("rejected", "counter", "jobs refused at intake", SUPERVISOR),
    Metric("queued", "counter", "jobs accepted into the spool", SUPERVISOR),
    Metric("intake_refused", "counter", "valid jobs read at intake and not acknowledged because"
           " the spool could not be written (their producers send them again)", SUPERVISOR),
    Metric("spool_write_errors", "counter", "spool writes that failed (a full disk, an I/O"
           " error): intake pauses, results wait in memory", SUPERVISOR),
    Metric("set_aside", "counter", "spooled jobs that could not be decoded, set aside in the"
           " spool's corrupt table; each recipient left gets a bounced event", SUPERVISOR),
    Metric("duplicates", "counter", "deliveries of a recipient an earlier hand-out of its job"
           " had delivered already (each one a copy the receiver got twice)", SUPERVISOR),
    Metric("taken_back", "counter", "hand-outs taken back from a worker: it died, could not"
           " read the task, or the hand-out outlived its deadline", SUPERVISOR),
    Metric("resent_after_loss", "counter", "recipients sent again after their worker (or the"
           " supervisor) died without reporting them: each may be a second copy at the"
           " receiver", SUPERVISOR),
    Metric("events_replayed", "counter", "final events published again at start: a crash had"
           " left them in the spool's outbox, unconfirmed (engine.outbox)", SUPERVISOR),
    Metric("handouts_unmarked", "counter", "jobs handed out without their mark in the spool (it"
           " could not be written): a crash of the supervisor meanwhile could re-send one"
           " uncounted", SUPERVISOR),
    Metric("worker_restarts", "counter", "workers that exited without being asked to"
           " (crashed, killed, out of memory): each is restarted after a back-off;"
           " 0 is sent at every housekeeping pass", SUPERVISOR),
    Metric("clock_steps", "counter", "steps of the wall clock the supervisor noticed (more"
           " than 5 s either way, or a start below the spool's latest time): logged, never"
           " followed (engine.clock)", SUPERVISOR),
    # TLS-RPT (RFC 8460, engine.tlsrpt_store): sessions as the workers reported them
    *(Metric("tlsrpt_" + result.replace("-", "_"), "counter", what, SUPERVISOR)
      for result, what in (
        ("success", "TLS-RPT: successful sessions counted for a policy domain that asks for"
         " reports (a connection's first transaction for the domain)"),
        ("starttls-not-supported", "TLS-RPT: sessions failed as starttls-not-supported"),
        ("certificate-host-mismatch", "TLS-RPT: sessions failed as certificate-host-mismatch"),
        ("certificate-expired", "TLS-RPT: sessions failed as certificate-expired"),
        ("certificate-not-trusted", "TLS-RPT: sessions failed as certificate-not-trusted"),
        ("validation-failure", "TLS-RPT: sessions failed as validation-failure (a TLS"
         " failure of another kind, an MX host the MTA-STS policy does not name)"),
        ("tlsa-invalid", "TLS-RPT: sessions failed as tlsa-invalid (no TLSA record matched)"),
        ("dnssec-invalid", "TLS-RPT: sessions failed as dnssec-invalid (a TLSA lookup"
         " failed)"),
        ("dane-required", "TLS-RPT: sessions failed as dane-required (DANE forced by"
         " tls_policy.domains/providers: an MX host without usable TLSA records, or an MX"
         " answer not DNSSEC-authenticated)"),
        ("sts-policy-fetch-error", "TLS-RPT: MTA-STS policy fetches failed as"
         " sts-policy-fetch-error"),
        ("sts-policy-invalid", "TLS-RPT: MTA-STS policies refused as sts-policy-invalid"),
        ("sts-webpki-invalid", "TLS-RPT: MTA-STS policy servers whose certificate did not"
         " verify (sts-webpki-invalid)"))),
    Metric("tlsrpt_reports_made", "counter", "TLS-RPT reports made (one per policy domain with"
           " a rua and sessions counted, per period)", SUPERVISOR),
    Metric("tlsrpt_reports_sent", "counter", "TLS-RPT reports a rua accepted (an https POST"
           " answered 2xx, or the mailed report spooled as a job)", SUPERVISOR),
    Metric("tlsrpt_reports_failed", "counter", "tries to send a TLS-RPT report to a rua that"
           " failed (tried again after tlsrpt.retry)", SUPERVISOR),
    Metric("tlsrpt_reports_given_up", "counter", "TLS-RPT reports dropped, not accepted by"
           " every rua after tlsrpt.give_up", SUPERVISOR),
    Metric("cluster_fallbacks", "counter", "times the process lost the cluster's Redis"
           " (down, unreachable, slower than cluster.timeout) and fell back to what it knows"
           " alone (engine.cluster)", EVERY_PROCESS),
    Metric("cluster_turns_lost", "counter", "turns of the provider's cluster-wide rate leased"
           " and not taken in time (the messages they were leased for went elsewhere)"),
    Metric("cluster_connections_denied", "counter", "asks for one of the provider's"
           " cluster-wide connection slots refused (the cluster at its cluster_connections,"
           " or this worker at its share while others wait)"),
    Metric("cluster_connections_shed", "counter", "idle connections to the provider closed"
           " because this worker held more than its share of the cluster's slots while"
           " other workers waited"),
    Metric("cluster_suspensions_published", "counter", "suspensions of the provider this"
           " worker saw (a block, a throttle rule's suspend) published to the cluster's Redis"
           " for the other hosts to follow (engine.cluster_suspend)"),
    Metric("cluster_suspensions_followed", "counter", "suspensions of the provider another"
           " host of the cluster saw and published, followed by this worker (log line"
           " provider_suspended_elsewhere)"),
    Metric("cluster_ceilings_followed", "counter", "times the worker, having learned no"
           " limit of the provider yet, started at the limit another worker of the cluster"
           " learned from a push-back (log line provider_ceiling_shared)"),
    Metric("cluster_state_rebuilt", "counter", "suspensions and learned ceilings of the"
           " provider this worker set in the cluster's Redis at its return: set again, Redis"
           " having lost them (restarted without persistence, flushed), or published late,"
           " met while Redis was away; and its hourly budgets' counts of the last hour"
           " added back, Redis having lost them: the cluster's state rebuilt (log line"
           " cluster_state_rebuilt)"),
    Metric("duplicates_elsewhere", "counter", "jobs acknowledged as duplicates because"
           " another host of the cluster accepted their id within cluster.duplicate_window"
           " (not spooled here)", SUPERVISOR),
    Metric("claimed_elsewhere", "counter", "jobs not acknowledged because another host of the"
           " cluster was spooling the same id that instant (their producers send them again)",
           SUPERVISOR),
    Metric("dedup_unchecked", "counter", "jobs read at intake while the cluster's Redis was"
           " unreachable: only this spool's own duplicate check applied", SUPERVISOR),
    # gauges
    Metric("cluster_mode", "gauge", "the process's link to the cluster's Redis: 0 off (no"
           " cluster configured), 1 fallback (Redis unreachable), 2 shared", EVERY_PROCESS,
           "mode"),
    Metric("cluster_members", "gauge", "workers (of every host) sharing the provider's"
           " cluster-wide rate, as Redis said at the last lease", PER_PROVIDER, "workers"),
    Metric("cluster_connections_held", "gauge", "the provider's cluster-wide connection"
           " slots this worker holds (its connections open or closing)", PER_PROVIDER,
           "connections"),
    Metric("cluster_hourly_left", "gauge", "messages left of the provider's cluster-wide"
           " hourly budget over the last hour (every host together), as Redis said at the"
           " worker's last lease", PER_PROVIDER, "messages"),
    Metric("connections_open", "gauge", "open SMTP connections of the worker", PER_IP,
           "connections"),
    Metric("in_flight", "gauge", "tasks (jobs) the worker is delivering", PER_IP, "jobs"),
    Metric("shaping_providers", "gauge", "providers whose shaping state the worker holds (an"
           " idle one is forgotten after shaping.forget_after)", PER_IP, "providers"),
    Metric("ip_down", "gauge", "1 while the host does not hold the worker's sending IP (a"
           " bind to it fails): the worker takes no jobs; else 0", PER_IP, "flag"),
    Metric("allowed_rate", "gauge", "messages per second allowed by shaping", PER_PROVIDER,
           "messages/s"),
    Metric("suspended", "gauge", "1 while sending from this IP to this provider is"
           " suspended (a block, a throttle rule that suspends), else 0", PER_PROVIDER,
           "flag"),
    Metric("spool_depth", "gauge", "recipients waiting in the spool", SUPERVISOR,
           "recipients"),
    Metric("oldest_queued_age", "gauge", "age of the oldest job in the spool (from its"
           " acceptance to now), 0 when the spool is empty", SUPERVISOR, "seconds"),
    Metric("spool_unwritable", "gauge", "1 while spool writes fail (a full disk, an I/O"
           " error), else 0", SUPERVISOR, "flag"),
    Metric("events_log_unwritable", "gauge", "1 while the events log cannot be written (a full"
           " disk, an I/O error): events go on to subscribers, final events wait in the"
           " spool's outbox for the log; else 0", SUPERVISOR, "flag"),
    Metric("results_unrecorded", "gauge", "results waiting in memory for the spool to be"
           " writable again", SUPERVISOR, "results"),
    Metric("memory_rss", "gauge", "resident memory of the process", EVERY_PROCESS, "bytes"),
    Metric("gc_pause", "timer", "a full collection of Python's cyclic garbage collector (the"
           " oldest generation), during which the process's loop does nothing else",
           EVERY_PROCESS),
)

KINDS = {m.name: m.kind for m in DECLARED}


def ip_segment(ip: str) -> str:
    return ip.replace(".", "_").replace(":", "_")


def provider_segment(provider: str) -> str:
    return provider.replace(".", "_") or "unknown"


class Metrics:
    """A thin, failure-proof StatsD emitter for one process (one sending IP)."""

    # Stats held in a batch before it is sent anyway (a few UDP packets' worth).
    MAX_BATCH = 64
    # Metric names built, by (metric, provider): one per message would be a string
    # formatting each; emptied when full (providers are domains: no fixed bound).
    MAX_NAMES = 4096

    def __init__(self, client: Any | None, ip: str) -> None:
        self._client = client
        self._sink: Any | None = client  # the client, or its pipeline when batching
        self._pending = 0  # stats in the pipeline not sent yet
        self._schedule: Callable[[Callable[[], None]], object] | None = None
        self._ip = ip_segment(ip)
        self._names: Memo[tuple[str, str], str] = Memo(self.MAX_NAMES)

    @classmethod
    def create(cls, host: str, port: int, prefix: str, ip: str, enabled: bool = True) -> Metrics:
        if not enabled:
            return cls(None, ip)
        try:
            import statsd  # imported here: only the processes that emit need it
            client = statsd.StatsClient(host, port, prefix=prefix)
        except Exception as exc:  # an unresolvable StatsD host must not stop delivery
            log.warning("event=statsd_disabled host=%s reason=%r", host, str(exc)[:120])
            client = None
        return cls(client, ip)

    def batched(self, schedule: Callable[[Callable[[], None]], object] | None = None) -> None:
        """Hold stats and send them packed into few UDP packets (statsd's pipeline: up to
        512 bytes each) at `flush()`: one sendto() per packet instead of one per stat, a
        good part of a message's CPU otherwise. `schedule`, if given, is called with
        `flush` when a batch starts (the worker passes gevent's `run_callback`: the batch
        goes at the end of the event loop's turn); without it the owner calls `flush()`.
        StatsD aggregates over seconds, so holding stats for one loop turn changes nothing
        on a graph."""
        if self._client is not None:
            self.flush()
            self._sink = self._client.pipeline()
            self._schedule = schedule

    def flush(self) -> None:
        """Send the stats held by `batched()` mode, if any."""
        if self._pending and self._sink is not None:
            self._pending = 0
            try:
                self._sink.send()
            except OSError:  # fire and forget
                pass

    def close(self) -> None:
        """Send what is held, then close the StatsD socket; stats after this are dropped."""
        self.flush()
        client, self._client, self._sink = self._client, None, None
        if client is not None:
            client.close()

    def name(self, metric: str, provider: str) -> str:
        name = self._names.get((metric, provider))
        if name is None:
            if metric not in KINDS:
                raise KeyError(f"undeclared metric {metric!r}")
            name = self._names.keep((metric, provider),
                                    f"{self._ip}.{provider_segment(provider)}.{metric}")
        return name

    def timing(self, metric: str, provider: str, ms: float) -> None:
        self._send("timing", self.name(metric, provider), ms)

    def incr(self, metric: str, provider: str, count: int = 1) -> None:
        self._send("incr", self.name(metric, provider), count)

    def gauge(self, metric: str, provider: str, value: float) -> None:
        self._send("gauge", self.name(metric, provider), value)

    def memory(self) -> None:
        self.gauge("memory_rss", "all", rss_bytes())

    def _send(self, method: str, name: str, value: float) -> None:
        if self._sink is None:
            return
        try:
            getattr(self._sink, method)(name, value)
        except OSError:  # fire and forget
            pass
        if self._sink is not self._client:
            self._pending += 1
            if self._pending == 1 and self._schedule is not None:
                self._schedule(self.flush)
            elif self._pending >= self.MAX_BATCH:
                self.flush()


def rss_bytes() -> int:
    """Current resident set size, from /proc (falls back to the peak)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            pages = int(f.read().split()[1])
        return pages * resource.getpagesize()
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
