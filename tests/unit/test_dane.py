"""DANE's rules (engine.dane, RFC 7672) on real certificates (trustme): which TLSA records are
usable, how DANE-EE and DANE-TA records match a presented chain. The whole path, with a
DNSSEC-signed zone behind a validating resolver: tests/engine/test_dane.py."""
from __future__ import annotations

import hashlib
import ssl

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from engine import dane
from engine.dane import Tlsa
from engine.mx import Destination, MxHost
from engine.tlspolicy import DANE, MTA_STS, TlsPolicies

pytestmark = pytest.mark.timeout(30)


def der_chain(leaf: trustme.LeafCert) -> list[bytes]:
    return [ssl.PEM_cert_to_DER_cert(blob.bytes().decode()) for blob in leaf.cert_chain_pems]


def spki(der: bytes) -> bytes:
    return x509.load_der_x509_certificate(der).public_key().public_bytes(
        Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def record(usage: int, selector: int, mtype: int, der: bytes) -> Tlsa:
    data = der if selector == 0 else spki(der)
    if mtype == 1:
        data = hashlib.sha256(data).digest()
    elif mtype == 2:
        data = hashlib.sha512(data).digest()
    return Tlsa(usage, selector, mtype, data)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.mark.parametrize("selector", [0, 1])
@pytest.mark.parametrize("mtype", [0, 1, 2])
def test_dane_ee_matches_the_leaf_whatever_its_name(ca: trustme.CA, selector: int,
                                                     mtype: int) -> None:
    chain = der_chain(ca.issue_cert("other.test"))  # RFC 7672 3.1.1: no name check
    other = der_chain(ca.issue_cert("mx.test"))
    assert dane.check([record(3, selector, mtype, chain[0])], chain, "mx.test")
    assert not dane.check([record(3, selector, mtype, other[0])], chain, "mx.test")


def test_a_record_for_the_issuer_does_not_match_as_dane_ee(ca: trustme.CA) -> None:
    child = ca.create_child_ca()
    chain = der_chain(child.issue_cert("mx.test"))
    assert len(chain) == 2  # the leaf and the intermediate
    assert not dane.check([record(3, 1, 1, chain[1])], chain, "mx.test")


def test_dane_ta_matches_an_issuer_in_the_chain_for_the_mx_name(ca: trustme.CA) -> None:
    child = ca.create_child_ca()
    chain = der_chain(child.issue_cert("mx.test", "*.wild.test"))
    for rec in (record(2, 0, 1, chain[1]), record(2, 1, 1, chain[1]), record(2, 1, 2, chain[1]),
                record(2, 0, 0, chain[1])):
        assert dane.check([rec], chain, "mx.test")
        assert dane.check([rec], chain, "a.wild.test")
        assert not dane.check([rec], chain, "b.a.wild.test")  # a wildcard covers one label
        assert not dane.check([rec], chain, "other.test")  # RFC 7672 3.1.2: the name counts
        assert not dane.check([rec], chain[:1], "mx.test")  # the anchor must be presented


def test_dane_ta_refuses_a_leaf_the_anchor_did_not_sign(ca: trustme.CA) -> None:
    child = ca.create_child_ca()
    stranger = trustme.CA().create_child_ca()
    chain = der_chain(stranger.issue_cert("mx.test"))
    forged = [chain[0], der_chain(child.issue_cert("x.test"))[1]]  # anchor swapped in
    assert not dane.check([record(2, 1, 1, forged[1])], forged, "mx.test")


def test_dane_ta_does_not_match_the_leaf_itself(ca: trustme.CA) -> None:
    chain = der_chain(ca.issue_cert("mx.test"))
    assert not dane.check([record(2, 0, 1, chain[0])], chain, "mx.test")


def test_only_dane_usages_with_known_parameters_are_usable(ca: trustme.CA) -> None:
    der = der_chain(ca.issue_cert("mx.test"))[0]
    good = [record(3, 1, 1, der), record(2, 0, 2, der), record(3, 0, 0, der)]
    bad = [record(0, 1, 1, der), record(1, 1, 1, der),  # PKIX-TA, PKIX-EE: unusable in SMTP
           Tlsa(3, 2, 1, bytes(32)), Tlsa(3, 1, 3, bytes(32)), Tlsa(4, 1, 1, bytes(32)),
           Tlsa(3, 1, 1, bytes(31)), Tlsa(3, 1, 2, bytes(32)), Tlsa(3, 0, 0, b"")]
    assert dane.usable([*bad, *good]) == tuple(good)
    assert dane.usable(bad) == ()


def test_an_empty_or_unreadable_chain_never_matches() -> None:
    assert not dane.check([Tlsa(3, 1, 1, bytes(32))], [], "mx.test")
    assert not dane.check([Tlsa(3, 1, 1, bytes(32))], [b"not a certificate"], "mx.test")
    assert not dane.check([Tlsa(2, 1, 1, bytes(32))], [b"junk", b"junk"], "mx.test")


class StubDane:
    """Stands in for the lookups: which hosts have usable records."""

    def __init__(self, hosts: set[str]) -> None:
        self.hosts = hosts

    def applies(self, dest: Destination) -> bool:
        return dest.authenticated and any(h.name in self.hosts for h in dest.hosts)


class StubSts:
    def policy(self, domain: str) -> object:
        raise AssertionError("MTA-STS must not be looked up when DANE applies")


def test_dane_comes_before_mta_sts_and_after_the_operators_exceptions() -> None:
    dest = Destination("d.test", (MxHost("mx.d.test", 10, 25),), authenticated=True)
    policies = TlsPolicies("opportunistic", {"forced.test": "verify"}, mta_sts=StubSts(),  # type: ignore[arg-type]
                           dane=StubDane({"mx.d.test"}))  # type: ignore[arg-type]
    assert policies.decide("d.test", "p", dest=dest).policy == DANE
    assert policies.decide("forced.test", "p", dest=dest).policy == "verify"
    assert policies.decide("d.test", "p", requiretls=True, dest=dest).policy == "requiretls"


def test_an_unauthenticated_mx_answer_means_no_dane() -> None:
    class NoSts:
        def policy(self, domain: str) -> None:
            return None

    dest = Destination("d.test", (MxHost("mx.d.test", 10, 25),), authenticated=False)
    policies = TlsPolicies("opportunistic", mta_sts=NoSts(),  # type: ignore[arg-type]
                           dane=StubDane({"mx.d.test"}))  # type: ignore[arg-type]
    decision = policies.decide("d.test", "p", dest=dest)
    assert decision.policy not in (DANE, MTA_STS) and decision.mode == "opportunistic"


class FakeResolver:
    """The answers engine.mx would give: (records, authenticated) per MX host."""

    trusted_ad = True

    def __init__(self, address_secure: bool, tlsa: tuple[list[Tlsa], bool]) -> None:
        self.address_secure = address_secure
        self.answer = tlsa
        self.asked: list[str] = []

    def addresses_secure(self, host: str, family: int) -> bool:
        return self.address_secure

    def tlsa(self, host: str) -> tuple[list[Tlsa], bool]:
        self.asked.append(host)
        return self.answer


def test_records_count_only_from_authenticated_answers() -> None:
    ee = Tlsa(3, 1, 1, bytes(32))
    pkix = Tlsa(1, 1, 1, bytes(32))
    assert dane.Dane(FakeResolver(True, ([ee], True))).records("mx.test") == (ee,)  # type: ignore[arg-type]
    assert dane.Dane(FakeResolver(True, ([ee], False))).records("mx.test") == ()  # type: ignore[arg-type]
    assert dane.Dane(FakeResolver(True, ([pkix], True))).records("mx.test") == ()  # type: ignore[arg-type]
    insecure_address = FakeResolver(False, ([ee], True))
    assert dane.Dane(insecure_address).records("mx.test") == ()  # type: ignore[arg-type]
    assert insecure_address.asked == []  # RFC 7672 2.2.2: no TLSA lookup at all


def test_dane_applies_only_to_an_authenticated_mx_answer() -> None:
    resolver = FakeResolver(True, ([Tlsa(3, 1, 1, bytes(32))], True))
    checker = dane.Dane(resolver)  # type: ignore[arg-type]
    hosts = (MxHost("mx.d.test", 10, 25),)
    assert checker.applies(Destination("d.test", hosts, authenticated=True))
    assert not checker.applies(Destination("d.test", hosts, authenticated=False))
    assert not checker.applies(Destination("d.test", hosts, authenticated=True, routed=True))
    resolver.answer = ([Tlsa(0, 1, 1, bytes(32))], True)  # only unusable: opportunistic
    assert not checker.applies(Destination("d.test", hosts, authenticated=True))


def test_a_forced_dane_requires_an_authenticated_mx_answer() -> None:
    """`tls_policy.domains: {d.test: dane}` (Postfix's dane-only): mode dane-only for an
    authenticated MX answer, else a refusal before any connection; DANE off for others."""
    resolver = FakeResolver(True, ([Tlsa(3, 1, 1, bytes(32))], True))
    policies = TlsPolicies("opportunistic", {"d.test": "dane"}, mta_sts=None,
                           dane=dane.Dane(resolver), dane_default=False)  # type: ignore[arg-type]
    hosts = (MxHost("mx.d.test", 10, 25),)
    secure = policies.decide("d.test", "other", dest=Destination("d.test", hosts,
                                                                 authenticated=True))
    assert (secure.policy, secure.mode, secure.refusal) == (DANE, dane.REQUIRED, None)
    insecure = policies.decide("d.test", "other", dest=Destination("d.test", hosts))
    assert insecure.refusal is not None and insecure.refusal.status == "4.7.5"
    assert "MX records of d.test are not DNSSEC-authenticated" in insecure.refusal.text
    routed = policies.decide("d.test", "other", routed=True,
                             dest=Destination("d.test", hosts, routed=True))
    assert routed.refusal is None and routed.mode == dane.REQUIRED  # the route's TLSA
    other = policies.decide("e.test", "other", dest=Destination("e.test", hosts,
                                                                authenticated=True))
    assert other.policy == "opportunistic"  # tls_policy.dane off: not looked up
    assert resolver.asked == []
    with_requiretls = policies.decide("d.test", "other", True, dest=Destination(
        "d.test", hosts, authenticated=True))
    assert (with_requiretls.mode, with_requiretls.requiretls) == (dane.REQUIRED, True)
    without_resolver = TlsPolicies("opportunistic", {"d.test": "dane"}, mta_sts=None)
    assert without_resolver.decide("d.test", "other", dest=Destination(
        "d.test", hosts, authenticated=True)).refusal is not None
