"""One job: its envelope and message, parsed and validated from the producer's ZeroMQ frames.

A producer sends two frames: a UTF-8 JSON envelope (`id`, `from`, `to`, and optionally
`ip` or `pool`, `meta`, `expires`, `requiretls`, `dkim_domain`) and the raw RFC 5322
message. `parse_job` turns them into a `Job` or raises `JobRejected`, and nothing else,
whatever the input: intake publishes the reason as the `rejected` event's `error`, so it
is written for people.

The id and meta are read before anything else is checked, so a rejection can echo
them even when a later field is what is wrong.
"""
from __future__ import annotations

import difflib
import functools
import ipaddress
import json
import math
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn, TypeGuard

from engine.address import (
    AddressError,
    domain_of,
    needs_smtputf8,
    split,
    validate_mailbox,
    validate_reverse_path,
)
from engine.config import LONG_LINES
from engine.downgrade import MAX_LINE, CannotConvert, first_long_line, wrap_long_lines
from engine.text import cut

MAX_ID_LENGTH = 200
# The envelope is parsed whole before any limit applies, so bound it: ample for
# thousands of recipients and a generous meta.
MAX_ENVELOPE_SIZE = 1024 * 1024
FIELDS = ("id", "from", "to", "ip", "pool", "meta", "expires", "requiretls", "dkim_domain")
# What intake does with a body line over MAX_LINE octets (config `limits.long_lines`).
REJECT, ENCODE = LONG_LINES
_POOL_NAME = re.compile(rf"[A-Za-z0-9_.-]{{1,{MAX_ID_LENGTH}}}")
# A DKIM signing domain (its d=): ASCII LDH labels (A-labels), two at least, 253 octets.
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_SIGNING_DOMAIN = re.compile(rf"(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})+")
_BYTES_LIKE = (bytes, bytearray, memoryview)
# A line ending that is not CRLF: a CR not followed by LF, an LF not preceded by CR. Each
# starts with its literal character, so the regex engine scans for it without a loop of
# Python; the look-behind comes after the LF, where it costs nothing until one is found.
_BARE_CR = re.compile(rb"\r(?!\n)")
_BARE_LF = re.compile(rb"\n(?<!\r\n)")
_QUOTED = 60  # characters of producer-supplied text quoted in a reason


