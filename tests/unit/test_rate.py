"""engine.rate.AllowedRate: slow start, the estimate at a push-back, backoff, probing, and
what survives a restart. Pure: the times are the test's (seconds on a made-up clock)."""
from __future__ import annotations

import math

import pytest

from engine.config import ThrottleConfig
from engine.rate import (
    BACKOFF,
    MIN_SPAN,
    PADDED,
    PROBE_SHARE,
    RECOVERY,
    START,
    STEADY,
    TARGET,
    AllowedRate,
)

# Round numbers for the arithmetic below (the shipped defaults, 20/s and 5/s per reply, are
# the config tests' business): slow start at 10/s, each clean binding reply adding 1/s.
DEFAULT = ThrottleConfig(start_rate=10.0, growth=1.0)


def accept(rate: AllowedRate, count: int, start: float, end: float,
           binding: bool = True) -> None:
    """`count` clean replies spread evenly over (start, end]."""
    for i in range(1, count + 1):
        rate.clean(start + (end - start) * i / count, binding)


def pushed_back_once(configured: float = 0.0) -> AllowedRate:
    """40 accepted in the first 2 s, then a push-back at 2.0: the limit is 20/s."""
    rate = AllowedRate(configured, DEFAULT, 0.0)
    accept(rate, 40, 0.0, 2.0)
    rate.pushback(2.0)
    return rate


# -- slow start --------------------------------------------------------------------------------


def test_slow_start_begins_at_start_rate_and_each_clean_reply_adds_growth() -> None:
    """As TCP's window grows a segment per acknowledgement: replies come at the rate, so the
    rate grows geometrically in time (e-fold per 1/growth s), never without bound."""
    rate = AllowedRate(0, DEFAULT, 0.0)
    assert (rate.phase, rate.rate, rate.spacing()) == (START, 10.0, pytest.approx(0.1))
    accept(rate, 10, 0.0, 1.0)
    assert rate.rate == pytest.approx(20.0)
    fast = AllowedRate(0, ThrottleConfig(growth=5.0, start_rate=2.0), 0.0)
    accept(fast, 3, 0.0, 1.0)
    assert fast.rate == pytest.approx(17.0)


def test_slow_start_grows_only_while_the_pace_binds() -> None:
    """Replies to mail the pace never held back say nothing about a faster rate."""
    rate = AllowedRate(0, DEFAULT, 0.0)
    accept(rate, 50, 0.0, 10.0, binding=False)
    assert rate.rate == 10.0 and rate.phase == START


def test_slow_start_is_capped_by_the_configured_rate() -> None:
    rate = AllowedRate(50.0, DEFAULT, 0.0)
    accept(rate, 100, 0.0, 2.0)
    assert rate.rate == 50.0
    below = AllowedRate(4.0, DEFAULT, 0.0)  # configured under start_rate: it from the start
    assert below.rate == 4.0


def test_without_slow_start_the_configured_rate_or_none() -> None:
    off = ThrottleConfig(slow_start=False)
    assert AllowedRate(25.0, off, 0.0).rate == 25.0
    unlimited = AllowedRate(0, off, 0.0)
    assert (unlimited.phase, unlimited.rate, unlimited.spacing()) == (STEADY, math.inf, 0.0)
    assert unlimited.time_for(1000) == 0.0


def test_time_for_a_long_line_in_slow_start_grows_only_logarithmically() -> None:
    """Turn k's gap is 1 / (rate + k * growth): the line's time is at most the first gap and
    ln((rate + (n - 1) * growth) / rate) / growth, not 10,000 turns at the starting rate
    (which would send them all to the spool)."""
    rate = AllowedRate(0, DEFAULT, 0.0)
    assert rate.time_for(0) == 0.0
    assert rate.time_for(1) == pytest.approx(0.1)
    exact = sum(1.0 / (10.0 + k) for k in range(10_000))
    assert exact <= rate.time_for(10_000) <= exact + 0.1
    assert rate.time_for(10_000) < 7.5  # not 1,000 s


def test_time_for_grows_until_the_configured_rate_then_holds_it() -> None:
    rate = AllowedRate(20.0, DEFAULT, 0.0)  # 10 -> 20/s takes 10 turns
    growing = 0.1 + math.log(19.0 / 10.0)
    assert rate.time_for(1000) == pytest.approx(growing + 990 / 20.0)


# -- the first push-back -----------------------------------------------------------------------


