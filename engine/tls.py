"""TLS policy for outbound connections (RFC 3207 STARTTLS, RFC 7435 opportunistic security).

Modes:
- ``none``: never STARTTLS.
- ``opportunistic`` (default): STARTTLS whenever offered, and a certificate that
  does not verify is still used (encryption beats plaintext). The certificate is
  still checked, and the result recorded: the first connection to a host tries a
  verifying handshake; if only verification fails, the host is remembered as
  unverified for ``smtp.tls_unverified_ttl`` (a day) and later connections skip the
  check. One verifying handshake per host at a time (`TlsPolicy.verifying`): a
  connection that reaches STARTTLS while another is checking the same server waits for
  its verdict (VERDICT_WAIT at most), so a host whose certificate does not verify costs
  one aborted handshake per worker and day, not one per connection opened meanwhile.
  (One handshake that records the result without aborting would need OpenSSL's
  SSL_get_verify_result after a handshake with SSL_VERIFY_NONE, which Python's ssl
  module does not expose.)
  A host whose handshake fails outright is remembered as TLS-broken for
  ``smtp.tls_broken_ttl`` and gets plaintext meanwhile (else every message to it
  would fail).
- ``required``: TLS must be negotiated (certificate not checked), or the host is
  skipped and the mail deferred.
- ``verify``: TLS with a certificate valid for the MX host name, or deferred.

DANE (engine.dane) is a plan of its own (`TlsPolicy.dane`): TLS required, the certificate
not checked by OpenSSL but matched against the host's TLSA records after the handshake
(engine.connector).
"""
from __future__ import annotations

import contextlib
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import gevent.event

MODES = ("none", "opportunistic", "required", "verify")


# s: the longest a connection waits for another's certificate check of the same server
# (a handshake takes a few round trips): past it, it checks for itself.
VERDICT_WAIT = 2.0


@dataclass(frozen=True)
class TlsPlan:
    """What to do on one new connection to one MX host."""

    attempt: bool  # send STARTTLS if offered
    context: ssl.SSLContext | None
    required: bool  # no TLS -> give up on this host
    checking: bool  # the context verifies; a verify-only failure falls back
    dane: tuple[Any, ...] = ()  # the host's usable TLSA records (engine.dane.Tlsa) to match


class TlsPolicy:
    """Per-worker TLS decisions and what the worker learned about MX hosts."""

    def __init__(self, mode: str, ca_file: str | None = None, broken_ttl: float = 3600.0,
                 clock: Callable[[], float] = time.monotonic,
                 unverified_ttl: float = 86400.0) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown TLS mode {mode!r}")
        self.mode = mode
        self.broken_ttl = broken_ttl
        self.unverified_ttl = unverified_ttl
        self._clock = clock
        self._verifying = _verifying_context(ca_file)
        self._unverified = _unverified_context()
        self._broken: dict[str, float] = {}  # host -> until
        self._unverifiable: dict[str, float] = {}  # host -> until
        # (host, port) -> set at its verdict: another port is another server
        self._checking: dict[tuple[str, int], gevent.event.Event] = {}

    def plan(self, host: str, mode: str | None = None) -> TlsPlan:
        """The plan for a new connection to `host` in `mode` (None: the policy's own; a
        domain's TLS policy may ask for another, engine.tlspolicy)."""
        mode = mode or self.mode
        if mode == "none":
            return TlsPlan(False, None, False, False)
        if mode == "verify":
            return TlsPlan(True, self._verifying, True, False)
        if mode == "required":
            return TlsPlan(True, self._unverified, True, False)
        if self._active(self._broken, host):
            return TlsPlan(False, None, False, False)
        if self._active(self._unverifiable, host):
            return TlsPlan(True, self._unverified, False, False)
        return TlsPlan(True, self._verifying, False, True)

    def dane(self, records: tuple[Any, ...]) -> TlsPlan:
        """The plan for a host with usable TLSA `records`: TLS required, matched by DANE."""
        return TlsPlan(True, self._unverified, True, False, records)

    def fallback(self, plan: TlsPlan, verify_failed: bool) -> TlsPlan:
        """The plan for the one retry after `plan`'s handshake failed: without the check if
        only verification failed, else plaintext. Explicit rather than read back from what
        was just remembered: with `broken_ttl` 0 that memory is already gone."""
        if plan.checking and verify_failed:
            return TlsPlan(True, self._unverified, False, False)
        return TlsPlan(False, None, False, False)

    def mark_broken(self, host: str) -> None:
        """The handshake with `host` failed: plaintext for a while."""
        self._broken[host] = self._clock() + self.broken_ttl

    def mark_unverifiable(self, host: str) -> None:
        """`host`'s certificate does not verify: skip the check for a while."""
        self._unverifiable[host] = self._clock() + self.unverified_ttl

    def await_verdict(self, host: str, timeout: float, port: int = 25) -> bool:
        """If a verifying handshake with `host` is under way (`verifying`), wait for its
        verdict, at most `timeout` seconds and VERDICT_WAIT; True if there was one to wait
        for (the plan may have changed: ask again). Regression: waited for the whole setup
        deadline, a server dripping its handshake held every other connection to that
        address for as long (5 s for healthy mail, tests/engine/test_hostile.py)."""
        pending = self._checking.get((host, port))
        if pending is None:
            return False
        pending.wait(min(timeout, VERDICT_WAIT))
        return True

    @contextlib.contextmanager
    def verifying(self, host: str, port: int = 25) -> Iterator[None]:
        """Around a verifying handshake with `host` (a plan that is `checking`): others
        `await_verdict` meanwhile; a failure of the check alone is remembered before
        they are woken."""
        key = (host, port)
        pending = self._checking.setdefault(key, gevent.event.Event())
        try:
            yield
        except BaseException as exc:
            if is_verify_failure(exc):
                self.mark_unverifiable(host)
            raise
        finally:
            if self._checking.get(key) is pending:
                del self._checking[key]
            pending.set()

    def is_broken(self, host: str) -> bool:
        return self._active(self._broken, host)

    def _active(self, table: dict[str, float], host: str) -> bool:
        until = table.get(host)
        if until is None:
            return False
        if until <= self._clock():
            del table[host]
            return False
        return True


class CaFileError(Exception):
    """`smtp.ca_file` cannot be loaded (gone, unreadable, not PEM): the message names it."""


def _verifying_context(ca_file: str | None) -> ssl.SSLContext:
    try:
        ctx = ssl.create_default_context(cafile=ca_file)
    except ssl.SSLError as err:  # engine.startcheck says the same at start
        raise CaFileError(f"smtp.ca_file {ca_file}: not a file of PEM CA certificates"
                          f" ({err.reason})") from err
    except OSError as err:
        raise CaFileError(f"smtp.ca_file {ca_file}: cannot be read: {err.strerror or err}"
                          ) from err
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def _unverified_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def is_verify_failure(exc: BaseException | None) -> bool:
    """True when a handshake failed only because the certificate did not verify."""
    while exc is not None:
        if isinstance(exc, ssl.SSLCertVerificationError):
            return True
        exc = exc.__cause__
    return False
