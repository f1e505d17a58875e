"""engine.shaping_idle through engine.shaping.Shaping: a provider idle for
`shaping.forget_after` with nothing to keep is forgotten, and made anew with what it learned
when mail comes again; one with something to keep (a suspension, the hour's count, a pool
holding its gate, a backoff) is kept; only the providers with something to show are
reported, and a report visits only the active providers (those something happened to,
and those still shown), not all held.

Fake clock (tests/support/shaping.py), unpaced and `max_wait` 0: no turn waits on a real
timer.
"""
from __future__ import annotations

import datetime
import gc
import json
import weakref
from collections.abc import Callable
from pathlib import Path

import pytest

from engine import shaping_idle
from engine.config import ShapingConfig, ThrottleConfig, WarmupConfig
from engine.rate import PROBE_MAX
from engine.reply import Reply
from engine.shaping import Deferral, ProviderShaper, Shaping, ShapingPlan
from tests.support.shaping import UNPACED, FakeTime

pytestmark = pytest.mark.timeout(30)

AFTER = 300.0  # shaping.forget_after
SHAPING = ShapingConfig(max_wait=0.0, forget_after=AFTER)
PLAN = ShapingPlan(ip="192.0.2.10", shaping=SHAPING, throttle=UNPACED)
OK = Reply(250, "2.0.0", "ok")
SLOW_DOWN = Reply(421, "4.7.0", "Rate limited, slow down")  # the shipped rule "rate-text"
SPAMHAUS = Reply(554, "5.7.1", "Service unavailable; Client host [192.0.2.10] blocked using "
                               "zen.spamhaus.org")


def learned_limit(s: ProviderShaper, t: FakeTime) -> None:
    """30 accepted in 1.5 s, a throttle rule (limit 20/s, rate 19/s), then a probe
    accepted: steady at the learned rate."""
    for _ in range(30):
        t.now += 0.05
        s.judge([OK], s.epoch)
    s.judge([SLOW_DOWN], s.epoch)
    t.now += 1.0
    s.judge([OK], s.epoch)
    assert s.state()["phase"] == "steady" and s.rate.limit == pytest.approx(20.0)


def test_an_idle_provider_is_forgotten_and_made_anew_with_its_learned_rate() -> None:
    t = FakeTime()
    shaping = Shaping(PLAN, None, t.clock, t.clock)  # no file: the store is in memory
    learned_limit(shaping.get("example.net"), t)
    first = shaping.get("example.net")  # the last message to it
    t.now += AFTER - 1
    assert len(shaping.forget_idle()) == 0 and shaping.providers == 1
    t.now += 2
    assert len(shaping.forget_idle()) == 1
    assert shaping.providers == 0 and shaping.forgotten == 1 and shaping.state() == {}
    again = shaping.get("example.net")
    assert again is not first
    assert again.rate.limit == pytest.approx(20.0)
    assert again.allowed_rate == pytest.approx(first.allowed_rate)
    assert again.state()["phase"] == "steady"


def test_a_use_keeps_a_provider_another_forget_after() -> None:
    t = FakeTime()
    shaping = Shaping(PLAN, None, t.clock, t.clock)
    shaping.get("example.net")
    t.now += AFTER - 1
    shaping.get("example.net")  # a message asked for it
    t.now += AFTER - 1
    assert len(shaping.forget_idle()) == 0
    t.now += 2
    assert len(shaping.forget_idle()) == 1


def test_a_running_suspension_is_kept_and_forgotten_only_after_it_ends() -> None:
    t = FakeTime()
    shaping = Shaping(PLAN, None, t.clock, t.clock)
    blocked = shaping.get("blocked.example")
    assert blocked.judge([SPAMHAUS], blocked.epoch).trigger == "block"
    shaping.hold("held.example", 2 * AFTER)  # the operator's suspension
    t.now += AFTER + 1
    assert len(shaping.forget_idle()) == 0
    assert shaping.get("blocked.example") is blocked and blocked.suspended
    deferral = blocked.turn()
    assert isinstance(deferral, Deferral) and deferral.reason == "suspended"
    t.now += AFTER  # the hold over, and unused since
    assert len(shaping.forget_idle()) == 1
    assert {name for name, _ in shaping.items()} == {"blocked.example"}
    t.now += UNPACED.block_suspend  # the block's hour over
    assert len(shaping.forget_idle()) == 1 and shaping.providers == 0