def test_the_first_pushback_estimates_from_what_was_accepted_since_the_start() -> None:
    rate = pushed_back_once()
    assert rate.limit == pytest.approx(20.0)  # 40 accepted in 2 s
    assert rate.rate == pytest.approx(TARGET * 20.0)
    assert rate.phase == BACKOFF and rate.pushbacks == 1


def test_backoff_sends_one_probe_every_probe_interval() -> None:
    rate = pushed_back_once()
    assert rate.spacing() == DEFAULT.probe_interval
    assert rate.time_for(3) == pytest.approx(DEFAULT.probe_interval + 2 / rate.rate)
    slow = AllowedRate(0, ThrottleConfig(probe_interval=2.5), 0.0)
    accept(slow, 40, 0.0, 2.0)
    slow.pushback(2.0)
    assert slow.spacing() == 2.5


def test_a_probe_accepted_goes_to_steady_at_95_percent_of_the_estimate() -> None:
    rate = pushed_back_once()
    rate.clean(3.0, True)
    assert rate.phase == STEADY
    assert rate.rate == pytest.approx(0.95 * 20.0)
    assert rate.spacing() == pytest.approx(1 / 19.0)
    assert rate.time_for(10) == pytest.approx(10 / 19.0)


def test_in_backoff_further_pushbacks_change_nothing() -> None:
    """Only probes go out in backoff: their refusals say the window is still used up."""
    rate = pushed_back_once()
    before = rate.learned(), rate.phase, rate.spacing()
    for now in (2.5, 3.0, 4.0):
        rate.pushback(now)
    assert (rate.learned(), rate.phase, rate.spacing()) == before


def test_slow_start_doubles_the_rate_every_transaction_time_on_a_fast_receiver() -> None:
    """As TCP's window doubles every round trip: replies come at the rate, so each adds
    ln 2 / the transaction time (smoothed), and throttle.growth at least. On loopback (2 ms)
    that is 347/s per reply: 5,000/s within ~20 ms, where growth 1 would take 6 s."""
    rate = AllowedRate(0, DEFAULT, 0.0)
    rate.clean(0.0, True, seconds=0.002)
    assert rate.rate == pytest.approx(10.0 + math.log(2) / 0.002)
    rate.clean(0.001, True, seconds=0.004)  # smoothed: 2 ms + 1/8 of the 2 ms more
    assert rate.growth == pytest.approx(math.log(2) / 0.00225)
    slow = AllowedRate(0, DEFAULT, 0.0)
    slow.clean(0.0, True, seconds=2.0)  # a slow receiver: throttle.growth at least
    assert slow.rate == pytest.approx(10.0 + DEFAULT.growth)


def test_a_few_accepted_in_a_short_span_say_nothing_of_a_limit() -> None:
    """5 accepted in 0.1 s (fewer than PADDED) say nothing of a limit (not 50/s): the
    push-back is treated as one at first contact, a decrease and a guess that the next probe
    soon corrects."""
    rate = AllowedRate(0, DEFAULT, 0.0)
    accept(rate, PADDED - 5, 0.0, 0.1)
    grown = rate.rate
    rate.pushback(0.1)
    assert rate.phase == BACKOFF
    assert rate.rate == pytest.approx(DEFAULT.decrease * grown)
    assert rate.limit == pytest.approx(rate.rate / TARGET)


def test_many_accepted_in_a_short_span_are_counted_over_min_span() -> None:
    """A fast slow start got 44 through in 0.1 s (a bucket of 40/s and its burst of 40): the
    limit is 44 per MIN_SPAN at least, not 440/s, nor a decrease of the ramp's rate."""
    rate = AllowedRate(0, DEFAULT, 0.0)
    accept(rate, 44, 0.0, 0.1)
    rate.pushback(0.1)
    assert rate.limit == pytest.approx(44 / MIN_SPAN)
    assert rate.rate == pytest.approx(TARGET * 44 / MIN_SPAN)


def test_an_estimate_over_min_span_is_taken_as_the_limit() -> None:
    rate = AllowedRate(0, DEFAULT, 0.0)
    accept(rate, 30, 0.0, MIN_SPAN)
    rate.pushback(MIN_SPAN)
    assert rate.limit == pytest.approx(30 / MIN_SPAN)


# -- later push-backs --------------------------------------------------------------------------


