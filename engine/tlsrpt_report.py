"""TLS-RPT reports (RFC 8460): the JSON of one policy domain's period, gzipped, mailed
(section 5.3) or POSTed over HTTPS (section 5.4). Pure functions but `post`.

A report, `report_json`, holds one entry per policy the period's sessions were counted
under (`policies`: `policy` with its type, strings, domain and mx patterns; `summary` with
the total successful and failed sessions; `failure-details`, one per distinct failure: its
result type, the sending IP, the MX host, the receiving IP, the reason and its count). At
most MAX_FAILURE_DETAILS details per policy, the most frequent: the totals count all.
"""
from __future__ import annotations

import base64
import datetime
import gzip
import http.client
import json
import socket
import ssl
import time
import urllib.parse
from collections.abc import Callable, Iterable
from email.utils import formatdate, make_msgid
from typing import Any

from engine.tlsrpt import SUCCESS

MEDIA_TYPE = "application/tlsrpt+gzip"  # RFC 8460 6.4 (a gzipped report, 5.4 and 5.3)
MAX_FAILURE_DETAILS = 1000  # per policy
MAX_ANSWER_BYTES = 64 * 1024  # of an https rua's answer, read at most


class PostError(Exception):
    """An https rua did not accept the report; the words say why."""


def iso(seconds: float) -> str:
    """RFC 3339 date-time in UTC, to the second."""
    return datetime.datetime.fromtimestamp(int(seconds), datetime.UTC).strftime(
        "%Y-%m-%dT%H:%M:%SZ")


def report_json(organization: str, contact: str, report_id: str, start: int, end: int,
                domain: str, rows: Iterable[tuple[str, str, str, int]]) -> dict[str, Any]:
    """The report of `domain` for [start, end) (Unix seconds) from the counted rows
    `(policy, result, detail, count)` (engine.tlsrpt: policy and detail as JSON text)."""
    policies: dict[str, dict[str, Any]] = {}
    for policy_text, result, detail_text, count in rows:
        entry = policies.get(policy_text)
        if entry is None:
            policy = {"policy-domain": domain, **json.loads(policy_text)}
            entry = policies[policy_text] = {
                "policy": policy,
                "summary": {"total-successful-session-count": 0,
                            "total-failure-session-count": 0},
                "failure-details": []}
        if result == SUCCESS:
            entry["summary"]["total-successful-session-count"] += count
            continue
        entry["summary"]["total-failure-session-count"] += count
        detail = {"result-type": result, **(json.loads(detail_text) if detail_text else {}),
                  "failed-session-count": count}
        entry["failure-details"].append(detail)
    for entry in policies.values():
        details = entry["failure-details"]
        details.sort(key=lambda d: (-d["failed-session-count"], json.dumps(d, sort_keys=True)))
        del details[MAX_FAILURE_DETAILS:]
        if not details:
            del entry["failure-details"]
    return {
        "organization-name": organization,
        "date-range": {"start-datetime": iso(start), "end-datetime": iso(end - 1)},
        "contact-info": contact,
        "report-id": report_id,
        "policies": [policies[key] for key in sorted(policies)],
    }


def gzipped(report: dict[str, Any]) -> bytes:
    """The report as gzipped UTF-8 JSON (no time in the gzip header: the same report, the
    same bytes)."""
    text = json.dumps(report, ensure_ascii=False, separators=(",", ":"))
    return gzip.compress(text.encode(), mtime=0)


def filename(submitter: str, domain: str, start: int, end: int, unique: str) -> str:
    """RFC 8460 5.3: sender "!" policy-domain "!" begin "!" end "!" unique-id ".json.gz"."""
    return f"{submitter}!{domain}!{start}!{end - 1}!{unique}.json.gz"


def mail(sender: str, to: str, submitter: str, domain: str, report_id: str, start: int,
         end: int, unique: str, body: bytes, now: float | None = None) -> bytes:
    """The report as a message (RFC 8460 5.3): multipart/report; report-type="tlsrpt", a
    short text part and the gzipped JSON as a base64 attachment. Every field is ASCII the
    caller validated (the config's sender, a rua's address, DNS names, our report id)."""
    boundary = f"=_tlsrpt_{unique}"
    name = filename(submitter, domain, start, end, unique)
    encoded = base64.encodebytes(body).decode().replace("\n", "\r\n")
    lines = [
        f"From: <{sender}>",
        f"To: <{to}>",
        f"Date: {formatdate(now, usegmt=True)}",
        f"Message-ID: {make_msgid('tlsrpt', submitter)}",
        f"Subject: Report Domain: {domain} Submitter: {submitter} Report-ID: <{report_id}>",
        f"TLS-Report-Domain: {domain}",
        f"TLS-Report-Submitter: {submitter}",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type="tlsrpt"; boundary="{boundary}"',
        "",
        "This is a multipart message in MIME format.",
        "",
        f"--{boundary}",
        'Content-Type: text/plain; charset="us-ascii"',
        "Content-Transfer-Encoding: 7bit",
        "",
        f"This is an aggregate TLS report from {submitter} for {domain}",
        f"({iso(start)} to {iso(end - 1)}).",
        "",
        f"--{boundary}",
        f"Content-Type: {MEDIA_TYPE}",
        "Content-Transfer-Encoding: base64",
        "Content-Disposition: attachment;",
        f' filename="{name}"',
        "",
    ]
    return ("\r\n".join(lines) + "\r\n" + encoded + f"\r\n--{boundary}--\r\n").encode("ascii")


# How `post` finds the addresses of an https rua's host: engine.tlsrpt_store gives the
# resolver's, filtered by the destination policy.
AddressLookup = Callable[[str], list[str]]


def post(url: str, body: bytes, context: ssl.SSLContext, addresses: AddressLookup,
         timeout: float) -> None:
    """POST the gzipped report to an https rua (RFC 8460 5.4): Content-Type
    application/tlsrpt+gzip, a certificate valid for the URL's host (`context`), no redirect
    followed, within `timeout` seconds in all; a 2xx answer accepts it. PostError else."""
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname or "", parts.port or 443
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    deadline = time.monotonic() + timeout
    found = addresses(host)
    if not found:
        raise PostError(f"{host} has no address a report may go to")
    try:
        sock = socket.create_connection((found[0], port), timeout)
    except OSError as exc:
        raise PostError(f"could not connect to {host} ({found[0]}): {exc}") from exc
    conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=context)
    try:
        try:
            conn.sock = context.wrap_socket(sock, server_hostname=host)
        except BaseException:
            sock.close()
            raise
        conn.request("POST", path, body, {"Content-Type": MEDIA_TYPE, "Connection": "close",
                                          "User-Agent": "mailengine"})
        response = conn.getresponse()
        try:
            _read_some(response, deadline)
        finally:
            response.close()
    except (OSError, http.client.HTTPException) as exc:
        raise PostError(f"POST {url}: {exc}") from exc
    finally:
        conn.close()
    if not 200 <= response.status < 300:
        raise PostError(f"POST {url}: answered {response.status} {response.reason}")


def _read_some(response: http.client.HTTPResponse, deadline: float) -> None:
    """Read the answer's body, at most MAX_ANSWER_BYTES, before the deadline."""
    size = 0
    while size <= MAX_ANSWER_BYTES and time.monotonic() < deadline:
        chunk = response.read1(16384)
        if not chunk:
            return
        size += len(chunk)
