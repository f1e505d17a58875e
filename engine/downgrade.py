"""Re-encoding a message's MIME parts: 8-bit to 7-bit for a server without 8BITMIME (RFC 6152
section 3), and lines over 998 octets into a transfer encoding at intake (RFC 5322 2.1.1).

RFC 6152: a client holding an 8-bit message for a server that does not offer 8BITMIME must
either convert it to 7-bit with the MIME content-transfer-encodings (RFC 2045) or not relay it
(5.6.3). `to_7bit` converts what can be converted and raises `CannotConvert` for the rest.

Only the MIME structure is parsed: the header block of the message and of each part, and the
multipart boundaries. A leaf part whose content has 8-bit bytes and whose
Content-Transfer-Encoding is 8bit, binary, 7bit or missing is re-encoded, to quoted-printable
for text/* and to base64 for every other type, and only that part's Content-Transfer-Encoding
header is rewritten (or added, after its other headers). A multipart or message/rfc822
labelled 8bit or binary is relabelled 7bit once its parts are converted. Every other byte of
the message stays as it was: no header is refolded or reordered (the stdlib email generator
would), no line ending changed. The conversion is an edit list over the original bytes.

Added headers, only where a converted part needs them to be read right:
- `Content-Transfer-Encoding`, on a converted leaf that had none;
- `Content-Type: text/plain; charset=utf-8` (or `charset=unknown-8bit`, RFC 1428, when the
  content is not valid UTF-8) on a converted text leaf that had no Content-Type: its default,
  us-ascii, would now be a lie. This is how a non-MIME message with an 8-bit body is converted
  rather than bounced: its words reach the reader intact, only the charset is inferred
  (sendmail's EightBitMode=m does the same, with unknown-8bit; Postfix sends unlabelled 8-bit
  content unchanged, which RFC 6152 does not allow);
- `MIME-Version: 1.0` on a converted message (the top level, or one inside message/rfc822)
  that had none: without it, its Content-* headers mean nothing.

Refused (`CannotConvert`, which the transaction turns into 554 5.6.3 for every recipient):
- 8-bit bytes in a header block: converting them means RFC 2047 encoded words, which would
  rewrite headers the sender wrote (and signed);
- 8-bit bytes in a base64 part or a part with an unknown encoding (the content is already
  broken, there is no meaning to keep), in a multipart's preamble or epilogue, in
  message/partial or message/external-body (RFC 2046 5.2: 7bit only), in a multipart without
  a boundary or without a delimiter line, or below `MAX_DEPTH` levels of nesting.

A quoted-printable part with raw 8-bit bytes (a common producer bug) has those bytes written
as `=XX`: what every lenient decoder already makes of them, so the decoded content is unchanged
(refused if that would make a line longer than 998 characters).

Each quoted-printable encoding is decoded again and compared with the original; a mismatch (a
bug of ours) raises RuntimeError, which the delivery code turns into a 4.3.0 deferral, never
into a changed message or a bounce.

Lines over 998 octets (`wrap_long_lines`, intake's `limits.long_lines: encode`): the same walk
with another goal (`_Goal`). A leaf part with such a line is re-encoded the same way (QP for text,
base64 for the rest); one already quoted-printable or base64 is decoded and encoded again (its
lines were no valid encoding anyway; the decoded content is kept). Refused: such a line in a
header block (a header cannot be re-encoded: it has to be folded, which only its writer can do
right), in a preamble or epilogue, or in a part of an unknown encoding. A multipart labelled
binary (the only label that allows long lines) is relabelled 8bit or 7bit.

Any conversion changes the body, so it breaks a DKIM signature's body hash (and adding
headers breaks one that covers them): senders who sign should send 7-bit messages with short
lines. Postfix, which converts 8bit parts to quoted-printable the same way, has the same caveat.

This module is shared: the worker converts to 7-bit, the supervisor's intake re-encodes long
lines. It imports nothing of either side.
"""
from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import Message

# Nesting (multiparts inside multiparts, messages inside messages) beyond which a message is
# refused rather than parsed; Postfix's mime_nesting_limit is 100.
MAX_DEPTH = 50
# Octets in a line, CRLF excluded (RFC 5322 2.1.1; RFC 5321 4.5.3.1.6 counts the CRLF: 1000).
MAX_LINE = 998
# Encodings that say what the content is made of, not how it was encoded (RFC 2045 6.1).
_IDENTITY = (None, "7bit", "8bit", "binary")
_EIGHTBIT_BYTE = re.compile(rb"[\x80-\xff]")


class CannotConvert(Exception):
    """The message cannot be converted; the text says why, for the reply or the rejection."""


