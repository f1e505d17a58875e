"""Traffic shaping: limits per IP x provider, pace, caps, throttle rules and the adaptive rate."""
from __future__ import annotations

import dataclasses
import datetime

import pytest

from engine import classify, config
from engine.config import (
    ThrottleConfig,
    ThrottleRule,
    WarmupConfig,
)
from engine.reply import Reply
from engine.shaping import Deferral, ProviderShaper, Shaping, ShapingPlan, plan_for
from tests.support.shaping import FakeTime, limits, shaper


def test_pace_holds_the_configured_rate_exactly() -> None:
    s, t = shaper(limits(rate=20.0))
    start = t.now
    for _ in range(600):
        assert s.turn() is None
    # 600 messages at 20/s: the last one goes out 599/20 s after the first.
    assert t.now - start == pytest.approx(599 / 20)


def test_unlimited_provider_never_waits() -> None:
    s, t = shaper(limits(rate=0))
    start = t.now
    for _ in range(1000):
        assert s.turn() is None
    assert t.now == start


def test_a_wait_longer_than_max_wait_goes_back_to_the_spool_without_waiting() -> None:
    t = FakeTime()
    s = ProviderShaper("example.net", limits(rate=1.0), ThrottleConfig(), 2.0, lambda: None,
                       t.clock, t.clock, lambda seconds: None)  # many greenlets queue at once
    for _ in range(3):  # they reserve slots at +0, +1, +2
        assert s.turn() is None
    before = t.now
    deferral = s.turn()
    assert isinstance(deferral, Deferral) and deferral.reason == "pace"
    assert t.now == before  # no waiting done
    assert deferral.retry_at > t.now


def test_hourly_cap_defers_until_the_oldest_minute_leaves_the_hour() -> None:
    s, t = shaper(limits(hourly=5))
    for _ in range(5):
        assert s.turn() is None
    deferral = s.turn()
    assert isinstance(deferral, Deferral) and deferral.reason == "hourly limit"
    assert t.now < deferral.retry_at <= t.now + 3600
    t.now = deferral.retry_at + 1
    assert s.turn() is None


def test_default_rules_recognise_the_big_providers_and_generic_throttles() -> None:
    cases = [
        ("google", Reply(421, "4.7.28", "Our system has detected an unusual rate of "
                                        "unsolicited mail"), "gmail-unsolicited-rate"),
        ("microsoft", Reply(451, "4.7.500", "Server busy. Please try again later from "
                                            "[203.0.113.10]. (S77714)"), "microsoft-busy"),
        ("yahoo", Reply(421, "4.7.0", "[TSS04] Messages from 203.0.113.10 temporarily "
                                      "deferred due to unexpected volume"), "yahoo-deferred"),
        ("example.net", Reply(450, "4.7.1", "Rate limit exceeded, slow down"), "rate-text"),
        ("example.net", Reply(421, None, "mx.example.net closing connection"), "421"),
    ]
    for provider, reply, name in cases:
        s, _ = shaper(provider=provider)
        rule = s.match(reply)
        assert rule is not None and rule.name == name, (provider, reply)


@pytest.mark.parametrize("reply", [
    Reply(250, "2.0.0", "ok"),
    Reply(450, "4.2.0", "Greylisted, please try again later"),
    Reply(452, "4.2.2", "Mailbox quota exceeded"),
    Reply(550, "5.1.1", "No such user"),
    Reply(452, "4.2.1", "The user you are trying to contact is receiving mail at a rate that"
                        " prevents additional messages from being delivered"),
])
def test_ordinary_failures_are_not_throttles(reply: Reply) -> None:
    s, _ = shaper(provider="google")
    assert s.match(reply) is None


def test_operator_rules_come_first_and_the_shipped_ones_can_be_turned_off() -> None:
    cfg = config.from_dict({"hostname": "mta.example.com", "ips": ["192.0.2.10"], "throttle": {
        "rules": [{"name": "ours", "code": 421, "text": "SLOW DOWN"}]}})
    rules = classify.throttle_rules(cfg.throttle)
    assert [r.name for r in rules[:1]] == ["ours"] and rules[1:] == classify.DEFAULT_RULES
    rule = classify.throttle_rule(rules, "example.net", Reply(421, "4.7.0", "please slow down"))
    assert rule is not None and rule.name == "ours"  # the text is case-insensitive
    assert classify.throttle_rule(rules, "example.net", Reply(421, None, "bye")) == \
        ThrottleRule("421", code=421)
    alone = classify.throttle_rules(dataclasses.replace(cfg.throttle, default_rules=False))
    assert classify.throttle_rule(alone, "example.net", Reply(421, None, "bye")) is None


def test_throttle_decreases_once_per_burst_and_a_suspension_defers_everything() -> None:
    s, t = shaper(limits(rate=40.0), ThrottleConfig(holdoff=2.0), provider="google")
    gmail = Reply(421, "4.7.28", "unusual rate of unsolicited mail")
    s.observe(gmail)
    assert s.allowed_rate == pytest.approx(20.0)
    s.observe(gmail)  # the same burst: in-flight messages all get the 421
    assert s.allowed_rate == pytest.approx(20.0)
    deferral = s.turn()
    assert isinstance(deferral, Deferral) and deferral.reason == "suspended"
    assert deferral.retry_at == pytest.approx(t.now + 900)
    assert s.resume_at() == pytest.approx(t.now + 900)
    t.now += 901
    assert s.turn() is None


