"""The whole suite's conftest: each test's tier (its folder) as a marker with the tier's
default timeout, the gevent hub between tests, the seed of a random order (printed at the
end of the run); the shared fixtures come from tests/support/fixtures.py."""
from __future__ import annotations

import gc
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

TESTS = Path(__file__).resolve().parent
# The tiers, one folder each, by the boundary their tests need; each tier's default timeout
# in seconds (a test's own `timeout` marker wins). README's Development section says the same.
TIERS = {
    "unit": 10,  # no sockets of any kind
    "conversation": 30,  # the engine's classes against servers and peers on loopback
    "engine": 120,  # the real engine processes end to end
    "package": 10,  # the Debian packaging
}
# A property test (hypothesis's @given) runs its body hundreds of times: its time is the
# examples times the machine's speed, and Debian's older hypothesis generates slower. 3 s
# here for 300 examples ran over 10 s on a loaded CI machine, so it gets a budget of its own.
PROPERTY_TIMEOUT = 60

# The fixtures every tier shares (servers, certificates, a whole engine); pytester for
# tests/unit/test_gevent_hub.py, which replays an order dependence in a pytest of its own.
pytest_plugins = ["tests.support.fixtures", "pytester"]


def pytest_addoption(parser: pytest.Parser, pluginmanager: pytest.PytestPluginManager) -> None:
    """With `-p no:cacheprovider`, an inert `--ff`: Debian's python3-pytest-random-order
    (1.1.0) reads that option of the cache plugin in every run, and stops at once without it."""
    if pluginmanager.is_blocked("cacheprovider") and pluginmanager.hasplugin("random_order"):
        parser.addoption("--ff", action="store_true", dest="failedfirst", help="(no cache: inert)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark each test with its tier (its folder under tests/) and, unless it says otherwise,
    that tier's timeout. `integration` stays as another name for the engine tier. A test
    outside the tier folders gets neither: tests/unit/test_layout.py fails on its file."""
    for item in items:
        tier = tier_of(item.path)
        if tier is None:
            continue
        item.add_marker(tier)
        if tier == "engine":
            item.add_marker("integration")
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(max(TIERS[tier], _property_timeout(item))))


def _property_timeout(item: pytest.Item) -> int:
    """PROPERTY_TIMEOUT for a hypothesis test, else 0."""
    test = getattr(item, "obj", None)
    return PROPERTY_TIMEOUT if getattr(test, "is_hypothesis_test", False) else 0


def tier_of(path: Path) -> str | None:
    """The tier of a test file: its first folder under tests/, if that is a tier."""
    try:
        folder = path.resolve().relative_to(TESTS).parts[0]
    except (ValueError, IndexError):
        return None  # not under tests/ (a pytester run's own files, say)
    return folder if folder in TIERS else None


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    """Name the seed of a random order, under -q too: the same option replays the order."""
    replay = _random_order_replay(config)
    if replay is not None:
        terminalreporter.write_line(f"tests ran in random order; the same order again: {replay}")


def _random_order_replay(config: pytest.Config) -> str | None:
    """The options of this run's random order, None if it ran in file order.

    pytest-randomly (PyPI, the `test` extra) shuffles unless `-p no:randomly`;
    pytest-random-order (Debian's python3-pytest-random-order) only when asked to."""
    if config.pluginmanager.hasplugin("randomly"):
        if config.getoption("randomly_reorganize"):
            return f"-p randomly --randomly-seed={config.getoption('randomly_seed')}"
    if not config.pluginmanager.hasplugin("random_order"):
        return None
    bucket, seed = (str(config.getoption(name)) for name in ("random_order_bucket",
                                                             "random_order_seed"))
    if config.getoption("random_order_enabled") or not bucket.startswith("default:") \
            or not seed.startswith("default:"):
        return (f"--random-order-bucket={bucket.removeprefix('default:')}"
                f" --random-order-seed={seed.removeprefix('default:')}")
    return None


@pytest.fixture(autouse=True)
def gevent_hub_between_tests() -> Iterator[None]:
    """Each test starts with this thread's gevent clock at the real time, and ends with the
    greenlets and timers it left on the hub run out.

    The test process is not gevent-patched: its hub runs only while a test waits on a gevent
    primitive. In between, for seconds while tests block on stdlib sockets and threads:
    - libev's clock (`loop.now()`) stands still, and a timer started from it fires early by
      as much: gevent.sleep() and gevent.Timeout bring the clock up to date first, but the
      timeout of `gevent.joinall()` / `wait()` / `iwait()` does not.
      Regression: after test_hostile's blocking servers had kept the hub idle for 5 s,
      tests/unit/test_pool.py's `joinall(timeout=5)` returned at once and
      test_never_more_than_max_connections_open failed, only in that order.
    - what a test spawned and never waited for (a pool's QUIT, say) sits on the hub and runs
      inside whichever later test next lets the hub run, its blocking sockets stalling that
      test. So the hub runs it now; a test whose leftovers still run after 5 s fails.
    """
    hub = _gevent_hub()
    if hub is not None:
        hub.loop.update_now()
    yield
    hub = _gevent_hub()
    if hub is None or not getattr(hub.loop, "activecnt", 0):
        return
    hub.loop.update_now()  # gevent.wait()'s timeout is one of those that does not
    if not sys.modules["gevent"].wait(timeout=5):
        pytest.fail("greenlets or timers this test left on the gevent hub still run after 5 s")


@pytest.fixture(autouse=True)
def collect_garbage_after_engine_tests(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each test of the engine tier, a garbage collection: a socket or file the test
    left open is finalized here, so its ResourceWarning (an error, pytest.ini) fails the test
    that leaked it, not whichever later test the collector happens to run in. Cheap next to
    the seconds an engine test takes; the faster tiers close what they open (their
    fixtures see to it)."""
    yield
    if request.node.get_closest_marker("engine") is not None:
        gc.collect()


def _gevent_hub() -> Any:
    """This thread's gevent hub, None in a test process that never loaded gevent."""
    gevent = sys.modules.get("gevent")
    return None if gevent is None else gevent.get_hub()
