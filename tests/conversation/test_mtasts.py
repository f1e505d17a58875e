"""MTA-STS (RFC 8461), REQUIRETLS (RFC 8689) and TLS-RPT's counts (RFC 8460) end to end in
one process, no mocks on the path: the delivery stack (tests/support/stack.py) with its TLS
policies, a real DNS server (MX, A and the `_mta-sts` TXT records), a real HTTPS server
serving the policy (tests/support/policyserver.py, its certificate from a test CA given as
`ca_file`) and real SMTP sinks on loopback (aiosmtpd) with certificates from the same CA.
Counters go to a real StatsD catcher.
"""
from __future__ import annotations

import json
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from engine import mtasts, tlsrpt
from engine.metrics import Metrics
from engine.mtasts import FetchSettings, MtaSts, PolicyError, https_context
from engine.mx import Resolver
from engine.protocol import Attempt, Status
from engine.testing.sink import SinkServer
from engine.tlspolicy import TlsPolicies
from tests.support.dnsserver import DnsServer
from tests.support.playbook import CLIENT_IP
from tests.support.policyserver import PolicyServer, TestCA, policy_text
from tests.support.stack import LOOPBACK_ALLOWED, Stack
from tests.support.statsd_catcher import StatsdCatcher

DOMAIN = "sts.test"
MX = "mx1.sts.test"
MX_IP = "127.0.0.21"
POLICY_IP = "127.0.0.30"
RCPT = f"someone@{DOMAIN}"
PLAIN = "plain.test"  # a domain without MTA-STS, for REQUIRETLS
PLAIN_MX = "mx.plain.test"


def txt(ident: str) -> dict[str, object]:
    return {"TXT": {"ttl": 0, "records": [f'"v=STSv1; id={ident};"']}}


@dataclass
class World:
    """The servers of one test and what builds the engine's side."""

    tmp: Path
    ca: TestCA
    dns: DnsServer
    policy: PolicyServer
    statsd: StatsdCatcher
    make_stack: Callable[..., Stack]
    sinks: list[SinkServer] = field(default_factory=list)
    opened: list[Metrics] = field(default_factory=list)  # the MtaSts's, closed at the end

    def sink(self, *names: str, tls: bool = True, requiretls: bool = False) -> SinkServer:
        """An SMTP sink at MX_IP with a certificate for `names` (default: the MX's name)."""
        context = self.ca.server_context(*(names or (MX, PLAIN_MX)))
        sink = SinkServer(tls=tls, host=MX_IP, tls_context=context, requiretls=requiretls)
        self.sinks.append(sink)
        return sink

    def mta_sts(self, store: str = "sts.db") -> MtaSts:
        settings = FetchSettings(https_context(self.ca.ca_file), port=self.policy.port,
                                 timeout=5.0)
        return mtasts.create(self.resolver(0), LOOPBACK_ALLOWED, CLIENT_IP, socket.AF_INET,
                             settings, str(self.tmp / store), self.sts_metrics())

    def resolver(self, smtp_port: int) -> Resolver:
        return Resolver(["127.0.0.1"], self.dns.port, timeout=3.0, smtp_port=smtp_port)

    def metrics(self) -> Metrics:
        return Metrics.create("127.0.0.1", self.statsd.port, "test", CLIENT_IP)

    def sts_metrics(self) -> Metrics:
        self.opened.append(self.metrics())
        return self.opened[-1]

    def engine(self, sink: SinkServer, mta_sts: MtaSts | None = None,
               sts: bool = True, domains: dict[str, str] | None = None) -> Stack:
        """A delivery stack (smtp.tls opportunistic) whose MX hosts are on `sink`'s port;
        `domains`: the config's tls_policy.domains."""
        policies = TlsPolicies("opportunistic", domains,
                               mta_sts=(mta_sts or self.mta_sts()) if sts else None)
        return self.make_stack(self.resolver(sink.port), tls="opportunistic",
                               policy=LOOPBACK_ALLOWED, metrics=self.metrics(),
                               policies=policies, ca_file=self.ca.ca_file)

    def counter(self, metric: str) -> float:
        self.statsd.sync()
        return sum(self.statsd.counter_sum(name) for name in self.statsd.names("counter")
                   if name.endswith(f".{metric}"))


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    """One test CA for the module: making one costs a key pair."""
    return TestCA(tmp_path_factory.mktemp("ca"))


