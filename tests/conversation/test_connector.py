"""engine.connector: opening ready connections (banner, EHLO, STARTTLS by policy) against
scripted servers on loopback, with real TLS handshakes and a real DNS server where needed.
"""
from __future__ import annotations

import socket
import time

import pytest

from engine.connector import Connector, Identity
from engine.metrics import Metrics
from engine.mx import MxHost, Resolver
from engine.reply import Blame, DeliveryError, PermanentError, TransientError
from engine.smtp import ReplyLimits, TlsError
from engine.testing.tlscert import CABundle
from engine.tls import TlsPolicy, is_verify_failure
from tests.support.dnsserver import DnsServer
from tests.support.playbook import CLIENT_IP, FAST, HELO, Scripted, ehlo_reply, greet
from tests.support.smtpserver import (
    CLOSE,
    INJECT,
    SLEEP,
    TLS,
    WAIT_CLOSE,
    C,
    S,
    ScriptedServer,
    Step,
)
from tests.support.smtpserver import server_tls_context as tls_context
from tests.support.stack import LOOPBACK_ALLOWED

QUIT = [C("QUIT"), S("221 2.0.0 bye")]


def make_connector(mode: str = "opportunistic", ca_file: str | None = None,
                   resolver: Resolver | None = None) -> tuple[Connector, TlsPolicy]:
    tls = TlsPolicy(mode, ca_file=ca_file)
    connector = Connector(Identity(CLIENT_IP, HELO), resolver or Resolver(), tls, FAST,
                          ReplyLimits(), Metrics(None, CLIENT_IP), LOOPBACK_ALLOWED)
    return connector, tls


def mx(server: ScriptedServer) -> MxHost:
    return MxHost(server.host, 10, server.port)


def events(server: ScriptedServer, index: int = 0) -> list[str]:
    return [line for who, line in server.transcript(index) if who == "*"]


def starttls_then(*steps: Step) -> list[Step]:
    return [*greet("PIPELINING", "STARTTLS"), C("STARTTLS"), S("220 2.0.0 go ahead"), *steps]


# A failed handshake, three ways: garbage where the ServerHello should be, a hang-up during
# the handshake, a hang-up right after the 220 (before the client could even start it).
BROKEN_TLS: dict[str, list[Step]] = {
    "garbage": [SLEEP(0.2), INJECT(b"this is not TLS at all\r\n"), CLOSE()],
    "hangup-in-handshake": [SLEEP(0.2), CLOSE()],
    "hangup-after-220": [CLOSE()],
}


@pytest.mark.parametrize("how", BROKEN_TLS)
def test_failed_tls_handshake_retries_in_plaintext_and_remembers_the_host(
        scripted: Scripted, how: str) -> None:
    plain = [*greet("PIPELINING", "STARTTLS"), *QUIT]  # STARTTLS offered, and not taken
    server = scripted([starttls_then(*BROKEN_TLS[how]), plain, plain])
    connector, tls = make_connector("opportunistic")
    conn = connector.open(mx(server), "test")
    assert conn.tls_version is None and conn.sock is not None
    assert conn.has_extn("pipelining")
    assert tls.is_broken(server.host)
    conn.quit_quietly()
    again = connector.open(mx(server), "test")  # next connection: does not even try
    assert again.tls_version is None
    again.quit_quietly()
    server.wait_finished(3)
    assert server.connections == 3
    assert server.errors == []


def test_tls_broken_ttl_zero_retries_in_plaintext_once_not_in_circles(
        scripted: Scripted) -> None:
    # docs/CONFIG.md: tls_broken_ttl 0 = always try TLS. The plaintext retry after a failed
    # handshake must still be plaintext, although the memory of the failure is already gone.
    plain = [*greet("STARTTLS"), *QUIT]
    server = scripted([starttls_then(*BROKEN_TLS["garbage"]), plain])
    tls = TlsPolicy("opportunistic", broken_ttl=0)
    connector = Connector(Identity(CLIENT_IP, HELO), Resolver(), tls, FAST, ReplyLimits(),
                          Metrics(None, CLIENT_IP), LOOPBACK_ALLOWED)
    conn = connector.open(mx(server), "test")
    assert conn.tls_version is None
    conn.quit_quietly()
    server.wait_finished(2)
    assert server.connections == 2 and server.errors == []
    assert tls.plan(server.host).attempt  # and the next connection tries TLS again


