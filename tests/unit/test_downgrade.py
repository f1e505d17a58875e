"""engine.downgrade: 8-bit messages converted to 7-bit for a server without 8BITMIME (RFC 6152),
and lines over 998 octets re-encoded (intake's `limits.long_lines: encode`, RFC 5322 2.1.1).

The converter's output is judged by the stdlib parser (structure) and binascii/base64
(decoding), never by the converter's own parsing (tests/support/mime.py): every leaf part must
decode to what the original's did, and every byte outside the converted parts must be the
original's. The transaction on a scripted server is tests/conversation/test_downgrade.py, the
whole engine tests/engine/test_downgrade.py.
"""
from __future__ import annotations

import base64
import binascii
import os
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.downgrade import (
    MAX_DEPTH,
    MAX_LINE,
    CannotConvert,
    first_long_line,
    to_7bit,
    wrap_long_lines,
)
from tests.support.mime import TOP, UTF8, leaves, multipart, part

pytestmark = pytest.mark.timeout(60)  # Hypothesis: DOWNGRADE_EXAMPLES can ask for many more


def head_and_body(message: bytes) -> tuple[bytes, bytes]:
    head, _, body = message.partition(b"\r\n\r\n")
    return head + b"\r\n", body


def same_but_labels(out: bytes, original: bytes) -> bool:
    """Header blocks equal but for the lines the converter rewrites (Content-Transfer-Encoding)
    or adds (a text/plain Content-Type where there was none)."""
    kept = [line for line in original.split(b"\r\n")
            if not line.startswith(b"Content-Transfer-Encoding:")]
    new = [line for line in out.split(b"\r\n")
           if not line.startswith(b"Content-Transfer-Encoding:")
           and (line in kept or not line.startswith(b"Content-Type: text/plain; charset="))]
    return new == kept


def check_lines(message: bytes) -> None:
    """CRLF only, no line over 998 characters (RFC 5321 4.5.3.1.6), 7-bit."""
    assert message.isascii()
    assert b"\n" not in message.replace(b"\r\n", b"") and b"\r" not in message.replace(b"\r\n",
                                                                                          b"")
    assert all(len(line) <= 998 for line in message.split(b"\r\n"))


# --- the converter ------------------------------------------------------------------------


def test_ascii_message_is_returned_as_is() -> None:
    message = multipart(part(b"plain ascii", cte=b"7bit"))
    assert to_7bit(message) is message


def test_multipart_with_7bit_and_8bit_parts() -> None:
    text = UTF8 + b" = 100%   \r\n" + b"x" * 300 + UTF8 + b"\r\n.\r\nFrom here\r\nend"
    seven = part(b"only ascii here\r\n", cte=b"7bit")
    eight = part(text)
    pdf = part(b"%PDF-1.4\r\n\xe2\xe3\xcf\xd3\r\nbinary-ish", b"application/pdf")
    original = multipart(seven, eight, pdf)
    out = to_7bit(original)
    check_lines(out)
    assert leaves(out) == leaves(original)
    assert leaves(out)[1] == ("text/plain", text)
    # The top-level header block is byte for byte the original's; so is the 7-bit part.
    assert head_and_body(out)[0] == head_and_body(original)[0]
    assert b"--=_b0und_=\r\n" + seven + b"\r\n--=_b0und_=\r\n" in out
    # Only the CTE header of the converted parts changed: quoted-printable for text, base64
    # for the rest.
    assert out.count(b"Content-Transfer-Encoding: 8bit") == 0
    assert out.count(b"Content-Transfer-Encoding: quoted-printable\r\n") == 1
    assert out.count(b"Content-Transfer-Encoding: base64\r\n") == 1
    assert out.replace(b"quoted-printable", b"8bit").replace(b"base64", b"8bit").startswith(
        original[:original.index(b"\r\n\r\n" + text[:10])])
    for ctype, cte in ((b"text/plain; charset=utf-8", b"quoted-printable"),
                       (b"application/pdf", b"base64")):
        encoded = out.split(b"Content-Type: " + ctype + b"\r\nContent-Transfer-Encoding: "
                            + cte + b"\r\n\r\n")[1].split(b"\r\n--=_b0und_=")[0]
        assert all(len(line) <= 76 for line in encoded.split(b"\r\n"))


