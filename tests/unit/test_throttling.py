"""The allowed rate against receivers that push back, in model time: the issue's "Must show"
figures (issue 13) at the model level. tests/support/shaping.SendingModel drives the real
AllowedRate and Pushback the way the shaper and delivery do, on a fake clock, in a few
milliseconds; the whole engine against the same receivers on loopback is bench/shaping_sim.py
(and tests/engine/test_throttling.py).
"""
from __future__ import annotations

import pytest

from engine import classify
from engine.reply import Reply
from engine.testing.limits import FixedWindow, Open, TokenBucket
from tests.support.shaping import (
    CONNECTIONS,
    DEFAULT_THROTTLE,
    PROVIDER,
    RTT,
    Bucket,
    FakeTime,
    SendingModel,
)


def test_token_bucket_refills_at_its_rate_up_to_its_burst() -> None:
    t = FakeTime()
    bucket = TokenBucket(10, 3, t.clock)
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    t.now += 0.25  # 2.5 tokens
    assert [bucket.take() for _ in range(3)] == [True, True, False]
    t.now += 100  # never more than the burst
    assert sum(bucket.take() for _ in range(10)) == 3


def test_a_willing_receiver_is_at_full_speed_within_a_second_or_two() -> None:
    """Slow start is clocked by replies, not by the clock: it costs a fast receiver little."""
    t = FakeTime(0.0)
    run = SendingModel(Open(), t).send(3000)
    assert len(run.delivered) == 3000 and not run.refused
    # Unpaced, the model's connections take 3,000 in 0.6 s (10 in flight, 2 ms each): slow
    # start costs a tenth of that (it was 40% with growth 5 per reply, 1.5 s in all).
    floor = 3000 / (CONNECTIONS / RTT)
    assert run.seconds < 1.15 * floor
    assert run.delivered_rate(0.3, 0.6) > 0.9 * CONNECTIONS / RTT


def test_against_a_token_bucket_close_to_the_floor_with_few_refusals() -> None:
    """40/s, a burst of 40, 421 past it; 1,200 messages: the floor is 30 s. On main the
    engine took 84 s and drew throttle replies for 23% of the messages."""
    t = FakeTime(0.0)
    run = SendingModel(Bucket(40.0, 40.0, t), t).send(1200)
    floor = 1200 / 40.0
    assert len(run.delivered) == 1200
    assert run.seconds <= 1.1 * floor
    assert run.refused_share <= 0.02
    # Once the limit is found (the first two push-backs: what was in flight at each is
    # refused with it), a probe every probe_every draws one refusal at most: the probe climbs
    # gently enough to be answered at once.
    found = sorted(run.pushbacks)[1]
    later = [t for t in run.refused if t > found + 0.1]
    assert len(later) <= run.seconds / DEFAULT_THROTTLE.probe_every
    assert run.deferred == 0  # every refused message was sent again at its turn


def test_against_a_fixed_window_in_words_no_rule_knows() -> None:
    """100 messages per 10 s, the rest of the window refused with 450 4.7.1 in words no
    shipped rule knows: recognised by behaviour alone. 300 messages: the floor is 30 s."""
    window = FixedWindow(100, 10.0)
    reply = Reply.parse(int(window.reply[:3]), window.reply[4:])
    assert classify.throttle_rule(classify.DEFAULT_RULES, PROVIDER, reply) is None
    t = FakeTime(0.0)
    run = SendingModel(window, t).send(300)
    assert len(run.delivered) == 300
    assert run.seconds <= 1.3 * 30.0
    assert run.refused_share <= 0.08
    assert run.pushbacks  # recognised as push-back...
    assert run.deferred == 0  # ...every time: no refused message waited for the retry schedule


@pytest.mark.parametrize("change, limit", [(20.0, 20.0), (40.0, 40.0)])
def test_a_limit_that_halves_then_doubles_back_is_followed_within_10_s(change: float,
                                                                      limit: float) -> None:
    """40/s, halved after 20 s, doubled back after 40 s: within 10 s of each change the
    delivered rate is within 10% of the new limit, over the next 10 s (as
    bench/shaping_sim.py measures it: on the real clock a probe draining the bucket's burst
    shows in a shorter window) and over the 3 s around the 10th second."""
    t = FakeTime(0.0)
    bucket = Bucket(40.0, 40.0, t, schedule=[(20.0, 20.0), (40.0, 40.0)])
    run = SendingModel(bucket, t).send(5000, horizon=60.0)
    assert bucket.limit(change) == limit
    assert run.delivered_rate(change + 8, change + 11) == pytest.approx(limit, rel=0.1)
    assert run.delivered_rate(change + 10, change + 20) == pytest.approx(limit, rel=0.1)
