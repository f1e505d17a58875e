"""engine.sendingip: a worker's sending IP, held or down as bind tests find it, tested again
on its own schedule, and what the worker's stats frame says of it."""
from __future__ import annotations

import errno

from engine import sendingip
from engine.sendingip import SendingIp

GONE = OSError(errno.EADDRNOTAVAIL, "Cannot assign requested address")
DOWN_LINE = ("sending IP 192.0.2.7 is not an address of this host: bind failed:"
             " Cannot assign requested address")


class Host:
    """The host's addresses as the bind test sees them, and a clock."""

    def __init__(self) -> None:
        self.holds = True
        self.now = 100.0
        self.tests = 0

    def bind_error(self, address: str) -> OSError | None:
        self.tests += 1
        return None if self.holds else GONE

    def clock(self) -> float:
        return self.now


def watch(host: Host) -> tuple[SendingIp, list[bool]]:
    ip = SendingIp("192.0.2.7", host.clock, host.bind_error)
    changes: list[bool] = []
    ip.on_change = lambda changed: changes.append(changed.down)
    return ip, changes


def test_a_failed_bind_test_puts_the_ip_down_and_a_good_one_back_up() -> None:
    host = Host()
    ip, changes = watch(host)
    assert not ip.check() and ip.figures() == {"ip_down": False}
    host.holds = False
    host.now += 5
    assert ip.check() and ip.check()  # told once, however often found
    host.now += 3
    assert ip.figures() == {"ip_down": True, "ip_error": DOWN_LINE, "ip_down_for": 3.0}
    host.holds = True
    assert not ip.check()
    assert changes == [True, False] and ip.error is None


def test_tested_every_second_while_down_and_every_ten_while_held() -> None:
    host = Host()
    ip, changes = watch(host)
    host.now += sendingip.UP_RECHECK - 0.1
    ip.check_due()
    assert host.tests == 0
    host.holds = False
    host.now += 0.1
    ip.check_due()
    assert host.tests == 1 and ip.down
    host.now += sendingip.DOWN_RECHECK - 0.1
    ip.check_due()
    assert host.tests == 1
    host.holds = True
    host.now += 0.1
    ip.check_due()
    assert host.tests == 2 and not ip.down and changes == [True, False]
