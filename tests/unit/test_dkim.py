"""engine.dkim: signatures checked by an independent verifier (dkimpy) against keys served by a
real DNS server on loopback; key rotation by date; key files refused with a clear reason; the
wire signer's cache and failure; `mailengine dkim keygen`."""
from __future__ import annotations

import datetime
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from engine import dkim
from engine.config import DkimConfig, DkimDomainConfig, DkimKeyConfig
from engine.metrics import Metrics
from engine.reply import Blame, TransientError
from tests.support.cli import mailengine
from tests.support.dkimkeys import DkimKey, Verifier, make_key, openssl_key, zone
from tests.support.dnsserver import DnsServer
from tests.support.statsd_catcher import StatsdCatcher

pytestmark = pytest.mark.timeout(60)

NOON = datetime.datetime(2026, 12, 6, 12, tzinfo=datetime.UTC).timestamp()


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, DkimKey]:
    folder = str(tmp_path_factory.mktemp("dkim"))
    return {"rsa": make_key(folder, "example.org", "r1"),
            "ed": make_key(folder, "example.org", "e1", "ed25519"),
            "old": make_key(folder, "example.org", "old"),
            "new": make_key(folder, "example.org", "new"),
            "pkcs1": openssl_key(folder, "example.org", "p1")}


@pytest.fixture(scope="module")
def verifier(keys: dict[str, DkimKey]) -> Iterator[Verifier]:
    with DnsServer(zone(*keys.values())) as server:
        yield Verifier(server.port)


def signer(*entries: DkimKeyConfig, clock: float = NOON, unsigned_ok: bool = False,
           **options: object) -> dkim.Signer:
    cfg = DkimConfig(domains={"example.org": DkimDomainConfig(entries, unsigned_ok)},
                     **options)  # type: ignore[arg-type]
    return dkim.Signer(cfg, dkim.load_keys(cfg), clock=lambda: clock)


def entry(key: DkimKey, not_before: str | None = None,
          not_after: str | None = None) -> DkimKeyConfig:
    return DkimKeyConfig(key.selector, key.path, not_before, not_after)


def signed(s: dkim.Signer, message: bytes) -> bytes:
    return s.sign(message).fields + message


# Messages chosen for canonicalization's corners (RFC 6376 3.4.2, 3.4.4).
MESSAGES = {
    "folded": b"From: A\r\n  <a@example.org>\r\nTo: b@example.test,\r\n\tc@example.test\r\n"
              b"Subject:\t lots   of\t space \r\n\r\nline \t \r\n\ttabbed\tline\r\n",
    "repeated": b"Received: x\r\nTo: a@example.test\r\nFrom: a@example.org\r\n"
                b"To: b@example.test\r\nSubject: one\r\n\r\nbody\r\n",
    "empty-body": b"From: a@example.org\r\nSubject: empty\r\n\r\n",
    "blank-lines": b"From: a@example.org\r\n\r\n\r\n\r\n \r\n",
    "trailing-blanks": b"From: a@example.org\r\n\r\ntext\r\n\r\n\r\n",
    "idn-subdomain": b"From: =?utf-8?q?J=C3=B6rg?= <j@news.EXAMPLE.org>\r\n\r\nx\r\n",
    "upper-names": b"FROM: a@example.org\r\nsUbJeCt: Mixed\r\nCONTENT-TYPE: text/plain\r\n"
                   b"\r\nx\r\n",
}


@pytest.mark.parametrize("name", list(MESSAGES))
def test_every_form_verifies_with_dkimpy_rsa_and_ed25519(
        name: str, keys: dict[str, DkimKey], verifier: Verifier) -> None:
    s = signer(entry(keys["rsa"]), entry(keys["ed"]))
    assert verifier.signatures(signed(s, MESSAGES[name])) == [
        ("example.org", "r1", "rsa-sha256", True), ("example.org", "e1", "ed25519-sha256", True)]


def test_an_openssl_pkcs1_key_signs_too(keys: dict[str, DkimKey], verifier: Verifier) -> None:
    s = signer(entry(keys["pkcs1"]))
    assert verifier.signatures(signed(s, MESSAGES["folded"])) == [
        ("example.org", "p1", "rsa-sha256", True)]


