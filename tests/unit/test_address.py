"""engine.address: what may go inside MAIL FROM:<...> and RCPT TO:<...>."""
from __future__ import annotations

import unicodedata

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from engine.address import (
    AddressError,
    domain_of,
    needs_smtputf8,
    split,
    validate_mailbox,
    validate_reverse_path,
)


@pytest.mark.parametrize("addr", [
    "bob@example.com",
    "first.last+tag@sub.example.co.uk",
    "!#$%&'*+-/=?^_`{|}~@example.com",
    '"john doe"@example.com',
    '"a@b"@example.com',
    '"quote\\"d"@example.com',
    "a@[192.0.2.1]",
    "a@[IPv6:2001:db8::1]",
    "a@[IPv6:::ffff:192.0.2.1]",
    "a@xn--bcher-kva.example",
    "a@x-y.example",
    "a@123.example",
    "ü@bücher.example",
    "用户@例子.example",
])
def test_valid_addresses_come_back_unchanged(addr: str) -> None:
    assert validate_mailbox(addr) == addr


def test_only_the_domain_is_lowercased() -> None:
    assert validate_mailbox("Bob.Smith@Example.COM") == "Bob.Smith@example.com"
    assert validate_mailbox("Ü@BÜCHER.example") == "Ü@bücher.example"


def test_ipv6_literal_tag_and_digits_are_normalised() -> None:
    assert validate_mailbox("a@[ipv6:2001:DB8::1]") == "a@[IPv6:2001:db8::1]"


@pytest.mark.parametrize(("addr", "reason"), [
    ("", "empty"),
    ("bob", "no '@'"),
    ("bob@", "empty domain"),
    ("@example.com", "empty local part"),
    ("a@b@", "'@' in its local part"),
    ("a@b@example.com", "'@' in its local part"),
    (".bob@example.com", "starts or ends with a dot"),
    ("bob.@example.com", "starts or ends with a dot"),
    ("bo..b@example.com", "two dots"),
    ("bo(b)@example.com", "allowed only inside quotes"),
    ("bo,b@example.com", "allowed only inside quotes"),
    ('bo"b@example.com', "allowed only inside quotes"),
    ("bob smith@example.com", "space"),
    (" bob@example.com", "space"),
    ("bob@exa mple.com", "space"),
    ("<bob@example.com>", "angle brackets"),
    ('"<bob>"@example.com', "angle brackets"),
    ('"bob@example.com', "closing quote"),
    ('"bo"b@example.com', "after the closing quote"),
    ('"bob\\"@example.com', "closing quote"),
    ('""@example.com', "empty quoted"),
    ('"bo\\\u00e9"@example.com', "backslash"),
    ("bob@localhost", "without a dot"),
    ("bob@example.com.", "empty label"),
    ("bob@.example.com", "empty label"),
    ("bob@example..com", "empty label"),
    ("bob@-example.com", "invalid domain label"),
    ("bob@example-.com", "invalid domain label"),
    ("bob@exa_mple.com", "invalid domain label"),
    ("bob@192.0.2.1", "looks like an IP address"),
    ("bob@" + "a" * 64 + ".com", "longer than 63"),
    ("a" * 65 + "@example.com", "local part longer than 64"),
    ("a@" + "b" * 63 + "." + "c" * 63 + "." + "d" * 63 + "." + "e" * 59 + ".com",
     "longer than 254"),
    ("bob@[192.0.2.1", "closing ']'"),
    ("bob@[192.0.2]", "not a valid IPv4"),
    ("bob@[010.0.2.1]", "not a valid IPv4"),
    ("bob@[IPv6:2001:db8::g]", "not a valid IPv6"),
    ("bob@[IPv6:fe80::1%eth0]", "zone id"),
    ("bob@[x400:stuff]", "unsupported address literal"),
    ("bob@stra\u00dfe.de", "xn-- form"),
    ("bob@ex\u2024ample.com", "invalid domain label"),
])
def test_invalid_addresses_say_why(addr: str, reason: str) -> None:
    with pytest.raises(AddressError) as info:
        validate_mailbox(addr)
    assert reason in str(info.value)


def test_domain_limit_applies_to_its_ascii_form() -> None:
    label = "a\u0101b\u0113c\u012bd\u014de\u016bf\u00e4g\u00f6" * 2  # 42 octets, 51 as xn--
    domain = ".".join([label] * 5) + ".com"
    assert len(domain.encode("utf-8")) < 254 < len(domain_of(f"x@{domain}"))
    with pytest.raises(AddressError, match="domain longer than 253"):
        validate_mailbox(f"x@{domain}")


@pytest.mark.parametrize("ch", ["\r", "\n", "\0", "\t", "\x1b", "\x7f", "\x85", "\x9f"])
@pytest.mark.parametrize("template", ["a{}b@example.com", "a@exa{}mple.com", '"a{}b"@example.com',
                                      "a@example.com{}"])
def test_control_characters_are_refused_anywhere(ch: str, template: str) -> None:
    with pytest.raises(AddressError, match="control character"):
        validate_mailbox(template.format(ch))


def test_smtp_command_injection_is_refused() -> None:
    with pytest.raises(AddressError, match="control character"):
        validate_mailbox("a@example.com>\r\nRCPT TO:<victim@example.org")


@pytest.mark.parametrize(("ch", "reason"), [
    ("\u00a0", "whitespace"), ("\u2028", "whitespace"), ("\u3000", "whitespace"),
    ("\u202e", "text-direction"), ("\ud800", "surrogate"),
])
def test_invisible_and_invalid_unicode_is_refused(ch: str, reason: str) -> None:
    with pytest.raises(AddressError, match=reason):
        validate_mailbox(f"a{ch}b@example.com")