def steady_at_19() -> AllowedRate:
    """Pushed back at 2.0 (limit 20/s), the probe accepted at 3.0: steady at 19/s."""
    rate = pushed_back_once()
    rate.clean(3.0, True)
    return rate


def test_a_confirmed_estimate_goes_straight_to_steady() -> None:
    """Within 20% of the last estimate: the limit is known; no pause for probes."""
    rate = steady_at_19()
    accept(rate, 37, 3.0, 4.0)  # 38 since the push-back at 2.0: 19/s
    rate.pushback(4.0)
    assert rate.phase == STEADY and rate.limit == pytest.approx(19.0)
    assert rate.rate == pytest.approx(0.95 * 19.0) and rate.pushbacks == 2
    rate.clean(5.5, True)  # clean, but not yet probe_every at the target: no probe
    assert rate.phase == STEADY


def test_a_higher_estimate_probes_again_a_second_later() -> None:
    """The limit was raised: it is climbed quickly, a probe a second after the last."""
    rate = steady_at_19()
    accept(rate, 59, 3.0, 4.0)  # 60 since 2.0: 30/s, above 1.25 x 20
    rate.pushback(4.0)
    assert rate.phase == STEADY and rate.limit == pytest.approx(30.0)
    rate.clean(4.5, True)
    assert rate.phase == STEADY
    rate.clean(5.0, True)  # a second at the target: probe
    assert rate.phase == START
    before = rate.rate
    rate.clean(5.05, True)
    assert rate.rate == pytest.approx(before + PROBE_SHARE * DEFAULT.growth)


def test_a_lower_estimate_backs_off_again() -> None:
    rate = steady_at_19()
    accept(rate, 19, 3.0, 4.0)  # 20 since 2.0: 10/s, under 0.8 x 20
    rate.pushback(4.0)
    assert rate.phase == BACKOFF and rate.limit == pytest.approx(10.0)
    assert rate.rate == pytest.approx(9.5)


def test_refused_at_once_after_a_pushback_multiplies_by_decrease_and_guesses_the_limit() -> None:
    """Too little accepted since the last push-back to measure anything (the bucket is
    still empty): halve, take that as the limit, and probe a second later to correct it."""
    rate = steady_at_19()  # 1 accepted since the push-back at 2.0
    rate.pushback(3.1)
    assert rate.rate == pytest.approx(DEFAULT.decrease * 19.0)
    assert rate.limit == pytest.approx(rate.rate / TARGET)
    assert rate.phase == BACKOFF and rate.spacing() == DEFAULT.probe_interval
    rate.clean(4.1, True)  # the probe goes through
    assert rate.phase == STEADY and rate.rate == pytest.approx(9.5)
    rate.clean(5.1, True)  # a second later: the guess is probed
    assert rate.phase == START


def test_refused_at_first_contact_halves_the_start_rate() -> None:
    rate = AllowedRate(0, DEFAULT, 0.0)
    rate.clean(0.1, True)
    rate.pushback(0.2)
    assert rate.rate == pytest.approx((10.0 + 1.0) * 0.5) and rate.phase == BACKOFF
    unlimited = AllowedRate(0, ThrottleConfig(slow_start=False, start_rate=10.0), 0.0)
    unlimited.pushback(0.2)  # no rate to halve: start_rate is the base
    assert unlimited.rate == pytest.approx(5.0)


def test_the_rate_never_falls_below_min_rate() -> None:
    rate = AllowedRate(0, ThrottleConfig(start_rate=1.0, min_rate=0.8), 0.0)
    rate.pushback(0.1)
    assert rate.rate == 0.8


# -- steady, probing, recovery -----------------------------------------------------------------


def test_after_probe_every_of_clean_steady_sending_a_probe_starts() -> None:
    rate = steady_at_19()  # steady since 3.0
    rate.clean(7.9, True)
    assert rate.phase == STEADY
    rate.clean(3.0 + DEFAULT.probe_every, True)
    assert rate.phase == START
    rate.clean(8.1, False)  # a probe grows only while the pace binds, as slow start
    assert rate.rate == pytest.approx(19.0)
    accept(rate, 3, 8.1, 8.2)  # a probe: a limit is known, growth is PROBE_SHARE as fast
    assert rate.rate == pytest.approx(19.0 + 3 * PROBE_SHARE * DEFAULT.growth)


