"""DANE for SMTP (RFC 7672): TLSA records, published under DNSSEC, that say which certificate
an MX host presents.

When it applies (`Dane.applies`, decided per domain by engine.tlspolicy, ahead of MTA-STS as
RFC 8461 2 says):
- `tls_policy.dane` is on, and the resolver is trusted to validate (`dns.trusted_ad`:
  only answers it marks authenticated, the AD bit, count; engine.mx);
- the domain's MX answer was authenticated (RFC 7672 2.2: an insecure MX means no DANE);
- at least one MX host has usable TLSA records (`records`) or its TLSA lookup failed.

Per MX host (`records`, engine.connector): the host's address answer must be authenticated,
then `_25._tcp.<mx host>` is looked up; an authenticated answer with usable records makes
the connection DANE-authenticated: STARTTLS is required (not offered: deferred), and after
the handshake the certificate must match a record (`check`), else the host fails with
4.7.5 and the next one is tried; the message is never sent in plaintext nor over a
connection that did not match. No usable record (none, insecure, or only unusable ones):
that host gets the default TLS (smtp.tls), as RFC 7672 2.2 says. A TLSA lookup that fails
(SERVFAIL, timeout) makes the host unusable for now (a TransientError, next host).

Usable records (RFC 7672 3.1): usage DANE-EE(3) or DANE-TA(2), selector Cert(0) or
SPKI(1), matching type Full(0), SHA2-256(1), SHA2-512(2). PKIX-TA(0) and PKIX-EE(1) are
unusable in SMTP and ignored, as are unknown values and digests of the wrong length.

Matching (`check`):
- DANE-EE(3): the leaf certificate (or its public key) matches; neither its names nor its
  dates are checked (RFC 7672 3.1.1).
- DANE-TA(2): a certificate the server presents in its chain, other than the leaf, matches
  the record; each certificate from the leaf up to it is signed by the next (RSA PKCS#1
  v1.5, ECDSA, Ed25519, Ed448: `_signed_by`), the leaf is within its dates and one of its
  DNS names (SAN; the subject CN only without SAN) matches the MX host name, a "*." wildcard
  covering one leftmost label (RFC 7672 3.2.3). Not supported: a trust anchor that is not
  in the presented chain (a "2 1 x" record of a key the server does not send), RSA-PSS
  signatures, and name checks against a CNAME-expanded TLSA base domain. Each of these
  fails the match (deferred), never passes it.

The chain comes from the TLS socket: `get_unverified_chain` (public from Python 3.13; the
same method of the private `_sslobj` on 3.10 to 3.12). Without it only the leaf is known
and DANE-TA records can never match.
"""
from __future__ import annotations

import datetime
import hashlib
import hmac
import itertools
import socket
import ssl
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from engine.mx import Destination, Resolver
from engine.reply import DeliveryError, Reply, TransientError

# The TLS mode of a delivery the operator put under DANE (`tls_policy.domains: {d: dane}`,
# engine.tlspolicy): as mode `dane`, but an MX host without usable, authenticated TLSA
# records fails (`NoTlsa`) instead of getting the default TLS (Postfix's `dane-only`).
REQUIRED = "dane-only"

PKIX_TA, PKIX_EE, DANE_TA, DANE_EE = 0, 1, 2, 3
CERT, SPKI = 0, 1
FULL, SHA256, SHA512 = 0, 1, 2
_DIGEST_LENGTH = {SHA256: 32, SHA512: 64}


@dataclass(frozen=True)
class Tlsa:
    """One TLSA record (RFC 6698 2.1)."""

    usage: int
    selector: int
    mtype: int
    data: bytes

    def usable(self) -> bool:
        """RFC 7672 3.1: DANE-TA or DANE-EE, a known selector and matching type."""
        if self.usage not in (DANE_TA, DANE_EE) or self.selector not in (CERT, SPKI):
            return False
        if self.mtype == FULL:
            return bool(self.data)
        return len(self.data) == _DIGEST_LENGTH.get(self.mtype, -1)

    def matches(self, der: bytes) -> bool:
        """Whether the certificate `der` (DER) is the one this record names."""
        try:
            selected = der if self.selector == CERT else _spki(der)
        except ValueError:
            return False
        if self.mtype == SHA256:
            selected = hashlib.sha256(selected).digest()
        elif self.mtype == SHA512:
            selected = hashlib.sha512(selected).digest()
        return hmac.compare_digest(selected, self.data)


def usable(records: Iterable[Any]) -> tuple[Tlsa, ...]:
    """The usable records among dnspython TLSA rdata (or Tlsa)."""
    found = (rd if isinstance(rd, Tlsa) else
             Tlsa(int(rd.usage), int(rd.selector), int(rd.mtype), bytes(rd.cert))
             for rd in records)
    return tuple(record for record in found if record.usable())


def check(records: Sequence[Tlsa], chain: Sequence[bytes], host: str,
          now: datetime.datetime | None = None) -> bool:
    """Whether the chain the server presented (`chain[0]` the leaf, DER) matches one of the
    usable `records` for MX host `host` (see the module's docstring)."""
    if not chain:
        return False
    leaf = chain[0]
    if any(r.usage == DANE_EE and r.matches(leaf) for r in records):
        return True
    anchors = [r for r in records if r.usage == DANE_TA]
    if not anchors:
        return False
    for depth in range(1, len(chain)):
        if any(r.matches(chain[depth]) for r in anchors):
            return _chains_to(chain[:depth + 1], host, now)
    return False


