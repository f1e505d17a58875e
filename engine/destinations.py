"""Which addresses mail (and TLS-RPT reports) may go to: the destination policy.

By default none that is loopback, private, link-local, multicast or otherwise not a public
unicast address (docs/SECURITY.md); `security.allowed_destinations` lets networks through,
`security.allow_private_destinations` turns the check off. engine.connector applies it to
every MX host that is not a configured route (engine.mx re-exports it), engine.mtasts to
the policy servers, engine.tlsrpt_store to the https rua hosts. Pure: ipaddress and the
config, nothing else (the supervisor imports it too).
"""
from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass

from engine.config import SecurityConfig

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def _nets(*pairs: tuple[str, str]) -> tuple[tuple[IPNetwork, str], ...]:
    return tuple((ipaddress.ip_network(net), what) for net, what in pairs)


# Where mail must not go unless the operator says so: IANA's special-purpose registries
# (RFC 6890 and successors), written out rather than taken from `ipaddress.is_global`,
# whose answers changed between Python releases.
PROHIBITED_NETWORKS = _nets(
    ("0.0.0.0/8", "an unspecified ('this network') address"),
    ("10.0.0.0/8", "a private (RFC 1918) address"),
    ("100.64.0.0/10", "a shared (carrier-grade NAT) address"),
    ("127.0.0.0/8", "a loopback address"),
    ("169.254.0.0/16", "a link-local address"),
    ("172.16.0.0/12", "a private (RFC 1918) address"),
    ("192.0.0.0/24", "an IETF protocol address"),
    ("192.0.2.0/24", "a documentation address"),
    ("192.88.99.0/24", "a 6to4 relay address"),
    ("192.168.0.0/16", "a private (RFC 1918) address"),
    ("198.18.0.0/15", "a benchmarking address"),
    ("198.51.100.0/24", "a documentation address"),
    ("203.0.113.0/24", "a documentation address"),
    ("224.0.0.0/4", "a multicast address"),
    ("240.0.0.0/4", "a reserved address"),
    ("::/128", "an unspecified address"),
    ("::1/128", "a loopback address"),
    ("::/96", "an IPv4-compatible (deprecated) address"),
    ("64:ff9b:1::/48", "a local-use NAT64 address"),
    ("100::/64", "a discard-only address"),
    ("2001::/23", "an IETF protocol address"),
    ("2001:db8::/32", "a documentation address"),
    ("3fff::/20", "a documentation address"),
    ("fc00::/7", "a unique local (private) address"),
    ("fe80::/10", "a link-local address"),
    ("fec0::/10", "a site-local (deprecated) address"),
    ("ff00::/8", "a multicast address"),
)


@dataclass(frozen=True)
class DestinationPolicy:
    """Which addresses an MX host may have. The default refuses every one that is not a
    public unicast address; `allowed` networks are let through all the same, and
    `allow_private` turns the check off."""

    allow_private: bool = False
    allowed: tuple[IPNetwork, ...] = ()

    @classmethod
    def from_config(cls, security: SecurityConfig) -> DestinationPolicy:
        return cls(security.allow_private_destinations,
                   tuple(ipaddress.ip_network(net) for net in security.allowed_destinations))

    @classmethod
    def allow_all(cls) -> DestinationPolicy:
        return cls(allow_private=True)

    def refusal(self, address: str) -> str | None:
        """Why mail must not go to `address` ("127.0.0.1 is a loopback address"), or None."""
        return _refusal(self, address)

    def _judge(self, address: str) -> str | None:
        ip = ipaddress.ip_address(address)
        if self.allow_private or any(ip in net for net in self.allowed):
            return None
        what = _special(ip)
        return None if what is None else f"{address} is {what}"


@functools.lru_cache(maxsize=4096)
def _refusal(policy: DestinationPolicy, address: str) -> str | None:
    """`policy._judge(address)`, remembered: every message to a host that is not a route
    asks it of the host's addresses (engine.connector), and parsing the address and
    testing it against every prohibited network each time cost more than the rest of
    the check. Both arguments are immutable; an invalid address raises, never cached."""
    return policy._judge(address)


def _special(ip: IPAddress) -> str | None:
    """What kind of special-purpose address `ip` is, or None for a public unicast one.
    IPv6 forms that embed an IPv4 address (mapped, NAT64, 6to4) are judged by it."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            inner = _special(embedded)
            return None if inner is None else f"an IPv6 form of {inner}"
    return next((what for net, what in PROHIBITED_NETWORKS
                 if net.version == ip.version and ip in net), None)


_NAT64 = ipaddress.ip_network("64:ff9b::/96")