def to_7bit(message: bytes) -> bytes:
    """`message` with every 8-bit part re-encoded to 7-bit; `message` itself if it is ASCII.

    `message` has CRLF line endings (as the engine's intake makes them). Raises
    CannotConvert when the message cannot be converted without rewriting what it says.
    """
    if message.isascii():
        return message
    return _convert(message, _SEVEN_BIT)


def wrap_long_lines(message: bytes) -> bytes:
    """`message` with every part that has a line over MAX_LINE octets re-encoded so that no
    line is; `message` itself if none is. CRLF line endings; raises CannotConvert (a long
    header line, preamble or epilogue line; an unknown encoding)."""
    if first_long_line(message) < 0:
        return message
    return _convert(message, _SHORT_LINES)


def first_long_line(data: bytes, start: int = 0, end: int | None = None) -> int:
    """The offset of the first line of data[start:end] longer than MAX_LINE octets (CRLF
    excluded), or -1. The lines end in CRLF, the last one included.

    Fast, and the common case has no per-line Python loop: each step is one rfind() for the
    last line feed within MAX_LINE + 2 octets, so a step covers about MAX_LINE octets of short
    lines (measured: 8 us for 50 KB, 0.16 ms for 1 MB of 78-character lines; the obvious
    max(map(len, data.split(b"\r\n"))) took 65 us and 1.8 ms, building a bytes object per
    line)."""
    end = len(data) if end is None else end
    pos = start
    while pos < end:
        newline = data.rfind(b"\n", pos, min(end, pos + MAX_LINE + 2))
        if newline < 0:
            return pos if end - pos > MAX_LINE else -1  # (a last line without CRLF)
        pos = newline + 1
    return -1


def _has_long_line(data: bytes) -> bool:
    return first_long_line(data) >= 0


def _convert(message: bytes, goal: _Goal) -> bytes:
    edits: list[_Edit] = []
    _entity(message, 0, len(message), "text/plain", True, edits, 0, "the message", goal)
    out = _apply(message, edits)
    if goal.needs(out):  # the parts above cover every byte; a last guard all the same
        raise CannotConvert(f"{goal.what} outside any convertible MIME part")
    return out


# --- parsing -----------------------------------------------------------------------------


@dataclass
class _Field:
    name: bytes  # as written
    start: int  # offset of its first line
    end: int  # offset past its last line's CRLF
    value: str  # unfolded


@dataclass
class _Head:
    """The header block of an entity in [start, end): its fields, where it ends, the body."""

    fields: list[_Field]
    end: int  # past the last header line's CRLF: where added headers go
    body: int  # where the body starts (past the empty line)
    _by_name: dict[bytes, list[_Field]] = field(default_factory=dict)

    def get(self, name: bytes) -> list[_Field]:
        if not self._by_name:
            for f in self.fields:
                self._by_name.setdefault(f.name.strip().lower(), []).append(f)
        return self._by_name.get(name, [])


def _head(msg: bytes, start: int, end: int) -> _Head:
    if msg.startswith(b"\r\n", start) and start + 2 <= end:  # no header at all
        return _Head([], start, start + 2)
    blank = msg.find(b"\r\n\r\n", start, end)
    head_end, body = (blank + 2, blank + 4) if blank >= 0 else (end, end)
    fields: list[_Field] = []
    pos = start
    while pos < head_end:
        eol = msg.find(b"\r\n", pos, head_end)
        nxt = head_end if eol < 0 else eol + 2
        line = msg[pos:nxt]
        if line[:1] in (b" ", b"\t") and fields:  # a continuation of the field before
            last = fields[-1]
            last.end = nxt
            last.value += line.rstrip(b"\r\n").decode("ascii", "replace")
        else:
            name, colon, value = line.rstrip(b"\r\n").partition(b":")
            if colon:
                fields.append(_Field(name, pos, nxt, value.decode("ascii", "replace")))
        pos = nxt
    return _Head(fields, head_end, body)


def _content_type(head: _Head, default: str) -> tuple[str, str | None]:
    """The content type (lower case; RFC 2045 5.2: text/plain when invalid) and boundary."""
    fields = head.get(b"content-type")
    parsed = Message()
    parsed.set_default_type(default)
    if fields:
        parsed["Content-Type"] = fields[0].value
    return parsed.get_content_type(), parsed.get_boundary()


def _encoding(head: _Head) -> str | None:
    fields = head.get(b"content-transfer-encoding")
    if not fields:
        return None
    token = re.match(r"\s*([^\s(;]*)", fields[0].value)
    return token.group(1).lower() if token else ""


# --- converting --------------------------------------------------------------------------

_Edit = tuple[int, int, bytes]  # replace msg[start:end] with the bytes


