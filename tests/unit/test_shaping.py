"""engine.shaping: limits per IP x provider, turns and caps, what replies say about the pace
(`judge`: throttle rules, push-back by behaviour, blocks), and what survives a restart.

The shapers run on a fake clock (tests/support/shaping.py): unpaced, so that no turn ever
waits on the real gevent timer; the pace itself is tests/unit/test_pacer.py's, the allowed
rate tests/unit/test_rate.py's.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import logging
from pathlib import Path

import gevent
import pytest

from engine import classify, config
from engine.config import ThrottleConfig, ThrottleRule, WarmupConfig
from engine.reply import Reply
from engine.shaping import (
    BLOCK,
    CLEAN,
    Deferral,
    ProviderShaper,
    Shaping,
    ShapingPlan,
    Verdict,
    plan_for,
)
from tests.support.clocks import Clocks
from tests.support.shaping import UNPACED, FakeTime, limits, shaper

OK = Reply(250, "2.0.0", "ok")
SLOW_DOWN = Reply(421, "4.7.0", "Rate limited, slow down")  # the shipped rule "rate-text"
QUOTA = Reply(450, "4.7.1", "Sender over quota for this period, try again later")  # no rule
SPAMHAUS = Reply(554, "5.7.1", "Service unavailable; Client host [192.0.2.10] blocked using "
                               "zen.spamhaus.org")


def took(turn: Deferral | int) -> bool:
    """The turn was given (its epoch), not deferred."""
    return not isinstance(turn, Deferral)


def accepted(s: ProviderShaper, t: FakeTime, count: int, seconds: float) -> None:
    """`count` transactions accepted over `seconds`, each of the current epoch."""
    for _ in range(count):
        t.now += seconds / count
        assert s.judge([OK], s.epoch) == CLEAN


def pushed_back(s: ProviderShaper, t: FakeTime) -> int:
    """30 accepted in 1.5 s (20/s), then a throttle rule: the epoch the burst went out on."""
    accepted(s, t, 30, 1.5)
    epoch = s.epoch
    assert s.judge([SLOW_DOWN], epoch) == Verdict("rule:rate-text")
    return epoch


# -- turns and caps ----------------------------------------------------------------------------


def test_an_unlimited_provider_never_waits() -> None:
    s, _ = shaper()
    assert [s.turn() for _ in range(1000)] == [0] * 1000
    assert s.pacer.waiting == 0 and s.sent_today == 1000


def test_a_wait_longer_than_max_wait_goes_back_to_the_spool_without_waiting() -> None:
    s, t = shaper(limits(rate=2.0), max_wait=0.3)  # a turn every 0.5 s
    assert took(s.turn())
    deferral = s.turn()
    assert isinstance(deferral, Deferral) and deferral.reason == "pace"
    # Back max_wait/2 before its turn (0.5 s): half the line is still ahead of it then.
    assert deferral.retry_at - t.now == pytest.approx(0.5 - 0.15)
    assert s.pacer.waiting == 0


def test_hourly_cap_defers_until_the_oldest_minute_leaves_the_hour() -> None:
    s, t = shaper(limits(hourly=5))
    for _ in range(5):
        assert took(s.turn())
    deferral = s.turn()
    assert isinstance(deferral, Deferral) and deferral.reason == "hourly limit"
    assert t.now < deferral.retry_at <= t.now + 3600
    t.now = deferral.retry_at + 1
    assert took(s.turn())


@pytest.mark.parametrize("step", [3600.0, -3600.0], ids=["forward", "back"])
def test_a_step_of_the_wall_clock_neither_opens_nor_shuts_the_hourly_cap(step: float) -> None:
    """Issue #14 (7): the hour is an interval, on the monotonic clock; the Deferral's
    retry_at is on the wall clock, the time the worker's results carry."""
    clocks = Clocks(1_800_000_000.0 + 1800)  # half past: the UTC day is the same after a step
    s = ProviderShaper("example.net", limits(hourly=5), UNPACED, 0.0, lambda: None,
                       clocks.monotonic, clocks.wall)
    for _ in range(5):
        assert took(s.turn())
    clocks.advance(600)
    clocks.step(step)
    deferral = s.turn()
    assert isinstance(deferral, Deferral) and deferral.reason == "hourly limit"
    assert clocks.wall_now + 2900 <= deferral.retry_at <= clocks.wall_now + 3000
    clocks.advance(deferral.retry_at - clocks.wall_now)
    assert took(s.turn())


