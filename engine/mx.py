"""Where a domain's mail goes: MX lookup (RFC 5321 5.1) with a TTL-honouring cache.

`Resolver.destination(domain)` gives the hosts to try, in order: a configured
route (a fixed next hop, no DNS), else the domain's MX hosts by preference
(equal preferences shuffled on every call, so the load spreads), else the
domain itself when it has no MX but has an address (the "implicit MX"). A null
MX (RFC 7505) or a domain that does not exist is a permanent failure of the
message; a DNS failure (SERVFAIL, timeout, no nameserver) a transient one.

`Resolver.addresses(host)` resolves one MX host. Its failures blame the
connection: the caller moves on to the next host.

`DestinationPolicy` (engine.destinations, re-exported here) says which addresses mail may
go to: by default none that is loopback, private, link-local, multicast or otherwise not a
public unicast address (docs/SECURITY.md); the connector applies it to every MX host that
is not a configured route.

DNSSEC (for DANE, engine.dane): with `trusted_ad` the queries carry the EDNS DO bit and the
AD flag, and an answer counts as authenticated when the resolver set AD in its reply. The
resolver must then be a validating one the engine trusts (on the host or over a trusted
path: `dns.trusted_ad`, Postfix's `smtp_dns_support_level = dnssec`); without `trusted_ad`
no answer is ever authenticated, whatever its flags say.

Both share one LRU cache keyed (name, rdtype). It keeps an answer for its TTL
and a "no such name" or "no such record" for the SOA's negative TTL (RFC 2308),
but never a failure: the next message asks again. The lookups are plain,
blocking dnspython; in a worker, gevent's monkey patching makes them yield.

Bounded (issue #19, "many destinations"): at most `max_in_flight` queries are out at once
(`dns.max_in_flight`; the rest wait their turn, within their own lookup's `timeout`), and a
name already being asked is not asked again: callers wanting the same (name, type) meanwhile
wait for that one answer (or its failure). A burst to 10,000 new domains is then 10,000 MX
queries at the bound's pace, not a thousand at once, nor one per message to a domain.
"""
from __future__ import annotations

import functools
import ipaddress
import random
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rdata
import dns.rdatatype
import dns.rdtypes.ANY.SOA
import dns.rdtypes.mxbase
import dns.resolver

from engine import classify
from engine.config import Route, names
from engine.destinations import DestinationPolicy, IPAddress
from engine.memo import Memo
from engine.reply import Blame, PermanentError, TransientError

__all__ = ["Destination", "DestinationPolicy", "MxHost", "Resolver", "ResolverStats", "Route"]

_MAX_TTL = 86400  # a day: a huge TTL must not pin a stale answer for weeks
_MAX_NEGATIVE_TTL = 300
_UNKNOWN_NEGATIVE_TTL = 60  # the answer carried no SOA
_TRY_TIMEOUT = 2.0  # per nameserver, so a silent one leaves time to ask the next
_ADDRESS_TYPES: dict[int, dns.rdatatype.RdataType] = {
    socket.AF_INET: dns.rdatatype.A,
    socket.AF_INET6: dns.rdatatype.AAAA,
}


@dataclass(frozen=True)
class MxHost:
    """One host to try: a host name (lowercase, no trailing dot) or, for routes, an IP."""

    name: str
    preference: int
    port: int


@dataclass(frozen=True)
class Destination:
    """A domain's hosts in the order to try them."""

    domain: str  # lowercase ASCII (IDNA), no trailing dot
    hosts: tuple[MxHost, ...]
    implicit: bool = False  # no MX records: the domain's own A/AAAA (RFC 5321 5.1)
    routed: bool = False  # a configured fixed next hop, not DNS
    # The MX answer (or, implicit, the address) was authenticated by a trusted validating
    # resolver (DNSSEC): DANE applies only then (RFC 7672 2.2).
    authenticated: bool = False


