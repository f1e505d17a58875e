"""The whole engine (supervisor, spool, worker processes) against a real SMTP server on loopback."""
from __future__ import annotations

import collections

import pytest

from engine.testing.harness import final_outcomes, make_message

DOMAINS = ("alpha.test", "beta.test", "gamma.test")


@pytest.mark.timeout(180)
def test_500_jobs_to_three_domains_all_delivered_over_tls_within_the_pool_cap(sink, local_engine):
    cap = 4
    engine = local_engine(sink.port, extra={"pool": {"max_connections": cap,
                                                     "max_messages": 1000}})
    jobs = []
    for i in range(500):
        rcpt = f"user{i}@{DOMAINS[i % 3]}"
        env = {"id": f"job-{i}", "from": "sender@example.test", "to": [rcpt],
               "meta": {"n": i}}
        jobs.append((env, make_message(i, 5000, rcpt=rcpt)))
    assert engine.push(jobs)

    events = engine.wait_final(500, timeout=150)
    finals = final_outcomes(events)
    assert collections.Counter(e["event"] for e in finals.values()) == {"delivered": 500}
    assert all(e["tls"] and e["tls"].startswith("TLS") for e in finals.values())
    assert all(e["meta"]["n"] == int(e["id"].split("-")[1]) for e in finals.values())

    received = sink.wait_for(500, timeout=10)
    assert len(received) == 500
    # Every message arrived intact, from the engine's sending IP, over TLS.
    sent = {env["id"]: msg for env, msg in jobs}
    by_subject = {m.content.split(b"Subject: test message ", 1)[1].split(b"\r\n", 1)[0]: m
                  for m in received}
    for env, _msg in jobs:
        got = by_subject[env["id"].split("-")[1].encode()]
        assert got.content == sent[env["id"]]
        assert got.rcpt_tos == tuple(env["to"])
        assert got.peer[0] == "127.0.0.2"
        assert got.tls is not None
    # Connections: never more than the cap at once, and the mail rode on few of them.
    assert sink.max_concurrent <= cap
    carriers = {m.conn_id for m in received}
    assert len(carriers) <= cap
    assert sum(1 for e in finals.values() if e["conn_reused"]) >= 500 - cap
