"""TLS-RPT (RFC 8460) through the whole engine: sessions under an enforced MTA-STS policy
counted in the worker, kept by the supervisor, reported when the period ends to an https rua
(a catcher that refuses the first POST: the report is kept and sent again) and to a mailto
rua (a job of the engine's own, delivered to a mailbox). Real servers on loopback: a DNS
server, an HTTPS policy server, aiosmtpd sinks, an HTTPS catcher; the unit rules are in
tests/unit/test_tlsrpt.py.
"""
from __future__ import annotations

import email
import email.policy
import gzip
import json
from collections import Counter
from collections.abc import Callable, Iterable
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from engine.testing.harness import LocalEngine, final_outcomes, make_message
from engine.testing.sink import SinkServer
from tests.support.dnsserver import DnsServer
from tests.support.policyserver import PolicyServer, TestCA, policy_text
from tests.support.reportcatcher import ReportCatcher

pytestmark = pytest.mark.timeout(120)

SENDING_IP = "127.0.0.2"


def totals(reports: Iterable[dict[str, Any]], domain: str) -> tuple[int, Counter[str]]:
    """The successful sessions and the failures by result type of `domain` in `reports`."""
    successes, failures = 0, Counter[str]()
    for report in reports:
        for entry in report["policies"]:
            if entry["policy"]["policy-domain"] != domain:
                continue
            successes += entry["summary"]["total-successful-session-count"]
            for detail in entry.get("failure-details", ()):
                failures[detail["result-type"]] += detail["failed-session-count"]
    return successes, failures


SCHEMA = json.loads((Path(__file__).parent.parent / "data" / "tlsrpt-report.schema.json")
                    .read_text(encoding="utf-8"))


def conforms(report: dict[str, Any]) -> None:
    """The report validates against RFC 8460's format (tests/data/tlsrpt-report.schema.json:
    every field the RFC requires, no other, each of its type and vocabulary)."""
    jsonschema.Draft202012Validator(SCHEMA).validate(report)


def accepted(posts: list[tuple[int, str, bytes]]) -> list[dict[str, Any]]:
    return [json.loads(gzip.decompress(body)) for status, _, body in posts if status == 200]


