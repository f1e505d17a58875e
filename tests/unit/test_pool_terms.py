"""engine.pool_terms: each connection's own term, below the configured limits."""
from __future__ import annotations

import random

from engine.config import PoolConfig
from engine.pool_terms import NOT_YET, NOW, SOON, Term


def terms(settings: PoolConfig, count: int = 2000) -> list[Term]:
    rng = random.Random(19)
    return [Term(settings, 0.0, rng) for _ in range(count)]


def test_terms_spread_between_a_tenth_and_a_twentieth_below_the_limits() -> None:
    drawn = terms(PoolConfig(max_messages=1000, max_age=300.0))
    assert min(t.messages for t in drawn) == 900 and max(t.messages for t in drawn) == 950
    assert 270.0 <= min(t.until for t in drawn) and max(t.until for t in drawn) <= 285.0
    assert len({t.messages for t in drawn}) > 40  # spread, not one value
    assert {t.hard_until for t in drawn} == {300.0}


def test_small_limits_leave_room_of_one_and_under_ten_are_exact() -> None:
    assert {t.messages for t in terms(PoolConfig(max_messages=10))} == {9}
    assert {t.messages for t in terms(PoolConfig(max_messages=9))} == {9}
    assert {t.messages for t in terms(PoolConfig(max_messages=1))} == {1}


def test_due_soon_at_its_term_now_at_the_configured_limit() -> None:
    settings = PoolConfig(max_messages=100, max_age=300.0)
    term = Term(settings, 0.0, random.Random(1))
    assert term.due(term.messages - 1, 1.0, settings) == NOT_YET
    assert term.due(term.messages, 1.0, settings) == SOON
    assert term.due(100, 1.0, settings) == NOW
    assert term.due(0, term.until, settings) == SOON
    assert term.due(0, 300.0, settings) == NOW


def test_max_age_zero_is_no_age_limit() -> None:
    settings = PoolConfig(max_messages=100, max_age=0.0)
    term = Term(settings, 0.0, random.Random(1))
    assert term.due(0, 1e12, settings) == NOT_YET