@dataclass
class ResolverStats:
    """Counters since the resolver was made, for the metrics module to report."""

    queries: int = 0  # lookups sent to DNS
    cache_hits: int = 0
    failures: int = 0  # SERVFAIL, timeouts, network errors
    joined: int = 0  # lookups that waited for the same question already asked
    in_flight: int = 0  # queries out now
    peak_in_flight: int = 0  # the most out at once

    def figures(self) -> dict[str, int]:
        return {"queries": self.queries, "cache_hits": self.cache_hits,
                "failures": self.failures, "joined": self.joined,
                "in_flight": self.in_flight, "peak_in_flight": self.peak_in_flight}


class _Flight:
    """One question being asked: the callers asking it meanwhile wait for its outcome."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.answer: _Answer | None = None
        self.error: BaseException | None = None


@dataclass(frozen=True)
class _Answer:
    """One lookup's result as cached; no records is NXDOMAIN or "no such record"."""

    records: tuple[dns.rdata.Rdata, ...]
    nxdomain: bool
    expires: float  # on the resolver's clock
    secure: bool = False  # the trusted resolver set AD (DNSSEC-validated): engine.dane
    # The records as text, made once: an address answer is read at every message to its
    # host (engine.connector's destination check), and dnspython's to_text() is slow.
    texts: tuple[str, ...] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "texts", tuple(rd.to_text() for rd in self.records))