def test_tls_broken_ttl_zero_unverifiable_certificate_retries_unchecked_once(
        scripted: Scripted) -> None:
    retry = starttls_then(TLS(), C(f"EHLO {HELO}"), ehlo_reply("PIPELINING"), *QUIT)
    server = scripted([starttls_then(TLS()), retry])
    tls = TlsPolicy("opportunistic", broken_ttl=0)
    connector = Connector(Identity(CLIENT_IP, HELO), Resolver(), tls, FAST, ReplyLimits(),
                          Metrics(None, CLIENT_IP), LOOPBACK_ALLOWED)
    conn = connector.open(mx(server), "test")
    assert conn.tls_version is not None and conn.tls_verified is False
    conn.quit_quietly()
    server.wait_finished(2)
    assert server.connections == 2


def test_injected_bytes_after_starttls_220_abort_the_connection(scripted: Scripted) -> None:
    # The 220 and a forged reply in one write: what a man in the middle would inject, hoping
    # the client reads "250 injected" as if it came over TLS.
    server = scripted([*greet("STARTTLS"), C("STARTTLS"),
                       INJECT(b"220 2.0.0 go ahead\r\n250 injected\r\n"), WAIT_CLOSE()])
    connector, tls = make_connector("opportunistic")
    with pytest.raises(TransientError) as caught:
        connector.open(mx(server), "test")
    err = caught.value
    assert not isinstance(err, TlsError)  # not "TLS broken, use plaintext": an abort
    assert (err.command, err.reply.code, err.reply.enhanced) == ("STARTTLS", 451, "4.5.0")
    assert err.blame is Blame.CONNECTION
    assert "injection" in err.reply.text
    assert not tls.is_broken(server.host)
    server.wait_finished()
    assert server.connections == 1  # no plaintext retry either
    assert [line.upper() for line in server.client_lines()] == [f"EHLO {HELO}".upper(),
                                                                "STARTTLS"]
    assert not any(event.startswith("TLS") for event in events(server))


def verified_script() -> list[Step]:
    return starttls_then(TLS(), C(f"EHLO {HELO}"), ehlo_reply("PIPELINING", "CHUNKING"), *QUIT)


def test_verify_mode_passes_with_the_ca_file(scripted: Scripted, ca_bundle: CABundle) -> None:
    server = scripted(verified_script(),
                      tls_context=tls_context(ca_bundle.certfile, ca_bundle.keyfile))
    connector, _ = make_connector("verify", ca_file=ca_bundle.cafile)
    conn = connector.open(mx(server), "test")
    assert conn.tls_version is not None and conn.tls_version.startswith("TLSv1")
    assert conn.tls_verified
    assert conn.has_extn("chunking") and not conn.has_extn("starttls")  # the second EHLO's
    conn.quit_quietly()
    server.wait_finished()
    assert server.errors == []


def test_verify_mode_fails_without_the_ca_file(scripted: Scripted, ca_bundle: CABundle) -> None:
    server = scripted(verified_script(),
                      tls_context=tls_context(ca_bundle.certfile, ca_bundle.keyfile))
    connector, tls = make_connector("verify")
    with pytest.raises(TlsError) as caught:
        connector.open(mx(server), "test")
    assert is_verify_failure(caught.value)
    assert caught.value.reply.code == 451 and caught.value.blame is Blame.CONNECTION
    assert not tls.is_broken(server.host)
    server.wait_finished()
    assert server.connections == 1  # verify never falls back


def test_opportunistic_unverifiable_certificate_is_used_without_the_check(
        scripted: Scripted) -> None:
    # The test server's certificate is self-signed: the verifying first try fails, the retry
    # encrypts anyway, and the host is remembered so the next connection skips the check.
    retry = starttls_then(TLS(), C(f"EHLO {HELO}"), ehlo_reply("PIPELINING"), *QUIT)
    server = scripted([starttls_then(TLS()), retry, retry])
    connector, tls = make_connector("opportunistic")
    conn = connector.open(mx(server), "test")
    assert conn.tls_version is not None and conn.tls_verified is False
    assert not tls.is_broken(server.host)
    conn.quit_quietly()
    again = connector.open(mx(server), "test")
    assert again.tls_version is not None  # one connection now
    again.quit_quietly()
    server.wait_finished(2)
    assert server.connections == 3