def test_the_hours_count_keeps_a_provider_with_an_hourly_cap() -> None:
    t = FakeTime()
    plan = ShapingPlan(ip="192.0.2.10", shaping=ShapingConfig(
        max_wait=0.0, forget_after=AFTER, hourly=3), throttle=UNPACED)
    shaping = Shaping(plan, None, t.clock, t.clock)
    capped = shaping.get("example.net")
    for _ in range(3):
        assert not isinstance(capped.turn(), Deferral)
    t.now += AFTER + 1
    assert len(shaping.forget_idle()) == 0  # made anew, it would send 3 more this hour
    deferral = shaping.get("example.net").turn()
    assert isinstance(deferral, Deferral) and deferral.reason == "hourly limit"
    t.now += 3600 + 60  # the three have left the hour
    assert len(shaping.forget_idle()) == 1


def test_a_pool_holding_the_providers_gate_keeps_it() -> None:
    t = FakeTime()
    shaping = Shaping(PLAN, None, t.clock, t.clock)
    gate = shaping.get("example.net").gate
    def closer() -> bool:
        return False
    gate.on_idle(closer)  # a pool of one of its MX hosts (engine.pools registers so)
    t.now += AFTER + 1
    assert len(shaping.forget_idle()) == 0
    gate.forget(closer)  # the pool reaped (engine.pools.reap)
    assert len(shaping.forget_idle()) == 1


def test_a_backoff_is_kept_up_to_the_longest_probe_gap_longer() -> None:
    t = FakeTime()
    shaping = Shaping(PLAN, None, t.clock, t.clock)
    s = shaping.get("example.net")
    for _ in range(30):
        t.now += 0.05
        s.judge([OK], s.epoch)
    s.judge([SLOW_DOWN], s.epoch)  # a first push-back: probes only, until one is accepted
    assert s.state()["phase"] == "backoff"
    t.now += AFTER + 1
    assert len(shaping.forget_idle()) == 0
    t.now += PROBE_MAX
    assert len(shaping.forget_idle()) == 1
    assert shaping.get("example.net").rate.limit == pytest.approx(20.0)


def test_with_remember_0_what_was_learned_keeps_the_provider() -> None:
    """Nothing learned is restored then: forgotten, it would start from scratch."""
    t = FakeTime()
    throttle = ThrottleConfig(slow_start=False, remember=0.0)
    shaping = Shaping(ShapingPlan(ip="192.0.2.10", shaping=SHAPING, throttle=throttle), None,
                      t.clock, t.clock)
    learned_limit(shaping.get("learned.example"), t)
    shaping.get("plain.example")
    t.now += AFTER + 1
    assert len(shaping.forget_idle()) == 1
    assert {name for name, _ in shaping.items()} == {"learned.example"}


def test_forget_after_0_keeps_every_provider() -> None:
    t = FakeTime()
    plan = ShapingPlan(ip="192.0.2.10", shaping=ShapingConfig(max_wait=0.0, forget_after=0.0),
                       throttle=UNPACED)
    shaping = Shaping(plan, None, t.clock, t.clock)
    shaping.get("example.net")
    t.now += 86400
    assert len(shaping.forget_idle()) == 0 and shaping.providers == 1


def test_todays_warmup_count_survives_forgetting_and_is_saved(tmp_path: Path) -> None:
    t = FakeTime(datetime.datetime(2026, 12, 3, 12, tzinfo=datetime.UTC).timestamp())
    plan = ShapingPlan(ip="192.0.2.10", shaping=SHAPING, throttle=UNPACED, warmup=WarmupConfig(
        schedule=(3, 5), ips={"192.0.2.10": "2026-12-02"}))  # today is day 2: cap 5
    state = tmp_path / "shaping.json"
    shaping = Shaping(plan, str(state), t.clock, t.clock)
    for _ in range(4):
        assert not isinstance(shaping.get("google").turn(), Deferral)
    t.now += AFTER + 1
    assert len(shaping.forget_idle()) == 1
    shaping.save()  # no shaper of it left: its count is written all the same
    assert json.loads(state.read_text())["sent"] == {"google": 4}
    again = shaping.get("google")
    assert again.sent_today == 4
    assert not isinstance(again.turn(), Deferral)  # the 5th
    deferral = again.turn()
    assert isinstance(deferral, Deferral) and deferral.reason == "warm-up daily limit"


