"""8-bit MIME messages for the downgrade tests (engine.downgrade), and how the stdlib parser
(never the converter's own parsing) sees them: `leaves` are the decoded leaf parts."""
from __future__ import annotations

import base64
import binascii
import email.message
from email import policy
from email.parser import BytesParser

from engine.downgrade import to_7bit

UTF8 = "Grüße aus Köln — ça va très bien, merci.".encode()
TOP = (b"From: sender@example.org\r\nTo: rcpt@example.test\r\nSubject: hi\r\n"
       b"MIME-Version: 1.0\r\n")


def leaves(message: bytes) -> list[tuple[str, bytes]]:
    """(content type, decoded content) of every leaf part, as the stdlib parser sees them."""
    parsed = BytesParser(policy=policy.compat32).parsebytes(message)
    return [(part.get_content_type(), decoded(part)) for part in parsed.walk()
            if not part.is_multipart()]


def decoded(part: email.message.Message) -> bytes:
    # The raw payload: get_payload() would decode 8-bit text with its charset, and the
    # stdlib's quoted-printable decoding turns CRLF into LF.
    payload = part._payload
    assert isinstance(payload, str)
    data = payload.encode("ascii", "surrogateescape")
    cte = (part.get("Content-Transfer-Encoding") or "7bit").strip().lower()
    if cte == "quoted-printable":
        return binascii.a2b_qp(data)
    if cte == "base64":
        return base64.b64decode(data, validate=False)
    return data


def multipart(*parts: bytes, boundary: bytes = b"=_b0und_=", head: bytes = TOP,
              ctype: bytes = b"multipart/mixed") -> bytes:
    body = b"".join(b"--" + boundary + b"\r\n" + p + b"\r\n" for p in parts)
    return (head + b"Content-Type: " + ctype + b"; boundary=\"" + boundary + b"\"\r\n\r\n"
            + b"This is a multi-part message in MIME format.\r\n" + body + b"--" + boundary
            + b"--\r\n")


def part(content: bytes, ctype: bytes | None = b"text/plain; charset=utf-8",
         cte: bytes | None = b"8bit") -> bytes:
    head = b""
    if ctype is not None:
        head += b"Content-Type: " + ctype + b"\r\n"
    if cte is not None:
        head += b"Content-Transfer-Encoding: " + cte + b"\r\n"
    return head + b"\r\n" + content


# CRLF line endings only, as intake leaves every message (the whole-engine test pushes it).
MESSAGE_8BIT = multipart(part(UTF8 + b"\r\n.leading dot\r\n"),
                         part(b"\x89PNG\r\n\x1a\r\n\xff", b"image/png", b"binary"))
CONVERTED = to_7bit(MESSAGE_8BIT)
