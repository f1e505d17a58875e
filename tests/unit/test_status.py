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