def test_rate_recovers_additively_never_above_the_maximum() -> None:
    s, _t = shaper(limits(rate=10.0), ThrottleConfig(decrease=0.5, increase=1.0))
    s.observe(Reply(421, None, "too busy"))
    assert s.allowed_rate == pytest.approx(5.0)
    ok = Reply(250, None, "ok")
    for _ in range(5):  # one second at ~5/s adds up to 1 msg/s, less near the old ceiling
        s.turn()
        s.observe(ok)
    assert 5.3 < s.allowed_rate < 6.0
    for _ in range(2000):
        s.turn()
        s.observe(ok)
    assert s.allowed_rate <= 10.0


def test_after_a_throttle_the_rate_settles_just_under_the_ceiling() -> None:
    """Against a provider that pushes back above 8 msg/s, throttles die out."""
    s, t = shaper(limits(rate=50.0), ThrottleConfig(decrease=0.5, increase=1.0, holdoff=0.0))
    limit = 8.0
    throttle_times = []
    for _ in range(20000):
        assert s.turn() is None
        if s.current_rate() > limit and s.allowed_rate > limit:
            s.observe(Reply(421, "4.7.0", "rate limit"))
            throttle_times.append(t.now)
        else:
            s.observe(Reply(250, None, "ok"))
    assert throttle_times, "the provider never pushed back: the test proves nothing"
    span = t.now - throttle_times[0]
    early = sum(1 for x in throttle_times if x < throttle_times[0] + span / 2)
    late = len(throttle_times) - early
    assert late < early  # throttles fall off over time
    assert 0.8 * limit < s.allowed_rate <= limit * 1.05  # just under the limit


def test_limits_resolve_defaults_then_provider_then_ip() -> None:
    cfg = config.from_dict({
        "ips": ["127.0.0.2", "127.0.0.3"],
        "pool": {"max_connections": 7},
        "shaping": {"rate": 5, "providers": {"google": {"rate": 20, "max_connections": 3}},
                    "ips": {"127.0.0.2": {"google": {"rate": 2}}}},
    })
    two, three = plan_for(cfg, "127.0.0.2"), plan_for(cfg, "127.0.0.3")
    assert two.limits_for("google") == limits(max_connections=3, max_messages=100, rate=2.0)
    assert three.limits_for("google").rate == 20.0
    assert three.limits_for("example.net") == limits(max_connections=7, rate=5.0)


def test_warmup_caps_each_provider_per_day_and_survives_a_restart(tmp_path) -> None:
    t = FakeTime(datetime.datetime(2026, 12, 3, 12, tzinfo=datetime.UTC).timestamp())
    plan = ShapingPlan(ip="192.0.2.10", warmup=WarmupConfig(
        schedule=(3, 5), ips={"192.0.2.10": "2026-12-02"}))  # today is day 2: cap 5
    state = str(tmp_path / "shaping.json")
    first = Shaping(plan, state, t.clock, t.clock, t.sleep)
    google = first.get("google")
    for _ in range(4):
        assert google.turn() is None
    first.save()
    second = Shaping(plan, state, t.clock, t.clock, t.sleep)  # a restarted worker
    again = second.get("google")
    assert again.turn() is None  # the 5th
    deferral = again.turn()
    assert isinstance(deferral, Deferral) and deferral.reason == "warm-up daily limit"
    assert deferral.retry_at == datetime.datetime(2026, 12, 4, tzinfo=datetime.UTC
                                                  ).timestamp()
    assert second.get("microsoft").turn() is None  # per provider
    t.now = deferral.retry_at + 10  # day 3: past the schedule, no cap
    for _ in range(50):
        assert again.turn() is None


def test_connection_gate_caps_open_connections_and_paces_new_ones() -> None:
    s, _t = shaper(limits(max_connections=2, connection_rate=0))
    gate = s.gate
    assert gate.try_enter() and gate.try_enter()
    assert not gate.try_enter()
    gate.leave()
    assert gate.try_enter()


def test_sent_today_starts_over_at_utc_midnight_and_not_before() -> None:
    midnight = datetime.datetime(2026, 12, 4, tzinfo=datetime.UTC).timestamp()
    s, t = shaper(t=FakeTime(midnight - 2.0))
    assert s.turn() is None and s.turn() is None
    t.now = midnight - 0.001  # the same day: still counted (the date is not formatted again)
    assert s.turn() is None and s.sent_today == 3
    t.now = midnight
    assert s.turn() is None and s.sent_today == 1 and s._day == "2026-12-04"
    t.now = midnight - 10  # a clock set back a day: that day's count starts over too
    assert s.turn() is None and s._day == "2026-12-03" and s.sent_today == 1
