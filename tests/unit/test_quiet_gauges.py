"""engine.quiet_gauges as the worker uses it: the providers' gauges of an engine.shaping.Shaping
on a fake clock, reported every (fake) second through a real, batched engine.metrics.Metrics
to a real StatsD socket (tests/support/statsd_catcher.py). Each provider's gauges go out at
its first report, then at the report after a change, and otherwise once per REFRESH, at the
provider's own point of the cycle: with many providers held unchanged the lines and packets a
second stay near N / REFRESH. A forgotten provider is no longer sent. A report looks only at
the active providers (engine.shaping) and at those whose refresh may be due, not at all held.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import pytest

from engine.config import ShapingConfig
from engine.metrics import Metrics, provider_segment
from engine.quiet_gauges import REFRESH, SLOTS, QuietGauges, Row
from engine.shaping import PROVIDER_GAUGES, Shaping, ShapingPlan
from tests.support.shaping import UNPACED, FakeTime
from tests.support.statsd_catcher import Sample, StatsdCatcher

pytestmark = pytest.mark.timeout(60)

IP = "192.0.2.10"
FORGET_AFTER = 300.0
PLAN = ShapingPlan(ip=IP, shaping=ShapingConfig(max_wait=0.0, forget_after=FORGET_AFTER),
                   throttle=UNPACED)


def held(rows: Sequence[Row]) -> Callable[[str], Sequence[float] | None]:
    """The providers' values now, as the worker's Shaping.gauges_of gives them."""
    return dict(rows).get


def gauge_name(provider: str, metric: str) -> str:
    return f"mailengine.192_0_2_10.{provider_segment(provider)}.{metric}"


@dataclass
class Report:
    """What one report put on the wire."""
    samples: list[Sample]
    packets: int

    def names(self) -> list[str]:
        return [s.name for s in self.samples]


class Reporter:
    """The worker's stats loop on a fake clock: a second passes, the gauges are reported,
    the batch is sent, and what arrived at the StatsD socket is returned."""

    def __init__(self, catcher: StatsdCatcher) -> None:
        self.catcher = catcher
        self.time = FakeTime()
        self.shaping = Shaping(PLAN, None, self.time.clock, self.time.clock)
        self.metrics = Metrics.create("127.0.0.1", catcher.port, "mailengine", IP)
        self.metrics.batched()  # as the worker: packed, sent at flush()
        self.gauges = QuietGauges(self.metrics, PROVIDER_GAUGES, clock=self.time.clock)

    def second(self) -> Report:
        self.time.now += 1.0
        seen, packets = len(self.catcher.samples), self.catcher.packets
        self.gauges.report(self.shaping.active_gauges(), self.shaping.gauges_of)
        self.metrics.flush()
        self.catcher.sync()
        return Report(self.catcher.samples[seen:], self.catcher.packets - packets)

    def forget_idle(self) -> list[str]:
        """The worker's reaper: the providers idle long enough forgotten, here too."""
        forgotten = self.shaping.forget_idle()
        self.gauges.forget(forgotten)
        return forgotten

    def close(self) -> None:
        self.metrics.close()
        self.shaping.close()


@pytest.fixture
def reporter() -> Iterator[Reporter]:
    with StatsdCatcher() as catcher:
        reporter = Reporter(catcher)
        yield reporter
        reporter.close()
        assert catcher.bad_lines == []
        assert catcher.dropped in (0, None)


def hold_providers(reporter: Reporter, count: int) -> list[str]:
    providers = [f"d{i}.test" for i in range(count)]
    for provider in providers:
        reporter.shaping.get(provider)  # a message asked for a turn: its shaper is held
    return providers