def test_nested_multipart_and_message_rfc822() -> None:
    inner_message = (b"From: a@example.org\r\nSubject: inner\r\nMIME-Version: 1.0\r\n"
                     b"Content-Type: text/plain; charset=utf-8\r\n"
                     b"Content-Transfer-Encoding: 8bit\r\n\r\n" + UTF8 + b"\r\n")
    alternative = multipart(part(UTF8 + b"\r\n"), part(b"<p>" + UTF8 + b"</p>\r\n",
                                                      b"text/html; charset=utf-8"),
                            boundary=b"inner", head=b"", ctype=b"multipart/alternative")
    original = multipart(alternative, part(inner_message, b"message/rfc822"),
                         part(b"ascii attachment\r\n", b"text/plain", b"7bit"))
    out = to_7bit(original)
    check_lines(out)
    assert leaves(out) == leaves(original)
    assert [ctype for ctype, _ in leaves(out)] == ["text/plain", "text/html", "text/plain",
                                                   "text/plain"]
    # message/rfc822 labelled 8bit: its content is now 7-bit, and it says so.
    assert b"Content-Type: message/rfc822\r\nContent-Transfer-Encoding: 7bit\r\n" in out
    assert b"From: a@example.org\r\nSubject: inner\r\n" in out


def test_missing_cte_is_added_after_the_part_headers() -> None:
    original = multipart(part(UTF8, cte=None), part(b"\x00\x01\xff", b"image/png", cte=None))
    out = to_7bit(original)
    assert (b"Content-Type: text/plain; charset=utf-8\r\n"
            b"Content-Transfer-Encoding: quoted-printable\r\n\r\n") in out
    assert b"Content-Type: image/png\r\nContent-Transfer-Encoding: base64\r\n\r\nAAH/\r\n" in out
    assert leaves(out) == leaves(original)


def test_binary_cte_is_converted_and_relabelled() -> None:
    original = multipart(part(b"\xff" * 2000, b"application/octet-stream", b"binary"))
    out = to_7bit(original)
    check_lines(out)
    assert b"Content-Transfer-Encoding: base64\r\n" in out and b"binary" not in out
    assert leaves(out) == leaves(original)


def test_multipart_labelled_8bit_becomes_7bit_and_folded_cte_is_replaced_whole() -> None:
    original = (TOP + b"Content-Type: multipart/mixed; boundary=b\r\n"
                b"Content-Transfer-Encoding:\r\n 8bit\r\nX-After: kept\r\n\r\n"
                b"--b\r\nContent-Transfer-Encoding: 8BIT (said loudly)\r\n\r\n" + UTF8
                + b"\r\n--b--\r\n")
    out = to_7bit(original)
    assert out.startswith(TOP + b"Content-Type: multipart/mixed; boundary=b\r\n"
                          b"Content-Transfer-Encoding: 7bit\r\nX-After: kept\r\n\r\n"
                          b"--b\r\nContent-Transfer-Encoding: quoted-printable\r\n"
                          b"Content-Type: text/plain; charset=utf-8\r\n\r\n")
    assert leaves(out) == leaves(original)


def test_single_part_message_keeps_its_headers_and_final_crlf() -> None:
    original = (TOP + b"Content-Type: text/plain; charset=utf-8\r\n"
                b"Content-Transfer-Encoding: 8bit\r\nX-Folded: a\r\n\tb\r\n\r\n"
                + UTF8 + b"\r\n" + UTF8 * 5 + b"\r\n")
    out = to_7bit(original)
    check_lines(out)
    assert out.endswith(b"\r\n")
    head, body = head_and_body(out)
    assert head == head_and_body(original)[0].replace(b"8bit", b"quoted-printable")
    assert binascii.a2b_qp(body) == UTF8 + b"\r\n" + UTF8 * 5 + b"\r\n"


