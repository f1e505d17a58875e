"""The gevent clock a test starts with (tests/conftest.py `gevent_hub_between_tests`).

The test process is not gevent-patched, so its hub's clock stands still while a test blocks;
`gevent.joinall(timeout=...)` starts its timer from that clock. Two tiny tests, run in a
pytest of their own and in this order, replay the order dependence it caused: the first
leaves the hub idle while it blocks, the second's `joinall` must still wait its timeout.
"""
from __future__ import annotations

import pytest

BLOCK_THEN_JOIN = """
import time

import gevent


def test_1_blocks_with_the_hub_idle():
    gevent.sleep(0.001)  # the hub runs: its clock reads the time
    time.sleep(0.5)  # blocking, as a test on stdlib sockets and threads: the clock stands still


def test_2_joinall_waits_its_timeout():
    sleeper = gevent.spawn(gevent.sleep, 0.05)
    try:
        assert gevent.joinall([sleeper], timeout=0.3) == [sleeper]
    finally:
        sleeper.kill()
"""
IN_ORDER = ("-p", "no:randomly", "-p", "no:benchmark")  # (benchmark: forks git, hg... at start)


def test_a_test_after_one_that_blocked_gets_its_whole_joinall_timeout(
        pytester: pytest.Pytester) -> None:
    pytester.makeconftest("from tests.conftest import gevent_hub_between_tests  # noqa: F401\n")
    pytester.makepyfile(BLOCK_THEN_JOIN)
    pytester.runpytest_inprocess(*IN_ORDER).assert_outcomes(passed=2)


def test_without_the_fixture_joinall_ends_early(pytester: pytest.Pytester) -> None:
    """The replay does reproduce the failure: without the fixture, `joinall` gives up
    before a 0.05 s sleep ends."""
    pytester.makepyfile(BLOCK_THEN_JOIN)
    pytester.runpytest_inprocess(*IN_ORDER).assert_outcomes(passed=1, failed=1)
