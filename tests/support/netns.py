"""A network namespace of the test's own, for what cannot be done to the host's network: an
address added to its loopback and removed again under a running engine.

`Netns` creates the namespace (`ip netns add`, root only) with its loopback up, runs `ip`
commands in it, writes a `python` wrapper that starts an interpreter inside it (for
LocalEngine's `python=`: the engine and its workers run there), and lets this process create
sockets there (`entered`: a test server's listening socket, a StatsD catcher), which stay in
the namespace whatever thread then serves them. Deleted at `close`; the host's own
interfaces are never touched. Unix-domain sockets (the engine's ipc endpoints) are paths in
the file system: the test reaches them from outside the namespace as usual.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Self

CLONE_NEWNET = 0x40000000
_count = 0


def unusable() -> str | None:
    """Why namespaces cannot be made here (not root, no `ip`, refused), or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2)"
    try:
        with Netns():
            pass
    except (OSError, subprocess.CalledProcessError) as err:
        return f"cannot make a network namespace: {err}"
    return None


class Netns:
    """One network namespace, its loopback up; deleted on exit."""

    def __init__(self) -> None:
        global _count
        _count += 1
        self.name = f"me-test-{os.getpid()}-{_count}"
        subprocess.run(["ip", "netns", "add", self.name], check=True, capture_output=True,
                       timeout=10)
        try:
            self.ip("link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise

    def ip(self, *args: str) -> None:
        """`ip -n <name> ARGS...`, e.g. `ip("addr", "add", "10.254.0.2/32", "dev", "lo")`."""
        subprocess.run(["ip", "-n", self.name, *args], check=True, capture_output=True,
                       timeout=10)

    def python(self, folder: Path) -> str:
        """A script that runs this interpreter inside the namespace (its arguments passed on)."""
        path = folder / f"python-in-{self.name}"
        path.write_text(f'#!/bin/sh\nexec ip netns exec {self.name} {sys.executable} "$@"\n',
                        encoding="utf-8")
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
        return str(path)

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """This thread inside the namespace meanwhile: the sockets it creates belong there."""
        libc = ctypes.CDLL(None, use_errno=True)
        with open("/proc/thread-self/ns/net", "rb") as home, \
                open(f"/run/netns/{self.name}", "rb") as there:
            if libc.setns(there.fileno(), CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns into the test's network namespace")
            try:
                yield
            finally:
                if libc.setns(home.fileno(), CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns back to the host's namespace")

    def close(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=10)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