@pytest.fixture
def world(tmp_path: Path, ca: TestCA, stack: Callable[..., Stack]) -> Iterator[World]:
    zone = {
        DOMAIN: {"MX": [(10, MX)]},
        MX: {"A": [MX_IP]},
        f"_mta-sts.{DOMAIN}": txt("1"),
        f"mta-sts.{DOMAIN}": {"A": [POLICY_IP]},
        PLAIN: {"MX": [(10, PLAIN_MX)]},
        PLAIN_MX: {"A": [MX_IP]},
    }
    with DnsServer(zone, ttl=0) as dns, PolicyServer(ca, DOMAIN, POLICY_IP) as policy, \
            StatsdCatcher() as statsd:
        policy.policy = policy_text("enforce", MX)
        one = World(tmp_path, ca, dns, policy, statsd, stack)
        yield one
        for sink in one.sinks:
            sink.stop()
        for metrics in one.opened:
            metrics.close()


def only(attempts: list[Attempt]) -> Attempt:
    assert len(attempts) == 1, attempts
    return attempts[0]


# -- enforce ----------------------------------------------------------------------------


def test_enforce_delivers_over_tls_verified_for_a_named_mx(world: World) -> None:
    sink = world.sink()
    engine = world.engine(sink)
    attempt = only(engine.deliver([RCPT]))
    assert attempt.status is Status.DELIVERED, attempt.reply
    assert (attempt.tls_policy, attempt.tls_verified, attempt.mx) == ("mta-sts", True, MX)
    (message,) = sink.messages
    assert message.tls is not None
    assert only(engine.deliver([RCPT], job_id="job-2")).status is Status.DELIVERED
    assert world.policy.requests == 1  # the second message used the cached policy
    assert world.counter("mta_sts_fetched") == 1
    assert world.counter("mta_sts_ok") == 2


def test_enforce_defers_a_certificate_for_another_name(world: World) -> None:
    sink = world.sink("mx.elsewhere.test")
    attempt = only(world.engine(sink).deliver([RCPT]))
    assert attempt.status is Status.DEFERRED
    assert attempt.reply.code == 451 and attempt.reply.status == "4.7.5"
    assert "MTA-STS policy of sts.test" in attempt.reply.text
    assert "certificate" in attempt.reply.text.lower()
    assert attempt.tls_policy == "mta-sts" and attempt.tls_verified is None
    assert sink.messages == []  # no retry without the check, none in plaintext
    assert world.counter("mta_sts_refused") == 1


def test_enforce_defers_an_mx_host_outside_the_policy(world: World) -> None:
    world.dns.set(DOMAIN, {"MX": [(10, "rogue.sts.test")]})
    world.dns.set("rogue.sts.test", {"A": [MX_IP]})
    sink = world.sink("rogue.sts.test")  # a valid certificate for its own name: not enough
    attempt = only(world.engine(sink).deliver([RCPT]))
    assert attempt.status is Status.DEFERRED
    assert (attempt.reply.code, attempt.reply.status) == (451, "4.7.5")
    assert "allows none of its MX hosts (rogue.sts.test)" in attempt.reply.text
    assert sink.connections == 0  # never even connected to


def test_enforce_never_sends_in_plaintext_when_starttls_is_stripped(world: World) -> None:
    sink = world.sink(tls=False)  # no STARTTLS offered, as an attacker would strip it
    attempt = only(world.engine(sink).deliver([RCPT]))
    assert attempt.status is Status.DEFERRED
    assert (attempt.reply.code, attempt.reply.status) == (451, "4.7.4")
    assert "MTA-STS" in attempt.reply.text and "STARTTLS" in attempt.reply.text
    assert sink.messages == []
    # The control: without MTA-STS the same server gets it, in plaintext.
    control = only(world.engine(sink, sts=False).deliver([RCPT], job_id="job-2"))
    assert control.status is Status.DELIVERED
    assert (control.tls_policy, control.tls_verified) == ("opportunistic", False)
    assert [m.tls for m in sink.messages] == [None]


# -- testing, none ------------------------------------------------------------------------


def test_testing_mode_delivers_and_reports_what_enforcing_would_refuse(world: World) -> None:
    world.policy.policy = policy_text("testing", MX)
    sink = world.sink("mx.elsewhere.test")
    attempt = only(world.engine(sink).deliver([RCPT]))
    assert attempt.status is Status.DELIVERED
    assert (attempt.tls_policy, attempt.tls_verified) == ("mta-sts-testing", False)
    assert [m.tls is not None for m in sink.messages] == [True]  # unverified TLS, as before
    assert world.counter("mta_sts_testing_failed") == 1


