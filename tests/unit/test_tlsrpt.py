"""TLS-RPT (RFC 8460) rule by rule: the `_smtp._tls` record, counting sessions once, the
report's JSON, the mailed form, and the supervisor's store (counts in the spool, reports
made when a period ends, kept until every rua accepted them, dropped after give_up). The
whole path through the engine: tests/engine/test_tlsrpt.py.
"""
from __future__ import annotations

import email
import email.policy
import gzip
import json
import sqlite3
import ssl
from pathlib import Path
from typing import Any

import pytest

from engine import config, tlsrpt, tlsrpt_report
from engine.metrics import Metrics
from engine.reply import Reply, TlsError, TransientError
from engine.spool import Spool
from engine.spoolfile import SCHEMA_VERSION
from engine.tlsrpt_store import TlsRptStore

pytestmark = pytest.mark.timeout(10)

STS = tlsrpt.policy_of(tlsrpt.STS, ["version: STSv1", "mode: enforce", "mx: mx.a.test",
                                    "max_age: 86400"], ["mx.a.test"])


# -- the record ----------------------------------------------------------------------------

@pytest.mark.parametrize(("records", "rua"), [
    (["v=TLSRPTv1; rua=mailto:r@a.test"], ("mailto:r@a.test",)),
    (["v=TLSRPTv1;rua=https://r.a.test/x, mailto:r@a.test"],
     ("https://r.a.test/x", "mailto:r@a.test")),
    (["v=spf1 -all", "v=TLSRPTv1; rua=https://r.a.test:8443/p?q=1"],
     ("https://r.a.test:8443/p?q=1",)),
    (["v=TLSRPTv1; rua=mailto:r@a.test", "v=TLSRPTv1; rua=mailto:s@a.test"], None),  # two
    (["v=TLSRPTv2; rua=mailto:r@a.test"], None),
    (["v=TLSRPTv1"], None),  # no rua
    (["v=TLSRPTv1; rua=http://r.a.test/"], None),  # not https
    (["v=TLSRPTv1; rua=mailto:r@a.test?subject=x"], None),  # header fields: refused
    (["v=TLSRPTv1; rua=mailto:r@a.test\r\nBcc: x@evil.test"], None),
    ([], None),
])
def test_the_record_names_the_ruas(records: list[str], rua: tuple[str, ...] | None) -> None:
    assert tlsrpt.parse_txt(records) == rua


# -- counting --------------------------------------------------------------------------------

class Conn:
    """Stands for a connection: only its identity (and peer) matters to the counts."""

    peer = ("192.0.2.25", 25)
    tls_version = "TLSv1.3"


def test_a_connection_counts_once_per_domain() -> None:
    sessions = tlsrpt.Sessions("198.51.100.1")
    conn, other = Conn(), Conn()
    assert sessions.first(conn, "a.test")
    assert not sessions.first(conn, "a.test")  # reused: the same session
    assert sessions.first(conn, "b.test")  # shared by another domain: its session too
    assert sessions.first(other, "a.test")


def test_a_tagged_failure_counts_once_and_its_copies_never() -> None:
    sessions = tlsrpt.Sessions("198.51.100.1")
    err = TransientError(Reply.local(451, "4.7.5", "TLS failure"), "STARTTLS")
    sessions.tag(err, tlsrpt.CERTIFICATE_EXPIRED, "192.0.2.25")
    copy = type(err)(err.reply, err.command, err.blame)  # as engine.pool hands to waiters
    assert not sessions.tagged(copy)
    assert sessions.failed("a.test", STS, "mx.a.test", err)
    assert not sessions.failed("a.test", STS, "mx.a.test", err)  # counted already
    ((key, count),) = sessions.take().items()
    assert count == 1 and key[:3] == ("a.test", STS, tlsrpt.CERTIFICATE_EXPIRED)
    assert json.loads(key[3]) == {"sending-mta-ip": "198.51.100.1",
                                  "receiving-mx-hostname": "mx.a.test",
                                  "receiving-ip": "192.0.2.25",
                                  "failure-reason-code": "TLS failure"}
    assert sessions.take() == {}


