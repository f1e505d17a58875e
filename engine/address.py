"""Mailbox syntax (RFC 5321 4.1.2, with RFC 6531 UTF-8), checked before it reaches the wire.

Every address the engine accepts ends up inside `MAIL FROM:<...>` or `RCPT TO:<...>`,
so validation is strict where the wire is at stake: no control characters (CR and LF
above all), no angle brackets, no whitespace except a space inside a quoted local
part. A valid address comes back as given, with only its domain lowercased.

Internationalised domains are converted with the standard library's IDNA codec,
which implements IDNA 2003. The characters that IDNA 2003 and IDNA 2008 encode
differently (ß, final sigma) are refused rather than risk sending mail to a different
domain; the producer can write such a domain in its `xn--` form. Invisible formatting
characters (Unicode category Cf: zero width space and joiners, soft hyphen, byte order
mark, text-direction controls) are refused anywhere in an address: they make it look like
another address, and IDNA 2003 silently drops them from a domain.

The same senders and recipient domains come back job after job, so the checks of a whole
address and of a domain are cached (bounded LRU caches; only successes are kept).

An `AddressError` reads as a sentence about the address, e.g.
"'bob@' has an empty domain"; callers prefix the role ("recipient 3 ...").
"""
from __future__ import annotations

import functools
import ipaddress
import re
import unicodedata

from engine.config import names
from engine.text import quoted

MAX_LOCAL_OCTETS = 64  # RFC 5321 4.5.3.1.1
MAX_ADDRESS_OCTETS = 254  # a 256-octet path minus its angle brackets
MAX_DOMAIN_OCTETS = names.MAX_NAME_OCTETS  # RFC 1035 in text form, without the trailing dot
MAX_LABEL_OCTETS = names.MAX_LABEL_OCTETS

# RFC 5321 atext; non-ASCII characters are allowed too (RFC 6531) and checked apart.
_ATEXT = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
                   "!#$%&'*+-/=?^_`{|}~")
# An ASCII Dot-string (RFC 5321): atext runs separated by single dots. The usual local part
# matches at once; anything else goes through the checks that say what is wrong.
_ATEXT_RUN = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_ASCII_DOT_ATOM = re.compile(rf"{_ATEXT_RUN}(?:\.{_ATEXT_RUN})*")
_CACHE_SIZE = 4096  # addresses, and domains, whose checks are remembered
# Characters that make an address look different from what is sent: bidi controls.
_BIDI = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
# Encoded differently by IDNA 2003 (mapped away) and IDNA 2008 (kept). (ZWNJ and ZWJ too,
# but they are format characters, refused before this.)
_IDNA_DEVIATIONS = frozenset("\u00df\u03c2\u200c\u200d")
_SHOW_MAX = 80


