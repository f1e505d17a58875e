"""Categories end to end: the real engine (`mailengine run`) against a sink that refuses
recipients the way real receivers word it; every `deferred`, `bounced` and `expired` event
carries its category, the operator's rule wins over the shipped ones and a reload changes it,
and the supervisor's per-category counters reach a real UDP StatsD socket.
"""
from __future__ import annotations

import time
from typing import Any

import pytest

from engine.testing.harness import final_outcomes, make_message
from engine.testing.sink import SinkServer
from tests.support.statsd_catcher import StatsdCatcher

# Local part prefix -> the sink's reply to RCPT (engine/testing/sink.py).
REPLIES = {
    "unknown": "550 5.1.1 <unknown@example.test>: Recipient address rejected: User unknown in"
               " virtual mailbox table",
    "spam": "550 5.7.1 Message rejected as spam by Content Filtering.",
    "aup": "550 5.7.1 Rejected, see AUP#1270",
    "full": "452 4.2.2 Mailbox full",
}


def jobs(locals_: list[str]) -> list[tuple[dict[str, Any], bytes]]:
    out = []
    for i, local in enumerate(locals_):
        rcpt = f"{local}{i}@example.test"
        env = {"id": f"cat-{local}-{i}-{time.time_ns()}", "from": "sender@example.test",
               "to": [rcpt], "expires": 4}
        out.append((env, make_message(i, 500, rcpt=rcpt)))
    return out


@pytest.mark.timeout(90)
def test_events_carry_categories_and_the_supervisor_counts_them(local_engine):
    rule = {"category": "blocklisted", "text": r"AUP#\d+"}
    with SinkServer(rcpt_rules=REPLIES) as sink, StatsdCatcher() as catcher:
        extra = {"statsd": {"enabled": True, "host": "127.0.0.1", "port": catcher.port,
                            "prefix": "mailengine"},
                 "retry": {"schedule": ["1s"]},
                 "categories": {"rules": [rule]}}
        engine = local_engine(sink.port, extra=extra)
        assert engine.push(jobs(["unknown", "spam", "aup", "full", "ok"]), timeout=20)
        events = engine.wait_final(5, timeout=40)

        final = {e["rcpt"].split("@")[0].rstrip("0123456789"): e
                 for e in final_outcomes(events).values()}
        got = {local: (e["event"], e.get("category")) for local, e in final.items()}
        assert got == {"unknown": ("bounced", "bad-mailbox"),
                       "spam": ("bounced", "spam-related"),
                       "aup": ("bounced", "blocklisted"),  # the operator's rule first
                       "full": ("expired", "quota-issues"),  # its last refusal's category
                       "ok": ("delivered", None)}
        deferred = [e for e in events if e["event"] == "deferred"]
        assert deferred and all(e["category"] == "quota-issues" for e in deferred)

        def counted(name: str) -> float:
            return catcher.counter_sum(f"mailengine.supervisor.{name}")

        def settled() -> bool:  # UDP is asynchronous: let the packets land
            return (counted("bad-mailbox.bounced_category") == 1
                    and counted("spam-related.bounced_category") == 1
                    and counted("blocklisted.bounced_category") == 1
                    and counted("quota-issues.expired_category") == 1
                    and counted("quota-issues.deferred_category") == len(deferred))
        deadline = time.monotonic() + 10
        while not settled() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert settled(), sorted(n for n in catcher.names() if "_category" in n)

        # A reload takes the new rules at once: without the rule, the shipped ones decide.
        engine.config["categories"] = {"rules": []}
        engine.reload()
        engine.wait_for(lambda evs: "event=reloaded" in engine.log_tail(), timeout=10,
                        what="the reload")
        assert engine.push(jobs(["aup"]), timeout=20)
        events = engine.wait_final(6, timeout=30)
        last = [e for e in events if e["event"] == "bounced" and e["rcpt"].startswith("aup")]
        assert [e["category"] for e in last] == ["blocklisted", "policy-related"]