def test_non_mime_message_becomes_text_plain_with_its_charset() -> None:
    head = b"From: sender@example.org\r\nSubject: hi\r\n"
    out = to_7bit(head + b"\r\n" + UTF8 + b"\r\n")
    assert out == (head + b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
                   b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"
                   + binascii.b2a_qp(UTF8 + b"\r\n", istext=True) )
    latin1 = to_7bit(head + b"\r\nK\xf6ln\r\n")
    assert b"Content-Type: text/plain; charset=unknown-8bit\r\n" in latin1
    assert leaves(latin1) == [("text/plain", b"K\xf6ln\r\n")]


def test_mime_version_added_when_only_content_type_was_there() -> None:
    head = b"Subject: hi\r\nContent-Type: text/plain; charset=iso-8859-1\r\n"
    out = to_7bit(head + b"\r\nK\xf6ln\r\n")
    assert out == (head + b"MIME-Version: 1.0\r\nContent-Transfer-Encoding: quoted-printable"
                   b"\r\n\r\nK=F6ln\r\n")


def test_quoted_printable_part_with_raw_8bit_bytes_is_escaped() -> None:
    original = multipart(part(b"caf\xc3\xa9 and caf=C3=A9\r\n", cte=b"quoted-printable"))
    out = to_7bit(original)
    assert b"\r\ncaf=C3=A9 and caf=C3=A9\r\n" in out
    assert leaves(out)[0][1] == "café and café\r\n".encode()