class JobRejected(ValueError):
    """A job refused at intake; `reason` is for people, `job_id` and `meta` are echoed if read."""

    def __init__(self, reason: str, job_id: str | None = None,
                 meta: dict[str, Any] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.job_id = job_id
        self.meta = meta


@dataclass(frozen=True)
class Job:
    """A validated job. Build it with `parse_job` or `job_from_stored`, not by hand."""

    id: str
    sender: str  # reverse-path, "" = null sender
    rcpts: tuple[str, ...]  # validated, deduplicated, in the producer's order
    message: bytes = field(repr=False)  # CRLF line endings; never in logs
    ip: str | None = None
    pool: str | None = None
    # A JSON object echoed on events; a plain dict so it serialises as is.
    meta: Mapping[str, Any] = field(default_factory=dict, hash=False)
    expires: float | None = None  # seconds the engine may keep trying
    smtputf8: bool = False  # some address needs SMTPUTF8
    eightbit: bool = False  # the message has bytes >= 0x80: needs 8BITMIME
    # TLS end to end (RFC 8689): only over verified TLS to servers offering REQUIRETLS.
    requiretls: bool = False
    # The domain whose DKIM keys sign it (engine.dkim), instead of the From domain's.
    dkim_domain: str | None = None

    @functools.cached_property
    def meta_json(self) -> str:
        """`meta` as compact JSON text, as events carry it (UTF-8, not escaped): made once
        per job (`parse_job` keeps the text its check of the meta made) and reused by
        every event and by the spool."""
        return _META_TEXT(dict(self.meta)) if self.meta else "{}"


def _new_id() -> str:
    return uuid.uuid4().hex


def parse_job(frames: Sequence[bytes], max_message_size: int, max_recipients: int,
              new_id: Callable[[], str] = _new_id, long_lines: str = REJECT) -> Job:
    """Parse one job from its frames (envelope, message); raise JobRejected if unacceptable.
    `long_lines`: REJECT a message with a line over MAX_LINE octets, or ENCODE the parts
    that have one (a long header line is refused either way)."""
    try:
        envelope, raw = _two_frames(frames)
        fields = _decode_envelope(envelope)
        return _build(fields, lambda: _message(raw, max_message_size, long_lines),
                      max_recipients, new_id)
    except JobRejected:
        raise
    except Exception as exc:  # a bug here must refuse the job, not kill intake
        raise JobRejected(f"job could not be read ({type(exc).__name__})") from exc


def normalise_message(raw: bytes) -> bytes:
    """Every line ending CRLF (bare LF and bare CR become CRLF), ending with CRLF; no NUL."""
    if not raw:
        raise JobRejected("message is empty")
    data = bytes(raw)
    nul = data.find(b"\0")
    if nul >= 0:
        raise JobRejected(f"message contains a NUL byte (at offset {nul})")
    # Fast path, the usual case (producers send CRLF): no bare CR and no bare LF, so the
    # rewrite below would change nothing. Two regex scans that jump from CR to CR and from
    # LF to LF, no copy: about half the CPU of counting CR, LF and CRLF (bytes.count
    # looks at every byte), which was a sixth of intake's CPU per 5 KB job.
    if _BARE_CR.search(data) or _BARE_LF.search(data):
        # CRLF first, so that "\r\r\n" is a bare CR and then a CRLF: two line endings.
        data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    return data if data.endswith(b"\r\n") else data + b"\r\n"


def envelope_json(job: Job) -> dict[str, Any]:
    """The envelope as a producer would send it (optional fields only when set), for the spool."""
    envelope: dict[str, Any] = {"id": job.id, "from": job.sender, "to": list(job.rcpts),
                                "meta": dict(job.meta)}
    optional = {"ip": job.ip, "pool": job.pool, "expires": job.expires,
                "requiretls": job.requiretls or None, "dkim_domain": job.dkim_domain}
    envelope.update((key, value) for key, value in optional.items() if value is not None)
    return envelope


def job_from_stored(envelope: Mapping[str, Any], message: bytes) -> Job:
    """The inverse of envelope_json; addresses are checked again (they go on the wire),
    size and recipient limits are not."""
    try:
        return _build(dict(envelope), lambda: bytes(message), None, _no_new_id)
    except JobRejected:
        raise
    except Exception as exc:  # a damaged spool entry must not crash the worker
        raise JobRejected(f"stored job could not be read ({type(exc).__name__})") from exc


def _no_new_id() -> str:
    raise JobRejected("stored envelope has no 'id'")


# --- frames and JSON --------------------------------------------------------------------


# The meta's text (Job.meta_json); the check at intake refuses NaN and Infinity as well.
_META_TEXT = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
_META_CHECK = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode


def _two_frames(frames: object) -> tuple[bytes, bytes]:
    if isinstance(frames, (str, *_BYTES_LIKE)) or not isinstance(frames, Sequence):
        raise JobRejected("a job must be a multipart message of 2 frames (envelope, message)")
    if len(frames) != 2:
        raise JobRejected(f"expected 2 frames (envelope, message), got {len(frames)}")
    for number, frame in enumerate(frames, 1):
        if not isinstance(frame, _BYTES_LIKE):
            raise JobRejected(f"frame {number} is {type(frame).__name__}, not bytes")
    return bytes(frames[0]), bytes(frames[1])


def _decode_envelope(envelope: bytes) -> dict[str, Any]:
    """The envelope frame as a dict; strict JSON (no NaN, no duplicate keys)."""
    if len(envelope) > MAX_ENVELOPE_SIZE:
        raise JobRejected(f"envelope is {len(envelope)} bytes, larger than the limit "
                          f"of {MAX_ENVELOPE_SIZE}")
    try:
        text = envelope.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise JobRejected(f"envelope is not UTF-8: invalid byte at offset {exc.start}") from exc
    fields = _loads(text)
    if not isinstance(fields, dict):
        raise JobRejected(f"envelope must be a JSON object, got {_json_type(fields)}")
    return fields


def _loads(text: str) -> Any:
    try:
        return _DECODER.decode(text)
    except JobRejected:  # from the hooks below; a ValueError too, so let it through first
        raise
    except json.JSONDecodeError as exc:
        raise JobRejected(f"envelope is not valid JSON: {exc.msg} at line {exc.lineno} "
                          f"column {exc.colno}") from exc
    except RecursionError as exc:
        raise JobRejected("envelope is not valid JSON: nested too deeply") from exc
    except ValueError as exc:  # e.g. an integer with more digits than Python converts
        raise JobRejected(f"envelope is not valid JSON: {cut(str(exc), _QUOTED)}") from exc


def _refuse_constant(name: str) -> NoReturn:
    # json.loads accepts NaN and Infinity, which are not JSON and break event consumers.
    raise JobRejected(f"envelope is not valid JSON: {name} is not a JSON value")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Parsers disagree on which duplicate wins; "to" given twice must not be ambiguous.
    obj = dict(pairs)  # in C; a key given twice leaves the dict shorter than the pairs
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise JobRejected(f"envelope has the key {cut(key, _QUOTED)!r} twice in one"
                                  " object")
            seen.add(key)
    return obj


# One decoder for every envelope (json.loads with hooks would build one per call).
_DECODER = json.JSONDecoder(parse_constant=_refuse_constant, object_pairs_hook=_unique_keys)


def _json_type(value: object) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


# --- envelope fields ---------------------------------------------------------------------


def _build(fields: dict[str, Any], message: Callable[[], bytes], max_recipients: int | None,
           new_id: Callable[[], str]) -> Job:
    """The job, envelope first (cheap), then the message; a rejection echoes the id and meta."""
    try:
        envelope = _envelope(fields, max_recipients, new_id)
        body = message()
    except JobRejected as exc:
        raise JobRejected(exc.reason, _id_or_none(fields.get("id")),
                          _meta_or_none(fields)) from exc
    envelope["message"] = body
    envelope["eightbit"] = not body.isascii()
    # Every field (and meta_json, the cached_property's slot) set at once: a frozen
    # dataclass's __init__ sets its 12 fields one object.__setattr__ at a time, ~2 us a
    # job at intake. tests/unit/test_job.py checks that this sets exactly the fields.
    job = object.__new__(Job)
    job.__dict__.update(envelope)
    return job


def _envelope(fields: dict[str, Any], max_recipients: int | None,
              new_id: Callable[[], str]) -> dict[str, Any]:
    """The job's fields but the message; checked in the order a person would fix them."""
    _check_known(fields)
    job_id = _id(fields.get("id"), new_id)
    meta, meta_json = _meta_and_text(fields.get("meta"))
    sender = _sender(fields)
    rcpts = _rcpts(fields.get("to"), max_recipients)
    ip, pool = _ip(fields.get("ip")), _pool(fields.get("pool"))
    if ip is not None and pool is not None:
        raise JobRejected("'ip' and 'pool' are mutually exclusive")
    return {"id": job_id, "sender": sender, "rcpts": rcpts, "ip": ip, "pool": pool,
            "meta": meta, "meta_json": meta_json, "expires": _expires(fields.get("expires")),
            "requiretls": _requiretls(fields.get("requiretls")),
            "dkim_domain": _dkim_domain(fields.get("dkim_domain")),
            "smtputf8": any(map(needs_smtputf8, (sender, *rcpts)))}


def _check_known(fields: dict[str, Any]) -> None:
    for key in fields:
        if key not in FIELDS:
            close = difflib.get_close_matches(key, FIELDS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise JobRejected(f"unknown envelope field {cut(key, _QUOTED)!r}{hint}; "
                              f"known fields: {', '.join(FIELDS)}")


def _valid_id(value: object) -> TypeGuard[str]:
    return (isinstance(value, str) and 0 < len(value) <= MAX_ID_LENGTH
            and value.isprintable() and " " not in value)


def _id_or_none(value: object) -> str | None:
    return value if _valid_id(value) else None


def _id(value: object, new_id: Callable[[], str]) -> str:
    if value is None:
        return new_id()
    if not _valid_id(value):
        raise JobRejected(f"'id' must be a non-empty string of at most {MAX_ID_LENGTH} printable "
                          "characters, without spaces")
    return value


def _meta_or_none(fields: Mapping[str, Any]) -> dict[str, Any] | None:
    try:
        return _meta(fields.get("meta"))
    except JobRejected:
        return None


def _meta(value: object) -> dict[str, Any]:
    return _meta_and_text(value)[0]


def _meta_and_text(value: object) -> tuple[dict[str, Any], str]:
    """The meta and its JSON text (Job.meta_json), which checking it makes anyway."""
    if value is None:
        return {}, "{}"
    if not isinstance(value, dict):
        raise JobRejected(f"'meta' must be a JSON object, got {_json_type(value)}")
    if not value:
        return value, "{}"
    try:
        text = _META_CHECK(value)
        # JSON escapes may hold unpaired surrogates, which no UTF-8 event log can carry.
        text.encode("utf-8")
    except (ValueError, TypeError, RecursionError) as exc:
        raise JobRejected("'meta' must be a JSON object of valid Unicode text") from exc
    return value, text


def _sender(fields: dict[str, Any]) -> str:
    if "from" not in fields:
        raise JobRejected("'from' is required (use \"\" for the null sender)")
    value = fields["from"]
    if not isinstance(value, str):
        raise JobRejected(f"'from' must be a string, got {_json_type(value)}")
    try:
        return validate_reverse_path(value)
    except AddressError as exc:
        raise JobRejected(f"sender {exc}") from exc


def _rcpts(value: object, max_recipients: int | None) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise JobRejected("'to' must be a non-empty list of addresses")
    rcpts: dict[tuple[str, str], str] = {}  # dedupe key -> first spelling, in order
    seen: set[object] = set()  # exact repeats need no second validation
    for number, addr in enumerate(value, 1):
        if isinstance(addr, str) and addr in seen:
            continue
        rcpt = _rcpt(number, addr)
        seen.add(addr)
        rcpts.setdefault(_dedupe_key(rcpt), rcpt)
        # Stop at the first one too many: a huge list costs no more than the limit.
        if max_recipients is not None and len(rcpts) > max_recipients:
            raise JobRejected(f"'to' has more than the limit of {max_recipients} "
                              "different recipients")
    return tuple(rcpts.values())


def _rcpt(number: int, addr: object) -> str:
    if not isinstance(addr, str):
        raise JobRejected(f"recipient {number} must be a string, got {_json_type(addr)}")
    try:
        return validate_mailbox(addr)
    except AddressError as exc:
        raise JobRejected(f"recipient {number} {exc}") from exc


def _dedupe_key(rcpt: str) -> tuple[str, str]:
    # The local part is case-sensitive (RFC 5321 2.4); the domain is not, in any spelling.
    local, _ = split(rcpt)
    return local, domain_of(rcpt)


def _ip(value: object) -> str | None:
    if value is None:
        return None
    # ipaddress also takes integers and zone ids ("fe80::1%eth0"); a source IP is neither.
    if isinstance(value, str) and "%" not in value:
        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            pass
    raise JobRejected(f"'ip' must be an IP address such as \"203.0.113.10\", got {_show(value)}")


def _pool(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, str) and _POOL_NAME.fullmatch(value):
        return value
    raise JobRejected(f"'pool' must be a pool name of 1 to {MAX_ID_LENGTH} letters, digits, "
                      f"'_', '.' or '-', got {_show(value)}")


def _expires(value: object) -> float | None:
    if value is None:
        return None
    seconds = _finite_number(value)
    if seconds is None or seconds <= 0:
        raise JobRejected("'expires' must be a positive number of seconds")
    return seconds


def _requiretls(value: object) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise JobRejected(f"'requiretls' must be true or false, got {_show(value)}")
    return value


def _dkim_domain(value: object) -> str | None:
    if value is None:
        return None
    domain = value.lower().rstrip(".") if isinstance(value, str) else None
    if domain is None or not _SIGNING_DOMAIN.fullmatch(domain):
        raise JobRejected(f"'dkim_domain' must be a domain name in ASCII (A-labels), got"
                          f" {_show(value)}")
    return domain


def _finite_number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        seconds = float(value)
    except OverflowError:  # an integer too large for a float
        return None
    return seconds if math.isfinite(seconds) else None


def _show(value: object) -> str:
    return repr(cut(value, _QUOTED)) if isinstance(value, str) else _json_type(value)


def _message(raw: bytes, max_message_size: int, long_lines: str) -> bytes:
    # Refuse by size before normalising: cheap, and what the producer sent is what counts.
    if len(raw) > max_message_size:
        raise JobRejected(f"message is {len(raw)} bytes, larger than the limit "
                          f"of {max_message_size}")
    return short_lines(normalise_message(raw), long_lines)


def short_lines(message: bytes, long_lines: str = REJECT) -> bytes:
    """`message` (normalised) if no line is over MAX_LINE octets (RFC 5322 2.1.1: servers may
    cut or refuse such a line), or re-encoded (`long_lines` ENCODE), or JobRejected naming
    the first long line. A header line cannot be re-encoded: refused whatever the setting."""
    offset = first_long_line(message)
    if offset < 0:
        return message
    line = _describe_line(message, offset)
    if offset < _header_end(message):
        raise JobRejected(f"{line}, in the header: a header line cannot be re-encoded (fold"
                          " it, RFC 5322 2.2.3)")
    if long_lines != ENCODE:
        raise JobRejected(f"{line} (set limits.long_lines: encode to convert)")
    try:
        return wrap_long_lines(message)
    except CannotConvert as exc:
        raise JobRejected(f"{line}, and cannot be converted: {exc}") from None


def _describe_line(message: bytes, offset: int) -> str:
    number = message.count(b"\n", 0, offset) + 1
    length = message.find(b"\r\n", offset) - offset
    return f"line {number} is {length} octets long, over RFC 5322's {MAX_LINE}"


def _header_end(message: bytes) -> int:
    """Where the header block ends: after the empty line (the whole message without one)."""
    if message.startswith(b"\r\n"):
        return 0
    blank = message.find(b"\r\n\r\n")
    return len(message) if blank < 0 else blank + 2