@pytest.mark.timeout(10)
def test_a_cap_reached_while_messages_wait_in_line_holds_them_back() -> None:
    """Regression: the cap was checked only on joining the paced line, so every message
    already in it went out (60 sent against a warm-up cap of 25). Real clocks: the turns
    wait on the gevent timer (5 ms apart)."""
    s = ProviderShaper("example.net", limits(rate=200.0, hourly=3), UNPACED, 1.0)
    turns = [gevent.spawn(s.turn) for _ in range(6)]
    gevent.joinall(turns, timeout=5, raise_error=True)
    taken = [g.value for g in turns if took(g.value)]
    held = [g.value for g in turns if not took(g.value)]
    assert len(taken) == 3 and s.sent_today == 3
    assert len(held) == 3 and all(d.reason == "hourly limit" for d in held)


def test_a_turn_taken_again_is_not_counted_twice() -> None:
    s, _ = shaper(limits(hourly=3))
    for _ in range(3):
        assert took(s.turn())
    assert took(s.turn(again=True))  # one of the three, throttled: the cap counted it
    deferral = s.turn()  # a fourth message
    assert isinstance(deferral, Deferral) and deferral.reason == "hourly limit"
    assert s.current_rate() == pytest.approx(0.3) and s.sent_today == 3


def test_a_message_given_back_untried_uses_up_neither_cap() -> None:
    """A message whose turn counted it and then went back to the spool untried (no cluster
    connection slot, a turn taken again that was not now) gives back what it took: the
    hourly cap's count, the warm-up day's, the current rate's."""
    s, _ = shaper(limits(hourly=2), cap=2)
    assert took(s.turn())
    counted = s.counted
    assert took(s.turn())
    s.give_back(counted)
    s.give_back(None)  # a throttled message's turn again: counted when it first went
    assert s.sent_today == 1 and s.current_rate() == pytest.approx(0.1)
    assert took(s.turn())  # the second of the hour and the day, not a third
    deferral = s.turn()
    assert isinstance(deferral, Deferral) and deferral.reason == "hourly limit"


def test_a_count_given_back_a_minute_later_leaves_its_own_minute() -> None:
    """Given back after its minute ended (it waited for a connection slot across it), the
    count goes from the minute it was counted in: taken from the later one, the earlier
    minute would leave the hour with one count too many and let a message too many in."""
    minute = 1_800_000_000.0  # a minute's start
    s, t = shaper(limits(hourly=2), t=FakeTime(minute - 1.0))
    assert took(s.turn())
    counted = s.counted
    t.now = minute + 1.0  # the next minute
    assert took(s.turn())
    s.give_back(counted)
    assert took(s.turn())  # the second of the hour: both in the second minute
    t.now = minute + 3570.0  # the first minute has left the hour, the second not yet
    deferral = s.turn()
    assert isinstance(deferral, Deferral) and deferral.reason == "hourly limit"
    assert deferral.retry_at - t.now == pytest.approx(30.0)


def test_a_turn_carries_the_epoch_of_the_moment() -> None:
    s, t = shaper()
    assert s.turn() == 0
    pushed_back(s, t)
    t.now += 10.0  # the lowered pace's next turn is free
    assert s.turn() == s.epoch == 1


def test_sent_today_starts_over_at_utc_midnight_and_not_before() -> None:
    midnight = datetime.datetime(2026, 12, 4, tzinfo=datetime.UTC).timestamp()
    s, t = shaper(t=FakeTime(midnight - 2.0))
    assert took(s.turn()) and took(s.turn())
    t.now = midnight - 0.001  # the same day: still counted (the date is not formatted again)
    assert took(s.turn()) and s.sent_today == 3
    t.now = midnight
    assert took(s.turn()) and s.sent_today == 1 and s.caps.day == "2026-12-04"
    t.now = midnight - 10  # a clock set back a day: that day's count starts over too
    assert took(s.turn()) and s.caps.day == "2026-12-03" and s.sent_today == 1