def test_digest_parts_default_to_message_rfc822() -> None:
    inner = b"Subject: one\r\nContent-Transfer-Encoding: 8bit\r\n\r\n" + UTF8 + b"\r\n"
    original = multipart(b"\r\n" + inner, ctype=b"multipart/digest")
    out = to_7bit(original)
    assert (b"Subject: one\r\nContent-Transfer-Encoding: quoted-printable\r\n"
            b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n") in out
    assert leaves(out) == leaves(original)


@pytest.mark.parametrize(("message", "why"), [
    (b"Subject: caf\xc3\xa9\r\n\r\nbody\r\n", "8-bit bytes in the Subject header of the message"),
    (multipart(part(b"x", b"text/plain; name=\"caf\xc3\xa9\"")),
     "8-bit bytes in the Content-Type header of part 1"),
    (multipart(part(b"\xff", cte=b"base64")), "part 1, whose Content-Transfer-Encoding is base64"),
    (multipart(part(b"\xff", cte=b"x-uuencode")), "Content-Transfer-Encoding is x-uuencode"),
    (multipart(part(b"\xff", b"message/partial; id=1; number=1")), "message/partial"),
    (TOP + b"Content-Type: multipart/mixed\r\n\r\n--b\r\n\r\n\xff\r\n--b--\r\n",
     "without a boundary"),
    (TOP + b"Content-Type: multipart/mixed; boundary=zz\r\n\r\n--b\r\n\r\n\xff\r\n",
     "no line has its boundary"),
    (multipart(part(b"x")).replace(b"multi-part", b"multi-p\xe4rt"), "the preamble"),
    (multipart(part(b"x")) + b"\xff\r\n", "the epilogue"),
    (TOP + b"Content-Type: multipart/mixed; boundary=b\r\nContent-Transfer-Encoding: base64"
     b"\r\n\r\n--b\r\n\r\n\xff\r\n--b--\r\n", "Content-Transfer-Encoding base64"),
])
def test_what_cannot_be_converted(message: bytes, why: str) -> None:
    with pytest.raises(CannotConvert, match=re.escape(why)):
        to_7bit(message)


def test_nesting_beyond_the_limit_is_refused() -> None:
    message = part(UTF8)
    for depth in range(MAX_DEPTH + 2):
        message = multipart(message, boundary=b"b%d" % depth, head=b"")
    with pytest.raises(CannotConvert, match="nesting deeper"):
        to_7bit(TOP + message)


# A line of part content: any bytes but CR and LF (the engine's intake makes every line
# ending CRLF); NUL too, which the converter must survive even if intake refuses it.
_line = st.binary(max_size=120).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
_content = st.lists(_line, max_size=6).map(b"\r\n".join)
_part = st.tuples(
    st.sampled_from([b"text/plain; charset=utf-8", b"text/html", b"application/octet-stream",
                     b"image/png", None]),
    st.sampled_from([b"8bit", b"7bit", b"binary", None]),
    _content)


@settings(max_examples=int(os.environ.get("DOWNGRADE_EXAMPLES", "200")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(parts=st.lists(_part, min_size=1, max_size=4), single=st.booleans())
def test_decoded_content_is_unchanged(parts: list[tuple[bytes | None, bytes | None, bytes]],
                                      single: bool) -> None:
    """decode(convert(x)) == decode(x), part by part; 7-bit CRLF lines of at most 998."""
    if single:
        ctype, cte, content = parts[0]
        original = TOP + part(content + b"\r\n", ctype, cte)
    else:
        original = multipart(*(part(content, ctype, cte) for ctype, cte, content in parts))
        if any(b"=_b0und_=" in content for _, _, content in parts):
            return
    out = to_7bit(original)
    check_lines(out)
    assert leaves(out) == leaves(original)
    # The top-level headers are the original's but for a rewritten or added CTE (and the
    # Content-Type added where there was none), single part; untouched, multipart.
    assert same_but_labels(head_and_body(out)[0], head_and_body(original)[0])
    if not single:
        assert head_and_body(out)[0] == head_and_body(original)[0]
    if original.isascii():
        assert out is original


_FRAGMENTS = [b"", b"MIME-Version: 1.0", b"Content-Type: multipart/mixed; boundary=b",
              b"Content-Type: message/rfc822", b"Content-Type: text/plain",
              b"Content-Type: multipart/digest; boundary=\"c\"", b"Content-Type: image/gif",
              b"Content-Transfer-Encoding: 8bit", b"Content-Transfer-Encoding: base64",
              b"Content-Transfer-Encoding: quoted-printable", b" folded", b"--b", b"--b--",
              b"--c", b"--c--  ", b"caf\xc3\xa9", b"\xff\xfe", b"x" * 1200]


@settings(max_examples=int(os.environ.get("DOWNGRADE_EXAMPLES", "200")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(_FRAGMENTS) | _line, max_size=30))
def test_any_input_converts_to_7bit_or_is_refused(lines: list[bytes]) -> None:
    """Whatever the structure (broken, truncated, nested), the result is 7-bit with CRLF
    lines, or CannotConvert: never another exception, never 8-bit bytes on the wire."""
    message = b"\r\n".join(lines) + b"\r\n"
    try:
        out = to_7bit(message)
    except CannotConvert:
        return
    assert out.isascii()
    assert b"\n" not in out.replace(b"\r\n", b"") and b"\r" not in out.replace(b"\r\n", b"")


def test_quoted_printable_part_whose_escaped_line_would_pass_998_is_refused() -> None:
    with pytest.raises(CannotConvert, match="too long"):
        to_7bit(multipart(part(b"\xc3\xa9" * 200, cte=b"quoted-printable")))


# --- lines over 998 octets ------------------------------------------------------------------


def slow_first_long_line(data: bytes) -> int:
    """The reference: every line measured."""
    offset = 0
    for line in data.split(b"\r\n"):
        if len(line) > MAX_LINE:
            return offset
        offset += len(line) + 2
    return -1


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 2100), max_size=12), st.booleans())
def test_first_long_line_finds_what_measuring_every_line_finds(lengths: list[int],
                                                               last_crlf: bool) -> None:
    data = b"\r\n".join(b"q" * n for n in lengths) + (b"\r\n" if last_crlf else b"")
    assert first_long_line(data) == slow_first_long_line(data)


@pytest.mark.parametrize(("length", "found"), [(998, -1), (999, 0), (1000, 0), (5000, 0)])
def test_first_long_line_at_the_limit(length: int, found: int) -> None:
    assert first_long_line(b"a" * length + b"\r\n") == found
    assert first_long_line(b"ok\r\n" + b"a" * length) == (found if found < 0 else 4)


def test_short_lines_are_returned_as_is() -> None:
    message = multipart(part(b"x" * 998, cte=b"7bit"))
    assert wrap_long_lines(message) is message


