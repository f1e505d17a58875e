"""engine.job: a job's frames in, a validated Job or a reason a person understands out."""
from __future__ import annotations

import binascii
import json
import unicodedata
from typing import Any

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from engine.job import (
    MAX_ENVELOPE_SIZE,
    MAX_ID_LENGTH,
    Job,
    JobRejected,
    envelope_json,
    job_from_stored,
    normalise_message,
    parse_job,
    short_lines,
)

MESSAGE = b"Subject: hi\r\n\r\nhello\r\n"
MAX_SIZE = 1000
MAX_RCPTS = 5


def envelope(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"id": "job-1", "from": "sender@example.com",
                            "to": ["rcpt@example.org"]}
    base.update(fields)
    return {k: v for k, v in base.items() if v is not ...}  # `...` drops a field


def parse(env: dict[str, Any] | bytes, message: bytes = MESSAGE, **limits: int) -> Job:
    raw = env if isinstance(env, bytes) else json.dumps(env).encode()
    return parse_job([raw, message], limits.get("size", MAX_SIZE), limits.get("rcpts", MAX_RCPTS),
                     new_id=lambda: "generated")


def rejected(env: dict[str, Any] | bytes, message: bytes = MESSAGE, **limits: int) -> JobRejected:
    with pytest.raises(JobRejected) as info:
        parse(env, message, **limits)
    assert str(info.value) == info.value.reason
    return info.value


def long_line_job(line: bytes, where: str = "body", long_lines: str = "reject") -> Job:
    """A job whose message has `line` in its header or its body (line 3 either way)."""
    if where == "header":
        message = b"From: a@example.com\r\nSubject: hi\r\n" + line + b"\r\n\r\nhello\r\n"
    else:
        message = b"Subject: hi\r\n\r\n" + line + b"\r\nbye\r\n"
    return parse_job([json.dumps(envelope()).encode(), message], 10**6, MAX_RCPTS,
                     long_lines=long_lines)


# --- accepted jobs -------------------------------------------------------------------------


def test_minimal_job() -> None:
    job = parse(envelope())
    assert job == Job(id="job-1", sender="sender@example.com", rcpts=("rcpt@example.org",),
                      message=MESSAGE)
    assert job.meta == {} and job.ip is None and job.pool is None and job.expires is None


def test_all_fields() -> None:
    job = parse(envelope(ip="2001:DB8::1", meta={"campaign": 7, "tags": ["a"]}, expires=3600))
    assert job.ip == "2001:db8::1"
    assert job.meta == {"campaign": 7, "tags": ["a"]}
    assert job.expires == 3600.0
    assert parse(envelope(pool="bulk_2.eu-west")).pool == "bulk_2.eu-west"


def test_id_is_generated_when_absent() -> None:
    assert parse(envelope(id=...)).id == "generated"
    assert len(parse_job([json.dumps(envelope(id=...)).encode(), MESSAGE], 100, 1).id) == 32


def test_null_sender_and_null_optionals() -> None:
    job = parse(envelope(**{"from": ""}, ip=None, pool=None, meta=None, expires=None))
    assert job.sender == "" and job.meta == {}


def test_addresses_come_back_with_domain_lowercased() -> None:
    job = parse(envelope(**{"from": "Bounce@Example.COM"}, to=["Bob@Example.ORG"]))
    assert job.sender == "Bounce@example.com"
    assert job.rcpts == ("Bob@example.org",)


def test_recipients_deduplicated_in_order() -> None:
    job = parse(envelope(to=["b@example.org", "a@EXAMPLE.org", "B@example.org", "a@example.org",
                             "b@Example.Org", "x@bücher.example", "x@xn--bcher-kva.example"]))
    assert job.rcpts == ("b@example.org", "a@example.org", "B@example.org", "x@bücher.example")


def test_recipient_limit_counts_after_dedupe() -> None:
    to = ["a@example.org"] * 10 + [f"r{i}@example.org" for i in range(4)]
    assert len(parse(envelope(to=to)).rcpts) == 5
    reason = rejected(envelope(to=[*to, "z@x.org"])).reason
    assert "more than the limit of 5 different recipients" in reason