def test_the_store_drops_learned_rates_older_than_remember(tmp_path: Path) -> None:
    t = FakeTime()
    state = tmp_path / "shaping.json"
    shaping = Shaping(PLAN, str(state), t.clock, t.clock)
    learned_limit(shaping.get("example.net"), t)
    t.now += AFTER + 1
    assert len(shaping.forget_idle()) == 1
    shaping.save()
    assert set(json.loads(state.read_text())["learned"]) == {"example.net"}
    t.now += UNPACED.remember + 1
    shaping.save()
    assert json.loads(state.read_text())["learned"] == {}
    assert shaping.get("example.net").rate.limit is None


def test_only_providers_with_something_to_show_are_reported() -> None:
    """2,000 providers sent one message each: reported while it is in the last 10 s's
    rate; then only those suspended, throttled or with a limit learned, until forgotten."""
    t = FakeTime()
    shaping = Shaping(PLAN, None, t.clock, t.clock)
    for i in range(2_000):
        assert not isinstance(shaping.get(f"d{i}.test").turn(), Deferral)
    assert len(shaping.state()) == 2_000
    blocked = shaping.get("d1.test")
    blocked.judge([SPAMHAUS], blocked.epoch)
    learned_limit(shaping.get("d2.test"), t)
    t.now += 11  # past the current rate's window
    shown = shaping.state()
    assert set(shown) == {"d1.test", "d2.test"}
    assert shown["d1.test"]["phase"] == "suspended" and shown["d2.test"]["limit"] == 20.0
    assert shaping.providers == 2_000
    t.now += AFTER  # the suspended one kept; the learned one forgotten, its limit stored
    assert len(shaping.forget_idle()) == 1_999
    assert set(shaping.state()) == {"d1.test"} and shaping.providers == 1


def test_a_forgotten_shaper_is_freed_without_waiting_for_the_cyclic_collector() -> None:
    """Regression (the benchmark's worker grew by 40 MB more when 10,000 providers were
    forgotten and made anew): the gate and the pacer held the shaper in a cycle, freed only
    by a full collection, which a worker seldom runs (engine.gctune)."""
    t = FakeTime()
    shaping = Shaping(PLAN, None, t.clock, t.clock)
    shaper = shaping.get("example.net")
    learned_limit(shaper, t)
    assert shaper.gate.try_enter()
    shaper.gate.leave()
    gone = weakref.ref(shaper)
    del shaper
    t.now += AFTER + 1
    gc.disable()
    try:
        assert len(shaping.forget_idle()) == 1
        assert gone() is None
    finally:
        gc.enable()


def test_a_state_file_with_damaged_tables_starts_them_afresh(tmp_path: Path) -> None:
    state = tmp_path / "shaping.json"
    state.write_text(json.dumps({"day": "2026-12-03", "sent": [1], "learned": "x"}))
    t = FakeTime()
    shaping = Shaping(PLAN, str(state), t.clock, t.clock)
    assert shaping.get("example.net").rate.limit is None
    t.now += AFTER + 1
    assert len(shaping.forget_idle()) == 1
    shaping.save()
    assert json.loads(state.read_text())["learned"] == {}


# -- the active providers: what a report visits ----------------------------------------------


def settled(count: int = 1) -> tuple[Shaping, FakeTime]:
    """A Shaping holding `count` providers made (a message asked for each) and settled: the
    report after, which finds nothing going on, has let them leave the active set."""
    t = FakeTime()
    shaping = Shaping(PLAN, None, t.clock, t.clock)
    for i in range(count):
        shaping.get(f"d{i}.test")
    assert len(shaping.active_gauges()) == count  # made: their gauges go out at once
    assert shaping.active_gauges() == []
    return shaping, t