def test_required_mode_without_starttls_is_transient_4_7_4(scripted: Scripted) -> None:
    server = scripted([*greet("PIPELINING"), WAIT_CLOSE()])
    connector, _ = make_connector("required")
    with pytest.raises(TransientError) as caught:
        connector.open(mx(server), "test")
    err = caught.value
    assert (err.reply.code, err.reply.enhanced, err.blame) == (451, "4.7.4", Blame.CONNECTION)
    server.wait_finished()
    assert [line.upper() for line in server.client_lines()] == [f"EHLO {HELO}".upper()]


def test_required_mode_starttls_refused_is_transient(scripted: Scripted) -> None:
    server = scripted([*greet("STARTTLS"), C("STARTTLS"), S("454 4.7.0 TLS not available"),
                       WAIT_CLOSE()])
    connector, _ = make_connector("required")
    with pytest.raises(TransientError) as caught:
        connector.open(mx(server), "test")
    assert caught.value.reply.enhanced == "4.7.5" and "454" in caught.value.reply.text


def test_opportunistic_starttls_refused_continues_in_plaintext(scripted: Scripted) -> None:
    server = scripted([*greet("STARTTLS"), C("STARTTLS"), S("454 4.7.0 TLS not available"),
                       *QUIT])
    connector, tls = make_connector("opportunistic")
    conn = connector.open(mx(server), "test")
    assert conn.tls_version is None and not tls.is_broken(server.host)
    conn.quit_quietly()
    server.wait_finished()
    assert server.errors == []


def test_ehlo_refused_after_starttls_is_a_connection_error(scripted: Scripted) -> None:
    server = scripted(starttls_then(TLS(), C(f"EHLO {HELO}"), S("421 4.3.2 shutting down"),
                                    WAIT_CLOSE()))
    connector, _ = make_connector("required")
    with pytest.raises(TransientError) as caught:
        connector.open(mx(server), "test")
    assert (caught.value.command, caught.value.reply.code) == ("EHLO", 421)


@pytest.mark.parametrize(("banner", "error"), [("421 4.3.2 too busy", TransientError),
                                               ("554 5.7.1 no service for you", PermanentError)])
def test_refusal_at_the_banner_is_a_connection_level_error(
        scripted: Scripted, banner: str, error: type[DeliveryError]) -> None:
    server = scripted([S(banner), WAIT_CLOSE()])
    connector, _ = make_connector()
    with pytest.raises(error) as caught:
        connector.open(mx(server), "test")
    assert caught.value.command == "BANNER" and caught.value.blame is Blame.CONNECTION
    assert str(caught.value.reply) == banner


def test_next_address_of_the_host_when_one_refuses(scripted: Scripted) -> None:
    # Nothing listens on 127.0.0.12 at the server's port: a refused connect, then the other.
    server = scripted([*greet(), *QUIT], host="127.0.0.10", extra="repeat_last")
    zone = {"mx.multi.test": {"A": ["127.0.0.12", "127.0.0.10"]}}
    with DnsServer(zone) as dns:
        resolver = Resolver(nameservers=["127.0.0.1"], port=dns.port, smtp_port=server.port)
        connector, _ = make_connector("none", resolver=resolver)
        for _ in range(3):  # the addresses come shuffled: either order ends connected
            conn = connector.open(MxHost("mx.multi.test", 10, server.port), "test")
            assert conn.peer == ("127.0.0.10", server.port)
            conn.quit_quietly()
            server.wait_finished(server.connections)
    assert server.errors == []


def test_unreachable_host_fails_fast_with_connection_refused() -> None:
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens
        probe.bind(("127.0.0.13", 0))
        port = probe.getsockname()[1]
    connector, _ = make_connector()
    started = time.monotonic()
    with pytest.raises(TransientError) as caught:
        connector.open(MxHost("127.0.0.13", 10, port), "test")
    assert time.monotonic() - started < 1
    assert caught.value.command == "CONNECT" and caught.value.reply.enhanced == "4.4.1"