def test_testing_mode_with_everything_right_reports_nothing(world: World) -> None:
    world.policy.policy = policy_text("testing", "*.sts.test")
    sink = world.sink()
    attempt = only(world.engine(sink).deliver([RCPT]))
    assert attempt.status is Status.DELIVERED
    assert (attempt.tls_policy, attempt.tls_verified) == ("mta-sts-testing", True)
    assert world.counter("mta_sts_testing_failed") == 0


def test_mode_none_is_no_policy(world: World) -> None:
    world.policy.policy = policy_text("none")
    sink = world.sink(tls=False)
    attempt = only(world.engine(sink).deliver([RCPT]))
    assert attempt.status is Status.DELIVERED
    assert attempt.tls_policy == "opportunistic"


# -- TLS-Required: No (RFC 8689 5) --------------------------------------------------------

OPTIONAL = (b"From: sender@example.org\r\nTo: rcpt@example.test\r\nTLS-Required: No\r\n"
            b"Subject: hi\r\n\r\nHello.\r\n")


def test_tls_required_no_skips_an_enforced_policy_the_certificate_fails(world: World) -> None:
    sink = world.sink("mx.elsewhere.test")  # the policy would defer: another name
    engine = world.engine(sink)
    plain = only(engine.deliver([RCPT]))
    assert (plain.status, plain.tls_policy) == (Status.DEFERRED, "mta-sts")
    assert sink.messages == []
    optional = only(engine.deliver([RCPT], OPTIONAL, job_id="job-2"))
    assert optional.status is Status.DELIVERED, optional.reply
    assert (optional.tls_policy, optional.tls_verified) == ("mta-sts-skipped", False)
    (message,) = sink.messages
    assert message.tls is not None  # still TLS where offered (opportunistic), unverified
    assert world.counter("tls_policy_skipped") == 1
    assert world.counter("mta_sts_refused") == 1


def test_tls_required_no_yields_to_requiretls_and_to_the_operator(world: World) -> None:
    sink = world.sink("mx.elsewhere.test", requiretls=True)
    both = only(world.engine(sink).deliver([RCPT], OPTIONAL, requiretls=True))
    assert (both.status, both.tls_policy) == (Status.DEFERRED, "requiretls")
    forced = only(world.engine(sink, domains={DOMAIN: "mta-sts"}).deliver(
        [RCPT], OPTIONAL, job_id="job-2"))
    assert (forced.status, forced.tls_policy) == (Status.DEFERRED, "mta-sts")
    body_only = OPTIONAL.replace(b"TLS-Required: No\r\n", b"") + b"TLS-Required: No\r\n"
    in_body = only(world.engine(sink).deliver([RCPT], body_only, job_id="job-3"))
    assert (in_body.status, in_body.tls_policy) == (Status.DEFERRED, "mta-sts")
    assert sink.messages == [] and world.counter("tls_policy_skipped") == 0


# -- the cache ----------------------------------------------------------------------------


def test_a_new_txt_id_fetches_the_policy_again(world: World) -> None:
    sink = world.sink("mx.elsewhere.test")
    world.policy.policy = policy_text("testing", MX)
    engine = world.engine(sink)
    assert only(engine.deliver([RCPT])).tls_policy == "mta-sts-testing"
    world.policy.policy = policy_text("enforce", MX)
    assert only(engine.deliver([RCPT], job_id="job-2")).tls_policy == "mta-sts-testing"
    assert world.policy.requests == 1  # same id: the cached policy, no fetch
    world.dns.set(f"_mta-sts.{DOMAIN}", txt("2"))
    attempt = only(engine.deliver([RCPT], job_id="job-3"))
    assert world.policy.requests == 2
    assert (attempt.tls_policy, attempt.status) == ("mta-sts", Status.DEFERRED)