def count_worth_showing(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How often `status`'s test (engine.shaping_idle.worth_showing) is asked from now."""
    asked = [0]
    real = shaping_idle.worth_showing

    def counted(shaper: ProviderShaper) -> bool:
        asked[0] += 1
        return real(shaper)

    monkeypatch.setattr(shaping_idle, "worth_showing", counted)
    return asked


def names(rows: list[tuple[str, tuple[float, float]]]) -> list[str]:
    return [name for name, _ in rows]


def test_a_report_visits_the_active_providers_not_all_held(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """1,000 providers held idle cost a report nothing; one that sends is shown and visited
    while it is in the current rate's window (10 s), then leaves by itself, visited no more.
    Before: every report asked all 1,000 (and sent their gauges' rows) every second."""
    shaping, t = settled(1_000)
    asked = count_worth_showing(monkeypatch)
    assert shaping.state() == {} and shaping.active_gauges() == []
    assert asked == [0]
    busy = shaping.get("d7.test")
    assert not isinstance(busy.turn(), Deferral)
    for _ in range(10):  # a report a second
        assert set(shaping.state()) == {"d7.test"}
        assert names(shaping.active_gauges()) == ["d7.test"]
        t.now += 1.0
    t.now += 0.5  # its message out of the current rate's window
    assert shaping.state() == {}
    assert names(shaping.active_gauges()) == ["d7.test"]  # the visit it leaves at
    assert shaping.active_gauges() == [] and shaping.state() == {}
    assert asked[0] <= 2 * 12  # d7's visits only
    assert shaping.providers == 1_000


def test_a_suspension_ending_with_time_is_seen_and_its_gauge_goes_back_to_0() -> None:
    shaping, t = settled()
    shaping.hold("d0.test", 30)
    assert shaping.active_gauges() == [("d0.test", (0.0, 1))]
    t.now += 29
    assert shaping.state()["d0.test"]["phase"] == "suspended"
    assert shaping.active_gauges() == [("d0.test", (0.0, 1))]
    t.now += 2  # over, with nothing more happening to it
    assert shaping.state() == {}
    assert shaping.active_gauges() == [("d0.test", (0.0, 0))]  # its last values: not held
    assert shaping.active_gauges() == []


def _turn(s: ProviderShaper) -> None:
    assert not isinstance(s.turn(), Deferral)


def _connection(s: ProviderShaper) -> None:
    assert s.gate.try_enter()


def _block(s: ProviderShaper) -> None:
    assert s.judge([SPAMHAUS], s.epoch).trigger == "block"


def _throttle_rule(s: ProviderShaper) -> None:
    assert s.judge([SLOW_DOWN], s.epoch).trigger == "rule:rate-text"


@pytest.mark.parametrize("event", [
    _turn, _connection, _block, _throttle_rule,
    lambda s: s.hold(60),
    lambda s: s.follow(60, "other-host/192.0.2.11", "block"),
    lambda s: s.seed(20.0),
], ids=["turn", "connection", "block", "throttle-rule", "hold", "followed", "seeded"])
def test_whatever_shows_a_settled_provider_makes_it_active_first(
        event: Callable[[ProviderShaper], None]) -> None:
    """A provider that left the active set is visited again, and shown, after anything
    engine.shaping_idle.worth_showing would show it for: a report that visits only the
    active ones misses none of them."""
    shaping, _t = settled(3)
    event(shaping.get("d1.test"))
    assert names(shaping.active_gauges()) == ["d1.test"]
    assert set(shaping.state()) == {"d1.test"}


def test_a_provider_forgotten_leaves_the_active_set() -> None:
    shaping, t = settled(2)
    learned_limit(shaping.get("d1.test"), t)  # shown while held: a limit learned
    t.now += AFTER + 1
    assert sorted(shaping.forget_idle()) == ["d0.test", "d1.test"]
    assert shaping.active_gauges() == [] and shaping.state() == {}