def test_long_lines_in_text_and_in_other_parts() -> None:
    text = b"x" * 3000 + b"\r\nshort\r\n" + UTF8 * 40
    blob = b"y" * 1500
    short = part(b"fine\r\n", cte=b"7bit")
    original = multipart(short, part(text), part(blob, b"application/octet-stream", None))
    out = wrap_long_lines(original)
    assert first_long_line(out) < 0
    assert leaves(out) == leaves(original)
    assert b"--=_b0und_=\r\n" + short + b"\r\n--=_b0und_=\r\n" in out  # untouched
    assert out.count(b"Content-Transfer-Encoding: quoted-printable\r\n") == 1
    assert b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64" in out


def test_quoted_printable_and_base64_with_long_lines_are_encoded_again() -> None:
    qp = part(b"a=3Db" * 400, cte=b"quoted-printable")
    b64 = part(base64.b64encode(b"\x00\xff" * 1000), b"image/png", b"base64")
    original = multipart(qp, b64)
    out = wrap_long_lines(original)
    assert first_long_line(out) < 0
    assert leaves(out) == leaves(original)
    assert leaves(out)[0] == ("text/plain", b"a=b" * 400)


def test_a_binary_multipart_is_relabelled_once_its_long_lines_are_gone() -> None:
    original = (TOP + b"Content-Type: multipart/mixed; boundary=b\r\n"
                b"Content-Transfer-Encoding: binary\r\n\r\n--b\r\n\r\n" + b"z" * 1200
                + b"\r\n--b--\r\n")
    out = wrap_long_lines(original)
    assert b"Content-Transfer-Encoding: 7bit\r\n" in out and b"binary" not in out
    assert leaves(out) == leaves(original)


@pytest.mark.parametrize(("message", "why"), [
    (TOP + b"X-Long: " + b"h" * 1000 + b"\r\n\r\nbody\r\n",
     "a line over 998 octets in the X-Long header of the message (a header cannot be"),
    (multipart(part(b"ok")).replace(b"This is a multi-part", b"p" * 1000),
     "a line over 998 octets in the preamble of the message"),
    (multipart(part(b"m" * 1000, b"message/partial", None)),
     "in part 1, a message/partial"),
    (multipart(part(b"u" * 1000, cte=b"x-uuencode")),
     "whose Content-Transfer-Encoding is x-uuencode"),
    (multipart(part(b"A" * 1001, b"image/png", b"base64")), "base64 that does not decode"),
])
def test_long_lines_that_cannot_be_converted(message: bytes, why: str) -> None:
    with pytest.raises(CannotConvert, match=re.escape(why)):
        wrap_long_lines(message)


_any_line = st.tuples(_line, st.integers(0, 2100), _line).map(
    lambda t: t[0][:40] + b"L" * t[1] + t[2][:40])
_long_part = st.tuples(
    st.sampled_from([b"text/plain; charset=utf-8", b"text/html", b"application/octet-stream",
                     None]),
    st.sampled_from([b"8bit", b"7bit", b"binary", None]),
    st.lists(_any_line, max_size=4).map(b"\r\n".join))


@settings(max_examples=int(os.environ.get("DOWNGRADE_EXAMPLES", "200")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(parts=st.lists(_long_part, min_size=1, max_size=4), single=st.booleans())
def test_wrapped_long_lines_decode_to_the_same_content(
        parts: list[tuple[bytes | None, bytes | None, bytes]], single: bool) -> None:
    """Every line of the result is at most 998 octets and every leaf decodes to what the
    original's did; the top-level header block is the original's but for the labels."""
    if single:
        ctype, cte, content = parts[0]
        original = TOP + part(content + b"\r\n", ctype, cte)
    else:
        original = multipart(*(part(content, ctype, cte) for ctype, cte, content in parts))
        if any(b"=_b0und_=" in content for _, _, content in parts):
            return
    out = wrap_long_lines(original)
    assert first_long_line(out) < 0 and slow_first_long_line(out) < 0
    assert leaves(out) == leaves(original)
    assert same_but_labels(head_and_body(out)[0], head_and_body(original)[0])
