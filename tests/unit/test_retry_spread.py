"""A deferral window ending for 100k recipients: their retries are spread over time, not
all due in one second (issue #19's thundering herd). Recorded through the real path (a
worker's deferral planned by engine.results with the config's jitter, written by
engine.spool), with a fixed clock; then the spool's `due` asked second by second."""
from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest

from engine import results
from engine.config.schema import RetryConfig
from engine.dispatch import InFlight
from engine.job import Job
from engine.protocol import Attempt, Status
from engine.reply import Reply
from engine.spool import Spool

N = 100_000
NOW = 1_800_000_000.0
SCHEDULE = (3600.0,)  # a provider deferring everything: back in an hour
LATER = Reply(451, "4.7.1", "try later")
BATCH = 500  # results recorded per transaction (engine.results' RESULTS_GROUP)


def _defer_all(spool: Spool, jitter: float) -> None:
    """N one-recipient jobs accepted at NOW, all deferred at NOW by one provider."""
    rand = random.Random(19).random
    for start in range(0, N, 1000):
        spool.accept([Job(id=f"j{i}", sender="s@example.com", rcpts=(f"r{i}@d{i % 1000}.test",),
                          message=b"Subject: x\r\n\r\nx\r\n") for i in range(start, start + 1000)],
                     NOW, 5 * 86400.0)
    for start in range(0, N, BATCH):
        updates = []
        for i in range(start, start + BATCH):
            rcpt = f"r{i}@d{i % 1000}.test"
            flight = InFlight("127.0.0.2", {}, NOW, NOW + 5 * 86400.0, {rcpt: 0})
            tried = Attempt(job_id=f"j{i}", rcpt=rcpt, status=Status.DEFERRED, reply=LATER,
                            ip="127.0.0.2", ts=NOW)
            update, _ = results.plan(tried, flight, NOW, SCHEDULE, jitter=jitter, rand=rand)
            assert update is not None and update.next_attempt is not None
            updates.append(update)
        spool.record(updates, NOW)


@pytest.mark.timeout(60)
def test_a_window_ending_for_100k_recipients_comes_due_spread_over_time(tmp_path: Path) -> None:
    jitter = RetryConfig().jitter  # the default a config without `retry.jitter` gets
    assert jitter > 0
    with Spool(str(tmp_path / "spool")) as spool:
        _defer_all(spool, jitter)
        times = [at for (at,) in spool.query(
            "SELECT next_attempt FROM rcpts WHERE status = 'pending'")]
        assert len(times) == N
        low, high = NOW + 3600 * (1 - jitter), NOW + 3600 * (1 + jitter)
        assert all(low <= at <= high for at in times)
        # 100k over a window of 2 x 360 s: ~140 a second; no second holds more than 0.5%.
        buckets = Counter(int(at) for at in times)
        assert max(buckets.values()) <= N * 0.005, buckets.most_common(3)
        assert len(buckets) >= 700  # spread over (nearly) every second of the window
        # The spool hands them out as they come due: from the window's start, each second
        # adds only what came due in it.
        taken: set[str] = set()
        for now in range(int(low), int(low) + 30):
            fresh = spool.due(float(now), N, skip=taken)
            taken.update(p.job.id for p in fresh)
            assert len(fresh) <= N * 0.005
            assert len(taken) == sum(1 for at in times if at <= now)
        assert 0 < len(taken) < N * 0.1  # 30 s into a 720 s window: a small part of it


@pytest.mark.timeout(60)
def test_without_jitter_the_same_window_comes_due_in_one_second(tmp_path: Path) -> None:
    """The check above can fail: with no jitter every retry is due in the same second."""
    with Spool(str(tmp_path / "spool")) as spool:
        _defer_all(spool, 0.0)
        buckets = Counter(int(at) for (at,) in spool.query(
            "SELECT next_attempt FROM rcpts WHERE status = 'pending'"))
        assert buckets == {int(NOW + 3600): N}
        assert len(spool.due(NOW + 3600, N)) == N