def test_counts_are_bounded() -> None:
    sessions = tlsrpt.Sessions("198.51.100.1")
    for n in range(tlsrpt.MAX_KEYS + 5):
        sessions.success(f"d{n}.test", STS)
    assert len(sessions.counts) == tlsrpt.MAX_KEYS and sessions.dropped == 5


def verify_error(code: int) -> TlsError:
    err = TlsError(Reply.local(451, "4.7.5", "TLS failure"), "STARTTLS")
    cause = ssl.SSLCertVerificationError(1, "certificate verify failed")
    cause.verify_code = code
    err.__cause__ = cause
    return err


@pytest.mark.parametrize(("err", "result"), [
    (verify_error(62), tlsrpt.CERTIFICATE_HOST_MISMATCH),
    (verify_error(10), tlsrpt.CERTIFICATE_EXPIRED),
    (verify_error(20), tlsrpt.CERTIFICATE_NOT_TRUSTED),
    (verify_error(18), tlsrpt.CERTIFICATE_NOT_TRUSTED),
    (TlsError(Reply.local(451, "4.7.5", "handshake"), "STARTTLS"), tlsrpt.VALIDATION_FAILURE),
])
def test_a_handshake_failure_gets_its_result_type(err: TlsError, result: str) -> None:
    assert tlsrpt.verify_result(err) == result


def test_rows_keep_only_domains_that_want_reports() -> None:
    sessions = tlsrpt.Sessions("198.51.100.1")
    sessions.success("a.test", STS)
    sessions.success("a.test", STS)
    sessions.success("quiet.test", tlsrpt.NO_POLICY_JSON)
    sessions.success("broken.test", tlsrpt.NO_POLICY_JSON)

    def rua(domain: str) -> tuple[str, ...] | None:
        if domain == "broken.test":
            raise TransientError(Reply.local(451, "4.4.3", "SERVFAIL"))
        return ("mailto:r@a.test",) if domain == "a.test" else None

    rows, uris, later = tlsrpt.rows(sessions.take(), rua)
    assert rows == [["a.test", STS, "success", "", 2]]
    assert uris == {"a.test": ["mailto:r@a.test"]}
    assert [key[0] for key in later] == ["broken.test"]  # tried again at the next take


# -- the report ------------------------------------------------------------------------------

def test_the_report_has_the_rfc_8460_shape() -> None:
    failure = tlsrpt.detail_of("198.51.100.1", "mx.a.test", "192.0.2.25", "no match")
    rows = [(STS, "success", "", 40), (STS, tlsrpt.TLSA_INVALID, failure, 2),
            (STS, tlsrpt.STARTTLS_NOT_SUPPORTED, failure, 3),
            (tlsrpt.NO_POLICY_JSON, "success", "", 1)]
    report = tlsrpt_report.report_json("Org", "ops@s.test", "r1@s.test", 86400, 2 * 86400,
                                       "a.test", rows)
    assert report["organization-name"] == "Org"
    assert report["date-range"] == {"start-datetime": "1970-01-02T00:00:00Z",
                                    "end-datetime": "1970-01-02T23:59:59Z"}
    assert report["contact-info"] == "ops@s.test" and report["report-id"] == "r1@s.test"
    sts, no_policy = report["policies"]  # in the order of their JSON text
    assert no_policy == {"policy": {"policy-type": "no-policy-found", "policy-domain": "a.test"},
                         "summary": {"total-successful-session-count": 1,
                                     "total-failure-session-count": 0}}
    assert sts["policy"]["policy-type"] == "sts" and sts["policy"]["mx-host"] == ["mx.a.test"]
    assert sts["summary"] == {"total-successful-session-count": 40,
                              "total-failure-session-count": 5}
    assert [d["result-type"] for d in sts["failure-details"]] == [
        "starttls-not-supported", "tlsa-invalid"]  # the most frequent first
    assert sts["failure-details"][0] == {
        "result-type": "starttls-not-supported", "sending-mta-ip": "198.51.100.1",
        "receiving-mx-hostname": "mx.a.test", "receiving-ip": "192.0.2.25",
        "failure-reason-code": "no match", "failed-session-count": 3}
    body = tlsrpt_report.gzipped(report)
    assert json.loads(gzip.decompress(body)) == report
    assert tlsrpt_report.gzipped(report) == body  # no time in the header


