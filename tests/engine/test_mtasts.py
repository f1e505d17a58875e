"""MTA-STS and REQUIRETLS through the whole engine (`mailengine run`, a worker, the spool,
the events): the config's `tls_policy` and `smtp.ca_file` reach the worker, a job's
`requiretls` survives the spool and the task, and the events say which policy applied. Real
servers on loopback: a DNS server, an HTTPS policy server, aiosmtpd sinks. The rules case by
case: tests/conversation/test_mtasts.py.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from engine.testing.harness import LocalEngine, final_outcomes, make_message
from engine.testing.sink import SinkServer
from tests.support.dnsserver import DnsServer
from tests.support.policyserver import PolicyServer, TestCA, policy_text

pytestmark = pytest.mark.timeout(90)


def test_policies_apply_in_the_engine_and_events_name_them(
        tmp_path: Path, local_engine: Callable[..., LocalEngine]) -> None:
    ca = TestCA(tmp_path)
    zone = {
        "sts.test": {"MX": [(10, "mx1.sts.test")]},
        "mx1.sts.test": {"A": ["127.0.0.21"]},
        "_mta-sts.sts.test": {"TXT": ['"v=STSv1; id=1;"']},
        "mta-sts.sts.test": {"A": ["127.0.0.30"]},
        "plain.test": {"MX": [(10, "mx.plain.test")]},
        "mx.plain.test": {"A": ["127.0.0.21"]},
    }
    offers = SinkServer(host="127.0.0.21", requiretls=True,
                        tls_context=ca.server_context("mx1.sts.test", "mx.plain.test"))
    lacks = SinkServer(host="127.0.0.22", tls_context=ca.server_context("127.0.0.22"))
    try:
        with DnsServer(zone) as dns, PolicyServer(ca, "sts.test", "127.0.0.30") as policy:
            policy.policy = policy_text("enforce", "*.sts.test")
            engine = local_engine(offers.port, route=None, extra={
                "dns": {"nameservers": ["127.0.0.1"], "port": dns.port},
                "routes": {"lacks.test": f"127.0.0.22:{lacks.port}"},
                "smtp": {"ca_file": ca.ca_file},
                "tls_policy": {"mta_sts_https_port": policy.port},
                "security": {"allowed_destinations": ["127.0.0.0/8"]},
                "retry": {"schedule": ["1h"]},
            })
            jobs = [({"id": "sts", "from": "s@example.test", "to": ["r@sts.test"]}),
                    ({"id": "rt", "from": "s@example.test", "to": ["r@plain.test"],
                      "requiretls": True}),
                    ({"id": "plain", "from": "s@example.test", "to": ["r@plain.test"]}),
                    ({"id": "lacks", "from": "s@example.test", "to": ["r@lacks.test"],
                      "requiretls": True})]
            assert engine.push([(job, make_message(n, 300)) for n, job in enumerate(jobs)])
            finals = final_outcomes(engine.wait_final(4, timeout=30))
            spool = engine.config["spool"]
            assert policy.requests == 1
        got = {job_id: (e["event"], e["enhanced"], e.get("tls_policy"), e.get("tls_verified"))
               for (job_id, _), e in finals.items()}
        assert got == {
            "sts": ("delivered", "2.0.0", "mta-sts", True),
            "rt": ("delivered", "2.0.0", "requiretls", True),
            "plain": ("delivered", "2.0.0", "opportunistic", True),
            "lacks": ("bounced", "5.7.30", "requiretls", None),
        }
        received = offers.messages
        assert len(received) == 3 and all(m.tls is not None for m in received)
        (required,) = [m for m in received if "REQUIRETLS" in m.mail_options]
        assert b"Subject: test message 1\r\n" in required.content  # the job "rt"
        assert lacks.messages == []
        assert os.path.exists(os.path.join(spool, "mta-sts-127.0.0.2.db"))
    finally:
        offers.stop()
        lacks.stop()