def test_reports_count_the_sessions_and_reach_both_ruas(
        tmp_path: Path, local_engine: Callable[..., LocalEngine]) -> None:
    ca = TestCA(tmp_path)
    good = SinkServer(host="127.0.0.21", tls_context=ca.server_context("mx.good.test"))
    # A certificate for another name: the enforced policy refuses it (host mismatch).
    bad = SinkServer(host="127.0.0.22", port=good.port,
                     tls_context=ca.server_context("mx.other.test"))
    mailbox = SinkServer(host="127.0.0.23", tls=False)
    catcher = ReportCatcher(ca, "rpt.catch.test", "127.0.0.40")
    https_rua = f"https://rpt.catch.test:{catcher.port}/v1/tlsrpt"
    zone = {
        "good.test": {"MX": [(10, "mx.good.test")]},
        "mx.good.test": {"A": ["127.0.0.21"]},
        "_mta-sts.good.test": {"TXT": ['"v=STSv1; id=1;"']},
        "mta-sts.good.test": {"A": ["127.0.0.30"]},
        "_smtp._tls.good.test": {"TXT": [
            f'"v=TLSRPTv1; rua={https_rua},mailto:tls-reports@reports.test"']},
        "bad.test": {"MX": [(10, "mx.bad.test")]},
        "mx.bad.test": {"A": ["127.0.0.22"]},
        "_mta-sts.bad.test": {"TXT": ['"v=STSv1; id=7;"']},
        "mta-sts.bad.test": {"A": ["127.0.0.30"]},
        "_smtp._tls.bad.test": {"TXT": [f'"v=TLSRPTv1; rua={https_rua}"']},
        "rpt.catch.test": {"A": ["127.0.0.40"]},
    }
    try:
        with DnsServer(zone) as dns, catcher, \
                PolicyServer(ca, "good.test", "127.0.0.30", also=("bad.test",)) as policy:
            policy.policy = policy_text("enforce", "mx.good.test", "mx.bad.test")
            catcher.refuse = 1  # the first POST fails: that report must come again
            engine = local_engine(good.port, route=None, extra={
                "hostname": "mta.sender.test",
                "dns": {"nameservers": ["127.0.0.1"], "port": dns.port},
                "routes": {"reports.test": f"127.0.0.23:{mailbox.port}"},
                "smtp": {"ca_file": ca.ca_file},
                "tls_policy": {"mta_sts_https_port": policy.port},
                "security": {"allowed_destinations": ["127.0.0.0/8"]},
                "retry": {"schedule": ["1h"]},
                "tlsrpt": {"enabled": True, "period": "3s", "retry": "1s",
                           "organization": "Sender Org", "contact": "ops@sender.test",
                           "sender": "tlsrpt@sender.test"},
            })
            assert engine.push([({"id": "g1", "from": "s@sender.test", "to": ["r@good.test"]},
                                 make_message(1, 300)),
                                ({"id": "b1", "from": "s@sender.test", "to": ["r@bad.test"]},
                                 make_message(2, 300))])
            engine.wait_for(lambda evs: ("g1", "r@good.test") in final_outcomes(evs)
                            and any(e["event"] == "deferred" and e["id"] == "b1"
                                    for e in evs), 30, "g1 delivered, b1 deferred")
            # A second message on the same (reused) connection: the same session.
            assert engine.push([({"id": "g2", "from": "s@sender.test", "to": ["r@good.test"]},
                                 make_message(3, 300))])
            engine.wait_final(2, timeout=30)
            sessions = len({m.conn_id for m in good.messages})

            def complete(posts: list[tuple[int, str, bytes]]) -> bool:
                reports = accepted(posts)
                return (totals(reports, "good.test")[0] >= sessions
                        and totals(reports, "bad.test")[1].total() >= 1)

            posts = catcher.wait_for(complete, 60)
            mails = mailbox.wait_for(1, timeout=30)
            events = engine.events()
        assert bad.messages == []  # never in plaintext, never over the refused certificate
        assert sessions >= 1 and len(good.messages) == 2

        reports = accepted(posts)
        assert all(media == "application/tlsrpt+gzip" for _, media, _ in posts)
        assert totals(reports, "good.test") == (sessions, Counter())
        assert totals(reports, "bad.test") == (0, Counter({"certificate-host-mismatch": 1}))
        # The refused report came again, the same one.
        refused = [json.loads(gzip.decompress(body)) for status, _, body in posts
                   if status == 503]
        assert len(refused) == 1
        assert refused[0]["report-id"] in {r["report-id"] for r in reports}

        (bad_entry,) = [e for r in reports for e in r["policies"]
                        if e["policy"]["policy-domain"] == "bad.test"]
        assert bad_entry["policy"] == {
            "policy-type": "sts", "policy-domain": "bad.test",
            "policy-string": ["version: STSv1", "mode: enforce", "mx: mx.good.test",
                              "mx: mx.bad.test", "max_age: 86400"],
            "mx-host": ["mx.good.test", "mx.bad.test"]}
        (detail,) = bad_entry["failure-details"]
        assert detail["sending-mta-ip"] == SENDING_IP
        assert detail["receiving-mx-hostname"] == "mx.bad.test"
        assert detail["receiving-ip"] == "127.0.0.22"
        assert detail["failed-session-count"] == 1
        for report in reports:
            conforms(report)
        report = reports[0]
        assert report["organization-name"] == "Sender Org"
        assert report["contact-info"] == "ops@sender.test"
        assert report["date-range"]["start-datetime"].endswith("Z")
        assert report["report-id"].endswith("@mta.sender.test")

        # The mailto rua: a multipart/report through the engine, its attachment the report.
        mailed = [m for m in mails if m.rcpt_tos == ("tls-reports@reports.test",)]
        assert mailed and mailed[0].mail_from == "tlsrpt@sender.test"
        message = email.message_from_bytes(mailed[0].content, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        assert message.get_content_type() == "multipart/report"
        assert message.get_param("report-type") == "tlsrpt"
        assert message["TLS-Report-Domain"] == "good.test"
        assert message["TLS-Report-Submitter"] == "mta.sender.test"
        (part,) = [p for p in message.iter_attachments()]
        assert part.get_content_type() == "application/tlsrpt+gzip"
        name = part.get_filename()
        assert name is not None and name.startswith("mta.sender.test!good.test!")
        assert name.endswith(".json.gz")
        content = part.get_content()
        assert isinstance(content, bytes)
        mailed_report = json.loads(gzip.decompress(content))
        conforms(mailed_report)
        assert mailed_report["report-id"] in message["Subject"]
        assert mailed_report["report-id"] in {r["report-id"] for r in reports}
        # The report's own job: queued and delivered, its meta naming the report.
        own = [e for e in events if e["event"] in ("queued", "delivered")
               and e["meta"].get("tlsrpt") == mailed_report["report-id"]]
        assert {e["event"] for e in own} == {"queued", "delivered"}
    finally:
        good.stop()
        bad.stop()
        mailbox.stop()


def test_a_report_no_rua_accepted_survives_a_restart(
        tmp_path: Path, local_engine: Callable[..., LocalEngine]) -> None:
    ca = TestCA(tmp_path)
    sink = SinkServer(host="127.0.0.21", tls_context=ca.server_context("mx.good.test"))
    catcher = ReportCatcher(ca, "rpt.catch.test", "127.0.0.40")
    zone = {
        "good.test": {"MX": [(10, "mx.good.test")]},
        "mx.good.test": {"A": ["127.0.0.21"]},
        "_smtp._tls.good.test": {"TXT": [
            f'"v=TLSRPTv1; rua=https://rpt.catch.test:{catcher.port}/r"']},
        "rpt.catch.test": {"A": ["127.0.0.40"]},
    }
    try:
        with DnsServer(zone) as dns, catcher:
            catcher.refuse = 1_000_000  # down until the engine has stopped
            engine = local_engine(sink.port, route=None, extra={
                "hostname": "mta.sender.test",
                "dns": {"nameservers": ["127.0.0.1"], "port": dns.port},
                "smtp": {"ca_file": ca.ca_file},
                "tls_policy": {"mta_sts": False},
                "security": {"allowed_destinations": ["127.0.0.0/8"]},
                "tlsrpt": {"enabled": True, "period": "2s", "retry": "1s"},
            })
            assert engine.push([({"id": "g1", "from": "s@sender.test", "to": ["r@good.test"]},
                                 make_message(1, 300))])
            engine.wait_final(1, timeout=30)
            posts = catcher.wait_for(lambda p: len(p) >= 2, 30)  # refused, and again
            assert engine.stop() == 0
            refused = {json.loads(gzip.decompress(body))["report-id"] for _, _, body in posts}
            assert len(refused) == 1  # one report, tried again
            catcher.refuse = 0
            engine.start()
            done = catcher.wait_for(lambda p: any(s == 200 for s, _, _ in p), 30)
        reports = accepted(done)
        assert {r["report-id"] for r in reports} == refused  # the same report, kept
        assert totals(reports, "good.test") == (1, Counter())
        assert reports[0]["policies"][0]["policy"] == {"policy-type": "no-policy-found",
                                                       "policy-domain": "good.test"}
    finally:
        sink.stop()
