"""DKIM signing (RFC 6376, RFC 8463): the signatures a message carries as it goes on the wire.

The worker signs a message right before it goes out, after any 7-bit conversion
(engine.downgrade, done per connection in engine.smtp.transaction, which calls the signing
hook `WireSigner.for_task` gives it), so the signature covers the bytes the receiver gets.
A message tried at several MX hosts, or again after a stale connection, is signed once per
hand-out and form (7-bit or not) while its task is in flight.

Which key: the domain of the message's From header (or its nearest configured parent,
`dkim.subdomains`) picks a `dkim.domains` entry; of its keys valid today (`not_before`,
`not_after`, UTC dates), the newest of each algorithm signs, so a domain with an RSA and an
Ed25519 key is dual-signed (RFC 8463 3) and a rotation hands over on the new key's
`not_before` while the old one, still published, verifies mail already signed. `dkim.esp`
names a domain whose keys also sign every message (the ESP's feedback-loop identity).

Canonicalization is relaxed/relaxed; the header set is `dkim.headers` (each instance
present), plus one empty instance of each `dkim.oversign` name so no such header can be
added after signing. The hashing and signing are done here with the `cryptography` library
(RSA PKCS#1 v1.5 with SHA-256, Ed25519 over the SHA-256 hash): dkimpy, the reference, takes
about 7 ms per 2048-bit RSA signature (pure-Python arithmetic) against 0.26 ms here, the
OpenSSL floor (docs/PERFORMANCE.md, "DKIM signing cost"); the tests check every form
against dkimpy's verifier.

Keys are read once, at a worker's start (engine.startcheck, at `run`, `check-config` and
reload, refuses a missing, unreadable, group- or world-readable key, or one that is neither
RSA of 1024 bits or more nor Ed25519); no key material and no message content is logged.
"""
from __future__ import annotations

import base64
import datetime
import hashlib
import os
import re
import stat
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from email.utils import getaddresses

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

from engine.config import DkimConfig, DkimKeyConfig
from engine.metrics import Metrics
from engine.reply import Blame, Reply, TransientError

RSA = "rsa-sha256"
ED25519 = "ed25519-sha256"
MIN_RSA_BITS = 1024  # RFC 8301 3.2: verifiers refuse less

_PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


class DkimKeyError(Exception):
    """A key file that cannot sign: its message names the file and why, never its content."""


class SigningError(Exception):
    """A message of a signing domain that cannot be signed now (no key valid today)."""


@dataclass(frozen=True)
class SigningKey:
    """One loaded private key, with the selector and dates it signs under."""

    domain: str
    selector: str
    algorithm: str  # RSA or ED25519
    key: _PrivateKey
    not_before: datetime.date | None
    not_after: datetime.date | None
    path: str

    def valid_on(self, day: datetime.date) -> bool:
        return ((self.not_before is None or self.not_before <= day)
                and (self.not_after is None or day <= self.not_after))

    def sign(self, data: bytes) -> bytes:
        if isinstance(self.key, rsa.RSAPrivateKey):
            return self.key.sign(data, padding.PKCS1v15(), hashes.SHA256())
        return self.key.sign(hashlib.sha256(data).digest())  # RFC 8463 3


# --- keys ---------------------------------------------------------------------------


def load_private_key(path: str) -> _PrivateKey:
    """The private key in PEM file `path`; DkimKeyError says what is wrong with it."""
    try:
        info = os.stat(path)
    except OSError as err:
        raise DkimKeyError(f"{path}: {err.strerror.lower() if err.strerror else err}") from None
    if not stat.S_ISREG(info.st_mode):
        raise DkimKeyError(f"{path}: not a regular file")
    if info.st_mode & 0o077:
        raise DkimKeyError(f"{path}: readable or writable by group or others (mode "
                        f"{stat.S_IMODE(info.st_mode):04o}); chmod 600 it, owned by the"
                        " engine's user")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise DkimKeyError(f"{path}: cannot be read ({err.strerror or err})") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):  # their text is not shown: it may quote the file
        raise DkimKeyError(f"{path}: not an unencrypted PEM private key") from None
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise DkimKeyError(f"{path}: an RSA key of {key.key_size} bits; DKIM needs at"
                            f" least {MIN_RSA_BITS} (2048 advised)")
        return key
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key
    raise DkimKeyError(f"{path}: neither an RSA nor an Ed25519 key")


def algorithm_of(key: _PrivateKey) -> str:
    return RSA if isinstance(key, rsa.RSAPrivateKey) else ED25519


