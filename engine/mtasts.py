"""MTA-STS (RFC 8461): a receiving domain's published wish that mail reach it only over TLS
with a certificate valid for an MX host it names.

A domain publishes a TXT record at `_mta-sts.<domain>` (`v=STSv1; id=...;`) and a policy
at `https://mta-sts.<domain>/.well-known/mta-sts.txt`:

    version: STSv1
    mode: enforce            # enforce | testing | none
    mx: mx1.example.com      # one line per pattern; "*." matches one leftmost label
    max_age: 604800          # seconds a sender keeps the policy

`MtaSts.policy(domain)` gives the policy that applies now, or None:
- the TXT record is looked up through the worker's resolver (engine.mx: its cache honours
  the record's TTL); not exactly one `v=STSv1` record means "no policy announced";
- a policy is fetched when none is cached, when the cached one expired (`max_age`) or when
  the TXT record's `id` differs from the one it was fetched under;
- the fetch: HTTPS to `mta-sts.<domain>` (its address through the same resolver, checked by
  the destination policy like an MX host's: docs/SECURITY.md), a certificate valid for that
  name (`smtp.ca_file`, else the system's CAs), from the worker's sending IP, no redirect
  followed, at most MAX_POLICY_BYTES, within `timeout` seconds in all; a 200 answer of type
  text/plain, parsed strictly (`parse_policy`);
- a cached policy that has not expired keeps applying whatever happens to the TXT lookup or
  the fetch (RFC 8461 5.1, the downgrade protection: an attacker who blocks the fetch or
  strips the TXT record gains nothing). A failed fetch is not tried again for
  RETRY_FAILED_FETCH seconds.

The cache lives in memory and in a small SQLite file (`PolicyStore`, the worker's state
folder): a restart keeps the policies. The file is written only when a policy is fetched
(rare), read once at start.

What a policy means for delivery (the MX hosts allowed, TLS required) is engine.tlspolicy's.
"""
from __future__ import annotations

import functools
import http.client
import logging
import re
import socket
import sqlite3
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from engine import logs, tlsrpt
from engine.config import names
from engine.metrics import Metrics
from engine.mx import DestinationPolicy, Resolver
from engine.reply import DeliveryError
from engine.tls import CaFileError

log = logging.getLogger("mailengine.mtasts")

POLICY_PATH = "/.well-known/mta-sts.txt"
MAX_POLICY_BYTES = 64 * 1024  # RFC 8461 3.3: senders may limit the policy's size (64 KB)
MAX_AGE_LIMIT = 31_557_600  # RFC 8461 3.2: about a year
RETRY_FAILED_FETCH = 300.0  # seconds before a failed fetch for a domain is tried again
MODES = ("enforce", "testing", "none")
_INVALID = tlsrpt.STS_POLICY_INVALID

# RFC 8461 3.1: sts-id = 1*32( ALPHA / DIGIT ); extension fields name=value.
_TXT_ID = re.compile(r"[A-Za-z0-9]{1,32}")
_TXT_EXT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
_TXT_EXT_VALUE = re.compile(r"[\x21-\x3a\x3c\x3e-\x7e]+")
# RFC 8461 3.2: policy fields.
_FIELD = re.compile(r"([A-Za-z0-9][A-Za-z0-9_.-]{0,31}):[ \t]*([\x21-\x7e](?:[ \t\x21-\x7e]*"
                    r"[\x21-\x7e])?)?[ \t]*")
_MAX_AGE = re.compile(r"[0-9]{1,10}")


class PolicyError(ValueError):
    """A policy that could not be fetched or read; the words say why, `kind` says it as
    TLS-RPT does (RFC 8460 4.3.2.2: sts-policy-fetch-error, sts-policy-invalid or
    sts-webpki-invalid; engine.tlsrpt)."""

    def __init__(self, message: str, kind: str = tlsrpt.STS_POLICY_FETCH_ERROR) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Policy:
    """A domain's policy as fetched: its mode, MX patterns and lifetime."""

    domain: str
    mode: str  # enforce | testing | none
    mx: tuple[str, ...]  # patterns, lowercase, no trailing dot
    max_age: int  # seconds
    id: str  # the TXT record's id it was fetched under
    fetched: float  # Unix seconds

    @property
    def expires(self) -> float:
        return self.fetched + self.max_age

    @functools.cached_property
    def report_policy(self) -> str:
        """The policy as a TLS-RPT report names it (engine.tlsrpt.policy_of)."""
        lines = ["version: STSv1", f"mode: {self.mode}", *(f"mx: {m}" for m in self.mx),
                 f"max_age: {self.max_age}"]
        return tlsrpt.policy_of(tlsrpt.STS, lines, self.mx)

    def allows(self, host: str) -> bool:
        """Whether MX host `host` matches one of the policy's patterns (RFC 8461 4.1)."""
        return any(mx_matches(pattern, host) for pattern in self.mx)