def test_long_recipient_lists_cost_no_more_than_the_limit() -> None:
    repeats = parse(envelope(to=["a@example.org"] * 20_000))
    assert repeats.rcpts == ("a@example.org",)
    many = [f"r{i}@example.org" for i in range(20_000)] + ["bad@"]
    assert "more than the limit" in rejected(envelope(to=many)).reason


def test_smtputf8_and_eightbit_flags() -> None:
    assert not parse(envelope()).smtputf8
    assert parse(envelope(to=["jürgen@example.org"])).smtputf8
    assert parse(envelope(**{"from": "a@bücher.example"})).smtputf8
    assert not parse(envelope()).eightbit
    assert parse(envelope(), "Subject: café\r\n\r\nx".encode()).eightbit


def test_message_is_normalised() -> None:
    assert parse(envelope(), b"Subject: x\n\nbody").message == b"Subject: x\r\n\r\nbody\r\n"


def test_bytes_like_frames_are_accepted() -> None:
    frames: list[Any] = [bytearray(json.dumps(envelope()).encode()), memoryview(MESSAGE)]
    assert parse_job(frames, MAX_SIZE, MAX_RCPTS).message == MESSAGE


def test_repr_never_shows_the_message() -> None:
    assert "hello" not in repr(parse(envelope()))


def test_job_is_hashable_despite_meta() -> None:
    assert hash(parse(envelope(meta={"a": [1]})))


# --- rejections ----------------------------------------------------------------------------


@pytest.mark.parametrize(("frames", "reason"), [
    ([b"{}"], "expected 2 frames (envelope, message), got 1"),
    ([b"{}", b"x", b"y"], "expected 2 frames (envelope, message), got 3"),
    ([], "got 0"),
    (None, "multipart message of 2 frames"),
    (b"ab", "multipart message of 2 frames"),
    ("ab", "multipart message of 2 frames"),
    ([b"{}", "text"], "frame 2 is str, not bytes"),
    ([7, b"x"], "frame 1 is int"),
])
def test_bad_frames(frames: Any, reason: str) -> None:
    with pytest.raises(JobRejected) as info:
        parse_job(frames, MAX_SIZE, MAX_RCPTS)
    assert reason in info.value.reason


@pytest.mark.parametrize(("raw", "reason"), [
    (b"", "not valid JSON: Expecting value at line 1 column 1"),
    (b'{"id": "x",', "not valid JSON"),
    (b"\xff{}", "not UTF-8"),
    (b"[1, 2]", "must be a JSON object, got an array"),
    (b'"text"', "got a string"),
    (b"null", "got null"),
    (b'{"id": "j", "expires": NaN}', "NaN is not a JSON value"),
    (b'{"id": "j", "expires": -Infinity}', "-Infinity is not a JSON value"),
    (b'{"id": "j", "meta": {"x": Infinity}}', "Infinity"),
    (b'{"to": ["a@x.org"], "to": ["b@x.org"]}', "'to' twice"),
    (b"[" * 100_000, "not valid JSON"),
    (b'{"id": ' + b"9" * 5000 + b"}", "not valid JSON"),
])
def test_bad_envelope_json(raw: bytes, reason: str) -> None:
    assert reason in rejected(raw).reason


def test_envelope_size_is_bounded() -> None:
    raw = json.dumps(envelope(meta={"pad": "x" * MAX_ENVELOPE_SIZE})).encode()
    assert "larger than the limit" in rejected(raw).reason


