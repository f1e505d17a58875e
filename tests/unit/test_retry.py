"""engine.retry: the wait before each attempt, the last one repeating, never past expiry."""
from __future__ import annotations

import pytest

from engine.retry import next_attempt

SCHEDULE = (60.0, 300.0, 1800.0)
FAR = 1e12


@pytest.mark.parametrize(("attempts", "wait"), [
    (1, 60.0), (2, 300.0), (3, 1800.0), (4, 1800.0), (50, 1800.0),
])
def test_wait_follows_schedule_and_last_interval_repeats(attempts: int, wait: float) -> None:
    assert next_attempt(SCHEDULE, attempts, 1000.0, FAR) == 1000.0 + wait


def test_zero_attempts_waits_like_the_first() -> None:
    # A throttled wait burns no attempt; its retry still waits the first interval.
    assert next_attempt(SCHEDULE, 0, 1000.0, FAR) == 1060.0


def test_none_when_next_attempt_falls_after_expiry() -> None:
    assert next_attempt(SCHEDULE, 2, 1000.0, 1299.0) is None


def test_attempt_exactly_at_expiry_is_allowed() -> None:
    assert next_attempt(SCHEDULE, 2, 1000.0, 1300.0) == 1300.0


@pytest.mark.parametrize(("r", "expected"), [(0.0, 1000.0 + 54.0), (0.5, 1060.0),
                                              (0.999999, 1000.0 + 60.0 * 1.099998)])
def test_jitter_moves_the_wait_within_its_fraction(r: float, expected: float) -> None:
    got = next_attempt(SCHEDULE, 1, 1000.0, FAR, jitter=0.1, rand=lambda: r)
    assert got == pytest.approx(expected)
    assert got is not None and 1054.0 <= got < 1066.0


def test_jitter_applies_before_the_expiry_check() -> None:
    assert next_attempt(SCHEDULE, 1, 1000.0, 1058.0, jitter=0.1, rand=lambda: 0.0) == 1054.0
    assert next_attempt(SCHEDULE, 1, 1000.0, 1058.0, jitter=0.1, rand=lambda: 0.9) is None


def test_default_random_jitter_stays_in_bounds() -> None:
    for _ in range(200):
        got = next_attempt(SCHEDULE, 2, 0.0, FAR, jitter=0.2)
        assert got is not None and 240.0 <= got <= 360.0


@pytest.mark.parametrize(("schedule", "attempts", "jitter"), [
    ((), 1, 0.0), (SCHEDULE, -1, 0.0), (SCHEDULE, 1, -0.1), (SCHEDULE, 1, 1.0),
])
def test_bad_arguments_are_refused(schedule: tuple[float, ...], attempts: int,
                                   jitter: float) -> None:
    with pytest.raises(ValueError):
        next_attempt(schedule, attempts, 0.0, FAR, jitter=jitter)
