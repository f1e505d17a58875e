"""DKIM signing in the whole engine (engine.dkim): messages delivered to a real SMTP server on
loopback verify with an independent verifier (dkimpy), which fetches the public keys from a
real DNS server; also after the 7-bit conversion, with dual (RSA + Ed25519) and ESP
signatures; a key that cannot be loaded stops the engine from starting."""
from __future__ import annotations

import datetime
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from engine.testing.harness import LocalEngine, final_outcomes
from engine.testing.sink import SinkServer
from tests.support.cli import mailengine
from tests.support.dkimkeys import DkimKey, Verifier, make_key, unsigned, zone
from tests.support.dnsserver import DnsServer
from tests.support.mime import CONVERTED, MESSAGE_8BIT
from tests.support.wait import until

RSA, ED = "rsa-sha256", "ed25519-sha256"


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, DkimKey]:
    folder = tmp_path / "dkim"
    folder.mkdir()
    return {
        "rsa": make_key(str(folder), "example.org", "r2026"),
        "ed": make_key(str(folder), "example.org", "e2026", "ed25519"),
        "esp": make_key(str(folder), "esp.test", "fbl"),
    }


@pytest.fixture
def verifier(keys: dict[str, DkimKey]) -> Iterator[Verifier]:
    with DnsServer(zone(*keys.values())) as server:
        yield Verifier(server.port)


def dkim_section(keys: dict[str, DkimKey]) -> dict[str, object]:
    return {"domains": {"example.org": {"keys": [keys["rsa"].config(), keys["ed"].config()]},
                        "esp.test": {"keys": [keys["esp"].config()]}},
            "esp": "esp.test"}


PLAIN = (b"From: Sender <sender@news.example.org>\r\nTo: rcpt@example.test\r\n"
         b"Subject:  folded\r\n  subject   line \r\nDate: Sun, 6 Dec 2026 10:00:00 +0000\r\n"
         b"Message-ID: <plain@example.org>\r\n\r\nbody  with   spaces \t\r\n.dot line\r\n\r\n\r\n")
OTHER = b"From: someone@other.test\r\nTo: rcpt@example.test\r\nSubject: x\r\n\r\nhello\r\n"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("eightbitmime", [True, False], ids=["8bitmime", "converted"])
def test_delivered_messages_verify_with_dkimpy_against_real_dns(
        eightbitmime: bool, plain_sink: SinkServer, keys: dict[str, DkimKey],
        verifier: Verifier, local_engine: Callable[..., LocalEngine]) -> None:
    """Every message the sink received verifies, each signature of it: the author domain's
    RSA and Ed25519 signatures (a subdomain's From signed by its parent domain) and the ESP's;
    the 8-bit message to a server without 8BITMIME is signed as converted, so it verifies as
    received; a message From an unlisted domain carries the ESP's signature only."""
    extra: dict[str, object] = {"dkim": dkim_section(keys)}
    if not eightbitmime:
        extra["smtp"] = {"discard_ehlo_keywords": ["8bitmime"]}
    engine = local_engine(plain_sink.port, extra=extra)
    rcpt = "rcpt@example.test"
    jobs = [({"id": "8bit", "from": "sender@example.org", "to": [rcpt]}, MESSAGE_8BIT),
            ({"id": "plain", "from": "sender@news.example.org", "to": [rcpt]}, PLAIN),
            ({"id": "other", "from": "someone@other.test", "to": [rcpt]}, OTHER)]
    assert engine.push(jobs)
    finals = final_outcomes(engine.wait_final(3))
    assert {f["event"] for f in finals.values()} == {"delivered"}
    assert len(plain_sink.messages) == 3

    by_body = {unsigned(m.content): m.content for m in plain_sink.messages}
    sent_8bit = MESSAGE_8BIT if eightbitmime else CONVERTED
    assert set(by_body) == {sent_8bit, PLAIN, OTHER}  # signatures on top, the rest untouched
    both = [("example.org", "r2026", RSA, True), ("example.org", "e2026", ED, True),
            ("esp.test", "fbl", RSA, True)]
    assert verifier.signatures(by_body[sent_8bit]) == both
    assert verifier.signatures(by_body[PLAIN]) == both
    assert verifier.signatures(by_body[OTHER]) == [("esp.test", "fbl", RSA, True)]
    assert {"r2026._domainkey.example.org", "e2026._domainkey.example.org",
            "fbl._domainkey.esp.test"} <= set(verifier.lookups)  # asked of the DNS server


