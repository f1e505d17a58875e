"""TLS reporting (RFC 8460), the worker's half: each TLS session's outcome counted per policy
domain, and where the domain wants its report (`_smtp._tls` TXT).

A *session* is a connection that carried mail for the policy domain (counted once per
connection and domain: a connection reused for the domain's next messages is the same
session, and a connection the pool shares between two domains with the same MX host is a
session of each), or a failed attempt at one: a host the domain's policy made the engine
give up on (no STARTTLS, a certificate that does not verify, no TLSA record matching, an
MX host the MTA-STS policy does not name), or an MTA-STS policy that could not be fetched.

The policy of a session (RFC 8460 4.3, `policy_of`):
- `sts`: an MTA-STS policy in `enforce` or `testing` mode (its lines, its mx patterns);
- `tlsa`: DANE (the MX host's usable TLSA records, as presentation text);
- `no-policy-found`: anything else. Here a session with TLS is a success, one without
  because the server offered no STARTTLS is `starttls-not-supported`, and one without TLS
  by the operator's choice (mode `none`, a host remembered as TLS-broken) is not counted.

Failures come from engine.connector, which tags the error it raises for a session that
failed for a TLS reason (`Sessions.tag`): a copy of that error (the pool hands one to
every caller waiting for the same connection) carries no tag, so one failed session is
counted once. engine.delivery calls `Sessions.success` and `Sessions.failed`; the hot path
costs a dictionary increment, and a lookup for the connection it already counted.

Every STATS interval the worker takes the counts (`Sessions.take`), looks up the domains'
`_smtp._tls` TXT records through its resolver (cached like every answer: engine.mx), drops
the domains that publish none, and sends the rest to the supervisor (engine.protocol,
`tlsrpt` frame), which keeps them in the spool and sends the reports (engine.tlsrpt_store).
"""
from __future__ import annotations

import json
import re
import ssl
import weakref
from collections.abc import Callable, Sequence
from typing import Any

from engine.reply import DeliveryError

# RFC 8460 4.3: the policy types.
STS, TLSA, NO_POLICY = "sts", "tlsa", "no-policy-found"
SUCCESS = "success"  # not a result type of the RFC: a successful session
# RFC 8460 4.3.2: the result types.
STARTTLS_NOT_SUPPORTED = "starttls-not-supported"
CERTIFICATE_HOST_MISMATCH = "certificate-host-mismatch"
CERTIFICATE_EXPIRED = "certificate-expired"
CERTIFICATE_NOT_TRUSTED = "certificate-not-trusted"
VALIDATION_FAILURE = "validation-failure"
TLSA_INVALID = "tlsa-invalid"
DNSSEC_INVALID = "dnssec-invalid"
DANE_REQUIRED = "dane-required"
STS_POLICY_FETCH_ERROR = "sts-policy-fetch-error"
STS_POLICY_INVALID = "sts-policy-invalid"
STS_WEBPKI_INVALID = "sts-webpki-invalid"
RESULT_TYPES = (STARTTLS_NOT_SUPPORTED, CERTIFICATE_HOST_MISMATCH, CERTIFICATE_EXPIRED,
                CERTIFICATE_NOT_TRUSTED, VALIDATION_FAILURE, TLSA_INVALID, DNSSEC_INVALID,
                DANE_REQUIRED, STS_POLICY_FETCH_ERROR, STS_POLICY_INVALID, STS_WEBPKI_INVALID)

# OpenSSL's X509_V_ERR codes that have a result type of their own.
_X509_EXPIRED = 10  # certificate has expired
_X509_HOSTNAME_MISMATCH = 62

MAX_RUA = 10  # rua URIs kept per domain
MAX_URI = 512  # characters of one rua URI
MAX_REASON = 200  # characters of a failure-reason-code
MAX_KEYS = 50_000  # distinct counts held between two takes (a bound on memory)

# RFC 8460 3: "v=TLSRPTv1; rua=<uri>[,<uri>...]". mailto: (RFC 6068, one address, no
# header fields) or https: (a host name, an optional port, a path without spaces).
_MAILTO = re.compile(r"mailto:([A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]{1,64}"
                     r"@[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*"
                     r"[A-Za-z0-9])?)+)")
_HTTPS = re.compile(r"https://[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]"
                    r"([A-Za-z0-9-]*[A-Za-z0-9])?)+(:[0-9]{1,5})?(/[!-~]*)?")


def valid_uri(uri: str) -> bool:
    """Whether `uri` is a rua URI the engine sends to: mailto: with one address, or https:."""
    return len(uri) <= MAX_URI and bool(_MAILTO.fullmatch(uri) or _HTTPS.fullmatch(uri))


def parse_txt(records: Sequence[str]) -> tuple[str, ...] | None:
    """The rua URIs of a domain's `_smtp._tls` TXT records, or None (RFC 8460 3: records
    not starting with "v=TLSRPTv1" are ignored; not exactly one left, or one without a
    usable rua, means no report is wanted). URIs of other schemes, or not well formed,
    are left out."""
    found = [r for r in records if r.startswith("v=TLSRPTv1")]
    if len(found) != 1:
        return None
    fields: dict[str, str] = {}
    for part in found[0].split(";"):
        name, eq, value = part.strip(" \t").partition("=")
        if eq:
            fields.setdefault(name.strip(" \t"), value.strip(" \t"))
    if fields.get("v") != "TLSRPTv1":
        return None
    uris = []
    for uri in fields.get("rua", "").split(","):
        uri = uri.strip(" \t")
        if valid_uri(uri):
            uris.append(uri)
    return tuple(dict.fromkeys(uris))[:MAX_RUA] or None


