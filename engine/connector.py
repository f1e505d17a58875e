"""Opening a ready-to-send connection to one MX host.

Address lookup, TCP connect from the sending IP, banner, EHLO and STARTTLS by
the TLS policy, each phase timed. A failure here is the connection's fault
(`Blame.CONNECTION`): the caller moves on to the next MX host; but running out of file
descriptors is the worker's (`DescriptorsExhausted`): no other address is tried, and the
caller waits and tries again (engine.delivery). So is a sending IP the host does not hold
(any more): a bind that fails with EADDRNOTAVAIL, confirmed by a bind test, is
`SendingIpGone` and marks the IP down (engine.sendingip); without the confirmation it is an
ordinary connection failure. Every connection gets TCP keepalive
(`pool.keepalive_*`). A failed TLS
handshake is retried once in plaintext on a fresh connection (the host is
remembered as TLS-broken); a certificate that only fails verification is retried
once without the check (remembered as unverifiable, `smtp.tls_unverified_ttl`). One
verifying handshake per host at a time: a connection that reaches STARTTLS while another
checks the same host's certificate waits for the verdict and follows it (engine.tls).
Opening one connection, all phases together, takes at most `timeouts.setup`.

Prohibited destinations: unless `host` is a configured route, every address of
it must pass the `DestinationPolicy` (by default: a public unicast address, not
loopback, private, link-local...). Refused addresses are skipped; a host left
with none fails with 451 4.4.4 and is never connected to (docs/SECURITY.md).

DANE (engine.dane, mode `dane` from engine.tlspolicy): a host with usable TLSA records must
offer STARTTLS and present a certificate that matches one after the handshake, else it fails
with 4.7.5 (no fallback, no plaintext); a host without gets the default plan (smtp.tls), or
fails with 4.7.5 in mode `dane-only` (DANE forced by the operator).

TLS-RPT (engine.tlsrpt): an error raised because a session failed for a TLS reason
(STARTTLS missing where required, a certificate that does not verify, no TLSA record
matching, a TLSA lookup that failed) is tagged with its RFC 8460 result type, once, here.
"""
from __future__ import annotations

import ipaddress
import logging
import socket
import time
from dataclasses import dataclass

from engine import classify, logs, tlsrpt
from engine import dane as dane_
from engine.config import Timeouts
from engine.metrics import Metrics
from engine.mx import DestinationPolicy, MxHost, Resolver
from engine.reply import DeliveryError, SendingIpGone, TlsError, TransientError, WorkerFault
from engine.sendingip import SendingIp
from engine.smtp import Connection, Keepalive, ReplyLimits
from engine.tls import TlsPlan, TlsPolicy, is_verify_failure

log = logging.getLogger("mailengine.connector")

DANE = "dane"  # the TLS mode of a delivery under DANE (engine.tlspolicy)
_DANE_MODES = (DANE, dane_.REQUIRED)  # the second: forced, a host without TLSA fails


@dataclass(frozen=True)
class Identity:
    """Who we are on the wire: the sending IP and the EHLO name that goes with it."""

    address: str
    helo: str

    @property
    def family(self) -> int:
        return socket.AF_INET6 if ipaddress.ip_address(self.address).version == 6 \
            else socket.AF_INET


