"""A stand-in for systemd's notify socket: a real AF_UNIX datagram socket that reads what a
service sends to $NOTIFY_SOCKET, with the sender's pid as the kernel gives it (SO_PASSCRED),
the way systemd tells the main process (`NotifyAccess=main`) from its children."""
from __future__ import annotations

import os
import socket
import struct
import time
from dataclasses import dataclass

_UCRED = struct.Struct("iII")  # pid, uid, gid


@dataclass(frozen=True)
class Notice:
    pid: int
    fields: dict[str, str]
    at: float  # time.monotonic() when read

    def __contains__(self, assignment: str) -> bool:
        key, _, value = assignment.partition("=")
        return self.fields.get(key) == value


class NotifySocket:
    """Bound at `path` (a file path, or `@name` for the abstract namespace)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind("\0" + path[1:] if path.startswith("@") else path)

    def receive(self, timeout: float) -> Notice | None:
        """The next message, None if none came within `timeout` seconds (0: only one
        already queued; a local datagram is queued when its sendto returns)."""
        self.sock.settimeout(max(timeout, 0.0))  # 0.0: non-blocking
        try:
            data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(_UCRED.size))
        except (BlockingIOError, TimeoutError):
            return None
        pid = next(_UCRED.unpack(cdata[:_UCRED.size])[0]
                   for level, kind, cdata in ancillary
                   if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS)
        fields = dict(line.partition("=")[::2] for line in data.decode().split("\n") if line)
        return Notice(pid, fields, time.monotonic())

    def until(self, assignment: str, timeout: float) -> list[Notice]:
        """Every message up to and including the first with `assignment` (e.g. READY=1);
        AssertionError, with what came, if it does not come within `timeout` seconds."""
        seen: list[Notice] = []
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            notice = self.receive(left)
            if notice is None:
                break
            seen.append(notice)
            if assignment in notice:
                return seen
        raise AssertionError(f"no {assignment} within {timeout}s; got {seen}")

    def close(self) -> None:
        self.sock.close()
        if not self.path.startswith("@"):
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
