"""TLS-RPT's https rua (RFC 8460 5.4) against a real HTTPS server on loopback
(tests/support/reportcatcher.py, its certificate from a test CA): what `post` sends, and
what it takes for a refusal. The whole path: tests/engine/test_tlsrpt.py.
"""
from __future__ import annotations

import gzip
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.destinations import DestinationPolicy
from engine.tlsrpt_report import PostError, gzipped, post
from tests.support.policyserver import TestCA
from tests.support.reportcatcher import ReportCatcher

pytestmark = pytest.mark.timeout(30)

HOST = "127.0.0.40"


@pytest.fixture
def ca(tmp_path: Path) -> TestCA:
    return TestCA(tmp_path)


@pytest.fixture
def catcher(ca: TestCA) -> Iterator[ReportCatcher]:
    with ReportCatcher(ca, "rpt.catch.test", HOST) as running:
        yield running


def context(ca: TestCA) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=ca.ca_file)


def test_a_report_is_posted_gzipped_with_its_media_type(ca: TestCA,
                                                        catcher: ReportCatcher) -> None:
    body = gzipped({"report-id": "r1"})
    post(f"https://rpt.catch.test:{catcher.port}/tlsrpt", body, context(ca),
         lambda host: [HOST] if host == "rpt.catch.test" else [], 5.0)
    ((status, media, got),) = catcher.posts
    assert (status, media, got) == (200, "application/tlsrpt+gzip", body)
    assert gzip.decompress(got) == b'{"report-id":"r1"}'


def test_a_refusal_is_an_error(ca: TestCA, catcher: ReportCatcher) -> None:
    catcher.refuse = 1
    url = f"https://rpt.catch.test:{catcher.port}/tlsrpt"
    with pytest.raises(PostError, match="503"):
        post(url, b"x", context(ca), lambda host: [HOST], 5.0)
    post(url, b"x", context(ca), lambda host: [HOST], 5.0)  # then it takes it
    assert [status for status, _, _ in catcher.posts] == [503, 200]


def test_a_certificate_for_another_name_is_refused(ca: TestCA, catcher: ReportCatcher) -> None:
    with pytest.raises(PostError, match=r"(?i)certificate"):
        post(f"https://elsewhere.test:{catcher.port}/", b"x", context(ca),
             lambda host: [HOST], 5.0)
    assert catcher.posts == []


def test_a_prohibited_address_is_never_connected_to(ca: TestCA,
                                                    catcher: ReportCatcher) -> None:
    strict = DestinationPolicy()  # loopback prohibited, as by default
    with pytest.raises(PostError, match="no address a report may go to"):
        post(f"https://rpt.catch.test:{catcher.port}/", b"x", context(ca),
             lambda host: [a for a in [HOST] if strict.refusal(a) is None], 5.0)
    assert catcher.posts == []