def policy_of(kind: str, strings: Sequence[str] = (), mx: Sequence[str] = ()) -> str:
    """A policy as it travels and is stored: canonical JSON of its RFC 8460 fields but the
    domain (`policy-type`, `policy-string`, `mx-host`)."""
    policy: dict[str, Any] = {"policy-type": kind}
    if strings:
        policy["policy-string"] = list(strings)
    if mx:
        policy["mx-host"] = list(mx)
    return json.dumps(policy, sort_keys=True, separators=(",", ":"))


NO_POLICY_JSON = policy_of(NO_POLICY)


def detail_of(sending_ip: str, mx: str | None, receiving_ip: str | None,
              reason: str | None) -> str:
    """A failure's details but its result type and count (RFC 8460 4.3, failure-details),
    canonical JSON."""
    detail = {"sending-mta-ip": sending_ip}
    if mx:
        detail["receiving-mx-hostname"] = mx
    if receiving_ip:
        detail["receiving-ip"] = receiving_ip
    if reason:
        detail["failure-reason-code"] = reason[:MAX_REASON]
    return json.dumps(detail, sort_keys=True, separators=(",", ":"))


def verify_result(err: BaseException | None) -> str:
    """The result type of a TLS handshake that failed (`err`, with its causes): a
    certificate that is not valid for the name, expired, or not trusted; else a
    validation-failure."""
    while err is not None:
        if isinstance(err, ssl.SSLCertVerificationError):
            code = getattr(err, "verify_code", None)
            if code == _X509_HOSTNAME_MISMATCH:
                return CERTIFICATE_HOST_MISMATCH
            if code == _X509_EXPIRED:
                return CERTIFICATE_EXPIRED
            return CERTIFICATE_NOT_TRUSTED
        err = err.__cause__ or err.__context__
    return VALIDATION_FAILURE


# (domain, policy JSON, result, detail JSON) -> sessions
Key = tuple[str, str, str, str]


class Sessions:
    """The counts of one worker between two takes (see the module's docstring)."""

    def __init__(self, sending_ip: str) -> None:
        self.sending_ip = sending_ip
        self.counts: dict[Key, int] = {}
        self.dropped = 0  # counts left out because MAX_KEYS were held
        # The connections already counted, and for which domains.
        self._counted: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()
        # The errors engine.connector raised for a failed session: (result, receiving ip).
        self._tags: weakref.WeakKeyDictionary[BaseException, tuple[str, str | None, str]] = \
            weakref.WeakKeyDictionary()

    def add(self, key: Key, count: int = 1) -> None:
        counts = self.counts
        if key in counts:
            counts[key] += count
        elif len(counts) < MAX_KEYS:
            counts[key] = count
        else:
            self.dropped += count

    def first(self, conn: Any, domain: str) -> bool:
        """Whether `conn` carries mail for `domain` for the first time (then it is a
        session to count; it is marked as counted)."""
        seen = self._counted.get(conn)
        if seen is None:
            self._counted[conn] = {domain}
        elif domain in seen:
            return False
        else:
            seen.add(domain)
        return True

    def success(self, domain: str, policy: str) -> None:
        """A successful session for `domain` under `policy` (policy_of)."""
        self.add((domain, policy, SUCCESS, ""))

    def tag(self, err: DeliveryError, result: str, receiving_ip: str | None) -> DeliveryError:
        """Mark `err` as the failure of a session for a TLS reason (`result`); returns it."""
        self._tags[err] = (result, receiving_ip, err.reply.text)
        return err

    def tagged(self, err: BaseException) -> bool:
        """Whether engine.connector tagged `err` (and it is not counted yet)."""
        return err in self._tags

    def failed(self, domain: str, policy: str, mx: str, err: BaseException) -> bool:
        """Count `err` if engine.connector tagged it (a copy of it is not: the same
        session); True if it was."""
        tag = self._tags.pop(err, None)
        if tag is None:
            return False
        result, receiving_ip, reason = tag
        self.add((domain, policy, result, detail_of(self.sending_ip, mx, receiving_ip,
                                                     reason)))
        return True

    def failure(self, domain: str, policy: str, result: str, mx: str | None,
                receiving_ip: str | None, reason: str | None) -> None:
        """A failed session seen outside engine.connector (a policy in testing mode, a
        server without STARTTLS under no policy), or a failure without a session (the
        policy allows none of the MX hosts, the MTA-STS policy could not be fetched)."""
        self.add((domain, policy, result, detail_of(self.sending_ip, mx, receiving_ip,
                                                     reason)))

    def take(self) -> dict[Key, int]:
        """The counts since the last take; the counter starts again from zero."""
        counts, self.counts = self.counts, {}
        return counts


def rows(counts: dict[Key, int], rua: Callable[[str], tuple[str, ...] | None]
         ) -> tuple[list[list[Any]], dict[str, list[str]], dict[Key, int]]:
    """The counts of domains that want reports (`rua(domain)`, their URIs or None) as
    rows `[domain, policy, result, detail, count]`, the domains' URIs, and the counts
    whose lookup failed (DeliveryError: the worker keeps them for one more take)."""
    out: list[list[Any]] = []
    uris: dict[str, list[str]] = {}
    later: dict[Key, int] = {}
    known: dict[str, tuple[str, ...] | None] = {}
    for key, count in counts.items():
        domain = key[0]
        if domain not in known:
            try:
                known[domain] = rua(domain)
            except DeliveryError:
                known[domain] = None
                later.update((k, c) for k, c in counts.items() if k[0] == domain)
        found = known[domain]
        if found is None:
            continue
        uris[domain] = list(found)
        out.append([*key, count])
    return out, uris, later
