"""DANE (RFC 7672) through the whole engine: a DNSSEC-signed zone served by nsd, signed at test
time (ldns-signzone), behind a validating unbound that has the zone's trust anchor; the
engine's `dns.trusted_ad` and `tls_policy.dane` on; aiosmtpd sinks with trustme certificates.
A matching TLSA record delivers (DANE-EE and DANE-TA), a mismatch or a missing STARTTLS
defers 4.7.5 and sends nothing, only unusable records or an unsigned zone's TLSA mean the
default (opportunistic) TLS. The rules case by case: tests/unit/test_dane.py.

Without nsd, unbound or ldnsutils the test skips, saying what to install; with
MAILENGINE_DNSSEC_SERVERS=required (.ci/run sets it) it fails instead.
"""
from __future__ import annotations

import hashlib
import os
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from engine.testing.harness import LocalEngine, make_message
from engine.testing.sink import SinkServer
from tests.support import dnssec
from tests.support.statsd_catcher import StatsdCatcher

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def servers_installed() -> None:
    why = dnssec.missing()
    if why is None:
        return
    if os.environ.get(dnssec.REQUIRE) == "required":
        pytest.fail(f"{why}; {dnssec.REQUIRE}=required")
    pytest.skip(why)


def sha256_spki(pem: bytes) -> str:
    cert = x509.load_pem_x509_certificate(pem)
    spki = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()


def sha256_cert(pem: bytes) -> str:
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem.decode())).hexdigest()