def test_error_message_quotes_the_address_escaped_and_cut_short() -> None:
    with pytest.raises(AddressError) as info:
        validate_mailbox("a\r\n" + "x" * 500 + "@example.com")
    text = str(info.value)
    assert "\r" not in text and "\\r\\n" in text
    assert len(text) < 200
    assert info.value.address == "a\r\n" + "x" * 500 + "@example.com"


def test_non_string_is_an_address_error() -> None:
    with pytest.raises(AddressError, match="must be a string"):
        validate_mailbox(None)  # type: ignore[arg-type]


def test_reverse_path_allows_the_null_sender() -> None:
    assert validate_reverse_path("") == ""
    assert validate_reverse_path("Bounce@Example.com") == "Bounce@example.com"
    with pytest.raises(AddressError, match='null sender is written ""'):
        validate_reverse_path("<>")
    with pytest.raises(AddressError, match="empty domain"):
        validate_reverse_path("bob@")


def test_mailbox_refuses_the_null_sender() -> None:
    with pytest.raises(AddressError, match="empty"):
        validate_mailbox("")


def test_split_at_the_last_at_sign() -> None:
    assert split('"a@b"@example.com') == ('"a@b"', "example.com")
    with pytest.raises(AddressError, match="no '@'"):
        split("nobody")


def test_needs_smtputf8() -> None:
    assert not needs_smtputf8("bob@example.com")
    assert needs_smtputf8("bob@bücher.example")
    assert needs_smtputf8("jürgen@example.com")


@pytest.mark.parametrize(("addr", "domain"), [
    ("bob@Example.COM", "example.com"),
    ("bob@bücher.example", "xn--bcher-kva.example"),
    ("bob@BÜCHER.example", "xn--bcher-kva.example"),
    ("bob@[192.0.2.1]", "[192.0.2.1]"),
    ('"x@y"@mail.example', "mail.example"),
])
def test_domain_of_is_lowercase_ascii(addr: str, domain: str) -> None:
    assert domain_of(addr) == domain


# --- properties ----------------------------------------------------------------------------

_PIECES = st.sampled_from(["a", "Z", "0", ".", "@", '"', "\\", " ", "-", "[", "]", ":", "\r", "\n",
                           "\0", "\x7f", "\x85", "ü", "例", "\u2028", "\u202e", "\ud800", "<",
                           "xn--", "IPv6:", "192.0.2.1", "example.com"])


def _mostly(good: st.SearchStrategy[str], bad: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    # About one draw in four is bad; st.one_of would pick the bad branch far more often.
    return st.integers(0, 3).flatmap(lambda n: bad if n == 2 else good)


_LOCALS = _mostly(st.text(alphabet="abZ09.+-_!~=ü例", min_size=1, max_size=20),
                  st.lists(_PIECES, max_size=8).map("".join))
_DOMAINS = _mostly(
    st.lists(st.text(alphabet="abZ09-ü", min_size=1, max_size=10), min_size=2, max_size=4)
    .map(".".join),
    st.lists(_PIECES, max_size=8).map("".join))
_ADDRESSES = _mostly(st.tuples(_LOCALS, _DOMAINS).map("@".join),
                     st.text(max_size=80) | st.lists(_PIECES, max_size=20).map("".join))


def _is_control(ch: str) -> bool:
    return unicodedata.category(ch) in ("Cc", "Cs", "Zl", "Zp")


@settings(max_examples=300, deadline=None)
@given(_ADDRESSES)
def test_accepted_addresses_are_safe_on_the_wire(addr: str) -> None:
    try:
        valid = validate_mailbox(addr)
    except AddressError:
        return
    event("accepted")
    assert not any(_is_control(ch) for ch in valid)
    assert "<" not in valid and ">" not in valid
    assert len(valid.encode("utf-8")) <= 254
    assert validate_mailbox(valid) == valid  # idempotent: the spool re-validates
    assert domain_of(valid).isascii()


@settings(max_examples=300, deadline=None)
@given(_ADDRESSES)
def test_validation_raises_only_address_error(addr: str) -> None:
    try:
        validate_reverse_path(addr)
    except AddressError as exc:
        assert str(exc)


@pytest.mark.parametrize("ch", ["\u200b", "\ufeff", "\u00ad", "\u2060", "\u200c", "\u200d",
                                "\u180e", "\U000e0001"])
@pytest.mark.parametrize("template", ["a{}b@example.com", "{}ab@example.com", '"a{}b"@example.com',
                                      "ab@exa{}mple.com", "ab@bücher{}.example"])
def test_invisible_format_characters_are_refused(ch: str, template: str) -> None:
    # Cf characters make two addresses look alike (and IDNA 2003 drops them from a domain).
    addr = template.format(ch)
    assert unicodedata.category(ch) == "Cf"
    with pytest.raises(AddressError, match="invisible formatting character") as info:
        validate_mailbox(addr)
    assert f"U+{ord(ch):04X}" in str(info.value)
    assert info.value.address == addr


def test_cached_checks_still_name_the_address() -> None:
    # The domain check is cached; each address must still get an error about itself.
    for local in ("first", "second"):
        with pytest.raises(AddressError) as info:
            validate_mailbox(f"{local}@example..com")
        assert info.value.address == f"{local}@example..com"
        assert f"'{local}@example..com' has an empty label" in str(info.value)
    assert validate_mailbox("A@Example.COM") == "A@example.com"
    assert validate_mailbox("A@Example.COM") == "A@example.com"
    assert domain_of("x@B\u00fccher.Example") == domain_of("y@b\u00fccher.example") \
        == "xn--bcher-kva.example"
