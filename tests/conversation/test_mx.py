"""engine.mx against a real DNS server on loopback (tests.support.dnsserver)."""
from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from engine.mx import Destination, MxHost, Resolver, Route
from engine.reply import Blame, PermanentError, TransientError
from tests.support.dnsserver import DnsServer

ZONE: dict[str, Any] = {
    "example.test": {"MX": [(10, "mx1.example.test"), (20, "mx2.example.test")]},
    "mx1.example.test": {"A": ["127.0.0.10"], "AAAA": ["::1"]},
    "mx2.example.test": {"A": ["127.0.0.11", "127.0.0.12"]},
    "equal.test": {"MX": [(10, "a.equal.test"), (10, "b.equal.test"), (20, "c.equal.test")]},
    "dup.test": {"MX": [(10, "mx.dup.test"), (20, "MX.DUP.test"), (5, "other.dup.test")]},
    "implicit.test": {"A": ["127.0.0.20"]},
    "implicit6.test": {"AAAA": ["::1"]},
    "noaddr.test": {"TXT": ['"v=spf1 -all"']},
    "nullmx.test": {"MX": [(0, ".")]},
    "broken.test": "SERVFAIL",
    "silent.test": "TIMEOUT",
    "short.test": {"MX": [(10, "mx1.example.test")], "ttl": 30},
    "alias.test": {"CNAME": "example.test"},
    "rrttl.test": {"A": {"ttl": 5, "records": ["127.0.0.30"]}},
    "xn--bcher-kva.test": {"MX": [(10, "mx1.example.test")]},
    "many.test": {"A": [f"127.0.1.{i}" for i in range(1, 101)]},  # too big for UDP
}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(scope="module")
def shared_server() -> Iterator[DnsServer]:
    with DnsServer(ZONE, ttl=300, negative_ttl=120) as server:
        yield server


@pytest.fixture
def server(shared_server: DnsServer) -> DnsServer:
    shared_server.queries.clear()
    return shared_server


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def resolver(server: DnsServer, clock: FakeClock) -> Resolver:
    return make_resolver(server, clock)


def make_resolver(server: DnsServer, clock: FakeClock | None = None, **kwargs: Any) -> Resolver:
    kwargs.setdefault("timeout", 2.0)
    return Resolver(["127.0.0.1"], port=server.port, clock=clock or FakeClock(), **kwargs)


def names(destination: Destination) -> list[str]:
    return [host.name for host in destination.hosts]


# --- MX ----------------------------------------------------------------------

def test_mx_hosts_in_preference_order(resolver: Resolver) -> None:
    dest = resolver.destination("example.test")
    assert dest == Destination("example.test", (MxHost("mx1.example.test", 10, 25),
                                                MxHost("mx2.example.test", 20, 25)))


def test_equal_preferences_come_in_both_orders(resolver: Resolver) -> None:
    orders = {tuple(names(resolver.destination("equal.test"))) for _ in range(50)}
    assert orders == {("a.equal.test", "b.equal.test", "c.equal.test"),
                      ("b.equal.test", "a.equal.test", "c.equal.test")}


def test_duplicate_hosts_are_tried_once_at_their_best_preference(resolver: Resolver) -> None:
    dest = resolver.destination("dup.test")
    assert [(h.name, h.preference) for h in dest.hosts] == [("other.dup.test", 5),
                                                          ("mx.dup.test", 10)]


def test_domain_is_lowercased_without_trailing_dot(resolver: Resolver) -> None:
    assert resolver.destination("EXAMPLE.Test.").domain == "example.test"


def test_mx_through_cname(resolver: Resolver) -> None:
    assert names(resolver.destination("alias.test")) == ["mx1.example.test", "mx2.example.test"]


def test_smtp_port_applies_to_mx_hosts(server: DnsServer) -> None:
    resolver = make_resolver(server, smtp_port=2525)
    assert {h.port for h in resolver.destination("example.test").hosts} == {2525}


def test_idna_domain(resolver: Resolver, server: DnsServer) -> None:
    dest = resolver.destination("Bücher.test")
    assert dest.domain == "xn--bcher-kva.test"
    assert names(dest) == ["mx1.example.test"]
    assert server.queries == [("xn--bcher-kva.test", "MX")]


@pytest.mark.parametrize("domain", ["a..b.test", "x" * 64 + ".test", "", "bad domain.test",
                                    "[not-an-ip]"])
def test_invalid_domain_is_permanent_without_dns(resolver: Resolver, server: DnsServer,
                                                 domain: str) -> None:
    with pytest.raises(PermanentError) as info:
        resolver.destination(domain)
    assert (info.value.reply.code, info.value.reply.enhanced) == (550, "5.1.2")
    assert info.value.blame is Blame.MESSAGE
    assert server.queries == []