@pytest.mark.parametrize(("fields", "reason"), [
    ({"fro": "a@x.org"}, "unknown envelope field 'fro' (did you mean 'from'?)"),
    ({"recipients": ["a@x.org"]}, "unknown envelope field 'recipients'"),
    ({"from": ...}, "'from' is required"),
    ({"from": None}, "'from' must be a string"),
    ({"from": "bob@"}, "sender 'bob@' has an empty domain"),
    ({"from": "<>"}, "null sender"),
    ({"to": ...}, "'to' must be a non-empty list"),
    ({"to": []}, "'to' must be a non-empty list"),
    ({"to": "a@x.org"}, "'to' must be a non-empty list"),
    ({"to": ["a@x.org", "b@x.org", "a@b@"]}, "recipient 3 'a@b@'"),
    ({"to": ["a@x.org", 5]}, "recipient 2 must be a string"),
    ({"to": ["a@x.org\r\nDATA"]}, "recipient 1 'a@x.org\\r\\nDATA' contains a control character"),
    ({"meta": [1]}, "'meta' must be a JSON object"),
    ({"meta": "x"}, "'meta' must be a JSON object"),
    ({"meta": {"k": "\ud800"}}, "valid Unicode"),
    ({"expires": 0}, "'expires' must be a positive number of seconds"),
    ({"expires": -5}, "positive number"),
    ({"expires": "60"}, "positive number"),
    ({"expires": True}, "positive number"),
    ({"expires": 10**400}, "positive number"),
    ({"ip": "1.2.3.4", "pool": "default"}, "'ip' and 'pool' are mutually exclusive"),
    ({"ip": "1.2.3"}, "'ip' must be an IP address"),
    ({"ip": 16909060}, "'ip' must be an IP address"),
    ({"ip": "fe80::1%eth0"}, "'ip' must be an IP address"),
    ({"ip": " 1.2.3.4"}, "'ip' must be an IP address"),
    ({"pool": ""}, "'pool' must be a pool name"),
    ({"pool": "a/b"}, "'pool' must be a pool name"),
    ({"pool": "bulk\n"}, "'pool' must be a pool name"),
    ({"pool": "p" * (MAX_ID_LENGTH + 1)}, "'pool' must be a pool name"),
    ({"id": ""}, "'id' must be a non-empty string of at most 200 printable characters"),
    ({"id": "x" * (MAX_ID_LENGTH + 1)}, "at most 200"),
    ({"id": "a b"}, "'id' must be"),
    ({"id": "a\nb"}, "'id' must be"),
    ({"id": "a\u202eb"}, "'id' must be"),
    ({"id": 42}, "'id' must be"),
])
def test_bad_fields(fields: dict[str, Any], reason: str) -> None:
    assert reason in rejected(envelope(**fields)).reason


def test_id_of_max_length_is_accepted() -> None:
    assert parse(envelope(id="é" * MAX_ID_LENGTH)).id == "é" * MAX_ID_LENGTH


@pytest.mark.parametrize(("message", "reason"), [
    (b"", "message is empty"),
    (b"Subject: x\r\n\r\na\0b", "NUL byte (at offset 15)"),
    (b"x" * (MAX_SIZE + 1), f"is {MAX_SIZE + 1} bytes, larger than the limit of {MAX_SIZE}"),
])
def test_bad_message(message: bytes, reason: str) -> None:
    assert reason in rejected(envelope(), message).reason


def test_size_limit_applies_before_normalising() -> None:
    # 600 bare LFs grow to 1200 bytes: what the producer sent is what counts.
    assert len(parse(envelope(), b"\n" * 600).message) == 1200
    assert "larger than the limit" in rejected(envelope(), b"x" * 1001).reason


# --- the rejection echoes what it could read ------------------------------------------------


def test_rejection_echoes_id_and_meta() -> None:
    exc = rejected(envelope(id="p-17", meta={"c": 1}, to=["ok@x.org", "bad@"]))
    assert exc.job_id == "p-17" and exc.meta == {"c": 1}


@pytest.mark.parametrize("fields", [
    {"fro": "a@x.org"}, {"expires": -1}, {"ip": "x", "pool": "y"}, {"to": []}, {"from": ...},
])
def test_rejection_of_a_later_field_still_carries_id_and_meta(fields: dict[str, Any]) -> None:
    exc = rejected(envelope(id="p-18", meta={"k": "v"}, **fields))
    assert (exc.job_id, exc.meta) == ("p-18", {"k": "v"})


def test_message_rejection_carries_id() -> None:
    assert rejected(envelope(id="p-19"), b"").job_id == "p-19"


