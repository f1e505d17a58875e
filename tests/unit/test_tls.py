"""engine.tls: what each mode plans for a new connection, and what the policy remembers.

The handshakes themselves run against real servers in tests/conversation/test_connector.py.
"""
from __future__ import annotations

import ssl

import pytest

from engine.tls import MODES, TlsPolicy, is_verify_failure

HOST = "mx.example.test"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def policy(mode: str, clock: FakeClock | None = None, ttl: float = 600.0) -> TlsPolicy:
    return TlsPolicy(mode, broken_ttl=ttl, clock=clock or FakeClock())


def test_none_never_attempts_tls() -> None:
    plan = policy("none").plan(HOST)
    assert (plan.attempt, plan.context, plan.required, plan.checking) == (False, None, False, False)


def test_opportunistic_first_connection_tries_a_verifying_handshake() -> None:
    plan = policy("opportunistic").plan(HOST)
    assert plan.attempt and plan.checking and not plan.required
    assert plan.context is not None
    assert plan.context.verify_mode == ssl.CERT_REQUIRED and plan.context.check_hostname


def test_required_insists_on_tls_without_checking_the_certificate() -> None:
    plan = policy("required").plan(HOST)
    assert plan.attempt and plan.required and not plan.checking
    assert plan.context is not None and plan.context.verify_mode == ssl.CERT_NONE
    assert not plan.context.check_hostname


def test_verify_insists_on_a_valid_certificate_for_the_host_name() -> None:
    plan = policy("verify").plan(HOST)
    assert plan.attempt and plan.required and not plan.checking
    assert plan.context is not None
    assert plan.context.verify_mode == ssl.CERT_REQUIRED and plan.context.check_hostname


def test_unknown_mode_is_refused() -> None:
    assert "opportunistic" in MODES
    with pytest.raises(ValueError, match="unknown TLS mode"):
        TlsPolicy("sometimes")


def test_broken_host_gets_plaintext_until_the_memory_expires() -> None:
    clock = FakeClock()
    tls = policy("opportunistic", clock, ttl=600)
    tls.mark_broken(HOST)
    assert tls.is_broken(HOST)
    assert not tls.plan(HOST).attempt
    assert tls.plan("other.example.test").attempt  # per host
    clock.now += 599
    assert not tls.plan(HOST).attempt
    clock.now += 1
    assert not tls.is_broken(HOST)
    assert tls.plan(HOST).attempt and tls.plan(HOST).checking


def test_unverifiable_host_skips_the_check_until_the_memory_expires() -> None:
    clock = FakeClock()
    tls = TlsPolicy("opportunistic", clock=clock, unverified_ttl=60)
    tls.mark_unverifiable(HOST)
    plan = tls.plan(HOST)
    assert plan.attempt and not plan.checking and not plan.required
    assert plan.context is not None and plan.context.verify_mode == ssl.CERT_NONE
    clock.now += 60
    assert tls.plan(HOST).checking


@pytest.mark.parametrize("mode", ["required", "verify"])
def test_strict_modes_never_fall_back_to_plaintext_for_a_broken_host(mode: str) -> None:
    tls = policy(mode)
    tls.mark_broken(HOST)
    tls.mark_unverifiable(HOST)
    plan = tls.plan(HOST)
    assert plan.attempt and plan.required


def test_is_verify_failure_follows_the_cause_chain() -> None:
    verify = ssl.SSLCertVerificationError("certificate verify failed")
    try:
        try:
            raise verify
        except ssl.SSLError as exc:
            raise RuntimeError("wrapped") from exc
    except RuntimeError as outer:
        assert is_verify_failure(outer)
    assert not is_verify_failure(ssl.SSLError("wrong version number"))
    assert not is_verify_failure(None)


def test_fallback_after_a_failed_handshake_is_unchecked_tls_then_plaintext() -> None:
    tls = policy("opportunistic")
    first = tls.plan(HOST)
    unchecked = tls.fallback(first, verify_failed=True)
    assert unchecked.attempt and not unchecked.checking and not unchecked.required
    assert unchecked.context is not None and unchecked.context.verify_mode == ssl.CERT_NONE
    assert not tls.fallback(unchecked, verify_failed=True).attempt  # bounded: then plaintext
    assert not tls.fallback(first, verify_failed=False).attempt


def verify_failure() -> Exception:
    err = Exception("handshake")
    err.__cause__ = ssl.SSLCertVerificationError("unknown ca")
    return err


def test_while_one_connection_checks_a_host_another_waits_for_its_verdict() -> None:
    """Two connections reach STARTTLS together: the second does not start a verifying
    handshake of its own (one more aborted handshake) but waits, and follows the verdict."""
    import gevent

    tls = policy("opportunistic")
    order: list[str] = []

    def first() -> None:
        with pytest.raises(Exception, match="handshake"), tls.verifying(HOST):
            gevent.sleep(0.05)
            order.append("first failed its check")
            raise verify_failure()

    def second() -> None:
        assert tls.await_verdict(HOST, 5.0)
        order.append("second woken")
        assert not tls.plan(HOST).checking  # straight to the handshake without the check

    gevent.joinall([gevent.spawn(first), gevent.spawn(second)], timeout=5, raise_error=True)
    assert order == ["first failed its check", "second woken"]
    assert not tls.await_verdict(HOST, 5.0)  # nothing under way now


def test_the_wait_for_a_verdict_is_short_and_per_server(monkeypatch: pytest.MonkeyPatch) -> None:
    """A check under way with one port of a host holds no connection to another port; and a
    check that drips on (a hostile server) holds the others VERDICT_WAIT at most, not the
    whole setup deadline: they then check for themselves."""
    import time

    import gevent

    from engine import tls as tls_mod
    monkeypatch.setattr(tls_mod, "VERDICT_WAIT", 0.2)
    tls = policy("opportunistic")

    def dripping() -> None:
        with tls.verifying(HOST, 2525):
            gevent.sleep(5)

    checker = gevent.spawn(dripping)
    gevent.sleep(0)
    assert not tls.await_verdict(HOST, 30.0, port=25)  # another server: nothing to wait for
    started = time.monotonic()
    assert tls.await_verdict(HOST, 30.0, port=2525)
    assert time.monotonic() - started < 1.0
    assert tls.plan(HOST).checking  # no verdict came: it checks for itself
    checker.kill()

def test_a_verdict_that_verified_leaves_the_next_connection_checking() -> None:
    import gevent

    tls = policy("opportunistic")

    def first() -> None:
        with tls.verifying(HOST):
            gevent.sleep(0.02)

    checker = gevent.spawn(first)
    gevent.sleep(0)
    assert tls.await_verdict(HOST, 5.0) and tls.plan(HOST).checking
    checker.join(timeout=5)


def test_an_unverifiable_host_is_remembered_for_the_unverified_ttl_not_the_broken_ttl() -> None:
    clock = FakeClock()
    tls = TlsPolicy("opportunistic", broken_ttl=60.0, clock=clock, unverified_ttl=86400.0)
    tls.mark_unverifiable(HOST)
    clock.now += 3600
    assert not tls.plan(HOST).checking
    clock.now += 86400
    assert tls.plan(HOST).checking