class Resolver:
    """MX and address lookups through one cache; greenlet-safe, one per worker.

    `nameservers` empty means the system resolver (/etc/resolv.conf); `timeout`
    is the lifetime of one lookup; `routes` maps a domain (or "*", every
    domain) to a fixed next hop; `clock` lets tests move time without sleeping;
    `max_in_flight` bounds the queries out at once.
    """

    def __init__(self, nameservers: Sequence[str] = (), port: int = 53, timeout: float = 5.0,
                 routes: Mapping[str, Route] | None = None, smtp_port: int = 25,
                 cache_size: int = 50000, clock: Callable[[], float] = time.monotonic,
                 trusted_ad: bool = False, max_in_flight: int = 32) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self._dns = _stub_resolver(nameservers, port, timeout, trusted_ad)
        self.trusted_ad = trusted_ad
        self._timeout = timeout
        self._routes = {_route_key(key): route for key, route in (routes or {}).items()}
        self._smtp_port = smtp_port
        self._cache: OrderedDict[tuple[str, int], _Answer] = OrderedDict()
        self._cache_size = cache_size
        self._clock = clock
        self.stats = ResolverStats()
        # threading's, which a worker's monkey patching makes gevent's: a greenlet waits.
        self._slots = threading.BoundedSemaphore(max_in_flight)
        self._flights: dict[tuple[str, int], _Flight] = {}
        # A routed domain's Destination, by the domain as asked: routes are fixed config, so
        # the answer never changes; built once rather than normalising the domain and
        # parsing the route's host at every message. Emptied when full.
        self._routed: Memo[str, Destination] = Memo(cache_size)

    def destination(self, domain: str) -> Destination:
        """The hosts to try for mail to `domain`.

        Raises PermanentError (bounce) or TransientError (try later), both
        blaming the message: no other host would do better.
        """
        dest = self._routed.get(domain)
        if dest is not None:
            return dest
        name = _normalize_domain(domain)
        route = self._routes.get(name) or self._routes.get("*")
        if route is not None:
            port = route.port or self._smtp_port
            return self._routed.keep(domain, Destination(
                name, (MxHost(_host_name(route.host), 0, port),), routed=True))
        literal = _domain_literal(name)
        if literal is not None:  # user@[192.0.2.1]: the address is the host
            return Destination(name, (MxHost(str(literal), 0, self._smtp_port),), implicit=True)
        return self._mx(name)

    def addresses(self, host: str, family: int = socket.AF_INET) -> list[str]:
        """The addresses of MX host `host` in `family` (A or AAAA), shuffled; never empty.

        An IP literal is its own address. Failures are TransientErrors that
        blame the connection: the caller tries the next MX host.
        """
        rdtype = _ADDRESS_TYPES.get(family)
        if rdtype is None:
            raise ValueError(f"unsupported address family {family!r}")
        name = _host_name(host)
        literal = _ip_literal(name)
        if literal is not None:
            found = [name] if _family(literal) == family else []
        else:
            found = list(self._lookup(name, rdtype, Blame.CONNECTION).texts)
        if not found:
            raise classify.no_address(name)
        random.shuffle(found)  # else a cached answer sends every connection to one address
        return found

    def txt(self, name: str) -> list[str]:
        """The TXT records of `name` (each record's strings joined, as ASCII text), through
        the same cache; [] for none. A DNS failure is a TransientError (engine.mtasts)."""
        answer = self._lookup(name.rstrip(".").lower(), dns.rdatatype.TXT, Blame.MESSAGE)
        return [b"".join(getattr(rd, "strings", ())).decode("ascii", "replace")
                for rd in answer.records]

    def tlsa(self, host: str, port: int = 25) -> tuple[list[dns.rdata.Rdata], bool]:
        """The TLSA records at `_<port>._tcp.<host>` and whether the answer was authenticated
        (engine.dane). A DNS failure is a TransientError blaming the connection: RFC 7672
        2.2 makes a host whose TLSA lookup fails unusable, the next MX host is tried."""
        name = f"_{port}._tcp.{_host_name(host)}"
        answer = self._lookup(name, dns.rdatatype.TLSA, Blame.CONNECTION)
        return list(answer.records), answer.secure

    def addresses_secure(self, host: str, family: int = socket.AF_INET) -> bool:
        """Whether `host`'s address answer in `family` was authenticated (RFC 7672 2.2.2:
        no TLSA lookup for a host whose address is not). A failure raises as addresses()."""
        rdtype = _ADDRESS_TYPES[family]
        return self._lookup(_host_name(host), rdtype, Blame.CONNECTION).secure

    def _mx(self, domain: str) -> Destination:
        answer = self._lookup(domain, dns.rdatatype.MX, Blame.MESSAGE)
        if answer.nxdomain:
            raise classify.no_such_domain(domain)
        if not answer.records:
            return self._implicit(domain, answer.secure)
        hosts = self._by_preference(answer.records)
        if not hosts:
            raise classify.null_mx(domain)
        return Destination(domain, hosts, authenticated=answer.secure)

    def _implicit(self, domain: str, mx_secure: bool) -> Destination:
        # RFC 5321 5.1: with no MX records the domain itself is the host, if it has an address.
        for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            found = self._lookup(domain, rdtype, Blame.MESSAGE)
            if found.records:
                host = MxHost(domain, 0, self._smtp_port)
                return Destination(domain, (host,), implicit=True,
                                   authenticated=mx_secure and found.secure)
        raise classify.no_mx_or_address(domain)

    def _by_preference(self, records: Iterable[dns.rdata.Rdata]) -> tuple[MxHost, ...]:
        """MX hosts by preference, shuffled within a preference, each host once.

        A null MX (RFC 7505: one MX of exchange ".") gives no hosts; "." among
        real hosts is skipped. Exchanges that are IP literals or "localhost" stay
        as names here: refusing prohibited destinations is the caller's job.
        """
        best: dict[str, int] = {}
        for rd in records:
            if isinstance(rd, dns.rdtypes.mxbase.MXBase) and rd.exchange != dns.name.root:
                name = rd.exchange.to_text(omit_final_dot=True).lower()
                best[name] = min(rd.preference, best.get(name, rd.preference))
        names = list(best)
        random.shuffle(names)
        names.sort(key=best.__getitem__)  # a stable sort keeps the shuffle within a preference
        return tuple(MxHost(name, best[name], self._smtp_port) for name in names)

    def _lookup(self, name: str, rdtype: dns.rdatatype.RdataType, blame: Blame) -> _Answer:
        key = (name, int(rdtype))
        answer = self._cached(key)
        if answer is not None:
            self.stats.cache_hits += 1
            return answer
        flight = self._flights.get(key)
        if flight is not None:  # asked already: wait for that answer
            self.stats.joined += 1
            if not flight.done.wait(self._timeout + 1.0):
                raise classify.dns_failed(name, "timed out", blame)
            if flight.answer is None:
                raise _as_own(flight.error, blame)
            return flight.answer
        flight = self._flights[key] = _Flight()
        try:
            answer = self._bounded_query(name, rdtype, blame)
        except BaseException as exc:
            flight.error = exc
            raise
        else:
            flight.answer = answer
            self._remember(key, answer)
            return answer
        finally:
            del self._flights[key]
            flight.done.set()

    def _bounded_query(self, name: str, rdtype: dns.rdatatype.RdataType,
                       blame: Blame) -> _Answer:
        """`_query` within the bound: waits for a slot first. The wait is not timed: it is
        local congestion, no fault of the nameservers nor reason to defer the message, and
        it ends (each query out ends within `timeout`, the waiters are at most the worker's
        tasks in flight)."""
        self._slots.acquire()
        stats = self.stats
        stats.in_flight += 1
        stats.peak_in_flight = max(stats.peak_in_flight, stats.in_flight)
        try:
            return self._query(name, rdtype, blame)
        finally:
            stats.in_flight -= 1
            self._slots.release()

    def _query(self, name: str, rdtype: dns.rdatatype.RdataType, blame: Blame) -> _Answer:
        """Ask DNS; TransientError (not cached) when no nameserver gives an answer."""
        try:
            qname = dns.name.from_text(name)
        except dns.exception.DNSException:  # e.g. too long: no such name can exist
            return _Answer((), True, 0.0)
        self.stats.queries += 1
        now = self._clock()
        try:
            answer = self._dns.resolve(qname, rdtype, search=False, lifetime=self._timeout)
        except dns.resolver.NXDOMAIN as exc:
            responses = list(exc.responses().values())
            return _Answer((), True, now + _negative_ttl(responses),
                           self.trusted_ad and all(_ad(r) for r in responses))
        except dns.resolver.NoAnswer as exc:
            return _Answer((), False, now + _negative_ttl([exc.response()]),
                           self.trusted_ad and _ad(exc.response()))
        except (dns.exception.DNSException, OSError) as exc:
            self.stats.failures += 1
            cause = _out_of_descriptors(exc)
            if cause is not None:  # the worker's fault, not the nameservers'
                raise classify.descriptors_exhausted(cause, "DNS") from exc
            raise classify.dns_failed(name, _why(exc), blame) from exc
        # minimum_ttl covers the CNAME chain as well as the answer itself
        ttl = min(answer.chaining_result.minimum_ttl, _MAX_TTL)
        return _Answer(tuple(answer.rrset or ()), False, now + ttl,
                       self.trusted_ad and _ad(answer.response))

    def _cached(self, key: tuple[str, int]) -> _Answer | None:
        answer = self._cache.get(key)
        if answer is None:
            return None
        if answer.expires <= self._clock():
            del self._cache[key]
            return None
        self._cache.move_to_end(key)
        return answer

    def _remember(self, key: tuple[str, int], answer: _Answer) -> None:
        if answer.expires <= self._clock() or self._cache_size <= 0:
            return
        self._cache[key] = answer
        self._cache.move_to_end(key)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)