def dns_record(key: _PrivateKey) -> str:
    """The TXT record's text (RFC 6376 3.6.1; RFC 8463 4.2 for Ed25519)."""
    public = key.public_key()
    if isinstance(public, ed25519.Ed25519PublicKey):
        raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return "v=DKIM1; k=ed25519; p=" + base64.b64encode(raw).decode()
    der = public.public_bytes(serialization.Encoding.DER,
                              serialization.PublicFormat.SubjectPublicKeyInfo)
    return "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode()


def zone_line(domain: str, selector: str, record: str) -> str:
    """The record as a zone file line, in strings of at most 255 octets (RFC 1035 3.3.14)."""
    parts = " ".join(f'"{record[i:i + 255]}"' for i in range(0, len(record), 255))
    return f"{selector}._domainkey.{domain}. IN TXT ( {parts} )"


def generate(algorithm: str, bits: int = 2048) -> _PrivateKey:
    if algorithm == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def write_key(key: _PrivateKey, path: str) -> None:
    """Write `key` as PEM to a new file `path`, mode 0600 from its creation."""
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)


def load_keys(cfg: DkimConfig) -> dict[str, tuple[SigningKey, ...]]:
    """Every configured key, loaded, per domain; DkimKeyError names the first bad one."""
    return {domain: tuple(_signing_key(domain, k) for k in entry.keys)
            for domain, entry in cfg.domains.items()}


def _signing_key(domain: str, k: DkimKeyConfig) -> SigningKey:
    key = load_private_key(k.key_file)
    return SigningKey(domain, k.selector, algorithm_of(key), key, _date(k.not_before),
                      _date(k.not_after), k.key_file)


_SELECTOR = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
                       r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*")


def is_selector(name: str) -> bool:
    """RFC 6376 3.1: a selector is DNS labels."""
    return len(name) <= 63 and _SELECTOR.fullmatch(name) is not None


def signing_today(keys: dict[str, tuple[SigningKey, ...]],
                  day: datetime.date | None = None) -> list[SigningKey]:
    """The keys that sign on `day` (today, UTC): the newest valid one of each algorithm."""
    day = day or _today()
    return [k for domain_keys in keys.values() for k in newest_valid(domain_keys, day)]


def newest_valid(keys: Iterable[SigningKey], day: datetime.date) -> list[SigningKey]:
    """Of `keys` valid on `day`, the newest (latest not_before) of each algorithm."""
    best: dict[str, SigningKey] = {}
    for key in keys:
        if not key.valid_on(day):
            continue
        held = best.get(key.algorithm)
        if held is None or _start(key) > _start(held):
            best[key.algorithm] = key
    return list(best.values())


def _date(value: str | None) -> datetime.date | None:
    return None if value is None else datetime.date.fromisoformat(value)


def problems(cfg: DkimConfig, today: datetime.date | None = None) -> list[str]:
    """One line per key that cannot sign, and per domain with no key valid today (unless
    `unsigned_ok`): start-up errors (engine.startcheck)."""
    if not cfg.enabled:
        return []
    today = today or _today()
    found = []
    for domain, entry in cfg.domains.items():
        keys = []
        for i, k in enumerate(entry.keys):
            try:
                keys.append(_signing_key(domain, k))
            except DkimKeyError as err:
                found.append(f"dkim.domains.{domain}.keys[{i}].key_file {err}")
        if len(keys) == len(entry.keys) and not entry.unsigned_ok \
                and not any(k.valid_on(today) for k in keys):
            found.append(f"dkim.domains.{domain}: no key is valid today ({today}); add one,"
                         " or set unsigned_ok: true to send its mail unsigned")
    return found


def _today() -> datetime.date:
    return datetime.datetime.now(datetime.UTC).date()


# --- canonicalization (RFC 6376 3.4.2, 3.4.4) ----------------------------------------

_WSP_RUN = re.compile(rb"[ \t]+")
_FOLD = re.compile(rb"\r\n(?=[ \t])")
_TRAILING_WSP = re.compile(rb" \r\n")
_FIELD_END = re.compile(rb"\r\n(?![ \t])")


def split_message(message: bytes) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """The header fields as (lower-case name, whole field without its final CRLF), in
    order, and the body. `message` has CRLF line endings (engine.job)."""
    if message.startswith(b"\r\n"):
        return [], message[2:]
    end = message.find(b"\r\n\r\n")
    head, body = (message, b"") if end < 0 else (message[:end], message[end + 4:])
    return [(f.split(b":", 1)[0].strip(b" \t").lower(), f) for f in _FIELD_END.split(head)], body


def relaxed_header(field: bytes) -> bytes:
    name, _, value = field.partition(b":")
    value = _WSP_RUN.sub(b" ", _FOLD.sub(b"", value)).strip(b" ")
    return name.strip(b" \t").lower() + b":" + value