def test_bad_id_still_echoes_meta_and_bad_meta_still_echoes_id() -> None:
    exc = rejected(envelope(id="has space", meta={"k": 1}))
    assert (exc.job_id, exc.meta) == (None, {"k": 1})
    exc = rejected(envelope(id="p-20", meta=[1]))
    assert (exc.job_id, exc.meta) == ("p-20", None)


def test_unreadable_envelope_has_no_id() -> None:
    exc = rejected(b"not json")
    assert exc.job_id is None and exc.meta is None


def test_generated_id_is_not_echoed_as_the_producers() -> None:
    assert rejected(envelope(id=..., to=[])).job_id is None


# --- CRLF normalisation --------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "expected"), [
    (b"a\r\nb\r\n", b"a\r\nb\r\n"),
    (b"a\nb\n", b"a\r\nb\r\n"),
    (b"a\rb\r", b"a\r\nb\r\n"),
    (b"a\nb\rc\r\nd", b"a\r\nb\r\nc\r\nd\r\n"),
    (b"a\r\r\nb", b"a\r\n\r\nb\r\n"),
    (b"a\n\rb", b"a\r\n\r\nb\r\n"),
    (b"no newline", b"no newline\r\n"),
    (b"\n", b"\r\n"),
    (b"\r", b"\r\n"),
    (b"\n\n\n", b"\r\n\r\n\r\n"),
    (b"caf\xc3\xa9\n", b"caf\xc3\xa9\r\n"),
])
def test_normalise_message(raw: bytes, expected: bytes) -> None:
    assert normalise_message(raw) == expected


def test_normalise_message_leaves_a_crlf_message_uncopied() -> None:
    raw = b"Subject: x\r\n\r\nbody\r\n"
    assert normalise_message(raw) is raw  # the fast path: no rewrite, no copy


def test_normalise_message_refuses_nul_and_empty() -> None:
    with pytest.raises(JobRejected, match="NUL"):
        normalise_message(b"a\0")
    with pytest.raises(JobRejected, match="empty"):
        normalise_message(b"")


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=1, max_size=200).filter(lambda b: b"\0" not in b))
def test_normalised_message_has_only_crlf(raw: bytes) -> None:
    out = normalise_message(raw)
    assert out.endswith(b"\r\n")
    assert out.count(b"\r") == out.count(b"\n") == out.count(b"\r\n")
    assert normalise_message(out) == out
    assert out.replace(b"\r\n", b"") == raw.replace(b"\r", b"").replace(b"\n", b"")


@pytest.mark.timeout(60)
def test_normalise_message_fast_path_is_exact() -> None:
    """Every message of up to 7 bytes over "a", CR and LF: the regex scans' fast path
    (no bare CR, no bare LF) returns the message as it is exactly when the rewrite of
    every line ending would change nothing."""
    import itertools
    for length in range(1, 8):
        for chars in itertools.product((b"a", b"\r", b"\n"), repeat=length):
            raw = b"".join(chars)
            rewritten = raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(
                b"\n", b"\r\n")
            expected = rewritten if rewritten.endswith(b"\r\n") else rewritten + b"\r\n"
            assert normalise_message(raw) == expected, raw
            normal = raw.count(b"\r") == raw.count(b"\n") == raw.count(b"\r\n")
            assert (normalise_message(raw) is raw) == (normal and raw.endswith(b"\r\n")), raw


@pytest.mark.parametrize("meta", [None, {}, {"campaign": "c-1", "n": 3},
                                  {"k": "v\u00e9\u2028", "x": [1.5, None, True], "q": "\"\x7f"}])
def test_meta_json_is_made_once_and_is_the_encoders_text(meta: dict[str, Any] | None) -> None:
    job = parse(envelope(meta=meta if meta is not None else ...))
    expected = json.dumps(meta or {}, separators=(",", ":"), ensure_ascii=False)
    assert job.__dict__["meta_json"] == expected  # kept by parse_job, not made again
    assert job.meta_json == expected
    by_hand = Job(id="x", sender="", rcpts=("r@example.org",), message=b"x\r\n",
                  meta=meta or {})
    assert by_hand.meta_json == expected  # made at first use