def mx_matches(pattern: str, host: str) -> bool:
    """RFC 8461 4.1: case-insensitive; "*.example.com" matches exactly one more label on
    the left ("mx.example.com", not "example.com" nor "a.b.example.com")."""
    host = host.rstrip(".").lower()
    pattern = pattern.rstrip(".").lower()
    if pattern.startswith("*."):
        label, _, rest = host.partition(".")
        return bool(label) and rest == pattern[2:]
    return host == pattern


def parse_txt(records: Sequence[str]) -> str | None:
    """The policy id announced by a domain's `_mta-sts` TXT records, or None (RFC 8461 3.1:
    records not starting with "v=STSv1" are ignored; not exactly one left, or one that is
    not well formed, means no policy is announced)."""
    sts = [r for r in records if r.startswith("v=STSv1")]
    if len(sts) != 1:
        return None
    fields: dict[str, str] = {}
    for part in sts[0].split(";"):
        part = part.strip(" \t")
        if not part:
            continue
        name, eq, value = part.partition("=")
        if not eq or not _TXT_EXT_NAME.fullmatch(name) or not _TXT_EXT_VALUE.fullmatch(value):
            return None
        fields.setdefault(name, value)
    if fields.get("v") != "STSv1":
        return None
    ident = fields.get("id", "")
    return ident if _TXT_ID.fullmatch(ident) else None


def parse_policy(body: bytes, domain: str, ident: str, now: float) -> Policy:
    """A policy file read strictly (RFC 8461 3.2): ASCII lines of `name: value` (CRLF, or
    LF as some servers write), `version: STSv1`, a known `mode`, a `max_age` of at most
    MAX_AGE_LIMIT, and for a mode other than "none" at least one `mx` pattern; unknown
    fields are ignored, a repeated field other than `mx` is an error. PolicyError says what
    is wrong."""
    try:
        text = body.decode("ascii")
    except UnicodeDecodeError:
        raise PolicyError("the policy is not ASCII text", _INVALID) from None
    single: dict[str, str] = {}
    mx: list[str] = []
    for number, line in enumerate(text.replace("\r\n", "\n").split("\n"), 1):
        if not line:
            continue
        match = _FIELD.fullmatch(line)
        if match is None or match.group(2) is None:
            raise PolicyError(f"line {number} of the policy is not 'name: value'", _INVALID)
        name, value = match.group(1).lower(), match.group(2)
        if name == "mx":
            mx.append(_mx_pattern(value, number))
        elif name in ("version", "mode", "max_age"):
            if name in single:
                raise PolicyError(f"the policy has '{name}' twice", _INVALID)
            single[name] = value
    return _policy(single, tuple(mx), domain, ident, now)


def _policy(single: dict[str, str], mx: tuple[str, ...], domain: str, ident: str,
            now: float) -> Policy:
    if single.get("version") != "STSv1":
        raise PolicyError("the policy's version is not STSv1", _INVALID)
    mode = single.get("mode")
    if mode not in MODES:
        raise PolicyError(f"the policy's mode is {mode!r}, not one of {', '.join(MODES)}",
                          _INVALID)
    max_age = single.get("max_age", "")
    if not _MAX_AGE.fullmatch(max_age) or int(max_age) > MAX_AGE_LIMIT:
        raise PolicyError(f"the policy's max_age is {max_age!r}, not 0 to {MAX_AGE_LIMIT}",
                          _INVALID)
    if mode != "none" and not mx:
        raise PolicyError(f"the policy's mode is {mode} and it names no mx", _INVALID)
    return Policy(domain, mode, mx, int(max_age), ident, now)


def _mx_pattern(value: str, number: int) -> str:
    pattern = value.rstrip(".").lower()
    name = pattern[2:] if pattern.startswith("*.") else pattern
    if not names.is_hostname(name) or "." not in name:
        raise PolicyError(f"line {number} of the policy: {value!r} is not an mx pattern",
                          _INVALID)
    return pattern


# -- fetching ------------------------------------------------------------------------------


@dataclass(frozen=True)
class FetchSettings:
    """How policies are fetched. `port` is 443 but for tests (tls_policy.mta_sts_https_port);
    `source`: the address the HTTPS connection binds to (the worker's sending IP)."""

    context: ssl.SSLContext
    source: str | None = None
    port: int = 443
    timeout: float = 10.0