def test_connection_gate_caps_open_connections() -> None:
    s, _ = shaper(limits(max_connections=2, connection_rate=0))
    gate = s.gate
    assert gate.try_enter() and gate.try_enter()
    assert not gate.try_enter()
    gate.leave()
    assert gate.try_enter()


# -- limits and rules --------------------------------------------------------------------------


def test_limits_resolve_defaults_then_provider_then_ip() -> None:
    cfg = config.from_dict({
        "ips": ["127.0.0.2", "127.0.0.3"],
        "pool": {"max_connections": 7},
        "shaping": {"rate": 5, "providers": {"google": {"rate": 20, "max_connections": 3}},
                    "ips": {"127.0.0.2": {"google": {"rate": 2}}}},
    })
    two, three = plan_for(cfg, "127.0.0.2"), plan_for(cfg, "127.0.0.3")
    assert two.limits_for("google") == limits(max_connections=3, max_messages=1000, rate=2.0)
    assert three.limits_for("google").rate == 20.0
    assert three.limits_for("example.net") == limits(max_connections=7, rate=5.0)


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
    OK,
    QUOTA,
    Reply(450, "4.2.0", "Greylisted, please try again later"),
    Reply(452, "4.2.2", "Mailbox quota exceeded"),
    Reply(550, "5.1.1", "No such user"),
    Reply(452, "4.2.1", "The user you are trying to contact is receiving mail at a rate that"
                        " prevents additional messages from being delivered"),
])
def test_ordinary_failures_are_not_throttle_rules(reply: Reply) -> None:
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


# -- judging replies: a throttle rule ----------------------------------------------------------


def test_a_rule_lowers_the_rate_once_per_episode(caplog: pytest.LogCaptureFixture) -> None:
    """The rest of the burst (mail whose turn came before the answer) is throttled too, but
    changes nothing more. Regression (the rate fell to a fifth of the limit): every echo
    of one overload cut it again."""
    learned: list[None] = []
    s, t = shaper(on_learned=lambda: learned.append(None))
    with caplog.at_level(logging.INFO, logger="mailengine.shaping"):
        stale = pushed_back(s, t)
    assert s.epoch == stale + 1 and s.rate.pushbacks == 1 and len(learned) == 1
    assert s.rate.limit == pytest.approx(20.0) and s.allowed_rate == pytest.approx(19.0)
    assert "event=rate_decreased" in caplog.text and "trigger=rule:rate-text" in caplog.text
    for _ in range(5):  # the echo: still throttled (sent again), no new decrease
        assert s.judge([SLOW_DOWN], stale) == Verdict("rule:rate-text")
    assert s.epoch == stale + 1 and s.rate.pushbacks == 1 and len(learned) == 1
    assert s.allowed_rate == pytest.approx(19.0) and s.throttles == 6
    s.judge([OK], s.epoch)  # the probe went through: steady, where a decrease would show
    s.judge([SLOW_DOWN], stale)  # a late echo of the same burst
    assert s.state()["phase"] == "steady" and s.allowed_rate == pytest.approx(19.0)


def test_a_stale_success_does_not_end_a_backoff() -> None:
    s, t = shaper()
    stale = pushed_back(s, t)
    assert s.state()["phase"] == "backoff"
    s.judge([OK], stale)  # sent before the push-back: says nothing about the lowered rate
    assert s.state()["phase"] == "backoff"
    s.judge([OK], s.epoch)  # the probe went through
    assert s.state()["phase"] == "steady"