class Connector:
    def __init__(self, identity: Identity, resolver: Resolver, tls: TlsPolicy,
                 timeouts: Timeouts, limits: ReplyLimits, metrics: Metrics,
                 destinations: DestinationPolicy | None = None,
                 keepalive: Keepalive | None = None,
                 sending_ip: SendingIp | None = None,
                 dane: dane_.Dane | None = None) -> None:
        self.identity = identity
        # Whether the host holds identity.address (the worker's, which reports it).
        self.sending_ip = sending_ip or SendingIp(identity.address)
        self.resolver = resolver
        self.tls = tls
        self.timeouts = timeouts
        self.limits = limits
        self.metrics = metrics
        self.destinations = destinations or DestinationPolicy()  # strict unless told
        self.keepalive = keepalive  # TCP keepalive on every connection (None: off)
        self.dane = dane  # TLSA lookups for mode `dane` (None: DANE is off)
        self.tlsrpt: tlsrpt.Sessions | None = None  # failed sessions tagged (None: off)

    def open(self, host: MxHost, provider: str, routed: bool = False, mode: str | None = None,
             requiretls: bool = False) -> Connection:
        """A connection to `host` ready for MAIL; tries each of its addresses in turn.

        `routed`: `host` is a configured route, exempt from the destination policy. `mode`:
        the TLS mode the domain's policy asks for (engine.tlspolicy; None: smtp.tls).
        `requiretls`: the connection is for jobs that require TLS end to end (RFC 8689):
        TLS with a verified certificate and REQUIRETLS offered, else the host fails.
        """
        last: DeliveryError | None = None
        addresses = self.resolver.addresses(host.name, self.identity.family)
        if not routed:
            addresses = self._permitted(host, addresses)
        for address in addresses[:4]:
            try:
                return self._open_at(host, address, provider, mode=mode,
                                     requiretls=requiretls)
            except SendingIpGone as err:
                if self.sending_ip.check():
                    raise  # the worker's: another address would fail the same
                last = TransientError(err.reply, err.command)  # held: not the IP after all
                self.metrics.incr("connections_failed", provider)
            except WorkerFault:
                raise  # the worker's: another address would fail the same
            except DeliveryError as err:
                self.metrics.incr("connections_failed", provider)
                last = err
        assert last is not None  # addresses() raises rather than return nothing
        raise last

    def check_destination(self, host: MxHost) -> None:
        """Refuse a prohibited MX host before any pool is involved (TransientError 4.4.4).

        The caller's early check: a refusal inside a pool's connection factory would put
        that pool in connect backoff, and a route to the same host and port shares it.
        """
        self._permitted(host, self.resolver.addresses(host.name, self.identity.family))

    def _permitted(self, host: MxHost, addresses: list[str]) -> list[str]:
        """The addresses mail may go to; TransientError (4.4.4) when none is left."""
        refusals = {a: self.destinations.refusal(a) for a in addresses}
        allowed = [a for a, why in refusals.items() if why is None]
        if allowed:
            return allowed
        why = "; ".join(str(reason) for reason in refusals.values())
        log.warning(logs.kv("prohibited_destination", mx=host.name, why=why))
        raise classify.prohibited_destination(host.name, why)

    def _open_at(self, host: MxHost, address: str, provider: str,
                 plan: TlsPlan | None = None, mode: str | None = None,
                 requiretls: bool = False) -> Connection:
        if plan is None:
            try:
                plan = self._tls_plan(host, mode)
            except TransientError as err:
                if mode in _DANE_MODES and not isinstance(err, WorkerFault):  # the TLSA lookup
                    result = (tlsrpt.DANE_REQUIRED if isinstance(err, dane_.NoTlsa)
                              else tlsrpt.DNSSEC_INVALID)
                    raise self._tagged(err, result, address) from None
                raise
        conn = Connection(self.identity.helo, self.identity.address, self.timeouts, self.limits,
                          self.keepalive)
        try:
            with conn.deadline("setup", self.timeouts.setup):
                self._greet(conn, address, host.port, provider)
                if plan.checking:  # what another connection found meanwhile, if it checked
                    self.tls.await_verdict(host.name, self.timeouts.setup, host.port)
                    plan = self._tls_plan(host, mode)
                if plan.attempt and conn.has_extn("starttls"):
                    if plan.checking:
                        with self.tls.verifying(host.name, host.port):
                            self._starttls(conn, plan, host, provider)
                    else:
                        self._starttls(conn, plan, host, provider)
                elif plan.dane:
                    raise self._tagged(classify.dane_no_starttls(host.name),
                                       tlsrpt.STARTTLS_NOT_SUPPORTED, address)
                elif plan.required:
                    raise self._tagged(classify.tls_not_offered(host.name),
                                       tlsrpt.STARTTLS_NOT_SUPPORTED, address)
                if requiretls:
                    _check_requiretls(conn, host)
        except TlsError as err:
            conn.close()
            if plan.required and not plan.dane:  # raised again: a failed session
                self._tagged(err, tlsrpt.verify_result(err), address)
            elif plan.required:
                self._tagged(err, tlsrpt.VALIDATION_FAILURE, address)
            return self._after_tls_failure(err, plan, host, address, provider)
        except BaseException:
            conn.close()
            raise
        self.metrics.incr("connections_opened", provider)
        if conn.tls_version is None:
            self.metrics.incr("plaintext", provider)
        return conn

    def _tls_plan(self, host: MxHost, mode: str | None = None) -> TlsPlan:
        """The TLS plan for `host`; building its context reads the CA file, which needs a
        file descriptor too. In mode `dane`, the host's TLSA records decide (the lookup
        failing fails the host)."""
        if mode in _DANE_MODES:
            records = self.dane.records(host.name) if self.dane is not None else ()
            if records:
                return self.tls.dane(records)
            if mode == dane_.REQUIRED:  # forced by the operator: no TLSA, no mail
                raise dane_.no_tlsa(host.name)
            mode = None  # no usable record: the default, as if DANE did not apply
        try:
            return self.tls.plan(host.name, mode)
        except OSError as exc:
            if classify.out_of_descriptors(exc):
                raise classify.descriptors_exhausted(exc, "TLS") from exc
            raise

    def _greet(self, conn: Connection, address: str, port: int, provider: str) -> None:
        started = time.monotonic()
        banner = conn.open(address, port)
        self.metrics.timing("connect", provider, _ms(started))
        if not banner.ok:  # 421 or 554 at the banner: try the next MX host
            raise classify.turned_away(banner, "BANNER")
        started = time.monotonic()
        ehlo = conn.hello()
        self.metrics.timing("ehlo", provider, _ms(started))
        if not ehlo.ok:
            raise classify.turned_away(ehlo, "EHLO")

    def _starttls(self, conn: Connection, plan: TlsPlan, host: MxHost, provider: str) -> None:
        assert plan.context is not None
        started = time.monotonic()
        reply = conn.starttls_upgrade(plan.context, host.name if plan.context.check_hostname
                                      else None)
        if reply.code == 220 and plan.dane:
            assert conn.sock is not None
            if not dane_.check(plan.dane, dane_.peer_chain(conn.sock), host.name):
                raise self._tagged(classify.dane_mismatch(host.name), tlsrpt.TLSA_INVALID,
                                   _peer(conn))
            conn.tls_verified = True  # authenticated by DANE (RFC 7672 3)
        if reply.code == 220:
            self.metrics.timing("tls_handshake", provider, _ms(started))
            self.metrics.incr("tls_negotiated", provider)
            if not conn.tls_verified:
                self.metrics.incr("tls_unverified", provider)
        elif plan.dane:
            raise self._tagged(classify.dane_no_starttls(host.name),
                               tlsrpt.STARTTLS_NOT_SUPPORTED, _peer(conn))
        elif plan.required:  # 454 and friends: fine for opportunistic, not here
            raise self._tagged(classify.tls_refused(host.name, reply),
                               tlsrpt.STARTTLS_NOT_SUPPORTED, _peer(conn))

    def _tagged(self, err: DeliveryError, result: str, address: str | None) -> DeliveryError:
        """`err`, the failure of a session for a TLS reason, tagged for TLS-RPT."""
        if self.tlsrpt is not None:
            self.tlsrpt.tag(err, result, address)
        return err

    def _after_tls_failure(self, err: TlsError, plan: TlsPlan, host: MxHost, address: str,
                           provider: str) -> Connection:
        """Retry once on a fresh connection: without the check, or in plaintext."""
        if plan.required:
            raise err
        retry = self.tls.fallback(plan, is_verify_failure(err))
        if retry.attempt:
            self.tls.mark_unverifiable(host.name)
        else:
            self.metrics.incr("tls_failed", provider)
            self.tls.mark_broken(host.name)
        # The retry follows `retry`, not the policy's memory: with smtp.tls_broken_ttl 0 the
        # memory is gone at once and the retry would try the same handshake, for ever.
        return self._open_at(host, address, provider, retry)


def _peer(conn: Connection) -> str | None:
    return conn.peer[0] if conn.peer else None


def _check_requiretls(conn: Connection, host: MxHost) -> None:
    """RFC 8689 4.2.1: a REQUIRETLS message goes only over TLS with a verified certificate,
    to a server that offers REQUIRETLS (after STARTTLS: the EHLO that counts)."""
    if conn.tls_version is None or not conn.tls_verified:
        raise classify.requiretls_unverified(host.name)
    if not conn.has_extn("requiretls"):
        raise classify.requiretls_not_offered(host.name)


def _ms(started: float) -> float:
    return (time.monotonic() - started) * 1000.0