def test_many_providers_held_unchanged_cost_about_n_over_refresh_a_second(reporter):
    count = 1200
    hold_providers(reporter, count)
    first = reporter.second()
    assert len(first.samples) == 2 * count  # each gauge once, at once
    # Before: every gauge every second, 2,400 lines (~240 packets) a second, for ever.
    seconds = [reporter.second() for _ in range(2 * int(REFRESH))]
    lines = [len(report.samples) for report in seconds]
    packets = [report.packets for report in seconds]
    average = 2 * count / REFRESH  # 40 lines a second
    print(f"\nlines a second: min {min(lines)}, max {max(lines)} (average {average:.0f});"
          f" packets a second: max {max(packets)}")
    assert max(lines) <= 2 * average  # spread over the cycle: never a burst of them all
    assert max(packets) <= 2 * average / 5  # packed: several lines per packet
    # Every gauge refreshed exactly once in each cycle of REFRESH reports, values unchanged.
    for cycle in (seconds[:int(REFRESH)], seconds[int(REFRESH):]):
        names = [name for report in cycle for name in report.names()]
        assert len(names) == len(set(names)) == 2 * count
    assert {s.number for s in first.samples} == {0.0}  # no limit, not suspended
    assert {s.number for report in seconds for s in report.samples} == {0.0}


def test_a_changed_value_goes_out_at_the_next_report_and_only_it(reporter):
    providers = hold_providers(reporter, 300)
    reporter.second()
    held = providers[7]
    reporter.shaping.hold(held, 600)  # the operator's suspension: `suspended` becomes 1
    report = reporter.second()
    suspended = [s for s in report.samples if s.name == gauge_name(held, "suspended")]
    assert [s.number for s in suspended] == [1]
    # Beside the change: only refreshes due (each provider's both gauges), no more.
    others = [s.name for s in report.samples if s not in suspended]
    assert len(others) <= 2 * 2 * 300 / REFRESH
    assert reporter.catcher.gauge(gauge_name(held, "suspended")) == 1
    # Unchanged, it is not sent again until its refresh...
    quiet = [reporter.second() for _ in range(5)]
    sent_again = [n for r in quiet for n in r.names() if n == gauge_name(held, "suspended")]
    assert len(sent_again) <= 1
    # ...and the release goes out at once.
    reporter.shaping.hold(held, 0)
    assert gauge_name(held, "suspended") in reporter.second().names()
    assert reporter.catcher.gauge(gauge_name(held, "suspended")) == 0


def test_a_provider_active_then_idle_again_is_refreshed_once_a_cycle(reporter):
    """Suspended for 5 s: its `suspended` goes out at 1, then at 0 when the suspension
    ends with time alone; idle again, both its gauges once in every cycle."""
    providers = hold_providers(reporter, 300)
    reporter.second()
    busy = providers[3]
    reporter.shaping.hold(busy, 5)
    during = [s.number for _ in range(8) for s in reporter.second().samples
              if s.name == gauge_name(busy, "suspended")]
    assert during[:1] == [1] and during[-1] == 0
    assert reporter.shaping.active_gauges() == []  # left the active set: idle
    seconds = [reporter.second() for _ in range(2 * int(REFRESH))]
    for cycle in (seconds[:int(REFRESH)], seconds[int(REFRESH):]):
        sent = [n for report in cycle for n in report.names() if n.startswith(
            gauge_name(busy, ""))]
        assert sorted(sent) == [gauge_name(busy, m) for m in sorted(PROVIDER_GAUGES)]
    assert reporter.catcher.gauge(gauge_name(busy, "suspended")) == 0


def test_a_forgotten_provider_is_no_longer_sent_and_made_anew_is_sent_at_once(reporter):
    providers = hold_providers(reporter, 200)
    kept = providers[0]
    reporter.second()
    reporter.shaping.hold(kept, 3600)  # suspended: engine.shaping_idle keeps it
    reporter.time.now += FORGET_AFTER
    assert len(reporter.forget_idle()) == 199
    assert reporter.shaping.providers == 1
    later = [reporter.second() for _ in range(2 * int(REFRESH) + 1)]
    sent = {name for report in later for name in report.names()}
    assert sent == {gauge_name(kept, metric) for metric in PROVIDER_GAUGES}  # refreshed
    assert reporter.gauges.providers == 1
    # Mail for a forgotten one again: its shaper is made anew, its gauges sent at once.
    again = providers[5]
    reporter.shaping.get(again)
    assert {gauge_name(again, m) for m in PROVIDER_GAUGES} <= set(reporter.second().names())