def test_over_signing_from_to_subject_and_the_tags(keys: dict[str, DkimKey]) -> None:
    s = signer(entry(keys["rsa"]), expiry=3600.0)
    fields = s.sign(MESSAGES["repeated"]).fields.decode()
    h = fields.split("h=")[1].split(";")[0].replace("\r\n\t ", "")
    # each instance present, plus one more of From, To, Subject; Received is not signed
    assert h.split(":") == ["from", "from", "subject", "subject", "to", "to", "to"]
    assert "c=relaxed/relaxed" in fields and "d=example.org" in fields
    assert f"t={int(NOON)};" in fields and f"x={int(NOON) + 3600};" in fields
    assert all(len(line) <= 78 for line in fields.split("\r\n"))


def test_a_header_added_after_signing_fails_verification(
        keys: dict[str, DkimKey], verifier: Verifier) -> None:
    s = signer(entry(keys["rsa"]))
    message = signed(s, MESSAGES["repeated"])
    assert verifier.signatures(message)[0][3] is True
    added = message.replace(b"Subject: one\r\n", b"Subject: one\r\nSubject: two\r\n")
    assert verifier.signatures(added)[0][3] is False


def test_rotation_overlap_both_keys_verify(keys: dict[str, DkimKey], verifier: Verifier) -> None:
    """Old key until the new one's not_before, then the new one; mail signed by each verifies
    while both are published (the overlap). (Clocks in the past: a verifier refuses t= in
    the future.)"""
    now = datetime.datetime.now(datetime.UTC)
    day = datetime.timedelta(days=1)
    rotating = (entry(keys["old"], str((now - 100 * day).date()), str((now + 30 * day).date())),
                entry(keys["new"], str(now.date())))
    before = signer(*rotating, clock=(now - day).timestamp())
    after = signer(*rotating, clock=now.timestamp())
    message = MESSAGES["folded"]
    assert verifier.signatures(signed(before, message)) == [
        ("example.org", "old", "rsa-sha256", True)]
    assert verifier.signatures(signed(after, message)) == [
        ("example.org", "new", "rsa-sha256", True)]
    # not_after is the last day it signs (inclusive), UTC
    last = signer(entry(keys["old"], None, "2026-12-06"), clock=NOON)
    assert last.sign(message).count == 1
    with pytest.raises(dkim.SigningError, match=r"no DKIM key of example\.org is valid on"):
        signer(entry(keys["old"], None, "2026-12-06"), clock=NOON + 86400).sign(message)


def test_domain_choice_subdomains_and_unlisted(keys: dict[str, DkimKey]) -> None:
    s = signer(entry(keys["rsa"]))
    assert s.domain_for("example.org") == "example.org"
    assert s.domain_for("a.b.example.org") == "example.org"
    assert s.domain_for("example.org.evil.test") is None
    assert s.domain_for("notexample.org") is None
    assert s.sign(b"From: a@other.test\r\n\r\nx\r\n").count == 0
    assert s.sign(b"Subject: no from\r\n\r\nx\r\n").count == 0
    strict = signer(entry(keys["rsa"]), subdomains=False)
    assert strict.domain_for("news.example.org") is None


def test_unsigned_ok_sends_unsigned_when_no_key_is_valid(keys: dict[str, DkimKey]) -> None:
    s = signer(entry(keys["rsa"], None, "2020-01-01"), unsigned_ok=True)
    result = s.sign(MESSAGES["folded"])
    assert (result.fields, result.count, result.unsigned) == (b"", 0, True)


def test_wire_signer_signs_once_per_form_and_defers_what_cannot_be_signed(
        keys: dict[str, DkimKey]) -> None:
    with StatsdCatcher() as catcher:
        metrics = Metrics.create("127.0.0.1", catcher.port, "me", "127.0.0.2")
        wire = dkim.WireSigner(signer(entry(keys["rsa"])), metrics)
        message = MESSAGES["folded"]
        sign = wire.for_task("job", 1, message, "gmail")
        first = sign(message, False)
        assert wire.for_task("job", 1, message, "gmail")(message, False) is first  # cached
        converted = message.replace(b"line", b"converted line")
        assert sign(converted, True) is not first  # the other form: signed on its own
        wire.forget("job", 1, message)
        assert sign(message, False) is not first  # forgotten once the task is done

        expired = dkim.WireSigner(signer(entry(keys["rsa"], None, "2020-01-01")), metrics)
        with pytest.raises(TransientError) as refused:
            expired.for_task("job2", 1, message, "gmail")(message, False)
        reply = refused.value.reply
        assert (reply.code, reply.enhanced, refused.value.blame) == (451, "4.3.5", Blame.MESSAGE)
        assert "DKIM signing failed" in reply.text
        catcher.sync()
        assert catcher.counter_sum("me.127_0_0_2.gmail.dkim_signed") == 3
        assert catcher.counter_sum("me.127_0_0_2.gmail.dkim_failed") == 1
        metrics.close()


