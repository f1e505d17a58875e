"""engine.hostcheck: whether this host holds the sending IPs, by a bind test (no packet sent),
and `mailengine check-config` refusing a config whose IP it does not hold.

Every address of 127.0.0.0/8 is held by Linux's loopback; 192.0.2.7 (TEST-NET-1) is held by
no host of the test machines: binding to it fails locally, and nothing is sent either way.
"""
from __future__ import annotations

import errno
import socket
from pathlib import Path

import pytest

from engine import cli, hostcheck
from engine.config import IpConfig

HELD, NOT_HELD = "127.0.0.2", "192.0.2.7"
NOT_HELD_LINE = ("sending IP 192.0.2.7 (ips[1]) is not an address of this host: bind failed:"
                 " Cannot assign requested address")


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


def test_an_address_of_the_loopback_is_held() -> None:
    assert hostcheck.bind_error(HELD) is None


def test_a_test_net_address_is_not_held() -> None:
    err = hostcheck.bind_error(NOT_HELD)
    assert err is not None and err.errno == errno.EADDRNOTAVAIL


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")
def test_ipv6_addresses_are_bound_in_their_own_family() -> None:
    assert hostcheck.bind_error("::1") is None
    err = hostcheck.bind_error("2001:db8::7")
    assert err is not None and err.errno == errno.EADDRNOTAVAIL


def test_problems_name_each_ip_not_held_with_its_place_in_the_config() -> None:
    ips = [IpConfig(HELD, "a.test"), IpConfig(NOT_HELD, "b.test"), IpConfig("127.0.0.3", "c")]
    assert hostcheck.problems(ips) == [NOT_HELD_LINE]
    assert hostcheck.problems(ips[::2]) == []


def test_another_bind_failure_is_said_as_it_is() -> None:
    err = OSError(errno.EACCES, "Permission denied")
    assert hostcheck.describe("192.0.2.8", err, "ips[0]") == (
        "sending IP 192.0.2.8 (ips[0]) cannot be used: bind failed: Permission denied")


def _config(tmp_path: Path, *ips: str) -> str:
    path = tmp_path / "mailengine.yaml"
    # Folders and endpoints of the test's own: only the IPs are in question here
    # (engine.startcheck checks the rest: tests/unit/test_cli_startcheck.py).
    path.write_text("hostname: mta.example.com\nips: [" + ", ".join(ips) + "]\n"
                    f"spool: {tmp_path}/spool\nrun_dir: {tmp_path}/run\n"
                    f"events_log: {tmp_path}/events.jsonl\n"
                    "ingest: inproc://ingest\nevents: inproc://events\n"
                    "control: inproc://control\n", encoding="utf-8")
    return str(path)


def test_check_config_refuses_an_ip_this_host_does_not_hold(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _config(tmp_path, HELD, NOT_HELD)
    assert cli.main(["check-config", "-c", path]) == 2
    out, err = capsys.readouterr()
    assert (out, err) == ("", f"mailengine: {NOT_HELD_LINE}\n")


def test_check_config_passes_with_every_ip_held(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["check-config", "-q", "-c", _config(tmp_path, HELD, "127.0.0.3")]) == 0
    assert capsys.readouterr() == ("", "")


def test_check_config_for_another_machine_skips_the_host_check(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _config(tmp_path, NOT_HELD)
    assert cli.main(["check-config", "-q", "--no-host-check", "-c", path]) == 0
    assert capsys.readouterr() == ("", "")