def test_refreshes_are_due_at_each_providers_own_point_of_the_cycle():
    """Each provider once per cycle, the providers' points spread over it (no second
    refreshes more than a few times the average)."""
    time = FakeTime(0.0)
    gauges = QuietGauges(Metrics(None, IP), PROVIDER_GAUGES, clock=time.clock)
    rows = [(f"p{i}.test", (0.0, 0)) for i in range(600)]
    assert gauges.report(rows, held(rows)) == 1200
    due_at: dict[int, int] = {}
    for second in range(1, int(REFRESH) + 1):
        time.now = float(second)
        due_at[second] = gauges.report([], held(rows)) // 2
    assert sum(due_at.values()) == 600
    assert max(due_at.values()) <= 3 * 600 / REFRESH
    assert sum(1 for n in due_at.values() if n) >= REFRESH * 0.8


@dataclass
class Lookups:
    """Shaping.gauges_of over `rows`, counting the providers looked up."""
    rows: dict[str, Sequence[float]]
    count: int = 0

    def __call__(self, provider: str) -> Sequence[float] | None:
        self.count += 1
        return self.rows.get(provider)


@dataclass
class Recorder:
    """A StatsD client that keeps the gauges it is given."""
    lines: list[tuple[str, float]] = field(default_factory=list)

    def gauge(self, name: str, value: float) -> None:
        self.lines.append((name, value))


def test_a_report_without_changes_looks_up_only_the_refreshes_due():
    """6,000 providers held unchanged: a report looks up about N / REFRESH of them, each
    once per cycle. Before, every report was given every provider's row."""
    time = FakeTime(0.0)
    gauges = QuietGauges(Metrics(None, IP), PROVIDER_GAUGES, clock=time.clock)
    rows = [(f"p{i}.test", (0.0, 0)) for i in range(6_000)]
    lookups = Lookups(dict(rows))
    assert gauges.report(rows, lookups) == 12_000
    looked = []
    for second in range(1, int(REFRESH) + 1):
        time.now = float(second)
        before = lookups.count
        gauges.report([], lookups)
        looked.append(lookups.count - before)
    assert sum(looked) == 6_000
    assert max(looked) <= 3 * 6_000 / REFRESH


def test_the_wheel_finds_the_refreshes_a_look_at_every_provider_would_at_any_report_times():
    """Given no rows, each report sends exactly what a report given every provider's row
    (the way before: all looked at) sends, whatever the time between reports: a fraction of
    a second, late ones, one nearly a whole cycle late (it ends in the slot it began in: the
    wheel is gone all round), more than a cycle."""
    time = FakeTime(1_000.0)
    everyone, wheel = Recorder(), Recorder()
    looks_at_all = QuietGauges(Metrics(everyone, IP), PROVIDER_GAUGES, clock=time.clock)
    turns = QuietGauges(Metrics(wheel, IP), PROVIDER_GAUGES, clock=time.clock)
    rows = [(f"p{i}.test", (0.0, 0)) for i in range(600)]
    looks_at_all.report(rows, held(rows))
    turns.report(rows, held(rows))
    steps = [1.0] * 30 + [0.3, 2.7, 0.5, REFRESH - 0.05, 1.0, REFRESH - REFRESH / SLOTS,
                          0.01, REFRESH + 1, 30.0, 45.0, 2 * REFRESH - 0.1, 1.0]
    for step in steps * 3:
        time.now += step
        before_all, before_wheel = len(everyone.lines), len(wheel.lines)
        looks_at_all.report(rows, held(rows))
        turns.report([], held(rows))
        assert sorted(wheel.lines[before_wheel:]) == sorted(everyone.lines[before_all:]), step
    assert len(wheel.lines) > 3 * 2 * 600


def test_a_provider_no_longer_held_is_dropped_at_its_refresh_unsent():
    """`values` says None (forgotten, and `forget` not called): nothing sent for it."""
    time = FakeTime(0.0)
    recorder = Recorder()
    gauges = QuietGauges(Metrics(recorder, IP), PROVIDER_GAUGES, clock=time.clock)
    rows = [(f"p{i}.test", (0.0, 0)) for i in range(100)]
    gauges.report(rows, held(rows))
    kept = rows[1:]
    sent = len(recorder.lines)
    for second in range(1, int(REFRESH) + 2):
        time.now = float(second)
        gauges.report([], held(kept))
    assert gauges.providers == 99
    assert {name for name, _ in recorder.lines[sent:]} == {
        gauge_name(provider, metric).replace("mailengine.", "", 1)
        for provider, _ in kept for metric in PROVIDER_GAUGES}