@dataclass(frozen=True)
class _Goal:
    """What a conversion is for: the content that needs it, how it is named in a refusal,
    what becomes of a part already encoded, and of a multipart's label."""

    needs: Callable[[bytes], bool]  # content (or a header block) that must be converted
    what: str  # e.g. "8-bit bytes", for the refusals
    header_hint: str  # why a header block with it cannot be converted
    encoded: Callable[[bytes, str, str], bytes]  # (content, its encoding, where): re-encoded
    labels: tuple[str, ...]  # a multipart or message/rfc822 with one of these is relabelled
    relabel: Callable[[bytes], str]  # ...to this, given its body


def _entity(msg: bytes, start: int, end: int, default: str, is_message: bool,
            edits: list[_Edit], depth: int, where: str, goal: _Goal) -> None:
    """Convert the entity (a message or a body part) in msg[start:end]."""
    if depth > MAX_DEPTH:
        raise CannotConvert(f"MIME nesting deeper than {MAX_DEPTH} levels")
    head = _head(msg, start, end)
    if goal.needs(msg[start:head.end]):
        name = next((f.name.decode("ascii", "replace")[:40] for f in head.fields
                     if goal.needs(msg[f.start:f.end])), "a")
        raise CannotConvert(f"{goal.what} in the {name} header of {where} ({goal.header_hint})")
    if not goal.needs(msg[head.body:end]):
        return  # nothing to convert below
    ctype, boundary = _content_type(head, default)
    encoding = _encoding(head)
    first = len(edits)
    added: list[bytes] = []
    if ctype.startswith("multipart/") or ctype == "message/rfc822":
        if encoding not in _IDENTITY:
            raise CannotConvert(f"{where} is {ctype} with Content-Transfer-Encoding"
                                f" {encoding} (RFC 2045 6.4 allows 7bit, 8bit, binary)")
        if ctype == "message/rfc822":
            _entity(msg, head.body, end, "text/plain", True, edits, depth + 1,
                    f"the message in {where}", goal)
        else:
            _multipart(msg, head.body, end, boundary, ctype, edits, depth, where, goal)
        if encoding in goal.labels:
            _label(head, goal.relabel(msg[head.body:end]), edits, added)
    elif ctype in ("message/partial", "message/external-body"):
        raise CannotConvert(f"{goal.what} in {where}, a {ctype} (RFC 2046 5.2: 7bit only)")
    elif encoding in _IDENTITY:
        _leaf(msg, head, end, ctype, edits, added)
    elif encoding in ("quoted-printable", "base64"):
        edits.append((head.body, end, goal.encoded(msg[head.body:end], encoding, where)))
    else:
        raise CannotConvert(f"{goal.what} in {where}, whose Content-Transfer-Encoding is"
                            f" {encoding or 'empty'}")
    if is_message and len(edits) > first and not head.get(b"mime-version"):
        added.insert(0, b"MIME-Version: 1.0\r\n")
    if added:
        edits.append((head.end, head.end, b"".join(added)))


def _leaf(msg: bytes, head: _Head, end: int, ctype: str, edits: list[_Edit],
          added: list[bytes]) -> None:
    """Encode a leaf whose content is as written: quoted-printable for text, else base64."""
    data = msg[head.body:end]
    if ctype.startswith("text/"):
        edits.append((head.body, end, _quoted_printable(data)))
        if not head.get(b"content-type"):
            added.append(b"Content-Type: text/plain; charset=" + _charset(data) + b"\r\n")
        _label(head, "quoted-printable", edits, added)
    else:
        edits.append((head.body, end, _base64(data)))
        _label(head, "base64", edits, added)


def _multipart(msg: bytes, body: int, end: int, boundary: str | None, ctype: str,
               edits: list[_Edit], depth: int, where: str, goal: _Goal) -> None:
    """Convert each part of a multipart body in msg[body:end]."""
    if not boundary:
        raise CannotConvert(f"{where} is {ctype} without a boundary")
    line = b"--" + re.escape(boundary.encode("ascii", "replace")) + rb"(--)?[ \t]*(?=\r\n|\Z)"
    delimiter = re.compile(b"\r\n" + line)  # the CRLF before a delimiter line is part of it
    found = re.compile(line).match(msg, body, end) or delimiter.search(msg, body, end)
    if found is None:
        raise CannotConvert(f"{where} is {ctype} but no line has its boundary")
    _refuse(msg, body, found.start(), f"the preamble of {where}", goal)
    default = "message/rfc822" if ctype == "multipart/digest" else "text/plain"
    number = 0
    while not found.group(1):  # not the close delimiter
        number += 1
        part_start = min(found.end() + 2, end)
        following = delimiter.search(msg, found.end(), end)
        part_end = following.start() if following else end  # no close delimiter: to the end
        if where == "the message":
            name = f"part {number}"
        elif where.startswith("part "):
            name = f"{where}.{number}"  # part 2.1, as IMAP numbers them
        else:
            name = f"part {number} of {where}"
        _entity(msg, part_start, part_end, default, False, edits, depth + 1, name, goal)
        if following is None:
            return
        found = following
    _refuse(msg, found.end(), end, f"the epilogue of {where}", goal)