@pytest.mark.timeout(60)
def test_a_job_names_its_signing_domain_and_an_unknown_one_is_rejected(
        plain_sink: SinkServer, keys: dict[str, DkimKey], verifier: Verifier,
        local_engine: Callable[..., LocalEngine]) -> None:
    """`dkim_domain` on the job: its keys sign instead of the From domain's (a From domain
    with no keys of its own, here), the ESP's too; a domain without keys is rejected at
    intake with the reason, and the jobs beside it go."""
    engine = local_engine(plain_sink.port, extra={"dkim": dkim_section(keys)})
    rcpt = "rcpt@example.test"
    assert not engine.push([  # not every job queued: one is rejected
        ({"id": "unknown", "from": "someone@other.test", "to": [rcpt],
          "dkim_domain": "nokeys.test"}, OTHER),
        ({"id": "named", "from": "someone@other.test", "to": [rcpt],
          "dkim_domain": "Example.ORG"}, OTHER)], timeout=10)
    events = engine.wait_for(lambda evs: any(e["event"] == "delivered" for e in evs)
                             and any(e["event"] == "rejected" for e in evs))
    (rejected,) = [e for e in events if e["event"] == "rejected"]
    assert rejected["id"] == "unknown"
    assert rejected["error"] == "dkim_domain nokeys.test has no keys in dkim.domains"
    (message,) = plain_sink.messages
    assert verifier.signatures(message.content) == [
        ("example.org", "r2026", RSA, True), ("example.org", "e2026", ED, True),
        ("esp.test", "fbl", RSA, True)]

@pytest.mark.timeout(60)
def test_a_tampered_message_fails_the_same_verifier(
        plain_sink: SinkServer, keys: dict[str, DkimKey], verifier: Verifier,
        local_engine: Callable[..., LocalEngine]) -> None:
    """The verifier is not blind: a header added on top of an over-signed one, or a changed
    body, fails every signature."""
    engine = local_engine(plain_sink.port, extra={"dkim": dkim_section(keys)})
    assert engine.push([({"id": "p", "from": "s@example.org", "to": ["r@example.test"]},
                         PLAIN)])
    engine.wait_final(1)
    (message,) = plain_sink.messages
    head, _, body = message.content.partition(b"\r\nFrom:")
    added = head + b"\r\nFrom: attacker@evil.test\r\nFrom:" + body
    assert [ok for *_, ok in verifier.signatures(added)] == [False, False, False]
    changed = message.content.replace(b"body  with", b"body with a change")
    assert [ok for *_, ok in verifier.signatures(changed)] == [False, False, False]


@pytest.mark.timeout(60)
def test_rotation_overlap_the_new_key_signs_and_both_are_published(
        plain_sink: SinkServer, tmp_path: Path, local_engine: Callable[..., LocalEngine]) -> None:
    """Two RSA keys valid today: the newer (later not_before) signs; the older still
    verifies mail it signed (tests/unit/test_dkim.py signs with it as of before the switch);
    `mailengine dkim records` prints both records to publish."""
    old = make_key(str(tmp_path), "example.org", "old")
    new = make_key(str(tmp_path), "example.org", "new")
    today = datetime.datetime.now(datetime.UTC).date()
    section = {"domains": {"example.org": {"keys": [
        old.config(not_before="2020-01-01", not_after=str(today + datetime.timedelta(days=30))),
        new.config(not_before=str(today - datetime.timedelta(days=1)))]}}}
    engine = local_engine(plain_sink.port, extra={"dkim": section})
    assert engine.push([({"id": "r", "from": "s@example.org", "to": ["r@example.test"]},
                         PLAIN)])
    engine.wait_final(1)
    with DnsServer(zone(old, new)) as server:
        assert Verifier(server.port).signatures(plain_sink.messages[0].content) == [
            ("example.org", "new", RSA, True)]
    listed = mailengine("dkim", "records", "-c", engine.config_path, timeout=30)
    assert listed.returncode == 0, listed.stderr
    assert "example.org old rsa-sha256: published, not signing today" in listed.stdout
    assert "example.org new rsa-sha256: signs today" in listed.stdout
    assert listed.stdout.count("._domainkey.example.org. IN TXT") == 2


@pytest.mark.timeout(60)
@pytest.mark.parametrize("fault", ["missing", "group-readable", "not-a-key", "expired"])
def test_a_key_that_cannot_sign_is_a_start_up_error(
        fault: str, tmp_path: Path, keys: dict[str, DkimKey],
        local_engine: Callable[..., LocalEngine]) -> None:
    """check-config and run refuse it, naming the key; nothing is sent unsigned."""
    key = keys["rsa"]
    entry = key.config()
    if fault == "missing":
        os.unlink(key.path)
    elif fault == "group-readable":
        os.chmod(key.path, 0o640)
    elif fault == "not-a-key":
        Path(key.path).write_text("-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n")
    else:
        entry = key.config(not_after="2020-12-31")
    engine = local_engine(9, start=False, extra={"dkim": {"domains": {
        "example.org": {"keys": [entry]}}}})
    checked = mailengine("check-config", "-q", "-c", engine.config_path, timeout=30)
    assert checked.returncode == 2
    expected = {"missing": f"dkim.domains.example.org.keys[0].key_file {key.path}: no such file",
                "group-readable": f"{key.path}: readable or writable by group or others (mode"
                                  " 0640)",
                "not-a-key": f"{key.path}: not an unencrypted PEM private key",
                "expired": "dkim.domains.example.org: no key is valid today"}[fault]
    assert expected in checked.stderr
    assert "PRIVATE" not in checked.stderr and "nope" not in checked.stderr
    with pytest.raises(Exception):  # noqa: B017 - the harness's "did not start"
        engine.start(timeout=20)
    assert engine.proc is not None and engine.proc.wait(10) == 2
    assert expected in engine.log_tail()


