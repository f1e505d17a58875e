"""The cluster benchmark's figures (bench/cluster.py): the busiest and quietest windows of a
phase, its rates and shares, the copies delivered twice, and the section drawn from a row."""
from __future__ import annotations

import copy
from typing import Any

from bench.cluster import (
    HEADING,
    IPS,
    PHASES,
    copies_twice,
    phase_rates,
    render,
    verdicts,
    window_extremes,
)


def test_a_steady_rate_has_the_same_busiest_and_quietest_window() -> None:
    times = [i / 8 for i in range(80)]  # 8/s for 10 s (times exact in binary)
    assert window_extremes(times, 0.0, 10.0, 5.0) == (40, 40)


def test_the_busiest_window_starts_at_an_event_and_the_quietest_just_past_one() -> None:
    # 1/s, with a burst of 10 at 4.5 s: a window [4.5, 9.5) holds it and 5 of the others
    times = sorted([float(i) for i in range(20)] + [4.5] * 10)
    busiest, quietest = window_extremes(times, 0.0, 20.0, 5.0) or (0, 0)
    assert busiest == 15
    assert quietest == 5  # past the burst: (4.5, 9.5] holds 5, 6, 7, 8, 9
    assert window_extremes(times, 10.0, 20.0, 5.0) == (5, 5)


def test_a_gap_is_the_quietest_window_and_windows_stay_within_the_phase() -> None:
    times = [float(i) for i in range(10)] + [float(i) for i in range(14, 20)]
    assert window_extremes(times, 0.0, 20.0, 5.0) == (5, 1)  # (9, 14] holds 14 alone
    # events outside [start, end) never count, whatever the window
    assert window_extremes([0.0] * 50 + [30.0] * 50, 10.0, 20.0, 5.0) == (0, 0)


def test_a_phase_shorter_than_a_window_has_none() -> None:
    assert window_extremes([1.0, 2.0], 0.0, 4.9, 5.0) is None
    assert window_extremes([], 0.0, 5.0, 5.0) == (0, 0)


def test_a_phases_rates_count_from_its_settling_on_and_share_per_sender() -> None:
    accepts = {IPS[0]: [i / 16 for i in range(160)],  # 16/s for 10 s (times exact in binary)
               IPS[1]: [i / 32 for i in range(320)],  # 32/s
               IPS[2]: [100.0]}  # outside
    rates = phase_rates(accepts, 0.0, 10.0, settle=2.0, window=5.0)
    assert rates["seconds"] == 8.0 and rates["messages"] == 384
    assert rates["average"] == 48.0 and rates["busiest"] == rates["quietest"] == 48.0
    assert rates["share"] == {IPS[0]: 0.333, IPS[1]: 0.667, IPS[2]: 0.0}
    assert phase_rates({ip: [] for ip in IPS}, 0.0, 3.0, settle=2.0)["busiest"] is None


def test_copies_twice_are_the_copies_after_each_recipients_first_when_they_came() -> None:
    arrivals = [(3.0, "a"), (1.0, "a"), (2.0, "b"), (5.0, "a"), (4.0, "c")]
    assert copies_twice(arrivals) == [(3.0, "a"), (5.0, "a")]
    assert copies_twice([]) == []


def a_row() -> dict[str, Any]:
    phase = {"seconds": 28.0, "messages": 1680, "average": 60.0, "busiest": 60.2,
             "quietest": 59.8, "share": dict.fromkeys(IPS, 0.333), "refusals": 0, "twice": 0,
             "twice_unflagged": 0, "leases_per_message": 0.21,
             "redis_commands_per_message": 2.5, "redis_commands": {"evalsha": 300, "get": 60}}
    phases = {name: copy.deepcopy(phase) for name in PHASES}
    phases["redis killed"].update(redis_commands_per_message=None, leases_per_message=0.0)
    del phases["redis killed"]["redis_commands"]
    phases["engine killed"]["pushed"] = {"jobs": 600, "acknowledged": 600, "lost": 0,
                                         "by_host": {"host0": 0, "host1": 300, "host2": 300}}
    return {"limit": 60, "window": 5.0, "settle": 2.0, "phases": phases,
            "duplicate_acknowledged": True, "resent_delivered": 1,
            "shared_again_s": {"host0.127_0_0_2": 0.4, "host1.127_0_0_3": 0.3,
                               "host2.127_0_0_4": 0.5}, "drain_s": 12.0,
            "host0_restarted_delivered": 400, "twice": 0, "twice_unflagged": 0, "lost": 0,
            "refusals": 0, "other_load": 0.25,
            "command": "python -m bench.cluster --label x --docs", "engine": "abc",
            "date": "2026-12-07 01:00 UTC"}


def test_every_must_show_check_passes_on_a_row_that_meets_them() -> None:
    assert all(ok for _, ok in verdicts(a_row()))


def test_a_refusal_a_slow_return_or_a_loss_fails_its_check() -> None:
    for change in ({"lost": 2}, {"resent_delivered": 2},
                   {"shared_again_s": {"host0.127_0_0_2": 11.0}}):
        row = a_row() | change
        failed = [text for text, ok in verdicts(row) if not ok]
        assert len(failed) == 1, (change, failed)
    row = a_row()
    row["phases"]["shared"]["busiest"] = 63.2
    assert [text for text, ok in verdicts(row) if not ok] == ["shared: busiest 5 s <= 63/s"]
    row = a_row()
    row["phases"]["shared"]["refusals"] = 1
    assert [text for text, ok in verdicts(row) if not ok] == ["shared: no refusal"]


def test_the_section_has_its_heading_a_row_per_phase_and_the_command_without_bookkeeping(
        ) -> None:
    text = render({"x": a_row()})
    assert text.startswith(HEADING + "\n")
    assert '<a id="bench-cluster"></a>' in text
    assert "**x**: `python -m bench.cluster`, engine `abc`" in text  # no --label, no --docs
    for name in PHASES:
        assert f"\n| {name} | 28 | 60.0 | 60.2 | 59.8 | 33% / 33% / 33% | 0 | 0 (0) |" in text
    assert "| 600 (0 / 300 / 300), 0 lost |" in text
    assert "- (no Redis)" in text
    assert "**no**" not in text