def last_tries(events: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each job's last delivered or deferred event, by job id."""
    return {e["id"]: e for e in events if e["event"] in ("delivered", "deferred")}


def summary(got: dict[str, dict[str, Any]]) -> dict[str, tuple[Any, ...]]:
    """Per job: its outcome, enhanced code, the TLS policy that applied, and whether the
    certificate verified."""
    return {job: (e["event"], e["enhanced"], e.get("tls_policy"), e.get("tls_verified"))
            for job, e in got.items()}


def subjects(sink: SinkServer) -> list[bytes]:
    """The subjects of the messages `sink` received, sorted."""
    return sorted(m.content.split(b"Subject: ")[1].split(b"\r\n")[0] for m in sink.messages)


def test_dane_through_a_validating_resolver(
        tmp_path: Path, local_engine: Callable[..., LocalEngine],
        servers_installed: None) -> None:
    intermediate = trustme.CA().create_child_ca()
    names = ["mx-ok.dane.test", "mx-ta.dane.test", "mx-bad.dane.test", "mx-none.dane.test",
             "mx.plain.test"]
    leaf = intermediate.issue_cert(*names)
    leaf_pem, issuer_pem = (blob.bytes() for blob in leaf.cert_chain_pems)
    other = sha256_spki(trustme.CA().issue_cert("mx-bad.dane.test").cert_chain_pems[0].bytes())
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    leaf.configure_cert(context)  # presents the leaf and the intermediate
    tls_sink = SinkServer(host="127.0.0.21", tls_context=context)
    no_tls = SinkServer(tls=False, host="127.0.0.22", port=tls_sink.port)

    def domain(label: str, mx: str, address: str, tlsa: str) -> dict[str, list[tuple[str, str]]]:
        return {label: [("MX", f"10 {mx}.dane.test.")], mx: [("A", address)],
                f"_25._tcp.{mx}": [("TLSA", tlsa)],
                # TLS-RPT: each wants reports (counted; the day does not end in the test)
                f"_smtp._tls.{label}": [("TXT", '"v=TLSRPTv1; rua=mailto:r@reports.test"')]}

    signed = {"dane.test": {
        **domain("ok", "mx-ok", "127.0.0.21", f"3 1 1 {sha256_spki(leaf_pem)}"),
        **domain("ta", "mx-ta", "127.0.0.21", f"2 0 1 {sha256_cert(issuer_pem)}"),
        **domain("bad", "mx-bad", "127.0.0.21", f"3 1 1 {other}"),
        # PKIX-EE: unusable in SMTP (RFC 7672 3.1.3), the host is not under DANE
        **domain("none", "mx-none", "127.0.0.21", f"1 1 1 {other}"),
        # the right key, but no STARTTLS offered: deferred, never sent in plaintext
        **domain("notls", "mx-notls", "127.0.0.22", f"3 1 1 {sha256_spki(leaf_pem)}"),
    }}
    unsigned = {"plain.test": {"@": [("MX", "10 mx.plain.test.")], "mx": [("A", "127.0.0.21")],
                               "_25._tcp.mx": [("TLSA", f"3 1 1 {other}")]}}
    statsd = StatsdCatcher()
    try:
        with dnssec.SignedDns(signed, unsigned) as dns:
            assert dns.authenticated("_25._tcp.mx-ok.dane.test", "TLSA")  # the set-up works
            assert not dns.authenticated("_25._tcp.mx.plain.test", "TLSA")
            engine = local_engine(tls_sink.port, route=None, extra={
                "dns": {"nameservers": [dns.resolver_address], "port": dns.resolver_port,
                        "trusted_ad": True},
                "tls_policy": {"dane": True, "mta_sts": False},
                "security": {"allowed_destinations": ["127.0.0.0/8"]},
                "statsd": {"enabled": True, "host": "127.0.0.1", "port": statsd.port},
                "retry": {"schedule": ["1h"]},
                "tlsrpt": {"enabled": True, "sender": "tlsrpt@sender.test"},
            })
            jobs = ["ok", "ta", "bad", "none", "notls", "plain", "bad-optional"]
            domains = {"plain": "plain.test", "bad-optional": "bad.dane.test"}

            def message(n: int, job: str) -> bytes:  # RFC 8689 5: skip DANE for this one
                text = make_message(n, 300)
                return (text.replace(b"Subject:", b"TLS-Required: No\r\nSubject:", 1)
                        if job.endswith("-optional") else text)

            assert engine.push([({"id": job, "from": "s@example.test",
                                  "to": [f"r@{domains.get(job, job + '.dane.test')}"]},
                                 message(n, job)) for n, job in enumerate(jobs)])
            events = engine.wait_for(
                lambda evs: {e["id"] for e in evs if e["event"] in ("delivered", "deferred")}
                >= set(jobs), 60, "an outcome for every job")

            def reported() -> dict[str, float]:  # TLS-RPT's sessions, as the supervisor got
                return {suffix: sum(statsd.counter_sum(name)  # them (the TXT lookups need
                                    for name in statsd.names("counter")  # the DNS: here)
                                    if name.endswith(".supervisor.all." + suffix))
                        for suffix in ("tlsrpt_success", "tlsrpt_tlsa_invalid",
                                       "tlsrpt_starttls_not_supported")}

            # "none" (an unusable record: no policy) is a success too; "plain" has no record
            # "bad-optional": TLS under no policy (DANE skipped), a success
            want = {"tlsrpt_success": 4, "tlsrpt_tlsa_invalid": 1,
                    "tlsrpt_starttls_not_supported": 1}
            assert statsd.wait_for(lambda: reported() == want, 20), reported()
        got = last_tries(events)
        assert summary(got) == {
            "ok": ("delivered", "2.0.0", "dane", True),
            "ta": ("delivered", "2.0.0", "dane", True),
            "bad": ("deferred", "4.7.5", "dane", None),
            "none": ("delivered", "2.0.0", "opportunistic", False),
            "notls": ("deferred", "4.7.5", "dane", None),
            "plain": ("delivered", "2.0.0", "opportunistic", False),
            "bad-optional": ("delivered", "2.0.0", "dane-skipped", False),
        }
        assert ("DANE: no TLSA record matched the certificate of mx mx-bad.dane.test"
                in got["bad"]["reply"])
        assert "does not offer STARTTLS" in got["notls"]["reply"]
        assert subjects(tls_sink) == [b"test message 0", b"test message 1", b"test message 3",
                            b"test message 5", b"test message 6"]
        assert all(m.tls is not None for m in tls_sink.messages)
        assert no_tls.messages == []  # never in plaintext
        def counted() -> dict[str, float]:
            return {suffix: sum(statsd.counter_sum(name) for name in statsd.names("counter")
                                if name.endswith("." + suffix))
                    for suffix in ("dane_ok", "dane_refused", "tls_policy_skipped")}

        # every try counts: "bad" and "notls" are deferred once each (retry in 1 h)
        want_counted = {"dane_ok": 2, "dane_refused": 2, "tls_policy_skipped": 1}
        assert statsd.wait_for(lambda: counted() == want_counted, 20), counted()
    finally:
        tls_sink.stop()
        no_tls.stop()
        statsd.stop()


def test_dane_forced_for_some_domains_requires_tlsa(
        tmp_path: Path, local_engine: Callable[..., LocalEngine],
        servers_installed: None) -> None:
    """`tls_policy.domains: {d: dane}` with `tls_policy.dane` off (Postfix's dane-only): a
    matching TLSA record delivers; an MX host without usable TLSA records (none at all, or
    only PKIX ones) and an MX answer that is not DNSSEC-signed defer 4.7.5 before anything
    is sent, counted as TLS-RPT `dane-required`; a domain not listed is not under DANE."""
    leaf = trustme.CA().issue_cert("mx-ok.dane.test", "mx-pkix.dane.test",
                                   "mx-bare.dane.test", "mx.plain.test")
    leaf_pem = leaf.cert_chain_pems[0].bytes()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    leaf.configure_cert(context)
    sink = SinkServer(host="127.0.0.21", tls_context=context)
    rua = [("TXT", '"v=TLSRPTv1; rua=mailto:r@reports.test"')]

    def domain(label: str, mx: str, tlsa: str | None) -> dict[str, list[tuple[str, str]]]:
        names = {label: [("MX", f"10 {mx}.dane.test.")], mx: [("A", "127.0.0.21")],
                 f"_smtp._tls.{label}": rua}
        if tlsa is not None:
            names[f"_25._tcp.{mx}"] = [("TLSA", tlsa)]
        return names

    good = f"3 1 1 {sha256_spki(leaf_pem)}"
    signed = {"dane.test": {**domain("ok", "mx-ok", good),
                            **domain("pkix", "mx-pkix", f"1 1 1 {sha256_spki(leaf_pem)}"),
                            **domain("bare", "mx-bare", None),
                            **domain("free", "mx-free", good)}}
    unsigned = {"plain.test": {"@": [("MX", "10 mx.plain.test.")], "mx": [("A", "127.0.0.21")],
                               "_25._tcp.mx": [("TLSA", good)], "_smtp._tls": rua}}
    forced = {"ok.dane.test": "dane", "pkix.dane.test": "dane", "bare.dane.test": "dane",
              "plain.test": "dane"}
    statsd = StatsdCatcher()
    try:
        with dnssec.SignedDns(signed, unsigned) as dns:
            engine = local_engine(sink.port, route=None, extra={
                "dns": {"nameservers": [dns.resolver_address], "port": dns.resolver_port,
                        "trusted_ad": True},
                "tls_policy": {"dane": False, "mta_sts": False, "domains": forced},
                "security": {"allowed_destinations": ["127.0.0.0/8"]},
                "statsd": {"enabled": True, "host": "127.0.0.1", "port": statsd.port},
                "retry": {"schedule": ["1h"]},
                "tlsrpt": {"enabled": True, "sender": "tlsrpt@sender.test"},
            })
            rcpts = {"ok": "r@ok.dane.test", "pkix": "r@pkix.dane.test",
                     "bare": "r@bare.dane.test", "plain": "r@plain.test",
                     "free": "r@free.dane.test"}
            assert engine.push([({"id": job, "from": "s@example.test", "to": [rcpt]},
                                 make_message(n, 300)) for n, (job, rcpt)
                                in enumerate(rcpts.items())])
            events = engine.wait_for(
                lambda evs: {e["id"] for e in evs if e["event"] in ("delivered", "deferred")}
                >= set(rcpts), 60, "an outcome for every job")

            def reported() -> dict[str, float]:
                return {suffix: sum(statsd.counter_sum(name)
                                    for name in statsd.names("counter")
                                    if name.endswith(".supervisor.all." + suffix))
                        for suffix in ("tlsrpt_success", "tlsrpt_dane_required")}

            # "ok" and "free" (TLS under no policy) succeed; the three others: dane-required
            want = {"tlsrpt_success": 2, "tlsrpt_dane_required": 3}
            assert statsd.wait_for(lambda: reported() == want, 20), reported()
        got = last_tries(events)
        assert summary(got) == {
            "ok": ("delivered", "2.0.0", "dane", True),
            "pkix": ("deferred", "4.7.5", "dane", None),
            "bare": ("deferred", "4.7.5", "dane", None),
            "plain": ("deferred", "4.7.5", "dane", None),
            "free": ("delivered", "2.0.0", "opportunistic", False),
        }
        for job in ("pkix", "bare"):
            assert (f"DANE required: mx mx-{job}.dane.test has no usable DNSSEC-authenticated"
                    " TLSA records") in got[job]["reply"]
        assert "MX records of plain.test are not DNSSEC-authenticated" in got["plain"]["reply"]
        assert got["plain"]["mx"] is None  # refused before any host was tried
        assert subjects(sink) == [b"test message 0", b"test message 4"]

        def refused() -> float:
            return sum(statsd.counter_sum(name) for name in statsd.names("counter")
                       if name.endswith(".dane_refused"))

        assert statsd.wait_for(lambda: refused() == 3, 20), refused()
    finally:
        sink.stop()
        statsd.stop()