def test_the_mailed_report_is_a_multipart_report() -> None:
    body = tlsrpt_report.gzipped({"report-id": "r1"})
    raw = tlsrpt_report.mail("tlsrpt@s.test", "r@a.test", "mta.s.test", "a.test",
                             "86400.ab@mta.s.test", 86400, 2 * 86400, "ab", body)
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert message["TLS-Report-Domain"] == "a.test"
    assert message["TLS-Report-Submitter"] == "mta.s.test"
    assert "Report-ID: <86400.ab@mta.s.test>" in message["Subject"]
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "tlsrpt"
    (part,) = message.iter_attachments()  # type: ignore[attr-defined]
    assert part.get_filename() == "mta.s.test!a.test!86400!172799!ab.json.gz"
    assert part.get_content() == body
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))


# -- the config --------------------------------------------------------------------------------

def test_reports_need_a_sender_address() -> None:
    ips = [{"address": "127.0.0.2", "helo": "mta.s.test"}]
    with pytest.raises(config.ConfigError, match=r"^tlsrpt\.sender: set it"):
        config.from_dict({"ips": ips, "hostname": "mta", "tlsrpt": {"enabled": True}})
    with pytest.raises(config.ConfigError, match=r"^tlsrpt\.sender: must be an ASCII address"):
        config.from_dict({"ips": ips, "tlsrpt": {"sender": "nobody"}})
    cfg = config.from_dict({"ips": ips, "hostname": "mta",
                            "tlsrpt": {"enabled": True, "sender": "r@s.test", "period": "2s"}})
    assert (cfg.tlsrpt.sender, cfg.tlsrpt.period) == ("r@s.test", 2.0)


# -- the supervisor's store ------------------------------------------------------------------

class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_store(tmp_path: Path, clock: Clock, accepted: bool = True,
               **settings: Any) -> tuple[TlsRptStore, Spool, list[list[list[bytes]]]]:
    cfg = config.from_dict({"ips": [{"address": "127.0.0.2", "helo": "mta.s.test"}],
                            "hostname": "mta.s.test",
                            "tlsrpt": {"enabled": True, "period": "1h", "retry": "10m",
                                       **settings}})
    spool = Spool(str(tmp_path / "spool"))
    submitted: list[list[list[bytes]]] = []

    def submit(batch: list[list[bytes]]) -> set[str]:
        submitted.append(batch)
        return {json.loads(frames[0])["id"] for frames in batch} if accepted else set()

    return TlsRptStore(cfg, spool, submit, Metrics(None, "supervisor"), clock), spool, submitted


def frame(*rows: list[Any], rua: list[str] | None = None) -> dict[str, Any]:
    return {"type": "tlsrpt", "ip": "127.0.0.2", "counts": list(rows),
            "rua": {"a.test": rua or ["mailto:r@a.test"]}}


def test_counts_are_added_up_in_the_spool_and_reported_when_the_period_ends(
        tmp_path: Path) -> None:
    clock = Clock(3600 * 10 + 5)
    store, spool, submitted = make_store(tmp_path, clock)
    store.counted(frame(["a.test", STS, "success", "", 3]))
    store.counted(frame(["a.test", STS, "success", "", 2],
                        ["a.test", "{}", "no-such-result", "", 1],  # refused
                        ["a.test", STS, "success", "", -1]))  # refused
    store.tick()
    assert spool.query("SELECT period, domain, result, count FROM tlsrpt_counts") == [
        (36000, "a.test", "success", 5)]
    assert submitted == []  # the period is not over
    clock.now += 3600
    store.tick()
    assert spool.query("SELECT COUNT(*) FROM tlsrpt_counts") == [(0,)]
    (batch,) = submitted
    ((envelope, raw),) = batch
    assert json.loads(envelope)["to"] == ["r@a.test"]
    assert json.loads(envelope)["from"] == "tlsrpt-noreply@mta.s.test"
    message = email.message_from_bytes(raw, policy=email.policy.default)
    (part,) = message.iter_attachments()  # type: ignore[attr-defined]
    report = json.loads(gzip.decompress(part.get_content()))
    assert report["policies"][0]["summary"]["total-successful-session-count"] == 5
    assert spool.query("SELECT COUNT(*) FROM tlsrpt_reports") == [(0,)]  # every rua took it
    store.close()
    spool.close()


