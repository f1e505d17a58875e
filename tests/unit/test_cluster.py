"""engine.cluster without a Redis: the mode when none is configured, and what a log line
shows of a Redis URL (never its password). Against a real Redis:
tests/conversation/test_cluster.py."""
from __future__ import annotations

import pytest

from engine.cluster import OFF, Cluster, shown
from engine.config import ClusterConfig


@pytest.mark.parametrize("url, expected", [
    ("redis://10.0.0.5:6379/0", "redis://10.0.0.5:6379/0"),
    ("redis://:s3cret@10.0.0.5:6379/0", "redis://:***@10.0.0.5:6379/0"),
    ("rediss://user:s3cret@redis.example/1", "rediss://user:***@redis.example/1"),
    ("unix:///run/redis/redis.sock", "unix:///run/redis/redis.sock"),
])
def test_a_redis_url_is_shown_without_its_password(url: str, expected: str) -> None:
    assert shown(url) == expected


def test_no_redis_configured_is_off_and_asks_nothing() -> None:
    link = Cluster(ClusterConfig(), "mx-1.example")
    asked: list[object] = []
    assert (link.mode, link.enabled, link.host) == (OFF, False, "mx-1.example")
    assert link.run("dedup", asked.append) is None and asked == []


def test_keys_are_under_the_prefix_and_the_host_name_wins_over_the_hostname() -> None:
    link = Cluster(ClusterConfig(host="mta-a", prefix="mail:out"), "mx-1.example")
    assert link.host == "mta-a"
    assert link.key("job", "j-1") == "mail:out:job:j-1"