def test_a_parsed_job_has_exactly_the_fields_of_job() -> None:
    """parse_job fills the Job's __dict__ directly (cheaper than the frozen dataclass's
    __init__): every field set, nothing else but the meta's JSON text, and the same job
    as Job(...) would make."""
    import dataclasses
    job = parse(envelope(meta={"k": 1}, requiretls=True))
    names = {f.name for f in dataclasses.fields(Job)}
    assert set(job.__dict__) == names | {"meta_json"}
    assert job == Job(**{name: getattr(job, name) for name in names})
    assert hash(job) == hash(Job(**{name: getattr(job, name) for name in names
                                    if name != "meta"}))  # meta is not hashed


# --- the spool's round trip ----------------------------------------------------------------


def test_envelope_json_omits_unset_optionals() -> None:
    stored = envelope_json(parse(envelope(**{"from": ""})))
    assert stored == {"id": "job-1", "from": "", "to": ["rcpt@example.org"], "meta": {}}


def test_dkim_domain_is_a_lower_case_ascii_domain_kept_in_the_spool() -> None:
    job = parse(envelope(dkim_domain="Mail.Example.ORG."))
    assert job.dkim_domain == "mail.example.org"
    assert envelope_json(job)["dkim_domain"] == "mail.example.org"
    assert parse(envelope()).dkim_domain is None and "dkim_domain" not in envelope_json(
        parse(envelope()))
    for bad in ("localhost", "bücher.example", "a..b", "-a.example", "a.example\r\n", 7, ""):
        with pytest.raises(JobRejected, match="'dkim_domain' must be a domain name"):
            parse(envelope(dkim_domain=bad))


def test_requiretls_is_a_boolean_kept_in_the_spool() -> None:
    assert parse(envelope(requiretls=True)).requiretls is True
    assert parse(envelope(requiretls=False)).requiretls is False
    assert parse(envelope()).requiretls is False
    assert envelope_json(parse(envelope(requiretls=True)))["requiretls"] is True
    assert "requiretls" not in envelope_json(parse(envelope(requiretls=False)))
    for bad in ("yes", 1, [True]):
        assert "'requiretls' must be true or false" in rejected(envelope(requiretls=bad)).reason


@pytest.mark.parametrize("fields", [
    {}, {"ip": "192.0.2.7", "meta": {"a": [1, {"b": None}]}, "expires": 90.5},
    {"requiretls": True},
    {"pool": "bulk", "from": "", "to": ["x@bücher.example", '"a b"@[192.0.2.1]']},
])
def test_round_trip_through_the_spool(fields: dict[str, Any]) -> None:
    job = parse(envelope(**fields), "Subject: é\n\nbody".encode())
    stored = json.loads(json.dumps(envelope_json(job)))
    assert job_from_stored(stored, job.message) == job


def test_stored_job_skips_limits_but_not_address_checks() -> None:
    to = [f"r{i}@example.org" for i in range(50)]
    job = job_from_stored({"id": "s1", "from": "", "to": to}, b"x" * 5000 + b"\r\n")
    assert len(job.rcpts) == 50
    with pytest.raises(JobRejected, match="control character") as info:
        job_from_stored({"id": "s2", "from": "", "to": ["a@x.org\r\n"], "meta": {"m": 1}}, b"x\r\n")
    assert (info.value.job_id, info.value.meta) == ("s2", {"m": 1})


@pytest.mark.parametrize("stored", [{"from": "", "to": ["a@x.org"]}, {"id": None, "to": []}])
def test_stored_job_needs_its_id(stored: dict[str, Any]) -> None:
    with pytest.raises(JobRejected, match="'id'"):
        job_from_stored(stored, b"x\r\n")


def test_stored_job_never_raises_anything_else() -> None:
    with pytest.raises(JobRejected):
        job_from_stored(None, b"x")  # type: ignore[arg-type]


# --- properties ----------------------------------------------------------------------------