def _as_own(error: BaseException | None, blame: Blame) -> BaseException:
    """The failure of a lookup another caller made, for this one: a DNS failure blames as
    this caller's lookup would (a domain's A lookup blames the message, an MX host's the
    connection); the worker's own trouble (WorkerFault) stays as it is."""
    if type(error) is TransientError:
        return TransientError(error.reply, blame=blame)
    return error if error is not None else RuntimeError("lookup ended without an outcome")


def _ad(response: dns.message.Message | None) -> bool:
    """Whether the resolver said it validated `response` (the AD flag, RFC 4035 3.2.3)."""
    return response is not None and bool(response.flags & dns.flags.AD)


def _stub_resolver(nameservers: Sequence[str], port: int, timeout: float,
                   dnssec: bool = False) -> dns.resolver.Resolver:
    """dnspython's resolver: `nameservers` on `port`, or the system's. `dnssec`: ask for
    validation status (EDNS DO bit, and AD in the query, RFC 6840 5.7)."""
    resolver = dns.resolver.Resolver(configure=not nameservers)
    if dnssec:
        resolver.use_edns(0, dns.flags.DO, 1232)
        resolver.flags = dns.flags.RD | dns.flags.AD
    resolver.port = port  # before the nameservers: some dnspython versions bind it then
    if nameservers:
        resolver.nameservers = list(nameservers)
    resolver.timeout = min(timeout, _TRY_TIMEOUT)
    resolver.lifetime = timeout
    return resolver