def test_a_rule_that_suspends_defers_every_turn_until_it_ends() -> None:
    s, t = shaper(provider="google")
    gmail = Reply(421, "4.7.28", "Our system has detected an unusual rate of unsolicited mail")
    assert s.judge([gmail], s.epoch) == Verdict("rule:gmail-unsolicited-rate")
    deferral = s.turn()
    assert isinstance(deferral, Deferral) and deferral.reason == "suspended"
    assert deferral.retry_at == pytest.approx(t.now + 900)
    assert s.resume_at() == pytest.approx(t.now + 900)
    assert s.state()["phase"] == "suspended" and s.state()["suspended_for"] == 900
    t.now += 901
    assert s.turn() == s.epoch and s.state()["phase"] != "suspended"


# -- judging replies: a block ------------------------------------------------------------------


def test_a_block_suspends_the_provider_without_touching_the_rate(
        caplog: pytest.LogCaptureFixture) -> None:
    s, t = shaper(throttle=dataclasses.replace(UNPACED, block_suspend=600.0))
    accepted(s, t, 10, 1.0)
    before = s.rate.learned()
    with caplog.at_level(logging.WARNING, logger="mailengine.shaping"):
        assert s.judge([SPAMHAUS], s.epoch) == Verdict("block")
    assert "event=provider_blocked" in caplog.text
    assert (s.triggers[BLOCK], s.throttles) == (1, 1) and s.rate.learned() == before
    deferral = s.turn()
    assert isinstance(deferral, Deferral) and deferral.reason == "suspended"
    assert deferral.retry_at == pytest.approx(t.now + 600)
    assert s.state()["phase"] == "suspended"


def test_a_block_is_a_block_whatever_its_code() -> None:
    s, _ = shaper()
    listed = Reply(421, "4.7.0", "[192.0.2.10] is listed by Spamhaus")  # also a "421" rule
    assert s.judge([OK, listed], s.epoch) == Verdict("block")


# -- judging replies: push-back by behaviour ---------------------------------------------------


def test_refusals_in_a_row_after_an_acceptance_are_pushback_whatever_their_words() -> None:
    s, t = shaper()
    assert s.match(QUOTA) is None  # no rule knows these words
    accepted(s, t, 1, 0.1)
    t.now += 0.1
    assert s.judge([QUOTA], s.epoch) == Verdict(pending=True)  # the first: wait and see
    assert s.rate.pushbacks == 0
    t.now += 0.1
    assert s.judge([QUOTA, QUOTA], s.epoch) == Verdict("pushback")
    assert s.rate.pushbacks == 1 and s.state()["phase"] == "backoff" and s.throttles == 1


def test_a_pending_verdict_comes_with_the_next_transaction() -> None:
    s, t = shaper()
    accepted(s, t, 1, 0.1)
    assert s.judge([QUOTA], s.epoch).pending
    verdict = gevent.spawn(s.verdict)  # delivery waits here, holding no connection
    gevent.idle()
    assert s.judge([QUOTA], s.epoch) == Verdict("pushback")
    assert verdict.get(timeout=1) == Verdict("pushback")
    assert s.judge([QUOTA], s.epoch - 1) == Verdict("pushback")  # echoes: no new decrease
    assert s.rate.pushbacks == 1


def test_a_pending_verdict_is_clean_when_the_next_is_accepted() -> None:
    s, t = shaper()
    accepted(s, t, 1, 0.1)
    assert s.judge([QUOTA], s.epoch).pending
    verdict = gevent.spawn(s.verdict)
    gevent.idle()
    s.judge([OK], s.epoch)
    assert verdict.get(timeout=1) == CLEAN


def test_refusals_at_first_contact_are_ordinary_deferrals() -> None:
    s, _ = shaper()
    for _ in range(5):
        assert s.judge([QUOTA], s.epoch) == CLEAN
    assert s.rate.pushbacks == 0 and s.throttles == 0