def test_a_cached_policy_survives_a_restart_and_a_failed_fetch(world: World) -> None:
    sink = world.sink()
    assert only(world.engine(sink).deliver([RCPT])).status is Status.DELIVERED
    # An attacker strips STARTTLS, changes the TXT id and breaks the policy server; the
    # worker restarts meanwhile (a new MtaSts on the same file).
    world.dns.set(f"_mta-sts.{DOMAIN}", txt("2"))
    world.policy.answer = (500, {"Content-Type": "text/plain"}, b"down\n")
    stripped = SinkServer(tls=False, host="127.0.0.22")
    world.sinks.append(stripped)
    world.dns.set(MX, {"A": ["127.0.0.22"]})
    attempt = only(world.engine(stripped, world.mta_sts()).deliver([RCPT], job_id="job-2"))
    assert world.policy.requests == 2  # the new id was fetched, and that failed
    assert (attempt.tls_policy, attempt.status) == ("mta-sts", Status.DEFERRED)
    assert stripped.messages == []
    assert world.counter("mta_sts_fetch_failed") == 1


def test_a_cached_policy_applies_when_the_txt_record_disappears(world: World) -> None:
    engine = world.engine(world.sink())
    assert only(engine.deliver([RCPT])).tls_policy == "mta-sts"
    world.dns.set(f"_mta-sts.{DOMAIN}", "SERVFAIL")
    world.dns.set(DOMAIN, {"MX": [(10, "rogue.sts.test")]})
    world.dns.set("rogue.sts.test", {"A": [MX_IP]})
    attempt = only(engine.deliver([RCPT], job_id="job-2"))
    assert (attempt.tls_policy, attempt.status) == ("mta-sts", Status.DEFERRED)
    assert "allows none of its MX hosts" in attempt.reply.text
    assert world.policy.requests == 1


def test_no_txt_record_and_no_cache_means_no_policy(world: World) -> None:
    world.dns.set(f"_mta-sts.{DOMAIN}", {"A": ["127.0.0.1"]})  # the name, no TXT
    sink = world.sink(tls=False)
    attempt = only(world.engine(sink).deliver([RCPT]))
    assert (attempt.tls_policy, attempt.status) == ("opportunistic", Status.DELIVERED)
    assert world.policy.requests == 0


# -- the config's exceptions ---------------------------------------------------------------


def test_an_exception_for_the_domain_overrides_its_policy(world: World) -> None:
    sink = world.sink(tls=False)  # the receiver's policy cannot be met...
    attempt = only(world.engine(sink, domains={DOMAIN: "opportunistic"}).deliver([RCPT]))
    assert (attempt.tls_policy, attempt.status) == ("opportunistic", Status.DELIVERED)
    assert world.policy.requests == 0  # ...and is not even looked up


def test_verify_for_a_domain_defers_a_certificate_for_another_name(world: World) -> None:
    sink = world.sink("mx.elsewhere.test")
    engine = world.engine(sink, domains={PLAIN: "verify"})
    attempt = only(engine.deliver([f"a@{PLAIN}"]))
    assert (attempt.tls_policy, attempt.status, attempt.reply.status) == (
        "verify", Status.DEFERRED, "4.7.5")
    assert sink.messages == []
    assert world.counter("tls_verify_refused") == 1
    # Another domain on the same host, without the exception: opportunistic, delivered.
    other = only(engine.deliver([f"b@{DOMAIN}"], job_id="job-2"))
    assert other.tls_policy == "mta-sts" and other.status is Status.DEFERRED  # its policy
    world.policy.policy = policy_text("none")
    world.dns.set(f"_mta-sts.{DOMAIN}", txt("2"))
    assert only(engine.deliver([f"b@{DOMAIN}"], job_id="job-3")).status is Status.DELIVERED


# -- the fetch's rules --------------------------------------------------------------------


def fetch(world: World, domain: str = DOMAIN) -> bytes:
    settings = FetchSettings(https_context(world.ca.ca_file), CLIENT_IP, world.policy.port, 3.0)
    return mtasts.fetch(domain, POLICY_IP, settings)


@pytest.mark.parametrize(("answer", "words"), [
    ((301, {"Location": "https://elsewhere.test/x", "Content-Type": "text/plain"}, b""),
     "redirects are not followed"),
    ((200, {"Content-Type": "text/html"}, b"version: STSv1\r\n"), "not text/plain"),
    ((200, {"Content-Type": "text/plain"}, b"x" * (64 * 1024 + 1)), "larger than 65536"),
    ((404, {"Content-Type": "text/plain"}, b"no\n"), "404"),
])
def test_a_policy_is_fetched_strictly(world: World, answer: tuple[int, dict[str, str], bytes],
                                      words: str) -> None:
    assert fetch(world) == policy_text("enforce", MX).encode()
    world.policy.answer = answer
    with pytest.raises(PolicyError, match=words):
        fetch(world)


