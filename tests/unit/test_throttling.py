"""The adaptive rate against a token bucket, in simulated time (tests/support/shaping.py's
fake clock): it settles just under the bucket's limit, recovers to just under the ceiling and
probes above it; a throttle makes the turns taken before it stale. The same against a real
throttling sink is tests/engine/test_throttling.py.
"""
from __future__ import annotations

import pytest

from engine.config import ThrottleConfig
from engine.reply import Reply
from engine.shaping import RECOVERY, ProviderShaper
from engine.testing.sink import TokenBucket
from tests.support.shaping import BURST, LIMIT, FakeTime, halves, limits, shaper


def test_token_bucket_refills_at_its_rate_up_to_its_burst() -> None:
    t = FakeTime()
    bucket = TokenBucket(10, 3, t.clock)
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    t.now += 0.25  # 2.5 tokens
    assert [bucket.take() for _ in range(3)] == [True, True, False]
    t.now += 100  # never more than the burst
    assert sum(bucket.take() for _ in range(10)) == 3


def _simulate(s: ProviderShaper, t: FakeTime, bucket: TokenBucket, seconds: float,
              send_interval: float = 0.0) -> list[float]:
    """Send as fast as the shaper allows for `seconds`; returns throttle times."""
    throttles = []
    end = t.now + seconds
    while t.now < end:
        before = t.now
        assert s.turn() is None
        if t.now == before:  # unlimited: the transaction itself takes a little time
            t.now += send_interval or 0.005
        if bucket.take():
            s.observe(Reply(250, "2.0.0", "ok"))
        else:
            s.observe(Reply(421, "4.7.0", "Rate limited, slow down"))
            throttles.append(t.now)
    return throttles


def test_against_a_token_bucket_the_rate_settles_just_under_its_limit() -> None:
    """Regression (collapse): the ceiling was the rate *sent*, throttled attempts included,
    averaged over 10 s; each echo of one overload cut it again, and the step back up near
    the ceiling was so small that it never recovered."""
    s, t = shaper(limits(rate=0), ThrottleConfig(holdoff=2.0))
    bucket = TokenBucket(LIMIT, BURST, t.clock)
    start = t.now
    throttles = _simulate(s, t, bucket, 120.0)
    assert s.ceiling is not None and 0.8 * LIMIT <= s.ceiling <= 1.3 * LIMIT
    assert 0.75 * LIMIT <= s.current_rate() <= LIMIT * 1.05
    early, late = halves(throttles, start, t.now)
    assert late < early


def test_recovery_reaches_just_under_the_ceiling_then_probes_above_it() -> None:
    """Regression (stuck): the step shrank with the room left, so the rate only approached
    95% of the ceiling and never got there, let alone probed above it."""
    s, t = shaper(limits(rate=1000.0), ThrottleConfig(decrease=0.5, increase=2.0))
    bucket = TokenBucket(5000, 5000, t.clock)  # accepts everything
    _simulate(s, t, bucket, 5.0)
    s.observe(Reply(421, "4.7.0", "Rate limited"))
    ceiling = s.ceiling
    assert ceiling is not None and s.allowed_rate == pytest.approx(ceiling / 2, rel=0.01)
    _simulate(s, t, bucket, RECOVERY * 0.8)
    assert s.allowed_rate < 0.95 * ceiling
    _simulate(s, t, bucket, RECOVERY * 0.3)
    assert s.allowed_rate >= 0.95 * ceiling  # back within RECOVERY seconds
    back = s.allowed_rate
    _simulate(s, t, bucket, 20.0)
    assert s.allowed_rate > back + 20 * 2.0 * 0.5  # probing, faster the longer it is quiet


def test_a_throttle_makes_turns_taken_before_it_stale_and_frees_their_slots() -> None:
    """Regression (dead air): the greenlets that take their turn again after a throttle
    (see delivery) left their old slots reserved: up to max_wait of nothing sent, then
    the backlog in a burst that drew the next throttle."""
    t = FakeTime()
    s = ProviderShaper("example.net", limits(rate=10.0), ThrottleConfig(), 2.0, lambda: None,
                       t.clock, t.clock, lambda seconds: None)  # greenlets queue at once
    for _ in range(21):  # slots at +0.0 ... +2.0 s: max_wait
        assert s.turn() is None
    assert s.turn() is not None  # +2.1 s: back to the spool
    epoch = s.epoch
    s.observe(Reply(451, "4.7.1", "Rate limited, slow down"))
    assert s.epoch == epoch + 1  # the 21 turns are stale: their greenlets take them again
    assert s.turn() is None  # and the slots are free for them


def test_a_stale_turn_taken_again_is_not_counted_twice() -> None:
    s, _ = shaper(limits(rate=10.0, hourly=3))
    for _ in range(3):
        assert s.turn() is None
    s.observe(Reply(451, "4.7.1", "Rate limited, slow down"))
    assert s.turn(again=True) is None  # one of the three: the cap counted it already
    deferral = s.turn()  # a fourth message
    assert deferral is not None and deferral.reason == "hourly limit"
    assert s.current_rate() == pytest.approx(0.3) and s.sent_today == 3