def _chains_to(chain: Sequence[bytes], host: str, now: datetime.datetime | None) -> bool:
    """The leaf, `chain[0]`, is signed through `chain` up to the anchor (the last), is within
    its dates and is valid for `host`."""
    try:
        certs = [x509.load_der_x509_certificate(der) for der in chain]
    except ValueError:
        return False
    for cert, issuer in itertools.pairwise(certs):
        if cert.issuer != issuer.subject or not _signed_by(cert, issuer):
            return False
    leaf = certs[0]
    now = now or datetime.datetime.now(datetime.UTC)
    if not _valid_from(leaf) <= now <= _valid_until(leaf):
        return False
    return any(_name_matches(name, host) for name in _dns_names(leaf))


def _valid_from(cert: x509.Certificate) -> datetime.datetime:
    """The start of `cert`'s validity, aware (cryptography 42 added the _utc properties)."""
    when = getattr(cert, "not_valid_before_utc", None)
    return when if when is not None else cert.not_valid_before.replace(tzinfo=datetime.UTC)


def _valid_until(cert: x509.Certificate) -> datetime.datetime:
    when = getattr(cert, "not_valid_after_utc", None)
    return when if when is not None else cert.not_valid_after.replace(tzinfo=datetime.UTC)


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    key = issuer.public_key()
    sig, tbs, hash_ = cert.signature, cert.tbs_certificate_bytes, cert.signature_hash_algorithm
    try:
        if isinstance(key, rsa.RSAPublicKey) and hash_ is not None:
            if cert.signature_algorithm_oid == x509.SignatureAlgorithmOID.RSASSA_PSS:
                return False  # not supported: see the module's docstring
            key.verify(sig, tbs, padding.PKCS1v15(), hash_)
        elif isinstance(key, ec.EllipticCurvePublicKey) and hash_ is not None:
            key.verify(sig, tbs, ec.ECDSA(hash_))
        elif isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
            key.verify(sig, tbs)
        else:
            return False
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def _dns_names(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return [str(a.value) for a in cert.subject.get_attributes_for_oid(
            x509.NameOID.COMMON_NAME)]
    return [str(name) for name in san.value.get_values_for_type(x509.DNSName)]


def _name_matches(name: str, host: str) -> bool:
    name, host = name.rstrip(".").lower(), host.rstrip(".").lower()
    if name.startswith("*."):
        label, _, rest = host.partition(".")
        return bool(label) and rest == name[2:]
    return name == host


def _spki(der: bytes) -> bytes:
    """The SubjectPublicKeyInfo of certificate `der`, DER."""
    cert = x509.load_der_x509_certificate(der)
    return cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def peer_chain(sock: ssl.SSLSocket | Any) -> list[bytes]:
    """The certificates the server presented, leaf first, DER (see the module's docstring)."""
    leaf = sock.getpeercert(binary_form=True)
    if not leaf:
        return []
    getter = getattr(sock, "get_unverified_chain", None)
    if getter is None:
        getter = getattr(getattr(sock, "_sslobj", None), "get_unverified_chain", None)
    try:
        chain = getter() if getter is not None else None
    except (ssl.SSLError, ValueError):
        chain = None
    if not chain:
        return [leaf]
    ders = [c if isinstance(c, bytes) else c.public_bytes(ssl._ssl.ENCODING_DER)  # type: ignore[attr-defined]
            for c in chain]
    return ders if ders and ders[0] == leaf else [leaf]


class NoTlsa(TransientError):
    """DANE is required of the host (mode `dane-only`) and it has no usable TLSA records
    from authenticated answers: the host fails, the next is tried; nothing is sent."""


def no_tlsa(host: str) -> NoTlsa:
    return NoTlsa(Reply.local(451, "4.7.5", f"DANE required: mx {host} has no usable"
                                            " DNSSEC-authenticated TLSA records"), "TLSA")


def insecure_mx(domain: str) -> Reply:
    """The reply when DANE is required of `domain` and its MX answer was not authenticated
    (RFC 7672 2.2.1: an insecure MX cannot be trusted to name the hosts)."""
    return Reply.local(451, "4.7.5", f"DANE required: the MX records of {domain} are not"
                                     " DNSSEC-authenticated")


class Dane:
    """DANE lookups through the worker's resolver (which must be `trusted_ad`)."""

    def __init__(self, resolver: Resolver, family: int = socket.AF_INET) -> None:
        self.resolver = resolver
        self.family = family

    def applies(self, dest: Destination) -> bool:
        """Whether the domain's delivery is under DANE: an authenticated MX answer and a
        host with usable TLSA records, or whose lookup failed (it will fail the host)."""
        if dest.routed or not dest.authenticated or not self.resolver.trusted_ad:
            return False
        for host in dest.hosts:
            try:
                if self.records(host.name):
                    return True
            except DeliveryError:
                return True
        return False

    def records(self, host: str) -> tuple[Tlsa, ...]:
        """The usable TLSA records of MX host `host` from authenticated answers, or ().
        A lookup that fails raises a TransientError blaming the connection."""
        if not self.resolver.addresses_secure(host, self.family):
            return ()
        found, secure = self.resolver.tlsa(host)
        if not secure:
            return ()
        return usable(found)