def test_a_report_a_rua_refuses_is_kept_tried_again_then_given_up(tmp_path: Path) -> None:
    clock = Clock(3600 * 10 + 5)
    store, spool, submitted = make_store(tmp_path, clock, accepted=False, give_up="2h")
    store.counted(frame(["a.test", STS, "success", "", 1]))
    store.tick()
    clock.now += 3600
    store.tick()
    assert len(submitted) == 1
    ((pending, tries, error),) = spool.query("SELECT pending, tries, error FROM tlsrpt_reports")
    assert json.loads(pending) == ["mailto:r@a.test"] and tries == 1
    assert error == "mailto:r@a.test: the spool did not accept the report's message"
    clock.now += 60
    store.tick()
    assert len(submitted) == 1  # not before tlsrpt.retry
    clock.now += 600
    store.tick()
    assert len(submitted) == 2
    clock.now += 7200
    store.tick()
    assert spool.query("SELECT COUNT(*) FROM tlsrpt_reports") == [(0,)]  # given up
    assert len(submitted) == 2
    store.close()
    spool.close()


def test_a_spool_of_schema_2_opens_and_gains_the_tables(tmp_path: Path) -> None:
    directory = str(tmp_path / "spool")
    Spool(directory).close()
    db = sqlite3.connect(str(tmp_path / "spool" / "spool.db"))
    for table in ("tlsrpt_counts", "tlsrpt_rua", "tlsrpt_reports"):
        db.execute(f"DROP TABLE {table}")
    db.execute("PRAGMA user_version = 2")
    db.commit()
    db.close()
    with Spool(directory) as spool:
        assert spool.query("SELECT COUNT(*) FROM tlsrpt_reports") == [(0,)]
        assert spool.query("PRAGMA user_version") == [(SCHEMA_VERSION,)] == [(3,)]


def test_a_forced_dane_reports_dane_required_under_no_policy() -> None:
    """DANE forced by the config (tls_policy.domains: dane): an MX host without TLSA records
    (a session's details) and an MX answer not authenticated (no host: no mx, no ip)."""
    host = tlsrpt.detail_of("198.51.100.1", "mx.a.test", "192.0.2.25", "no TLSA")
    no_host = tlsrpt.detail_of("198.51.100.1", None, None, "insecure MX")
    rows = [(tlsrpt.NO_POLICY_JSON, tlsrpt.DANE_REQUIRED, host, 2),
            (tlsrpt.NO_POLICY_JSON, tlsrpt.DANE_REQUIRED, no_host, 1)]
    report = tlsrpt_report.report_json("Org", "ops@s.test", "r1@s.test", 86400, 2 * 86400,
                                       "a.test", rows)
    (policy,) = report["policies"]
    assert policy["policy"] == {"policy-type": "no-policy-found", "policy-domain": "a.test"}
    assert policy["summary"] == {"total-successful-session-count": 0,
                                 "total-failure-session-count": 3}
    first, second = policy["failure-details"]
    assert first == {"result-type": "dane-required", "sending-mta-ip": "198.51.100.1",
                     "receiving-mx-hostname": "mx.a.test", "receiving-ip": "192.0.2.25",
                     "failure-reason-code": "no TLSA", "failed-session-count": 2}
    assert second == {"result-type": "dane-required", "sending-mta-ip": "198.51.100.1",
                      "failure-reason-code": "insecure MX", "failed-session-count": 1}