def https_context(ca_file: str | None) -> ssl.SSLContext:
    """A context that verifies the server's certificate and name (`ca_file`, else the
    system's CAs)."""
    try:
        context = ssl.create_default_context(cafile=ca_file)
    except (ssl.SSLError, OSError) as err:  # as engine.tls says it (the worker names it)
        raise CaFileError(f"smtp.ca_file {ca_file}: cannot be loaded ({err})") from err
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def fetch(domain: str, address: str, settings: FetchSettings) -> bytes:
    """The policy file of `domain` from `address` (an address of mta-sts.<domain>): the body
    of a 200 text/plain answer, at most MAX_POLICY_BYTES, within settings.timeout seconds in
    all. PolicyError otherwise (a redirect is an error: RFC 8461 3.3)."""
    host = f"mta-sts.{domain}"
    deadline = time.monotonic() + settings.timeout
    source = None if settings.source is None else (settings.source, 0)
    try:
        sock = socket.create_connection((address, settings.port), settings.timeout, source)
    except OSError as exc:
        raise PolicyError(f"could not connect to {host} ({address}): {exc}") from exc
    conn = http.client.HTTPSConnection(host, settings.port, timeout=settings.timeout,
                                       context=settings.context)
    try:
        try:
            conn.sock = settings.context.wrap_socket(sock, server_hostname=host)
        except BaseException:
            sock.close()
            raise
        conn.request("GET", POLICY_PATH, headers={"Connection": "close",
                                                  "User-Agent": "mailengine"})
        response = conn.getresponse()
        try:
            return _body(response, deadline)
        finally:
            response.close()
    except ssl.SSLCertVerificationError as exc:  # RFC 8460 4.3.2.2: the policy host's
        raise PolicyError(f"fetching https://{host}{POLICY_PATH} failed: {exc}",  # PKI
                          tlsrpt.STS_WEBPKI_INVALID) from exc
    except (OSError, http.client.HTTPException) as exc:
        raise PolicyError(f"fetching https://{host}{POLICY_PATH} failed: {exc}") from exc
    finally:
        conn.close()


def _body(response: http.client.HTTPResponse, deadline: float) -> bytes:
    if response.status != 200:
        raise PolicyError(f"the policy server answered {response.status} {response.reason}"
                          + (" (redirects are not followed)" if 300 <= response.status < 400
                             else ""))
    media = (response.getheader("Content-Type") or "").split(";")[0].strip().lower()
    if media != "text/plain":
        raise PolicyError(f"the policy is served as {media or 'no type'!r}, not text/plain",
                          _INVALID)
    chunks: list[bytes] = []
    size = 0
    while True:
        if time.monotonic() > deadline:
            raise PolicyError("fetching the policy took too long")
        chunk = response.read1(16384)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > MAX_POLICY_BYTES:
            raise PolicyError(f"the policy is larger than {MAX_POLICY_BYTES} bytes", _INVALID)
        chunks.append(chunk)


# -- the cache -----------------------------------------------------------------------------


class PolicyStore:
    """Policies kept across restarts: one SQLite file, one row per domain. Written when a
    policy is fetched, read at start; a store that cannot be written is logged and the
    policies stay in memory."""

    def __init__(self, path: str | None) -> None:
        self._db: sqlite3.Connection | None = None
        if path:
            try:
                self._db = sqlite3.connect(path, timeout=1.0, isolation_level=None,
                                           check_same_thread=False)
                self._db.execute("CREATE TABLE IF NOT EXISTS policies (domain TEXT PRIMARY KEY,"
                                 " mode TEXT, mx TEXT, max_age INTEGER, id TEXT, fetched REAL)")
            except sqlite3.Error as exc:
                log.warning(logs.kv("mta_sts_store_failed", path=path, error=exc))
                self._db = None

    def load(self, now: float) -> dict[str, Policy]:
        if self._db is None:
            return {}
        try:
            rows = self._db.execute("SELECT domain, mode, mx, max_age, id, fetched"
                                    " FROM policies").fetchall()
        except sqlite3.Error as exc:
            log.warning(logs.kv("mta_sts_store_failed", error=exc))
            return {}
        policies = {}
        for domain, mode, mx, max_age, ident, fetched in rows:
            policy = Policy(domain, mode, tuple(mx.split()), int(max_age), ident, float(fetched))
            if policy.expires > now and mode in MODES:
                policies[domain] = policy
        return policies

    def save(self, policy: Policy) -> None:
        if self._db is None:
            return
        try:
            self._db.execute("INSERT OR REPLACE INTO policies VALUES (?, ?, ?, ?, ?, ?)",
                             (policy.domain, policy.mode, " ".join(policy.mx), policy.max_age,
                              policy.id, policy.fetched))
        except sqlite3.Error as exc:
            log.warning(logs.kv("mta_sts_store_failed", domain=policy.domain, error=exc))

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


# How MtaSts looks names up: TXT records of a name, addresses of a host (engine.mx.Resolver).
TxtLookup = Callable[[str], list[str]]
AddressLookup = Callable[[str], list[str]]