def test_address_literal_domain_is_its_own_host(resolver: Resolver, server: DnsServer) -> None:
    dest = resolver.destination("[IPv6:2001:DB8::1]")
    assert dest.hosts == (MxHost("2001:db8::1", 0, 25),) and dest.implicit
    assert server.queries == []


# --- implicit MX and permanent failures ---------------------------------------

def test_implicit_mx_from_a_record(resolver: Resolver) -> None:
    dest = resolver.destination("implicit.test")
    assert dest == Destination("implicit.test", (MxHost("implicit.test", 0, 25),), implicit=True)


def test_implicit_mx_from_aaaa_record(resolver: Resolver) -> None:
    assert resolver.destination("implicit6.test").implicit


def test_no_mx_and_no_address_is_permanent(resolver: Resolver) -> None:
    with pytest.raises(PermanentError) as info:
        resolver.destination("noaddr.test")
    assert (info.value.reply.code, info.value.reply.enhanced) == (550, "5.1.2")
    assert "no MX or address records" in info.value.reply.text
    assert info.value.blame is Blame.MESSAGE


def test_null_mx_is_permanent_556(resolver: Resolver) -> None:
    with pytest.raises(PermanentError) as info:
        resolver.destination("nullmx.test")
    reply = info.value.reply
    assert (reply.code, reply.enhanced) == (556, "5.1.10")
    assert reply.text == "Recipient address rejected: nullmx.test does not accept mail (null MX)"
    assert info.value.blame is Blame.MESSAGE


def test_nxdomain_is_permanent(resolver: Resolver) -> None:
    with pytest.raises(PermanentError) as info:
        resolver.destination("nope.test")
    assert (info.value.reply.code, info.value.reply.enhanced) == (550, "5.1.2")
    assert info.value.reply.text == "domain nope.test does not exist"
    assert info.value.blame is Blame.MESSAGE


# --- transient failures -------------------------------------------------------

def test_servfail_is_transient_and_not_cached(resolver: Resolver, server: DnsServer) -> None:
    for _ in range(2):
        with pytest.raises(TransientError) as info:
            resolver.destination("broken.test")
        assert (info.value.reply.code, info.value.reply.enhanced) == (451, "4.4.3")
        assert "DNS lookup for broken.test failed: SERVFAIL" in info.value.reply.text
        assert info.value.blame is Blame.MESSAGE
    assert server.queries == [("broken.test", "MX")] * 2
    assert resolver.stats.failures == 2


def test_silent_server_is_transient_within_the_timeout(server: DnsServer) -> None:
    resolver = make_resolver(server, timeout=0.5)
    started = time.monotonic()
    with pytest.raises(TransientError) as info:
        resolver.destination("silent.test")
    assert time.monotonic() - started < 1.5
    assert (info.value.reply.code, info.value.reply.enhanced) == (451, "4.4.3")
    assert "timed out" in info.value.reply.text


def test_unreachable_nameserver_is_transient() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    resolver = Resolver(["127.0.0.1"], port=closed_port, timeout=0.5)
    with pytest.raises(TransientError) as info:
        resolver.destination("example.test")
    assert (info.value.reply.code, info.value.reply.enhanced) == (451, "4.4.3")


# --- cache ----------------------------------------------------------------------

def test_cache_honours_ttl(resolver: Resolver, server: DnsServer, clock: FakeClock) -> None:
    resolver.destination("short.test")
    clock.advance(29)
    resolver.destination("short.test")
    assert server.queries == [("short.test", "MX")]
    clock.advance(2)
    resolver.destination("short.test")
    assert server.queries == [("short.test", "MX")] * 2
    assert (resolver.stats.queries, resolver.stats.cache_hits) == (2, 1)


def test_cache_honours_a_per_type_ttl_for_addresses(resolver: Resolver, server: DnsServer,
                                                     clock: FakeClock) -> None:
    for advance in (0, 4, 2):
        clock.advance(advance)
        assert resolver.addresses("rrttl.test") == ["127.0.0.30"]
    assert server.queries == [("rrttl.test", "A")] * 2


def test_cache_reshuffles_equal_preferences(resolver: Resolver, server: DnsServer) -> None:
    orders = {names(resolver.destination("equal.test"))[0] for _ in range(50)}
    assert orders == {"a.equal.test", "b.equal.test"}
    assert server.queries == [("equal.test", "MX")]


def test_cache_is_shared_by_destination_and_addresses(resolver: Resolver,
                                                      server: DnsServer) -> None:
    resolver.destination("implicit.test")
    assert resolver.addresses("implicit.test") == ["127.0.0.20"]
    assert server.queries == [("implicit.test", "MX"), ("implicit.test", "A")]