def test_no_probe_at_the_configured_rate() -> None:
    rate = AllowedRate(19.0, DEFAULT, 0.0)
    accept(rate, 40, 0.0, 2.0)
    rate.pushback(2.0)  # estimate 20: the target is the configured 19
    rate.clean(3.0, True)
    accept(rate, 200, 3.0, 20.0)
    assert rate.phase == STEADY and rate.rate == 19.0


def test_below_the_target_the_rate_recovers_to_it_within_recovery_seconds() -> None:
    rate = AllowedRate(0, DEFAULT, 0.0)
    rate.restore({"rate": 5.0, "limit": 20.0}, 0.0)  # steady, far under 95% of the limit
    now = 0.0
    while now < RECOVERY / 2:
        now += 1 / rate.rate
        rate.clean(now, True)
    assert 5.0 < rate.rate < TARGET * 20.0
    while now < RECOVERY * 1.05:
        now += 1 / rate.rate
        rate.clean(now, True)
    assert rate.rate == pytest.approx(TARGET * 20.0) and rate.phase == STEADY


# -- what survives a restart -------------------------------------------------------------------


def test_learned_is_the_rate_the_limit_and_the_pushbacks() -> None:
    assert AllowedRate(0, DEFAULT, 0.0).learned() == {"rate": 10.0, "limit": None,
                                                      "pushbacks": 0}
    assert AllowedRate(0, ThrottleConfig(slow_start=False), 0.0).learned()["rate"] is None
    learned = pushed_back_once().learned()
    assert learned == {"rate": pytest.approx(19.0), "limit": pytest.approx(20.0),
                       "pushbacks": 1}


def test_restore_goes_straight_to_the_learned_rate() -> None:
    rate = AllowedRate(0, DEFAULT, 100.0)
    rate.restore(pushed_back_once().learned(), 100.0)
    assert (rate.phase, rate.rate, rate.limit) == (STEADY, pytest.approx(19.0),
                                                   pytest.approx(20.0))
    assert rate.spacing() == pytest.approx(1 / 19.0)


def test_restore_of_a_rate_saved_mid_probe_goes_on_at_the_target() -> None:
    """Regression (found by tests/support/shaping.SendingModel killed mid-run): saved while
    a probe had grown the rate past the limit for a moment (the state is saved every 10 s), a
    restarted worker went on at the probe's rate as if steady, with the limit known: a
    flood of the receiver at every such restart, until it pushed back."""
    probing = steady_at_19()
    probing.clean(3.0 + DEFAULT.probe_every, True)
    accept(probing, 300, 8.0, 8.3)
    assert probing.phase == START and probing.rate > 20.0  # past the limit
    rate = AllowedRate(0, DEFAULT, 100.0)
    rate.restore(probing.learned(), 100.0)
    assert (rate.phase, rate.rate) == (STEADY, pytest.approx(TARGET * 20.0))


def test_restore_without_a_limit_resumes_slow_start_from_the_rate() -> None:
    rate = AllowedRate(0, DEFAULT, 0.0)
    rate.restore({"rate": 30.0, "limit": None}, 0.0)
    assert (rate.phase, rate.rate) == (START, 30.0)
    rate.clean(0.1, True)
    assert rate.rate == pytest.approx(30.0 + DEFAULT.growth)


def test_restore_is_capped_by_the_configured_rate() -> None:
    rate = AllowedRate(15.0, DEFAULT, 0.0)
    rate.restore({"rate": 19.0, "limit": 20.0}, 0.0)
    assert rate.rate == 15.0


@pytest.mark.parametrize("learned", [{}, {"rate": None}, {"rate": 0}, {"rate": -3.0},
                                     {"rate": "fast", "limit": 20.0}])
def test_restore_ignores_what_is_not_a_rate(learned: dict[str, object]) -> None:
    rate = AllowedRate(0, DEFAULT, 0.0)
    rate.restore(learned, 0.0)
    assert (rate.phase, rate.rate, rate.limit) == (START, 10.0, None)


def test_learning_is_a_limit_or_a_rate_grown_from_the_start() -> None:
    rate = AllowedRate(0, DEFAULT, 0.0)
    assert not rate.learning
    rate.clean(0.1, False)
    assert not rate.learning  # not binding: nothing grown
    rate.clean(0.2, True)
    assert rate.learning
    unlimited = AllowedRate(0, ThrottleConfig(slow_start=False), 0.0)
    accept(unlimited, 30, 0.0, 1.0)
    assert not unlimited.learning
    unlimited.pushback(1.0)
    assert unlimited.learning and unlimited.limit == pytest.approx(30.0)
