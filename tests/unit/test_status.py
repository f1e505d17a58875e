"""engine.status.render: what `mailengine status` prints from the supervisor's figures."""
from __future__ import annotations

from typing import Any

from engine import status


def figures(**workers: dict[str, Any]) -> dict[str, Any]:
    return {"pid": 7, "in_flight": 0, "events": {"delivered": 3},
            "spool": {"jobs": 1, "rcpts_pending": 1, "rcpts_deferred": 0},
            "workers": {ip.replace("_", "."): {"alive": True, "ready": True, "pid": 9, "jobs": 0,
                                               "connections_open": 0, "restarts": 0, **w}
                        for ip, w in workers.items()}}


def test_a_sending_ip_the_host_does_not_hold_is_shown_down() -> None:
    text = status.render(figures(**{"10_0_0_2": {"ip_down": True, "ip_down_for": 12.5,
                                                 "ip_error": "sending IP 10.0.0.2 is gone"},
                                    "10_0_0_3": {"ip_down": False}}), None, 0)
    lines = text.splitlines()
    assert ("SENDING IP 10.0.0.2 DOWN for 12.5s (sending IP 10.0.0.2 is gone): no new jobs for"
            " it; its pools' mail goes to their other IPs") in lines
    rows = {line.split()[0]: line.split()[1:3] for line in lines if line.startswith("10.")}
    assert rows == {"10.0.0.2": ["yes", "NO"], "10.0.0.3": ["yes", "yes"]}


def test_nothing_is_said_while_every_ip_is_held() -> None:
    text = status.render(figures(**{"10_0_0_3": {"ip_down": False}}), None, 0)
    assert "DOWN" not in text


def test_only_the_providers_reported_are_listed_and_the_idle_ones_counted() -> None:
    """A worker holding 10,000 providers reports those with something to show; status
    lists them and says how many it left out."""
    shown = {"google": {"phase": "steady", "allowed_rate": 19.0, "limit": 20.0,
                        "connections": 2, "max_connections": 10}}
    text = status.render(figures(**{"10_0_0_2": {"shaping": shown, "shaping_idle": 9_999},
                                    "10_0_0_3": {"shaping": {}, "shaping_idle": 0}}), None, 0)
    rows = [line for line in text.splitlines() if line.startswith("10.0.0.2 ")
            and "google" in line]
    assert len(rows) == 1 and "steady" in rows[0]
    assert ("9,999 idle providers not shown (10.0.0.2 9,999): nothing sent in the last 10 s,"
            " no connection, nothing waiting, suspended, throttled or learned") in text


def test_idle_providers_are_counted_when_none_is_shown() -> None:
    text = status.render(figures(**{"10_0_0_2": {"shaping": {}, "shaping_idle": 12}}), None, 0)
    assert "shaping (per sending IP x provider)" not in text
    assert text.splitlines()[-1].startswith("12 idle providers not shown (10.0.0.2 12)")