class MtaSts:
    """The policies of the domains this worker sends to (see the module's docstring).

    `txt` and `addresses` look names up (the worker's resolver); `permitted` filters the
    addresses of mta-sts.<domain> (the destination policy); `fetcher` fetches a policy file
    from one address (engine.mtasts.fetch with the settings bound)."""

    def __init__(self, txt: TxtLookup, addresses: AddressLookup,
                 fetcher: Callable[[str, str], bytes], store: PolicyStore,
                 permitted: Callable[[list[str]], list[str]] = lambda a: a,
                 metrics: Metrics | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self._txt = txt
        self._addresses = addresses
        self._fetcher = fetcher
        self._store = store
        self._permitted = permitted
        self._clock = clock
        self._metrics = metrics or Metrics(None, "")
        self._policies = store.load(clock())
        self._failed: dict[str, float] = {}  # domain -> when a fetch may be tried again
        self._locks: dict[str, threading.Lock] = {}  # one fetch per domain at a time
        self.fetched = 0  # policies fetched since start
        self.fetch_failures = 0
        # Told of each failed fetch: (domain, TLS-RPT result type, why); engine.tlsrpt.
        self.on_failure: Callable[[str, str, str], None] = lambda domain, kind, why: None

    def policy(self, domain: str) -> Policy | None:
        """The policy that applies to mail for `domain` now, or None."""
        now = self._clock()
        cached = self._valid(domain, now)
        ident = self._announced(domain)
        if cached is not None and (ident is None or ident == cached.id):
            return cached  # RFC 8461 5.1: the TXT record gone or failing: still applies
        if ident is None or self._failed.get(domain, 0.0) > now:
            return cached
        self._failed.pop(domain, None)
        lock = self._locks.setdefault(domain, threading.Lock())
        try:
            with lock:  # one that waited finds what its neighbour's fetch found
                again = self._valid(domain, self._clock())
                if again is not None and again.id == ident:
                    return again
                if self._failed.get(domain, 0.0) > self._clock():
                    return cached
                return self._refresh(domain, ident) or cached
        finally:
            # Only while a fetch is on: those waiting hold the lock itself, later callers
            # find the policy (or the failure) and need none.
            if not lock.locked():
                self._locks.pop(domain, None)

    def close(self) -> None:
        self._store.close()

    def _valid(self, domain: str, now: float) -> Policy | None:
        policy = self._policies.get(domain)
        if policy is not None and policy.expires <= now:
            del self._policies[domain]
            return None
        return policy

    def _announced(self, domain: str) -> str | None:
        try:
            return parse_txt(self._txt(f"_mta-sts.{domain}"))
        except DeliveryError:  # a DNS failure: as if nothing were announced
            return None

    def _refresh(self, domain: str, ident: str) -> Policy | None:
        try:
            policy = parse_policy(self._download(domain), domain, ident, self._clock())
        except PolicyError as exc:
            self.fetch_failures += 1
            self._metrics.incr("mta_sts_fetch_failed", "all")
            self._failed[domain] = self._clock() + RETRY_FAILED_FETCH
            log.warning(logs.kv("mta_sts_fetch_failed", domain=domain, id=ident, error=exc))
            self.on_failure(domain, exc.kind, str(exc))
            return None
        self.fetched += 1
        self._metrics.incr("mta_sts_fetched", "all")
        self._failed.pop(domain, None)
        self._policies[domain] = policy
        self._store.save(policy)
        log.info(logs.kv("mta_sts_policy", domain=domain, id=ident, mode=policy.mode,
                         mx=",".join(policy.mx), max_age=policy.max_age))
        return policy

    def _download(self, domain: str) -> bytes:
        host = f"mta-sts.{domain}"
        try:
            addresses = self._permitted(self._addresses(host))
        except DeliveryError as err:
            raise PolicyError(f"{host}: {err.reply.text}") from err
        if not addresses:
            raise PolicyError(f"{host} has no address mail may go to")
        last: PolicyError | None = None
        for address in addresses[:2]:
            try:
                return self._fetcher(domain, address)
            except PolicyError as exc:
                last = exc
        assert last is not None
        raise last


def create(resolver: Resolver, destinations: DestinationPolicy, source: str, family: int,
           settings: FetchSettings, state_path: str | None,
           metrics: Metrics | None = None) -> MtaSts:
    """A worker's MtaSts: names looked up by its `resolver`, the policy servers' addresses
    checked by its `destinations` policy, fetched from its sending IP (`source`, of
    `family`), the cache kept at `state_path`."""
    bound = FetchSettings(settings.context, source, settings.port, settings.timeout)
    return MtaSts(resolver.txt, lambda host: resolver.addresses(host, family),
                  lambda domain, address: fetch(domain, address, bound), PolicyStore(state_path),
                  lambda found: [a for a in found if destinations.refusal(a) is None], metrics)