@pytest.mark.timeout(60)
def test_unsigned_ok_lets_a_domain_without_a_valid_key_send_unsigned(
        plain_sink: SinkServer, keys: dict[str, DkimKey],
        local_engine: Callable[..., LocalEngine]) -> None:
    section = {"domains": {"example.org": {"unsigned_ok": True, "keys": [
        keys["rsa"].config(not_after="2020-12-31")]}}}
    engine = local_engine(plain_sink.port, extra={"dkim": section})
    assert yaml.safe_load(Path(engine.config_path).read_text())["dkim"] == section
    assert engine.push([({"id": "u", "from": "s@example.org", "to": ["r@example.test"]},
                         PLAIN)])
    assert final_outcomes(engine.wait_final(1))[("u", "r@example.test")]["event"] == "delivered"
    assert plain_sink.messages[0].content == PLAIN


@pytest.mark.timeout(90)
def test_reload_with_a_key_that_cannot_sign_is_refused_and_a_good_one_is_taken(
        plain_sink: SinkServer, tmp_path: Path, keys: dict[str, DkimKey], verifier: Verifier,
        local_engine: Callable[..., LocalEngine]) -> None:
    """SIGHUP: a config naming a missing key is refused (the workers keep signing with the
    keys they have); then a config adding the ESP's key is taken by the fresh workers."""
    engine = local_engine(plain_sink.port, extra={"dkim": {"domains": {
        "example.org": {"keys": [keys["rsa"].config()]}}}})
    engine.config["dkim"]["domains"]["example.org"]["keys"].append(
        {"selector": "gone", "key_file": str(tmp_path / "gone.pem")})
    engine.reload()
    until(lambda: "event=reload_refused" in engine.log_tail(50), 10, "reload_refused",
          engine.log_tail)
    assert "gone.pem: no such file" in engine.log_tail(50)
    assert engine.push([({"id": "a", "from": "s@example.org", "to": ["r@example.test"]},
                         PLAIN)])
    engine.wait_final(1)
    assert verifier.signatures(plain_sink.messages[0].content) == [
        ("example.org", "r2026", RSA, True)]

    before = {ip: w["pid"] for ip, w in engine.status()["workers"].items()}
    engine.config["dkim"] = dkim_section(keys)
    engine.reload()
    until(lambda: all(w["alive"] and w["pid"] != before[ip]
                      for ip, w in engine.status()["workers"].items()), 20,
          "fresh workers", engine.log_tail)
    assert engine.push([({"id": "b", "from": "s@example.org", "to": ["r@example.test"]},
                         PLAIN)])
    engine.wait_final(2)
    assert [s[:2] for s in verifier.signatures(plain_sink.messages[1].content)] == [
        ("example.org", "r2026"), ("example.org", "e2026"), ("esp.test", "fbl")]


@pytest.mark.timeout(60)
def test_a_key_broken_after_the_start_is_named_by_the_restarted_worker(
        plain_sink: SinkServer, keys: dict[str, DkimKey],
        local_engine: Callable[..., LocalEngine]) -> None:
    """Made group-readable since the start, the key stops a worker started again (after a
    crash): one line naming the file, exit 2 (restarted with back-off), no traceback, and
    nothing sent unsigned meanwhile."""
    engine = local_engine(plain_sink.port, extra={"dkim": dkim_section(keys)})
    worker = engine.status()["workers"]["127.0.0.2"]
    os.chmod(keys["ed"].path, 0o640)
    os.kill(worker["pid"], signal.SIGKILL)
    wanted = (f'event=worker_start_failed ip=127.0.0.2 error="{keys["ed"].path}: readable'
              " or writable by group or others")
    until(lambda: wanted in engine.log_tail(2000), 30, "the restarted worker's error line",
          engine.log_tail)
    until(lambda: "event=worker_exited ip=127.0.0.2 code=2" in engine.log_tail(2000), 30,
          "the supervisor's worker_exited line with status 2", engine.log_tail)
    assert "Traceback" not in engine.log_tail(2000)
    assert "PRIVATE KEY" not in engine.log_tail(2000)