def test_nxdomain_is_cached_for_the_negative_ttl(resolver: Resolver, server: DnsServer,
                                                  clock: FakeClock) -> None:
    for _ in range(2):
        with pytest.raises(PermanentError):
            resolver.destination("nope.test")
    assert server.queries == [("nope.test", "MX")]
    clock.advance(121)  # the server's negative TTL is 120
    with pytest.raises(PermanentError):
        resolver.destination("nope.test")
    assert len(server.queries) == 2


def test_no_answer_is_cached(resolver: Resolver, server: DnsServer) -> None:
    for _ in range(2):
        with pytest.raises(PermanentError):
            resolver.destination("noaddr.test")
    assert server.queries == [("noaddr.test", "MX"), ("noaddr.test", "A"),
                              ("noaddr.test", "AAAA")]


@pytest.mark.parametrize("negative_ttl, kept", [(30, 30), (3600, 300), (None, 60)],
                         ids=["soa", "capped", "no-soa"])
def test_negative_ttl_from_soa_capped_or_default(clock: FakeClock, negative_ttl: int | None,
                                                  kept: int) -> None:
    with DnsServer({}, negative_ttl=negative_ttl) as server:
        resolver = make_resolver(server, clock)
        for advance in (0, kept - 1, 2):
            clock.advance(advance)
            with pytest.raises(PermanentError):
                resolver.destination("nope.test")
        assert len(server.queries) == 2


def test_cache_is_lru_bounded(server: DnsServer, clock: FakeClock) -> None:
    resolver = make_resolver(server, clock, cache_size=1)
    resolver.destination("example.test")
    resolver.destination("short.test")
    resolver.destination("example.test")
    assert len(server.queries) == 3


# --- routes ---------------------------------------------------------------------

def test_route_exact_domain_with_port(server: DnsServer) -> None:
    resolver = make_resolver(server, routes={"Routed.test": Route("relay.example.test", 2525)})
    dest = resolver.destination("routed.test")
    assert dest == Destination("routed.test", (MxHost("relay.example.test", 0, 2525),),
                               routed=True)
    assert names(resolver.destination("example.test")) == ["mx1.example.test",
                                                           "mx2.example.test"]
    assert server.queries == [("example.test", "MX")]


def test_route_star_takes_the_rest_on_the_smtp_port(server: DnsServer) -> None:
    routes = {"routed.test": Route("::1", 2526), "*": Route("smarthost.test")}
    resolver = make_resolver(server, routes=routes, smtp_port=2500)
    assert resolver.destination("routed.test").hosts == (MxHost("::1", 0, 2526),)
    dest = resolver.destination("nope.test")
    assert dest.hosts == (MxHost("smarthost.test", 0, 2500),) and dest.routed
    assert server.queries == []


# --- addresses ------------------------------------------------------------------

def test_addresses_a(resolver: Resolver) -> None:
    assert sorted(resolver.addresses("mx2.example.test")) == ["127.0.0.11", "127.0.0.12"]


def test_addresses_aaaa(resolver: Resolver) -> None:
    assert resolver.addresses("MX1.example.test.", socket.AF_INET6) == ["::1"]


def test_addresses_over_tcp_when_udp_truncates(resolver: Resolver) -> None:
    assert len(resolver.addresses("many.test")) == 100


@pytest.mark.parametrize("host, family, expected", [
    ("127.0.0.5", socket.AF_INET, ["127.0.0.5"]),
    ("[127.0.0.5]", socket.AF_INET, ["127.0.0.5"]),
    ("2001:DB8::1", socket.AF_INET6, ["2001:db8::1"]),
])
def test_addresses_of_ip_literal(resolver: Resolver, server: DnsServer, host: str, family: int,
                                 expected: list[str]) -> None:
    assert resolver.addresses(host, family) == expected
    assert server.queries == []


@pytest.mark.parametrize("host, family", [
    ("nohost.example.test", socket.AF_INET),  # NXDOMAIN
    ("implicit6.test", socket.AF_INET),  # no A record
    ("::1", socket.AF_INET),  # an IP literal of the other family
])
def test_addresses_missing_is_transient_for_the_connection(resolver: Resolver, host: str,
                                                            family: int) -> None:
    with pytest.raises(TransientError) as info:
        resolver.addresses(host, family)
    assert (info.value.reply.code, info.value.reply.enhanced) == (451, "4.4.4")
    assert info.value.blame is Blame.CONNECTION


def test_addresses_servfail_is_transient_for_the_connection(resolver: Resolver) -> None:
    with pytest.raises(TransientError) as info:
        resolver.addresses("broken.test")
    assert (info.value.reply.code, info.value.reply.enhanced) == (451, "4.4.3")
    assert info.value.blame is Blame.CONNECTION