def test_key_files_are_refused_with_the_reason_and_never_their_content(
        tmp_path: Path, keys: dict[str, DkimKey]) -> None:
    missing = str(tmp_path / "none.pem")
    with pytest.raises(dkim.DkimKeyError, match=r"none\.pem: no such file"):
        dkim.load_private_key(missing)
    loose = tmp_path / "loose.pem"
    loose.write_bytes(Path(keys["rsa"].path).read_bytes())
    for mode in (0o640, 0o604, 0o660):
        os.chmod(loose, mode)
        with pytest.raises(dkim.DkimKeyError, match=f"group or others \\(mode {mode:04o}\\)"):
            dkim.load_private_key(str(loose))
    junk = tmp_path / "junk.pem"
    junk.write_text("-----BEGIN PRIVATE KEY-----\nc2VjcmV0\n-----END PRIVATE KEY-----\n")
    os.chmod(junk, 0o600)
    with pytest.raises(dkim.DkimKeyError) as err:
        dkim.load_private_key(str(junk))
    assert "not an unencrypted PEM private key" in str(err.value)
    assert "c2VjcmV0" not in str(err.value)
    other = tmp_path / "ec.pem"
    other.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    os.chmod(other, 0o600)
    with pytest.raises(dkim.DkimKeyError, match="neither an RSA nor an Ed25519 key"):
        dkim.load_private_key(str(other))
    cfg = DkimConfig(domains={"example.org": DkimDomainConfig((DkimKeyConfig("s", missing),))})
    assert dkim.problems(cfg) == [
        f"dkim.domains.example.org.keys[0].key_file {missing}: no such file or directory"]
    assert dkim.problems(DkimConfig(enabled=False, domains=cfg.domains)) == []


def test_keygen_writes_a_private_key_and_prints_its_record(
        tmp_path: Path, verifier: Verifier) -> None:
    done = mailengine("dkim", "keygen", "Example.ORG", "k2027", "--dir", str(tmp_path),
                      timeout=60)
    assert done.returncode == 0, done.stderr
    path = tmp_path / "example.org.k2027.pem"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = dkim.load_private_key(str(path))
    record = dkim.dns_record(key)
    zone_line = next(line for line in done.stdout.splitlines() if "IN TXT" in line)
    assert zone_line.startswith("k2027._domainkey.example.org. IN TXT ( ")
    assert "".join(zone_line.split('"')[1::2]) == record
    assert "PRIVATE" not in done.stdout
    again = mailengine("dkim", "keygen", "example.org", "k2027", "--dir", str(tmp_path),
                       timeout=60)
    assert again.returncode == 2 and again.stderr.strip() == (
        f"mailengine dkim keygen: {path} exists; not overwritten")
    bad = mailengine("dkim", "keygen", "example.org", "bad_selector", timeout=60)
    assert bad.returncode == 2 and len(bad.stderr.splitlines()) == 1


@pytest.mark.parametrize(("value", "domain"), [
    (b"a@Example.org", "example.org"),
    (b"Name <a@b.example.org>", "b.example.org"),
    (b'"x@y.test" <a@c.org>', "c.org"),
    (b"a@d.org (comment)", "d.org"),
    (b"=?utf-8?q?J=C3=B6rg?= <j@news.EXAMPLE.org>", "news.example.org"),
    (b"Name\r\n <a@h.org>", "h.org"),
    (b"undisclosed", None),
])
def test_from_domain_fast_path_and_parser_agree(value: bytes, domain: str | None) -> None:
    assert dkim.from_domain([(b"from", b"From: " + value)]) == domain
