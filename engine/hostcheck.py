"""Whether this host holds the configured sending IPs: a bind test, no packet sent.

A worker binds every outbound connection to its sending IP, and the kernel refuses to
bind to an address no interface of the host has (EADDRNOTAVAIL). Found at the first
connect, that used to defer every message for days with nothing said at warning level;
found here, `mailengine check-config` and `mailengine run` refuse the config instead
(exit status 2), and a reload refuses the new IP (engine.workers). A worker whose IP
goes away at run time finds out the same way (engine.sendingip).

Kept out of config loading on purpose: a config is valid or not whatever host reads it
(tests, a build machine); whether this host can send from it is a separate question.
Imported by both sides: it needs nothing but the standard library's socket.
"""
from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import Sequence

from engine.config import IpConfig


def bind_error(address: str) -> OSError | None:
    """Bind a TCP socket to `address`, port 0, and close it: None when the host holds the
    address, else the error (EADDRNOTAVAIL: no interface has it). Nothing is sent."""
    family = socket.AF_INET6 if ipaddress.ip_address(address).version == 6 \
        else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.bind((address, 0))
    except OSError as err:
        return err
    return None


def describe(address: str, err: OSError, where: str = "") -> str:
    """One line for an operator: which IP, and why it cannot be sent from."""
    named = f"sending IP {address}" + (f" ({where})" if where else "")
    reason = err.strerror or str(err)
    if err.errno == errno.EADDRNOTAVAIL:
        return f"{named} is not an address of this host: bind failed: {reason}"
    return f"{named} cannot be used: bind failed: {reason}"


def problems(ips: Sequence[IpConfig]) -> list[str]:
    """A line per configured sending IP this host cannot send from (empty: all good)."""
    found = []
    for index, ip in enumerate(ips):
        err = bind_error(ip.address)
        if err is not None:
            found.append(describe(ip.address, err, f"ips[{index}]"))
    return found