def _negative_ttl(responses: Iterable[dns.message.Message]) -> int:
    """RFC 2308: the SOA's TTL or MINIMUM, whichever is less, capped."""
    for response in responses:
        for rrset in response.authority:
            for rd in rrset:
                if isinstance(rd, dns.rdtypes.ANY.SOA.SOA):
                    return min(rrset.ttl, rd.minimum, _MAX_NEGATIVE_TTL)
    return _UNKNOWN_NEGATIVE_TTL


def _out_of_descriptors(exc: Exception) -> BaseException | None:
    """The EMFILE or ENFILE behind a failed lookup: raised as is, or one of the errors
    dnspython collected from each nameserver (it drops a server on an OSError)."""
    if classify.out_of_descriptors(exc):
        return exc
    if isinstance(exc, dns.resolver.NoNameservers):
        for error in exc.kwargs.get("errors") or ():
            if isinstance(error[3], BaseException) and classify.out_of_descriptors(error[3]):
                return error[3]
    return None


def _why(exc: Exception) -> str:
    """A few words for the reply text: what the nameservers did."""
    if isinstance(exc, dns.exception.Timeout):
        return "timed out"
    if isinstance(exc, dns.resolver.NoNameservers):
        # each error is (server, tcp, port, exception or rcode text, response)
        answers = sorted({str(error[3]) for error in exc.kwargs.get("errors") or ()})
        return "; ".join(answers)[:200] or "no nameserver answered"
    return str(exc)[:200] or type(exc).__name__


@functools.lru_cache(maxsize=4096)
def _normalize_domain(domain: str) -> str:
    """`domain` as DNS knows it: lowercase ASCII, no trailing dot.

    Non-ASCII labels are encoded with Python's IDNA codec (IDNA 2003), as
    engine.address does. An address literal ("[192.0.2.1]") is only lowercased.
    """
    if domain.startswith("["):
        return domain.lower()
    try:
        name = domain.rstrip(".").encode("idna").decode("ascii").lower()
    except UnicodeError as exc:
        raise classify.invalid_domain(domain) from exc
    if len(name) > names.MAX_NAME_OCTETS or not names.DNS_NAME.fullmatch(name):
        raise classify.invalid_domain(domain)
    return name


def _route_key(key: str) -> str:
    if key == "*":
        return key
    try:
        return _normalize_domain(key)
    except PermanentError:
        raise ValueError(f"routes: not a domain name: {key!r}") from None


def _domain_literal(name: str) -> IPAddress | None:
    """The address of an RFC 5321 address literal, None for a domain name."""
    if not name.startswith("["):
        return None
    literal = _ip_literal(name)
    if literal is None or not name.endswith("]"):
        raise classify.invalid_domain(name)
    return literal


def _ip_literal(text: str) -> IPAddress | None:
    """The address in "192.0.2.1", "::1", "[192.0.2.1]" or "[IPv6:2001:db8::1]"; else None."""
    inner = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    if inner[:5].lower() == "ipv6:":
        inner = inner[5:]
    try:
        return ipaddress.ip_address(inner)
    except ValueError:
        return None


@functools.lru_cache(maxsize=4096)
def _host_name(host: str) -> str:
    """A host as MxHost names it: an IP without brackets, or a lowercase name without the dot."""
    literal = _ip_literal(host)
    return str(literal) if literal is not None else host.rstrip(".").lower()


def _family(address: IPAddress) -> int:
    return socket.AF_INET if address.version == 4 else socket.AF_INET6

