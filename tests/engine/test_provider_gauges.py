"""The providers' gauges of the whole engine (issue #19; engine/quiet_gauges.py): after a burst
to a hundred domains, each with its own MX host and provider (resolved by a real DNS server on
loopback), the worker holds a hundred providers, unchanged. Their gauges (`allowed_rate`,
`suspended`), caught on a real StatsD socket, go out once each, then only as their refreshes
fall due (once a minute each, spread): a few lines a second, not two per provider every second
as before. Once the providers are forgotten (`shaping.forget_after`), none is sent."""
from __future__ import annotations

import re
from collections.abc import Callable

import pytest

from engine.quiet_gauges import REFRESH
from engine.testing.harness import LocalEngine, final_outcomes, make_message
from engine.testing.sink import SinkServer
from tests.support.dnsserver import DnsServer, domains_with_own_mx
from tests.support.statsd_catcher import StatsdCatcher

pytestmark = pytest.mark.timeout(120)

DOMAINS = 100
FORGET_AFTER = 20  # s: long enough to watch them held, short enough to see them forgotten
REPORTS = 3  # the worker's stats reports watched in each window (one a second)
PROVIDER_GAUGE = re.compile(r"mailengine\.127_0_0_2\.d\d+_test\.(allowed_rate|suspended)$")
IN_FLIGHT = "mailengine.127_0_0_2.all.in_flight"  # sent at every report


def _held(engine: LocalEngine) -> int:
    """Providers whose shaping state the worker holds (listed or idle)."""
    worker = next(iter(engine.status()["workers"].values()))
    return len(worker["shaping"]) + worker["shaping_idle"]


def _provider_lines_over_reports(catcher: StatsdCatcher) -> list[str]:
    """The providers' gauge lines of the worker's stats reports: REPORTS whole ones, from
    the second to begin after the call (the first may carry changes made before it). A
    report's lines follow its `in_flight` gauge (one socket: they arrive in order)."""
    begun = len(catcher.of(IN_FLIGHT, "gauge"))
    assert catcher.wait_for(lambda: len(catcher.of(IN_FLIGHT, "gauge")) >= begun + REPORTS + 2,
                            timeout=REPORTS + 10)
    samples = catcher.samples
    marks = [i for i, s in enumerate(samples) if s.name == IN_FLIGHT]
    window = samples[marks[begun + 1]:marks[begun + 1 + REPORTS]]
    return [s.name for s in window if PROVIDER_GAUGE.match(s.name)]


def test_idle_providers_gauges_go_out_at_their_refresh_only_and_forgotten_ones_never(
        local_engine: Callable[..., LocalEngine]) -> None:
    sink = SinkServer(host="127.0.0.21")
    try:
        zone = domains_with_own_mx(DOMAINS, "127.0.0.21")
        with StatsdCatcher() as catcher, DnsServer(zone, ttl=3600) as dns:
            engine = local_engine(sink.port, route=None, extra={
                "dns": {"nameservers": ["127.0.0.1"], "port": dns.port},
                "pool": {"idle_timeout": 1},
                "shaping": {"forget_after": FORGET_AFTER},
                "tls_policy": {"mta_sts": False},
                "security": {"allowed_destinations": ["127.0.0.0/8"]},
                "statsd": {"enabled": True, "host": "127.0.0.1", "port": catcher.port,
                           "prefix": "mailengine"},
            })
            jobs = [({"id": f"g{i}", "from": "s@example.test", "to": [f"r@d{i}.test"]},
                     make_message(i, 300)) for i in range(DOMAINS)]
            assert engine.push(jobs)
            finals = final_outcomes(engine.wait_final(DOMAINS, timeout=60))
            assert {e["event"] for e in finals.values()} == {"delivered"}
            every = {f"mailengine.127_0_0_2.d{i}_test.{metric}" for i in range(DOMAINS)
                     for metric in ("allowed_rate", "suspended")}
            assert catcher.wait_for(lambda: every <= catcher.names("gauge"), timeout=5)

            held_lines = _provider_lines_over_reports(catcher)
            assert _held(engine) == DOMAINS  # all held through the window
            # Before: 2 x DOMAINS lines at every report (600 in the window). Now: refreshes
            # as they fall due, ~2 x DOMAINS / REFRESH a report, and no change (none sent).
            print(f"\nproviders' gauge lines over {REPORTS} reports, {DOMAINS} held:"
                  f" {len(held_lines)} (expected ~{2 * DOMAINS * REPORTS / REFRESH:.0f})")
            assert len(held_lines) <= 2 * DOMAINS / 4
            assert len(held_lines) == len(set(held_lines))  # none twice (no change)

            assert catcher.wait_for(lambda: _held(engine) == 0, timeout=FORGET_AFTER + 30,
                                    interval=0.25)
            forgotten_lines = _provider_lines_over_reports(catcher)
            assert forgotten_lines == []
            assert catcher.bad_lines == []
    finally:
        sink.stop()
    assert len(sink.messages) == DOMAINS