def relaxed_body(body: bytes) -> bytes:
    """The engine's messages end with CRLF (engine.job); a last line without one keeps its
    trailing space, as dkimpy's verifier hashes it."""
    if b"\t" in body or b"  " in body or b" \r\n" in body:  # else only the end changes
        body = _TRAILING_WSP.sub(b"\r\n", _WSP_RUN.sub(b" ", body))
    while body.endswith(b"\r\n\r\n"):
        body = body[:-2]
    if body == b"\r\n":
        return b""
    if body and not body.endswith(b"\r\n"):
        body += b"\r\n"
    return body


# --- signing ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Signed:
    """The DKIM-Signature fields to put on top of a message (empty: it is not signed)."""

    fields: bytes
    count: int
    unsigned: bool = False  # its domain had no key valid, and may send unsigned


def signature_field(key: SigningKey, fields: Sequence[tuple[bytes, bytes]], body_hash: bytes,
                    names: Iterable[bytes], now: int, expiry: float = 0) -> bytes:
    """One DKIM-Signature field, CRLF-ended, over `fields` (the message's, in order)."""
    chosen = list(names)
    signed = _signed_fields(fields, chosen)
    tags = (f"v=1; a={key.algorithm}; c=relaxed/relaxed; d={key.domain};\r\n\ts={key.selector};"
            f" t={now};" + (f" x={now + int(expiry)};" if expiry else ""))
    head = (b"DKIM-Signature: " + tags.encode() + b"\r\n\th=" + _fold_names(chosen) + b";\r\n\tbh="
            + base64.b64encode(body_hash) + b";\r\n\tb=")
    data = b"".join(relaxed_header(f) + b"\r\n" for f in signed) + relaxed_header(head)
    b = base64.b64encode(key.sign(data))
    return head + b"\r\n\t ".join(b[i:i + 64] for i in range(0, len(b), 64)) + b"\r\n"


def _signed_fields(fields: Sequence[tuple[bytes, bytes]],
                   names: Sequence[bytes]) -> list[bytes]:
    """RFC 6376 5.4.2: each name takes the next instance from the bottom; a name listed
    more often than present signs nothing for the extra ones (over-signing)."""
    taken: dict[bytes, int] = {}
    result = []
    for name in names:
        instances = [f for n, f in fields if n == name]
        used = taken.get(name, 0)
        taken[name] = used + 1
        if used < len(instances):
            result.append(instances[len(instances) - 1 - used])
    return result


def _fold_names(names: Sequence[bytes]) -> bytes:
    lines: list[bytes] = []
    line = b""
    for name in names:
        part = name if not line else b":" + name
        if len(line) + len(part) > 66 and line:
            lines.append(line + b":")
            line = name
        else:
            line += part
    lines.append(line)
    return b"\r\n\t ".join(lines)


def header_names(fields: Sequence[tuple[bytes, bytes]], headers: Sequence[str],
                 oversign: Sequence[str]) -> list[bytes]:
    """The h= list: every instance of `headers` present, plus one more of `oversign`."""
    counts: dict[bytes, int] = {}
    for name, _ in fields:
        counts[name] = counts.get(name, 0) + 1
    names = []
    for header in headers:
        name = header.encode()
        names += [name] * (counts.get(name, 0) + (1 if header in oversign else 0))
    return names


def from_domain(fields: Sequence[tuple[bytes, bytes]]) -> str | None:
    """The domain of the (first) From header's address, lower case, IDN as xn--."""
    field = next((f for n, f in fields if n == b"from"), None)
    if field is None:
        return None
    value = field.partition(b":")[2].decode("utf-8", "replace")
    simple = _SIMPLE_FROM.fullmatch(value)  # "a@b", "Name <a@b>": no parser needed
    if simple is not None:
        domain = simple.group(1)
    else:
        addresses = [a for _, a in getaddresses([_FOLD_TEXT.sub("", value)]) if "@" in a]
        if not addresses:
            return None
        domain = addresses[0].rpartition("@")[2]
    domain = domain.strip().rstrip(".").lower()
    try:
        return domain.encode("idna").decode("ascii") if not domain.isascii() else domain
    except UnicodeError:
        return None


_FOLD_TEXT = re.compile(r"\r\n(?=[ \t])")
# One plain address, bare or in angle brackets after a display name without quotes, '@',
# comments or groups; anything else goes to the stdlib's parser.
_SIMPLE_FROM = re.compile(r"[ \t]*(?:[^<>@\"(),;:\\\r\n]*<)?"
                          r"[^<>@\"(),;:\\\s]+@([A-Za-z0-9.-]+)>?[ \t]*")