def test_a_slow_policy_server_is_given_up(world: World) -> None:
    world.policy.delay = 5.0
    settings = FetchSettings(https_context(world.ca.ca_file), CLIENT_IP, world.policy.port, 0.5)
    with pytest.raises(PolicyError, match="timed out"):
        mtasts.fetch(DOMAIN, POLICY_IP, settings)


def test_a_policy_server_certificate_for_another_name_is_refused(world: World) -> None:
    with pytest.raises(PolicyError, match=r"(?i)certificate") as refused:
        fetch(world, "other.test")  # the server's certificate is for mta-sts.sts.test
    assert refused.value.kind == "sts-webpki-invalid"  # as TLS-RPT reports it


@pytest.mark.parametrize(("answer", "kind"), [
    ((404, {"Content-Type": "text/plain"}, b"no\n"), "sts-policy-fetch-error"),
    ((200, {"Content-Type": "text/html"}, b"version: STSv1\r\n"), "sts-policy-invalid"),
])
def test_a_failed_fetch_says_its_kind_for_tls_rpt(world: World,
                                                  answer: tuple[int, dict[str, str], bytes],
                                                  kind: str) -> None:
    world.policy.answer = answer
    with pytest.raises(PolicyError) as failed:
        fetch(world)
    assert failed.value.kind == kind


# -- REQUIRETLS -----------------------------------------------------------------------------


def test_requiretls_bounces_5_7_30_when_the_server_does_not_offer_it(world: World) -> None:
    sink = world.sink()
    attempt = only(world.engine(sink).deliver([f"a@{PLAIN}"], requiretls=True))
    assert attempt.status is Status.BOUNCED
    assert (attempt.reply.code, attempt.reply.status) == (550, "5.7.30")
    assert attempt.tls_policy == "requiretls"
    assert sink.messages == []
    assert world.counter("requiretls_refused") == 1


def test_requiretls_defers_without_tls_and_never_sends_in_plaintext(world: World) -> None:
    sink = world.sink(tls=False, requiretls=True)
    attempt = only(world.engine(sink).deliver([f"a@{PLAIN}"], requiretls=True))
    assert attempt.status is Status.DEFERRED
    assert attempt.reply.status.startswith("4.7.")
    assert sink.messages == []


def test_requiretls_defers_an_unverified_certificate(world: World) -> None:
    sink = world.sink("mx.elsewhere.test", requiretls=True)
    attempt = only(world.engine(sink).deliver([f"a@{PLAIN}"], requiretls=True))
    assert attempt.status is Status.DEFERRED
    assert sink.messages == []


def test_requiretls_is_sent_on_mail_when_offered(world: World) -> None:
    sink = world.sink(requiretls=True)
    engine = world.engine(sink)
    attempt = only(engine.deliver([f"a@{PLAIN}"], requiretls=True))
    assert attempt.status is Status.DELIVERED, attempt.reply
    assert (attempt.tls_policy, attempt.tls_verified) == ("requiretls", True)
    # An ordinary job to the same host: its own pool, no REQUIRETLS on its MAIL.
    assert only(engine.deliver([f"b@{PLAIN}"], job_id="job-2")).status is Status.DELIVERED
    first, second = sink.messages
    assert "REQUIRETLS" in first.mail_options and first.tls is not None
    assert "REQUIRETLS" not in second.mail_options
    assert world.counter("requiretls_ok") == 1


# -- TLS-RPT: what each delivery counts (engine.tlsrpt.Sessions wired in as the worker does) --


@pytest.fixture
def sessions() -> Iterator[tlsrpt.Sessions]:
    yield tlsrpt.Sessions("127.0.0.2")


def engine(world: World, sink: SinkServer, sessions: tlsrpt.Sessions,
           sts: bool = True) -> Stack:
    """The stack of test_mtasts, counting for TLS-RPT as engine.worker wires it."""
    mta_sts = world.mta_sts()
    mta_sts.on_failure = lambda domain, kind, why: sessions.failure(
        domain, tlsrpt.policy_of(tlsrpt.STS), kind, None, None, why)
    stack = world.engine(sink, mta_sts, sts=sts)
    stack.deliverer.tlsrpt = stack.connector.tlsrpt = sessions
    return stack