def _json_containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Lists and objects of `inner` values. A function, not a lambda: see json_containers in
    tests/unit/test_fuzz_jobs.py (Hypothesis parses a lambda's source, which CPython 3.11.7
    failed)."""
    return st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    _json_containers, max_leaves=12)
# Mostly valid pieces, so that many jobs are accepted, with hostile ones mixed in.
_GOOD_LOCAL = st.one_of(
    st.sampled_from(["bob", "a.b", "Jürgen", '"x y"', '"a\\"b"', "o'neil", "用户"]),
    st.text(alphabet="abcXYZ09+-_!~=ä例", min_size=1, max_size=12))
_GOOD_DOMAIN = st.sampled_from(["example.com", "Bücher.example", "[192.0.2.1]",
                                "[IPv6:2001:DB8::1]", "EXAMPLE.org", "xn--bcher-kva.example"])
_BAD_DOMAIN = st.sampled_from(["x", "", "a..b", "EXAMPLE.org\r\n", "exa mple.com", "-x.org",
                               "1.2.3.4", "ex\u2024ample.org", "straße.de", "[1.2.3]"])
_HOSTILE = st.text(alphabet="ab.\"\\ \r\n\t\0\x7f\x85ü@<>()[]:\u2028\u202e\ud800",
                   max_size=16)
_GOOD_ADDRESS = st.tuples(_GOOD_LOCAL, _GOOD_DOMAIN).map("@".join)


def _mostly(good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    # About one draw in eight is bad; st.one_of would pick the bad branch far more often.
    return st.integers(0, 7).flatmap(lambda n: bad if n == 3 else good)


_ADDRESS = _mostly(_GOOD_ADDRESS, st.one_of(
    st.tuples(_GOOD_LOCAL | _HOSTILE, _BAD_DOMAIN | _GOOD_DOMAIN).map("@".join),
    _HOSTILE, st.text(max_size=30)))
_ENVELOPE = st.fixed_dictionaries(
    {"from": _mostly(st.just("") | _ADDRESS, _JSON),
     "to": _mostly(st.lists(_ADDRESS, min_size=1, max_size=3), _JSON)},
    optional={
        "id": _mostly(st.text(alphabet="abc-_:/.é", min_size=1, max_size=30), _HOSTILE | _JSON),
        "meta": _mostly(st.dictionaries(st.text(max_size=8), _JSON, max_size=3), _JSON),
        "ip": _mostly(st.sampled_from(["192.0.2.1", "2001:DB8::1"]),
                      st.sampled_from(["fe80::1%lo", "1.2.3", "", " 192.0.2.1", 7])),
        "pool": _mostly(st.sampled_from(["bulk", "a.b-c_d"]),
                        st.sampled_from(["", "a b", "x/y", "p\n"])),
        "expires": _mostly(st.floats(min_value=0.001, max_value=1e9) | st.integers(1, 10**6),
                           st.floats() | st.integers() | st.text(max_size=3))})
_MESSAGE = _mostly(st.binary(min_size=1, max_size=120).filter(lambda b: b"\0" not in b),
                   st.binary(max_size=120))
_PLAUSIBLE_FRAMES = st.tuples(_ENVELOPE.map(lambda env: json.dumps(env).encode()), _MESSAGE)
_ANY_ENVELOPE = st.one_of(_ENVELOPE, _JSON, st.dictionaries(st.text(max_size=8), _JSON)).map(
    lambda env: json.dumps(env).encode())
_ANY_FRAMES = st.one_of(
    st.tuples(_ANY_ENVELOPE, _MESSAGE),
    st.lists(st.one_of(_ANY_ENVELOPE, _MESSAGE, st.text(max_size=10), st.none(), st.integers()),
             max_size=4),
    st.none(), st.binary(max_size=10), st.text(max_size=10))


def _clean(text: str) -> bool:
    return not any(unicodedata.category(ch) in ("Cc", "Cs", "Zl", "Zp") for ch in text)


@settings(max_examples=300, deadline=None)
@given(_ANY_FRAMES)
def test_parse_job_raises_only_job_rejected(frames: Any) -> None:
    try:
        parse_job(frames, 100, 3)
    except JobRejected as exc:
        assert exc.reason and isinstance(exc.reason, str)


@settings(max_examples=300, deadline=None)
@given(_PLAUSIBLE_FRAMES)
def test_accepted_jobs_are_safe_on_the_wire(frames: tuple[bytes, bytes]) -> None:
    try:
        job = parse_job(frames, 100, 3)
    except JobRejected as exc:
        assert exc.reason and isinstance(exc.reason, str)
        return
    event("accepted")
    for addr in (job.sender, *job.rcpts):
        assert _clean(addr) and "<" not in addr and ">" not in addr
    assert job.rcpts and len(job.rcpts) <= 3
    assert job.message.endswith(b"\r\n") and b"\0" not in job.message
    assert job_from_stored(json.loads(json.dumps(envelope_json(job))), job.message) == job


# --- lines over 998 octets (RFC 5322 2.1.1) -----------------------------------------------


def test_a_line_of_998_octets_is_accepted_as_it_is() -> None:
    assert b"x" * 998 + b"\r\n" in long_line_job(b"x" * 998).message


def test_a_body_line_over_998_is_rejected_naming_the_line_and_the_setting() -> None:
    with pytest.raises(JobRejected) as info:
        long_line_job(b"x" * 1204)
    assert info.value.reason == ("line 3 is 1204 octets long, over RFC 5322's 998 (set"
                                 " limits.long_lines: encode to convert)")
    assert info.value.job_id == "job-1"


@pytest.mark.parametrize("long_lines", ["reject", "encode"])
def test_a_header_line_over_998_is_rejected_whatever_the_setting(long_lines: str) -> None:
    with pytest.raises(JobRejected, match=r"^line 3 is 1100 octets long, over RFC 5322's 998,"
                                          r" in the header: a header line cannot be"):
        long_line_job(b"X-Long: " + b"y" * 1092, "header", long_lines)


def test_encode_turns_a_long_body_line_into_quoted_printable() -> None:
    job = long_line_job(b"x" * 1204, long_lines="encode")
    head, _, body = job.message.partition(b"\r\n\r\n")
    assert b"Content-Transfer-Encoding: quoted-printable" in head.split(b"\r\n")
    assert b"MIME-Version: 1.0" in head.split(b"\r\n")
    assert max(map(len, job.message.split(b"\r\n"))) <= 76
    assert binascii.a2b_qp(body) == b"x" * 1204 + b"\r\nbye\r\n"
    assert not job.eightbit


def test_encode_of_an_8bit_long_line_leaves_a_7bit_message() -> None:
    job = long_line_job("é".encode() * 600, long_lines="encode")
    assert job.message.isascii() and not job.eightbit
    assert b"charset=utf-8" in job.message


def test_encode_that_cannot_convert_says_why() -> None:
    message = (b"MIME-Version: 1.0\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding:"
               b" x-uue\r\n\r\n" + b"z" * 1000 + b"\r\n")
    with pytest.raises(JobRejected, match=r"^line 5 is 1000 octets long, over RFC 5322's 998,"
                                          r" and cannot be converted: .*x-uue"):
        short_lines(message, "encode")


def test_a_message_without_an_empty_line_is_all_header() -> None:
    with pytest.raises(JobRejected, match="in the header"):
        short_lines(b"Subject: hi\r\n" + b"w" * 999 + b"\r\n", "encode")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 2500), min_size=1, max_size=8), st.booleans())
def test_accepted_or_encoded_messages_have_no_line_over_998(lengths: list[int],
                                                            encode: bool) -> None:
    body = b"".join(b"a" * n + b"\r\n" for n in lengths)
    message = b"Subject: hi\r\n\r\n" + body
    try:
        out = short_lines(message, "encode" if encode else "reject")
    except JobRejected as exc:
        assert not encode and max(lengths) > 998 and exc.reason.startswith("line ")
        return
    assert max(map(len, out.split(b"\r\n"))) <= 998
    if max(lengths) <= 998:
        assert out is message
    else:
        assert binascii.a2b_qp(out.partition(b"\r\n\r\n")[2]) == body
