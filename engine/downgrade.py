"""8-bit to 7-bit conversion of a message, for a server without 8BITMIME (RFC 6152 section 3).

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

Any conversion changes the body, so it breaks a DKIM signature's body hash (and adding
headers breaks one that covers them): senders who sign should send 7-bit messages. Postfix,
which converts 8bit parts to quoted-printable the same way, has the same caveat.
"""
from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, field
from email.message import Message

# Nesting (multiparts inside multiparts, messages inside messages) beyond which a message is
# refused rather than parsed; Postfix's mime_nesting_limit is 100.
MAX_DEPTH = 50
# Encodings that say what the content is made of, not how it was encoded (RFC 2045 6.1).
_IDENTITY = (None, "7bit", "8bit", "binary")
_EIGHTBIT_BYTE = re.compile(rb"[\x80-\xff]")


class CannotConvert(Exception):
    """The message cannot be converted to 7-bit; the text says why, for the reply."""


def to_7bit(message: bytes) -> bytes:
    """`message` with every 8-bit part re-encoded to 7-bit; `message` itself if it is ASCII.

    `message` has CRLF line endings (as the engine's intake makes them). Raises
    CannotConvert when the message cannot be converted without rewriting what it says.
    """
    if message.isascii():
        return message
    edits: list[_Edit] = []
    _entity(message, 0, len(message), "text/plain", True, edits, 0, "the message")
    out = _apply(message, edits)
    if not out.isascii():  # the parts above cover every byte; a last guard all the same
        raise CannotConvert("8-bit bytes outside any convertible MIME part")
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


def _entity(msg: bytes, start: int, end: int, default: str, is_message: bool,
            edits: list[_Edit], depth: int, where: str) -> None:
    """Convert the entity (a message or a body part) in msg[start:end]."""
    if depth > MAX_DEPTH:
        raise CannotConvert(f"MIME nesting deeper than {MAX_DEPTH} levels")
    head = _head(msg, start, end)
    if not msg[start:head.end].isascii():
        name = next((f.name.decode("ascii", "replace")[:40] for f in head.fields
                     if not msg[f.start:f.end].isascii()), "a")
        raise CannotConvert(f"8-bit bytes in the {name} header of {where} (that would need"
                            " RFC 2047 encoding)")
    if msg[head.body:end].isascii():
        return  # nothing 8-bit below
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
                    f"the message in {where}")
        else:
            _multipart(msg, head.body, end, boundary, ctype, edits, depth, where)
        if encoding in ("8bit", "binary"):
            _label(head, "7bit", edits, added)
    elif ctype in ("message/partial", "message/external-body"):
        raise CannotConvert(f"8-bit bytes in {where}, a {ctype} (RFC 2046 5.2: 7bit only)")
    elif encoding in _IDENTITY:
        data = msg[head.body:end]
        if ctype.startswith("text/"):
            edits.append((head.body, end, _quoted_printable(data)))
            if not head.get(b"content-type"):
                added.append(b"Content-Type: text/plain; charset=" + _charset(data) + b"\r\n")
            _label(head, "quoted-printable", edits, added)
        else:
            edits.append((head.body, end, _base64(data)))
            _label(head, "base64", edits, added)
    elif encoding == "quoted-printable":
        escaped = _EIGHTBIT_BYTE.sub(lambda m: b"=%02X" % m.group()[0], msg[head.body:end])
        if max(map(len, escaped.split(b"\r\n"))) > 998:  # RFC 5321 4.5.3.1.6
            raise CannotConvert(f"{where} is quoted-printable with raw 8-bit bytes in lines"
                                " too long to escape")
        edits.append((head.body, end, escaped))
    else:
        raise CannotConvert(f"8-bit bytes in {where}, whose Content-Transfer-Encoding is"
                            f" {encoding or 'empty'}")
    if is_message and len(edits) > first and not head.get(b"mime-version"):
        added.insert(0, b"MIME-Version: 1.0\r\n")
    if added:
        edits.append((head.end, head.end, b"".join(added)))


def _multipart(msg: bytes, body: int, end: int, boundary: str | None, ctype: str,
               edits: list[_Edit], depth: int, where: str) -> None:
    """Convert each part of a multipart body in msg[body:end]."""
    if not boundary:
        raise CannotConvert(f"{where} is {ctype} without a boundary")
    line = b"--" + re.escape(boundary.encode("ascii", "replace")) + rb"(--)?[ \t]*(?=\r\n|\Z)"
    delimiter = re.compile(b"\r\n" + line)  # the CRLF before a delimiter line is part of it
    found = re.compile(line).match(msg, body, end) or delimiter.search(msg, body, end)
    if found is None:
        raise CannotConvert(f"{where} is {ctype} but no line has its boundary")
    _ascii(msg, body, found.start(), f"the preamble of {where}")
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
        _entity(msg, part_start, part_end, default, False, edits, depth + 1, name)
        if following is None:
            return
        found = following
    _ascii(msg, found.end(), end, f"the epilogue of {where}")


def _ascii(msg: bytes, start: int, end: int, where: str) -> None:
    if not msg[start:end].isascii():
        raise CannotConvert(f"8-bit bytes in {where}")


def _label(head: _Head, encoding: str, edits: list[_Edit], added: list[bytes]) -> None:
    """Set the entity's Content-Transfer-Encoding: rewrite its field(s), or add one."""
    fields = head.get(b"content-transfer-encoding")
    for f in fields:
        edits.append((f.start, f.end, f.name + b": " + encoding.encode() + b"\r\n"))
    if not fields:
        added.append(b"Content-Transfer-Encoding: " + encoding.encode() + b"\r\n")


def _charset(data: bytes) -> bytes:
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


def _apply(msg: bytes, edits: list[_Edit]) -> bytes:
    out: list[bytes] = []
    pos = 0
    for start, end, new in sorted(edits, key=lambda e: (e[0], e[1])):
        assert start >= pos, "overlapping edits"
        out += (msg[pos:start], new)
        pos = end
    out.append(msg[pos:])
    return b"".join(out)