@pytest.mark.parametrize("reply", [
    Reply(450, "4.2.0", "Recipient address rejected: Greylisted, see http://postgrey."
                        "schweikert.ch/help/example.test.html"),
    Reply(452, "4.2.2", "Mailbox full"),
    Reply(450, "4.2.1", "Mailbox busy, try again later"),
    Reply(450, "4.1.1", "Recipient address rejected: unverified address"),
    Reply(550, "5.7.1", "Sender not allowed"),
    Reply.local(451, "4.4.2", "timeout after 30s in MAIL"),
])
def test_what_is_not_about_the_pace_is_never_pushback(reply: Reply) -> None:
    s, t = shaper()
    accepted(s, t, 5, 0.5)
    for _ in range(5):
        assert s.judge([reply], s.epoch) == CLEAN
    assert s.pushback.refused == 0 and s.rate.pushbacks == 0


def test_recipients_refused_before_refused_again_are_no_pushback_but_words_still_count(
        ) -> None:
    s, t = shaper()
    accepted(s, t, 5, 0.5)
    for _ in range(5):  # a batch of retries of mailboxes that defer every time
        assert s.judge([], s.epoch, repeated=[QUOTA]) == CLEAN  # ordinary deferrals
    assert s.pushback.refused == 0 and s.rate.pushbacks == 0
    # Throttled by behaviour alone here, refused again: the next transaction decides.
    assert s.judge([], s.epoch, repeated=[QUOTA], guessed=True) == Verdict(pending=True)
    verdict = gevent.spawn(s.verdict)
    gevent.idle()
    s.judge([OK], s.epoch)
    assert verdict.get(timeout=1) == CLEAN  # accepted: it was the mailbox
    s.judge([QUOTA], s.epoch)  # a first try refused, then one more: push-back as before
    assert s.judge([QUOTA], s.epoch) == Verdict("pushback")
    # Refused again while the provider pushes back: throttled with the rest, no new decrease.
    assert s.judge([], s.epoch, repeated=[QUOTA]) == Verdict("pushback")
    assert s.rate.pushbacks == 1
    listed = Reply(554, "5.7.1", "Service unavailable; Client host [127.0.0.2] blocked using"
                                 " zen.spamhaus.org")
    s2, t2 = shaper()
    accepted(s2, t2, 5, 0.5)
    assert s2.judge([OK], s2.epoch, repeated=[listed]) == Verdict("block")

def test_one_recipient_accepted_is_an_accepted_transaction() -> None:
    s, t = shaper()
    accepted(s, t, 1, 0.1)
    s.judge([QUOTA], s.epoch)
    assert s.judge([QUOTA, OK], s.epoch) == CLEAN
    assert s.pushback.refused == 0


# -- when a throttled recipient goes again; what it looks like ---------------------------------


def test_resume_at_is_the_next_turn_not_retry_after() -> None:
    s, t = shaper()
    assert s.resume_at() == pytest.approx(t.now)  # unpaced: at once
    pushed_back(s, t)  # backoff: the next probe a probe_interval from now
    assert s.resume_at() == pytest.approx(t.now + UNPACED.probe_interval)


def test_resume_at_is_at_least_retry_after() -> None:
    s, t = shaper(throttle=dataclasses.replace(UNPACED, retry_after=30.0))
    pushed_back(s, t)
    assert s.resume_at() == pytest.approx(t.now + 30.0)


def test_state_shows_the_phase_the_limit_and_the_line() -> None:
    s, t = shaper(limits(max_connections=4))
    assert {k: s.state()[k] for k in ("phase", "allowed_rate", "limit", "waiting",
                                      "max_connections")} == {
        "phase": "steady", "allowed_rate": 0.0, "limit": None, "waiting": 0,
        "max_connections": 4}
    started, _ = shaper(throttle=ThrottleConfig())
    assert (started.state()["phase"], started.state()["allowed_rate"]) == (
        "start", ThrottleConfig().start_rate)
    pushed_back(s, t)
    state = s.state()
    assert (state["phase"], state["limit"], state["allowed_rate"]) == ("backoff", 20.0, 19.0)
    assert state["throttles"] == 1 and state["blocks"] == 0
    assert state["triggers"] == {"rule:rate-text": 1}  # pushed_back's reply matches that rule


# -- what survives a restart -------------------------------------------------------------------


PLAN = ShapingPlan(ip="192.0.2.10", throttle=UNPACED)


