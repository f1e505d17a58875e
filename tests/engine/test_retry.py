"""Retries through the whole engine: deferred, deferred, delivered; always 4xx ends `expired`
after the maximum age, never `bounced`; a 5xx bounces at once."""
from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

import pytest

from engine.testing.harness import LocalEngine, make_message
from engine.testing.sink import SinkServer


class FlakySink(SinkServer):
    """The sink, answering `451` to the first `failures` RCPTs of each recipient."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures
        self.rcpts_seen: collections.Counter[str] = collections.Counter()

    def rcpt_reply(self, address: str) -> str | None:
        self.rcpts_seen[address] += 1  # the sink's one event-loop thread calls this
        if self.rcpts_seen[address] <= self.failures:
            return "451 4.3.0 greylisted, try again later"
        return super().rcpt_reply(address)


@pytest.fixture
def flaky_sink() -> Any:
    with FlakySink(failures=2) as server:
        yield server


def job(job_id: str, rcpt: str) -> tuple[dict[str, Any], bytes]:
    return ({"id": job_id, "from": "sender@example.test", "to": [rcpt], "meta": {"k": job_id}},
            make_message(0, 1000, rcpt=rcpt))


def of_job(events: list[dict[str, Any]], job_id: str) -> list[dict[str, Any]]:
    return [e for e in events if e["id"] == job_id and e["event"] != "queued"]


@pytest.mark.timeout(60)
def test_451_twice_then_250_is_delivered_on_the_third_attempt(
        flaky_sink: FlakySink, local_engine: Callable[..., LocalEngine]) -> None:
    engine = local_engine(flaky_sink.port,
                          extra={"retry": {"schedule": ["1s"], "max_age": "1m"}})
    assert engine.push([job("greylisted", "user@example.test")])
    events = engine.wait_final(1, timeout=30)

    seen = of_job(events, "greylisted")
    assert [(e["event"], e["attempt"]) for e in seen] == [
        ("deferred", 1), ("deferred", 2), ("delivered", 3)]
    first, second, delivered = seen
    for deferred in (first, second):
        assert (deferred["code"], deferred["enhanced"]) == (451, "4.3.0")
        assert "greylisted" in deferred["reply"]
        assert 0.9 <= deferred["next_attempt"] - deferred["ts"] <= 1.5  # schedule: 1s
    assert second["ts"] >= first["next_attempt"] - 0.05  # not tried before its time
    assert delivered["ts"] >= second["next_attempt"] - 0.05
    assert "next_attempt" not in delivered
    assert delivered["code"] == 250 and delivered["meta"] == {"k": "greylisted"}
    assert all(e["rcpt"] == "user@example.test" for e in seen)

    assert flaky_sink.rcpts_seen["user@example.test"] == 3
    assert len(flaky_sink.wait_for(1)) == 1
    status = engine.status()
    assert status["spool"]["jobs"] == 0
    assert status["events"]["deferred"] == 2 and status["events"]["delivered"] == 1


@pytest.mark.timeout(60)
def test_always_4xx_expires_after_the_maximum_age_and_a_5xx_bounces_at_once(
        sink: SinkServer, local_engine: Callable[..., LocalEngine]) -> None:
    max_age = 4.0
    engine = local_engine(sink.port,
                          extra={"retry": {"schedule": ["1s"], "max_age": f"{max_age:g}s"}})
    # The sink answers 451 to `defer...` and 550 to `reject...`, every time.
    assert engine.push([job("soft", "defer-me@example.test"),
                        job("hard", "reject-me@example.test")])
    events = engine.wait_final(2, timeout=30)
    queued = {e["id"]: e["ts"] for e in events if e["event"] == "queued"}

    hard = of_job(events, "hard")
    assert [(e["event"], e["attempt"]) for e in hard] == [("bounced", 1)]
    assert (hard[0]["code"], hard[0]["enhanced"]) == (550, "5.1.1")
    assert hard[0]["ts"] - queued["hard"] < 2.0  # at once, no retry

    soft = of_job(events, "soft")
    kinds = [e["event"] for e in soft]
    assert kinds[-1] == "expired" and set(kinds[:-1]) == {"deferred"}
    assert "bounced" not in kinds
    assert [e["attempt"] for e in soft] == list(range(1, len(soft) + 1))
    assert len(soft) >= 3  # tried about once a second until no try fits before the max age
    expired = soft[-1]
    assert expired["code"] == 451  # the server's last word, not a made-up bounce
    # Expired once no further attempt fits in the maximum age: its last 1 s step
    # would land after it.
    assert max_age - 1.5 <= expired["ts"] - queued["soft"] <= max_age + 1.5
    assert all(e["next_attempt"] <= queued["soft"] + max_age + 0.01 for e in soft[:-1])

    assert sink.messages == []
    assert len([r for _, r, _ in sink.refused if r == "defer-me@example.test"]) == len(soft)
    assert engine.status()["spool"]["jobs"] == 0