class Signer:
    """Signs messages under the config's keys (loaded once: `load_keys`)."""

    def __init__(self, cfg: DkimConfig, keys: dict[str, tuple[SigningKey, ...]],
                 clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.keys = keys
        self.clock = clock
        self.headers = tuple(h.lower() for h in cfg.headers)
        self.oversign = tuple(h.lower() for h in cfg.oversign)

    @classmethod
    def create(cls, cfg: DkimConfig) -> Signer | None:
        """A signer, or None when there is nothing to sign with; DkimKeyError on a bad key."""
        if not cfg.enabled or not cfg.domains:
            return None
        return cls(cfg, load_keys(cfg))

    def domain_for(self, author: str | None) -> str | None:
        """The configured domain that signs for the From domain `author`."""
        if author is None:
            return None
        if author in self.keys:
            return author
        if self.cfg.subdomains:
            labels = author.split(".")
            for i in range(1, len(labels) - 1):
                parent = ".".join(labels[i:])
                if parent in self.keys:
                    return parent
        return None

    def sign(self, message: bytes, domain: str | None = None) -> Signed:
        """The signatures for `message`, by `domain`'s keys (the job's `dkim_domain`) or
        else its From domain's; SigningError when that domain has no key valid today and
        may not send unsigned."""
        fields, body = split_message(message)
        own = domain if domain in self.keys else self.domain_for(from_domain(fields))
        domains = [d for d in (own, self.cfg.esp) if d]
        if not domains:
            return Signed(b"", 0)
        now = int(self.clock())
        day = datetime.datetime.fromtimestamp(now, datetime.UTC).date()
        keys = [k for d in dict.fromkeys(domains) for k in self._current(d, day)]
        if not keys:
            return Signed(b"", 0, unsigned=True)
        body_hash = hashlib.sha256(relaxed_body(body)).digest()
        names = header_names(fields, self.headers, self.oversign)
        signatures = [signature_field(k, fields, body_hash, names, now, self.cfg.expiry)
                      for k in keys]
        return Signed(b"".join(signatures), len(signatures))

    def _current(self, domain: str, day: datetime.date) -> list[SigningKey]:
        """The newest key of each algorithm valid on `day`."""
        best = newest_valid(self.keys.get(domain, ()), day)
        if not best and not self.cfg.domains[domain].unsigned_ok:
            raise SigningError(f"no DKIM key of {domain} is valid on {day}")
        return best


def _start(key: SigningKey) -> datetime.date:
    return key.not_before or datetime.date.min


def signing_refused(why: str) -> TransientError:
    """A message of a signing domain that may not go unsigned and cannot be signed now:
    deferred (451 4.3.5, RFC 3463: system incorrectly configured; not 4.7.x, which throttle
    rules read as the provider's policy) before MAIL; the message is to blame, so no other
    host is tried, and being made here, it is never taken for the provider's push-back."""
    return TransientError(Reply.local(451, "4.3.5", f"DKIM signing failed: {why}"), "MAIL",
                          Blame.MESSAGE)


class WireSigner:
    """The signed form of each message as it goes on the wire, made once per hand-out and
    form (converted to 7-bit or not) while its task is in flight: the same message tried
    at several MX hosts, or again on a fresh connection after a stale one, is signed once.
    The deliverer calls `forget` when the task is done."""

    def __init__(self, signer: Signer, metrics: Metrics) -> None:
        self.signer = signer
        self.metrics = metrics
        self._signed: dict[tuple[str, int, int, bool], bytes] = {}

    def for_task(self, job_id: str, handout: int, message: bytes, provider: str,
                 domain: str | None = None) -> Callable[[bytes, bool], bytes]:
        """What engine.smtp.send_mail calls with the message as it goes out and whether it
        was converted: the message with its signatures on top (`domain`'s: Signer.sign)."""
        ident = (job_id, handout, hash(message))
        return lambda wire, converted: self._wire(ident, wire, converted, provider, domain)

    def forget(self, job_id: str, handout: int, message: bytes) -> None:
        for converted in (False, True):
            self._signed.pop((job_id, handout, hash(message), converted), None)

    def _wire(self, ident: tuple[str, int, int], message: bytes, converted: bool,
              provider: str, domain: str | None) -> bytes:
        key = (*ident, converted)
        signed = self._signed.get(key)
        if signed is None:
            try:
                result = self.signer.sign(message, domain)
            except SigningError as err:
                self.metrics.incr("dkim_failed", provider)
                raise signing_refused(str(err)) from None
            if result.count:
                self.metrics.incr("dkim_signed", provider)
            elif result.unsigned:
                self.metrics.incr("dkim_failed", provider)
            signed = self._signed[key] = result.fields + message
        return signed