def _refuse(msg: bytes, start: int, end: int, where: str, goal: _Goal) -> None:
    if goal.needs(msg[start:end]):
        raise CannotConvert(f"{goal.what} in {where}")


def _label(head: _Head, encoding: str, edits: list[_Edit], added: list[bytes]) -> None:
    """Set the entity's Content-Transfer-Encoding: rewrite its field(s), or add one."""
    fields = head.get(b"content-transfer-encoding")
    for f in fields:
        edits.append((f.start, f.end, f.name + b": " + encoding.encode() + b"\r\n"))
    if not fields:
        added.append(b"Content-Transfer-Encoding: " + encoding.encode() + b"\r\n")


def _charset(data: bytes) -> bytes:
    if data.isascii():  # (a long-lined ASCII body: intake's wrap_long_lines)
        return b"us-ascii"
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return b"unknown-8bit"
    return b"utf-8"


def _quoted_printable(data: bytes) -> bytes:
    """RFC 2045 6.7, lines of at most 76 characters, CRLF line breaks kept as hard breaks."""
    # binascii takes its line ending from the first one in the data (LF without one): give
    # it a CRLF to find, and take it off again.
    tail = not data.endswith(b"\r\n")
    encoded = binascii.b2a_qp(data + b"\r\n" if tail else data, quotetabs=False, istext=True,
                              header=False)
    if tail:
        encoded = encoded[:-2]
    if binascii.a2b_qp(encoded) != data:  # a bug of ours must not change what mail says
        raise RuntimeError("quoted-printable conversion does not decode to the original")
    return encoded


def _base64(data: bytes) -> bytes:
    """RFC 2045 6.8, lines of 76 characters; ends in CRLF only where the data did (a part's
    last line break belongs to the boundary delimiter that follows)."""
    encoded = base64.encodebytes(data).replace(b"\n", b"\r\n")
    return encoded if data.endswith(b"\r\n") or not encoded else encoded[:-2]


def _escape_8bit(data: bytes, encoding: str, where: str) -> bytes:
    """An encoded part's raw 8-bit bytes as quoted-printable escapes, what every lenient
    decoder makes of them; base64 with 8-bit bytes is broken already: refused."""
    if encoding != "quoted-printable":
        raise CannotConvert(f"8-bit bytes in {where}, whose Content-Transfer-Encoding is"
                            f" {encoding}")
    escaped = _EIGHTBIT_BYTE.sub(lambda m: b"=%02X" % m.group()[0], data)
    if _has_long_line(escaped):  # RFC 5321 4.5.3.1.6
        raise CannotConvert(f"{where} is quoted-printable with raw 8-bit bytes in lines"
                            " too long to escape")
    return escaped


def _encode_again(data: bytes, encoding: str, where: str) -> bytes:
    """A quoted-printable or base64 part with lines over MAX_LINE is no valid encoding (RFC
    2045 allows 76): its content, decoded as a lenient reader would, encoded again the same
    way. Ends in CRLF where `data` did (the part's last line break is the delimiter's)."""
    if encoding == "quoted-printable":
        return _quoted_printable(binascii.a2b_qp(data))
    try:
        content = base64.b64decode(data)  # (validate=False: line breaks and junk skipped)
    except binascii.Error as exc:
        raise CannotConvert(f"{where} is base64 that does not decode ({exc})") from None
    encoded = base64.encodebytes(content).replace(b"\n", b"\r\n")
    return encoded if data.endswith(b"\r\n") else encoded.removesuffix(b"\r\n")


def _not_ascii(data: bytes) -> bool:
    return not data.isascii()


def _label_7bit(body: bytes) -> str:
    return "7bit"


def _label_by_content(body: bytes) -> str:
    """A multipart once labelled binary, its long lines gone: 8bit if it has 8-bit bytes."""
    return "7bit" if body.isascii() else "8bit"


_SEVEN_BIT = _Goal(needs=_not_ascii, what="8-bit bytes",
                   header_hint="that would need RFC 2047 encoding", encoded=_escape_8bit,
                   labels=("8bit", "binary"), relabel=_label_7bit)
_SHORT_LINES = _Goal(needs=_has_long_line, what=f"a line over {MAX_LINE} octets",
                     header_hint="a header cannot be re-encoded: only its writer can fold it",
                     encoded=_encode_again, labels=("binary",), relabel=_label_by_content)


def _apply(msg: bytes, edits: list[_Edit]) -> bytes:
    out: list[bytes] = []
    pos = 0
    for start, end, new in sorted(edits, key=lambda e: (e[0], e[1])):
        assert start >= pos, "overlapping edits"
        out += (msg[pos:start], new)
        pos = end
    out.append(msg[pos:])
    return b"".join(out)
