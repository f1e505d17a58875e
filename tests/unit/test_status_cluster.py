"""engine.status_cluster: the cluster's figures in the text of `mailengine status` (one
host: its link to Redis, each cluster limit and the worker's part) and of `status
--cluster` (each host's link, each host's part of every limit)."""
from __future__ import annotations

import re
from typing import Any

from engine import clusterview, status

YAHOO = {"phase": "steady", "allowed_rate": 50.0, "current_rate": 40.0,
         "cluster_rate": 300, "members": 3, "share": 100.0, "mode": "shared", "leased": 12,
         "lost": 0, "cluster_hourly": 500_000, "hourly_left": 4_120, "hourly_members": 3,
         "hourly_held": 40, "cluster_connections": 40, "slots_held": 2, "cluster_open": 17,
         "connection_share": 14, "connection_members": 3,
         "pools": {"bulk": {"cluster_rate": 100, "members": 2, "leased": 3}},
         "followed": 0, "seeded": None}


def figures(cluster: dict[str, Any] | None, **workers: dict[str, Any]) -> dict[str, Any]:
    return {"pid": 7, "in_flight": 0, "events": {"delivered": 3},
            "spool": {"jobs": 1, "rcpts_pending": 1, "rcpts_deferred": 0},
            "workers": {ip.replace("_", "."): {"alive": True, "ready": True, "pid": 9, "jobs": 0,
                                               "connections_open": 0, "restarts": 0, **w}
                        for ip, w in workers.items()},
            **({"cluster": cluster} if cluster is not None else {})}


def cells(line: str) -> list[str]:
    return re.split(r"\s{2,}", line.strip())


def block_after(lines: list[str], heading: str) -> list[list[str]]:
    """The rows of the table whose heading line starts with `heading` (its column line
    skipped), up to the next empty line."""
    start = next(i for i, line in enumerate(lines) if line.startswith(heading)) + 2
    rows = []
    for line in lines[start:]:
        if not line:
            break
        rows.append(cells(line))
    return rows


def test_status_shows_the_link_to_redis_and_each_cluster_limit_with_the_workers_part() -> None:
    fallen = {**YAHOO, "mode": "fallback", "share": 150.0, "leased": 0,
              "pools": {}, "cluster_connections": 40, "slots_held": 1, "connection_share": 20}
    text = status.render(figures({"host": "mta-a", "mode": "shared"},
                                 **{"10_0_0_2": {"shaping": {"yahoo": YAHOO},
                                                 "cluster_mode": "shared"},
                                    "10_0_0_3": {"shaping": {"yahoo": fallen},
                                                 "cluster_mode": "fallback"}}), None, 0)
    lines = text.splitlines()
    assert "cluster: host mta-a; Redis shared (supervisor), workers: 1 FALLBACK, 1 shared" \
        in lines
    assert block_after(lines, "cluster limits") == [
        ["10.0.0.2", "yahoo", "rate 300/s", "share 100.0/s, 12 turns leased", "3"],
        ["10.0.0.2", "yahoo", "hourly 500,000", "4,120 left, 40 held", "3"],
        ["10.0.0.2", "yahoo", "connections 40", "2 held, share 14 (17 open in all)", "3"],
        ["10.0.0.2", "yahoo/bulk", "rate 100/s", "3 turns leased", "2"],
        ["10.0.0.3", "yahoo", "rate 300/s", "share 150.0/s, 0 turns leased, FALLBACK", "3"],
        ["10.0.0.3", "yahoo", "hourly 500,000", "4,120 left, 40 held", "3"],
        ["10.0.0.3", "yahoo", "connections 40",
         "1 held, share 20 (17 open in all), FALLBACK", "3"]]


def test_a_cluster_host_with_no_cluster_limit_shown_says_its_link_alone() -> None:
    text = status.render(figures({"host": "mta-b", "mode": "fallback"},
                                 **{"10_0_0_2": {"cluster_mode": "fallback"}}), None, 0)
    lines = text.splitlines()
    assert lines[-1] == "cluster: host mta-b; Redis FALLBACK (supervisor), workers: 1 FALLBACK"
    assert not any(line.startswith("cluster limits") for line in lines)


def test_a_host_without_a_cluster_shows_nothing_of_it() -> None:
    text = status.render(figures(None, **{"10_0_0_2": {"shaping": {
        "google": {"phase": "steady", "allowed_rate": 19.0}}}}), None, 0)
    assert "cluster" not in text and "Redis" not in text


def test_status_of_the_cluster_shows_each_hosts_link_and_part_of_every_limit() -> None:
    a = figures({"host": "mta-a", "mode": "shared"},
                **{"10_0_0_2": {"shaping": {"yahoo": YAHOO}, "cluster_mode": "shared"},
                   "10_0_0_3": {"shaping": {"yahoo": YAHOO}, "cluster_mode": "shared"}})
    b = figures({"host": "mta-b", "mode": "shared"},
                **{"10_0_0_4": {"shaping": {"yahoo": {**YAHOO, "mode": "fallback"}},
                                "cluster_mode": "fallback"},
                   "10_0_0_5": {"shaping": {}, "cluster_mode": "shared"}})
    answers = [clusterview.Answer("mta-a", "ipc://a", a), clusterview.Answer("mta-b", "ipc://b", b),
               clusterview.Answer("mta-c", "tcp://10.0.0.9:5572", error="no answer")]
    lines = clusterview.render_status(answers).splitlines()
    start = lines.index("redis: mta-a shared, mta-b shared (1 of 2 workers FALLBACK)")
    assert lines[start + 1:] == [
        "yahoo connections 40: mta-a 4 slots held; mta-b 2 slots held",
        "yahoo hourly 500,000: mta-a 80 held; mta-b 40 held",
        "yahoo rate 300/s: mta-a share 200.0/s, 24 leased; mta-b share 100.0/s, 12 leased"]
    assert lines[start - 1] == "" and lines[start - 2] == "mta-c: no answer"


def test_status_of_a_cluster_without_redis_shows_no_block() -> None:
    answers = [clusterview.Answer("mta-a", "ipc://a", figures(None, **{"10_0_0_2": {}}))]
    assert "redis" not in clusterview.render_status(answers)