class AddressError(ValueError):
    """An address that must not be used; the message says why, quoting the address."""

    def __init__(self, reason: str, address: object = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.address = address


class _DomainProblem(Exception):
    """What is wrong with a domain, as the end of a sentence about the address."""


def validate_mailbox(addr: str) -> str:
    """Return `addr` with its domain lowercased, or raise AddressError saying what is wrong."""
    if not isinstance(addr, str):
        raise AddressError(f"an address must be a string, not {type(addr).__name__}", addr)
    return _validate(addr)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _validate(addr: str) -> str:
    """validate_mailbox for a str (a success is cached: the same sender comes every job)."""
    if not addr:
        raise _bad(addr, "is empty")
    # Characters never outnumber octets: a cheap refusal before the per-character scan.
    if len(addr) > MAX_ADDRESS_OCTETS:
        raise _bad(addr, f"is longer than {MAX_ADDRESS_OCTETS} octets")
    _check_characters(addr)
    if _octets(addr) > MAX_ADDRESS_OCTETS:
        raise _bad(addr, f"is longer than {MAX_ADDRESS_OCTETS} octets")
    local, domain = split(addr)
    _check_local(addr, local)
    try:
        domain = _checked_domain(domain)
    except _DomainProblem as exc:
        raise _bad(addr, str(exc)) from exc
    return f"{local}@{domain}"


def validate_reverse_path(addr: str) -> str:
    """Like validate_mailbox, but "" (the null sender, for bounces) is allowed."""
    if addr == "":
        return addr
    if addr == "<>":
        raise _bad(addr, 'has angle brackets; the null sender is written ""')
    return validate_mailbox(addr)


def split(addr: str) -> tuple[str, str]:
    """(local part, domain), split at the last '@': a quoted local part may contain '@'."""
    local, at, domain = addr.rpartition("@")
    if not at:
        raise _bad(addr, "has no '@'")
    return local, domain


def needs_smtputf8(addr: str) -> bool:
    """True when the address has any non-ASCII character (RFC 6531)."""
    return not addr.isascii()


def domain_of(addr: str) -> str:
    """The lowercased domain in its ASCII (IDNA) form, as DNS and the wire without SMTPUTF8 need."""
    domain = split(addr)[1]
    if domain.startswith("["):
        return domain
    try:
        return _ascii_domain(domain)
    except _DomainProblem as exc:
        raise _bad(addr, str(exc)) from exc


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _ascii_domain(domain: str) -> str:
    return ".".join(_label_to_ascii(label) for label in domain.lower().split("."))


def _bad(addr: object, problem: str) -> AddressError:
    """The error for `addr`, reading as a sentence: "'bob@' has an empty domain"."""
    return AddressError(f"{_show(addr)} {problem}", addr)


def _show(addr: object) -> str:
    """The address quoted for an error message: control characters escaped, cut short."""
    return quoted(addr if isinstance(addr, str) else type(addr).__name__, _SHOW_MAX)


def _octets(text: str) -> int:
    return len(text.encode("utf-8"))


def _check_characters(addr: str) -> None:
    """Refuse what could break the SMTP command line or hide what is sent."""
    # Fast path: a printable string has no character _bad_character refuses (no Cc, Cf,
    # Cs, and no separator but the ASCII space), so only the others are looked at.
    if not addr.isprintable():
        for ch in addr:
            if ch == " ":
                continue  # allowed in a quoted local part only; checked there
            problem = _bad_character(ch)
            if problem:
                raise _bad(addr, f"contains {problem} (U+{ord(ch):04X})")
    if "<" in addr or ">" in addr:
        raise _bad(addr, "contains angle brackets; give the bare address")


def _bad_character(ch: str) -> str | None:
    """What kind of forbidden character `ch` is, or None if it may appear in an address."""
    if ch.isascii():
        return "a control character" if ch < " " or ch == "\x7f" else None
    category = unicodedata.category(ch)
    if category == "Cc":
        return "a control character"
    if category == "Cs":
        return "an unpaired surrogate, which is not valid Unicode"
    if category in ("Zs", "Zl", "Zp") or ch.isspace():
        return "a whitespace character"
    if ch in _BIDI:
        return "an invisible text-direction control"
    if category == "Cf":  # zero width space, ZWJ/ZWNJ, soft hyphen, BOM, word joiner...
        return "an invisible formatting character"
    return None


def _check_local(addr: str, local: str) -> None:
    if not local:
        raise _bad(addr, "has an empty local part (before the '@')")
    if local.startswith('"'):
        _check_quoted(addr, local)
    else:
        _check_dot_atom(addr, local)
    if _octets(local) > MAX_LOCAL_OCTETS:
        raise _bad(addr, f"has a local part longer than {MAX_LOCAL_OCTETS} octets")


def _check_dot_atom(addr: str, local: str) -> None:
    """RFC 5321 Dot-string: atext runs separated by single dots."""
    if _ASCII_DOT_ATOM.fullmatch(local):
        return
    if local.startswith(".") or local.endswith("."):
        raise _bad(addr, "has a local part that starts or ends with a dot")
    if ".." in local:
        raise _bad(addr, "has two dots in a row in its local part")
    for ch in local:
        if ch == " ":
            raise _bad(addr, "contains a space outside a quoted local part")
        if ch != "." and ch.isascii() and ch not in _ATEXT:
            raise _bad(addr, f"has {ch!r} in its local part, allowed only inside quotes")


def _check_quoted(addr: str, local: str) -> None:
    """RFC 5321 Quoted-string: qtextSMTP (plus UTF-8, RFC 6531) and backslash pairs."""
    body, i = local[1:], 0
    while i < len(body):
        ch = body[i]
        if ch == "\\":
            if i + 1 >= len(body) or not " " <= body[i + 1] <= "~":
                raise _bad(addr, "has a backslash not followed by a printable ASCII character")
            i += 2
            continue
        if ch == '"':
            break
        i += 1
    else:
        raise _bad(addr, "has a quoted local part without its closing quote")
    if i != len(body) - 1:
        raise _bad(addr, "has text after the closing quote of its local part")
    if i == 0:
        raise _bad(addr, "has an empty quoted local part")


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _checked_domain(domain: str) -> str:
    """Validate the domain; return it in the form to send (lowercased). _DomainProblem if bad.
    Cached: recipients' domains repeat (a failure is not cached, and costs the same again)."""
    if not domain:
        raise _DomainProblem("has an empty domain")
    if domain.startswith("["):
        return _check_literal(domain)
    if " " in domain:
        raise _DomainProblem("contains a space in its domain")
    domain = domain.lower()
    labels = domain.split(".")
    if "" in labels:
        raise _DomainProblem(
            "has an empty label in its domain (a leading, trailing or double dot)")
    if len(labels) == 1:
        raise _DomainProblem("has a domain without a dot; use a fully qualified domain")
    ascii_labels = [_label_to_ascii(label) for label in labels]
    if ascii_labels[-1].isdigit():
        raise _DomainProblem(
            "has a domain that looks like an IP address; write it as [192.0.2.1]")
    if len(".".join(ascii_labels)) > MAX_DOMAIN_OCTETS:
        raise _DomainProblem(f"has a domain longer than {MAX_DOMAIN_OCTETS} octets")
    return domain


def _label_to_ascii(label: str) -> str:
    """One domain label as a valid LDH label (an A-label when it is not ASCII)."""
    ascii_label = label if label.isascii() else _idna_label(label)
    if len(ascii_label) > MAX_LABEL_OCTETS:
        raise _DomainProblem(f"has a domain label longer than {MAX_LABEL_OCTETS} octets")
    if not names.LABEL.fullmatch(ascii_label):  # the length is checked above
        raise _DomainProblem(f"has an invalid domain label {_show(label)}: "
                             "use letters, digits and inner hyphens")
    return ascii_label.lower()


def _idna_label(label: str) -> str:
    deviation = next((ch for ch in label if ch in _IDNA_DEVIATIONS), None)
    if deviation:
        raise _DomainProblem(f"has {deviation!r} (U+{ord(deviation):04X}) in its domain, which "
                             "IDNA versions encode differently; give the domain in xn-- form")
    try:
        return label.encode("idna").decode("ascii")
    except UnicodeError as exc:
        raise _DomainProblem(f"has a domain label {_show(label)} that is not a valid "
                             f"internationalised name ({_idna_reason(exc)})") from exc


def _idna_reason(exc: UnicodeError) -> str:
    # The codec wraps its own error: "encoding with 'idna' codec failed (UnicodeError: ...)".
    text = str(exc)
    return text.rsplit("UnicodeError: ", 1)[-1].rstrip(")") or "rejected by the IDNA codec"


def _check_literal(domain: str) -> str:
    """RFC 5321 address literal: [IPv4] or [IPv6:...]; general literals are not supported."""
    if not domain.endswith("]") or len(domain) < 3:
        raise _DomainProblem("has an address literal without its closing ']'")
    inner = domain[1:-1]
    is_v6 = inner[:5].lower() == "ipv6:"
    text = inner[5:] if is_v6 else inner
    if not is_v6 and ":" in text:
        raise _DomainProblem("has an unsupported address literal; "
                             "use [192.0.2.1] or [IPv6:2001:db8::1]")
    if "%" in text:  # ipaddress accepts zone ids ("fe80::1%eth0"); they mean nothing remotely
        raise _DomainProblem("has an IPv6 zone id in its address literal")
    try:
        (ipaddress.IPv6Address if is_v6 else ipaddress.IPv4Address)(text)
    except ValueError as exc:
        kind = "IPv6" if is_v6 else "IPv4"
        raise _DomainProblem(
            f"has an address literal that is not a valid {kind} address") from exc
    return f"[IPv6:{text.lower()}]" if is_v6 else domain