def test_the_learned_rate_and_limit_survive_a_restart_within_remember(tmp_path: Path) -> None:
    t = FakeTime()
    state = str(tmp_path / "shaping.json")
    first = Shaping(PLAN, state, t.clock, t.clock)
    pushed_back(first.get("example.net"), t)  # saved at the push-back
    again = Shaping(PLAN, state, t.clock, t.clock).get("example.net")  # a restarted worker
    assert again.allowed_rate == pytest.approx(19.0)
    assert again.rate.limit == pytest.approx(20.0) and again.state()["phase"] == "steady"
    t.now += PLAN.throttle.remember + 1
    forgotten = Shaping(PLAN, state, t.clock, t.clock).get("example.net")
    assert forgotten.allowed_rate == 0.0 and forgotten.rate.limit is None


def test_providers_not_used_since_a_restart_stay_learned(tmp_path: Path) -> None:
    t = FakeTime()
    state = str(tmp_path / "shaping.json")
    pushed_back(Shaping(PLAN, state, t.clock, t.clock).get("example.net"), t)
    second = Shaping(PLAN, state, t.clock, t.clock)
    second.get("google")
    second.save()
    assert set(json.loads(Path(state).read_text())["learned"]) == {"example.net"}
    third = Shaping(PLAN, state, t.clock, t.clock)
    assert third.get("example.net").allowed_rate == pytest.approx(19.0)


def test_an_unreadable_state_file_starts_afresh(tmp_path: Path) -> None:
    state = tmp_path / "shaping.json"
    state.write_text("{not json")
    t = FakeTime()
    s = Shaping(PLAN, str(state), t.clock, t.clock).get("example.net")
    assert s.rate.limit is None and took(s.turn())


def test_warmup_caps_each_provider_per_day_and_survives_a_restart(tmp_path: Path) -> None:
    t = FakeTime(datetime.datetime(2026, 12, 3, 12, tzinfo=datetime.UTC).timestamp())
    plan = ShapingPlan(ip="192.0.2.10", throttle=UNPACED, warmup=WarmupConfig(
        schedule=(3, 5), ips={"192.0.2.10": "2026-12-02"}))  # today is day 2: cap 5
    state = str(tmp_path / "shaping.json")
    first = Shaping(plan, state, t.clock, t.clock)
    google = first.get("google")
    for _ in range(4):
        assert took(google.turn())
    first.save()
    second = Shaping(plan, state, t.clock, t.clock)  # a restarted worker
    again = second.get("google")
    assert took(again.turn())  # the 5th
    deferral = again.turn()
    assert isinstance(deferral, Deferral) and deferral.reason == "warm-up daily limit"
    assert deferral.retry_at == datetime.datetime(2026, 12, 4, tzinfo=datetime.UTC
                                                  ).timestamp()
    assert took(second.get("microsoft").turn())  # per provider
    t.now = deferral.retry_at + 10  # day 3: past the schedule, no cap
    for _ in range(50):
        assert took(again.turn())


def test_a_cluster_connections_limit_adds_its_figures_to_the_shaper_state() -> None:
    """The gate of a provider with `cluster_connections` asks the cluster's slots; its
    figures join the shaper's state without hiding the operator's `held`."""
    from engine.config import ClusterConfig, ProviderLimits, ShapingConfig
    from engine.shaping import Shaping, ShapingPlan

    shaping = Shaping(ShapingPlan(ip="192.0.2.10", cluster=ClusterConfig(
        redis="redis://127.0.0.1:1/0", host="mta-a"), shaping=ShapingConfig(
        providers={"yahoo": ProviderLimits(cluster_connections=3)})))
    try:
        yahoo, google = shaping.get("yahoo"), shaping.get("google")
        assert yahoo.gate.cluster is not None and google.gate.cluster is None
        yahoo.hold(60.0)  # the operator's suspension: `held`, as queue_admin reads it
        state = yahoo.state()
        assert (state["cluster_connections"], state["slots_held"]) == (3, 0)
        assert state["held"] is True
    finally:
        shaping.close()