def counted(sessions: tlsrpt.Sessions) -> list[tuple[str, str, dict[str, str], int]]:
    """(policy type, result, detail, count) of every count taken."""
    return sorted((json.loads(policy)["policy-type"], result,
                   json.loads(detail) if detail else {}, count)
                  for (_, policy, result, detail), count in sessions.take().items())


def test_sessions_on_one_connection_count_once(world: World,
                                                sessions: tlsrpt.Sessions) -> None:
    stack = engine(world, world.sink(), sessions)
    for n in range(3):
        assert only(stack.deliver([RCPT], job_id=f"job-{n}")).status is Status.DELIVERED
    assert counted(sessions) == [("sts", "success", {}, 1)]


def test_a_certificate_for_another_name_is_a_host_mismatch(world: World,
                                                           sessions: tlsrpt.Sessions) -> None:
    stack = engine(world, world.sink("mx.elsewhere.test"), sessions)
    assert only(stack.deliver([RCPT])).status is Status.DEFERRED
    ((kind, result, detail, count),) = counted(sessions)
    assert (kind, result, count) == ("sts", "certificate-host-mismatch", 1)
    assert detail["receiving-mx-hostname"] == MX and detail["receiving-ip"] == MX_IP
    assert detail["sending-mta-ip"] == "127.0.0.2"


def test_starttls_stripped_under_enforce_is_starttls_not_supported(
        world: World, sessions: tlsrpt.Sessions) -> None:
    stack = engine(world, world.sink(tls=False), sessions)
    assert only(stack.deliver([RCPT])).status is Status.DEFERRED
    assert [(k, r, n) for k, r, _, n in counted(sessions)] == [
        ("sts", "starttls-not-supported", 1)]


def test_no_policy_counts_tls_as_success_and_plaintext_as_no_starttls(
        world: World, sessions: tlsrpt.Sessions) -> None:
    stack = engine(world, world.sink(), sessions, sts=False)
    assert only(stack.deliver([RCPT])).status is Status.DELIVERED
    assert counted(sessions) == [("no-policy-found", "success", {}, 1)]
    plain = engine(world, world.sink(tls=False), sessions, sts=False)
    assert only(plain.deliver([RCPT], job_id="job-2")).status is Status.DELIVERED
    assert [(k, r, n) for k, r, _, n in counted(sessions)] == [
        ("no-policy-found", "starttls-not-supported", 1)]


def test_testing_mode_reports_what_enforcing_would_refuse(world: World,
                                                          sessions: tlsrpt.Sessions) -> None:
    world.policy.policy = policy_text("testing", MX)
    stack = engine(world, world.sink("mx.elsewhere.test"), sessions)
    assert only(stack.deliver([RCPT])).status is Status.DELIVERED  # delivered all the same
    assert [(k, r, n) for k, r, _, n in counted(sessions)] == [
        ("sts", "validation-failure", 1)]


def test_an_mx_outside_the_policy_is_a_validation_failure(world: World,
                                                          sessions: tlsrpt.Sessions) -> None:
    world.dns.set("sts.test", {"MX": [(10, "rogue.sts.test")]})
    world.dns.set("rogue.sts.test", {"A": [MX_IP]})
    stack = engine(world, world.sink("rogue.sts.test"), sessions)
    assert only(stack.deliver([RCPT])).status is Status.DEFERRED
    assert [(k, r, n) for k, r, _, n in counted(sessions)] == [
        ("sts", "validation-failure", 1)]


@pytest.mark.parametrize(("answer", "result"), [
    ((500, {"Content-Type": "text/plain"}, b"down\n"), "sts-policy-fetch-error"),
    ((200, {"Content-Type": "text/plain"}, b"version: STSv9\r\n"), "sts-policy-invalid"),
])
def test_a_policy_that_cannot_be_had_is_reported_by_kind(
        world: World, sessions: tlsrpt.Sessions, answer: tuple[int, dict[str, str], bytes],
        result: str) -> None:
    world.policy.answer = answer
    stack = engine(world, world.sink(), sessions)
    assert only(stack.deliver([RCPT])).status is Status.DELIVERED  # no policy: as before
    found = counted(sessions)
    assert [(k, r, n) for k, r, _, n in found] == [
        ("no-policy-found", "success", 1), ("sts", result, 1)]
