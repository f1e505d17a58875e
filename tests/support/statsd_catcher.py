"""A real StatsD listener for tests: a UDP socket on loopback that records every metric line.

``StatsdCatcher()`` binds ``127.0.0.1`` on an ephemeral port (``catcher.port``) and collects
packets in a background thread until ``stop()`` (or the end of a ``with`` block). A packet may
hold several lines (``\\n``-separated, as pipelining clients send them); each line is
``name:value|type`` with an optional ``|@rate`` sample rate, and, as the etsy daemon accepts,
more ``value|type`` parts after further colons (``name:1|c:5|ms``).

Helpers read what arrived: ``counter_sum`` (sample rates undone), ``timers``, ``gauge`` (the last
value, ``+n``/``-n`` deltas applied), ``names``, ``wait_for`` to poll a condition, and ``sync``
to know that everything sent so far has arrived.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Self

__all__ = ["Sample", "StatsdCatcher", "parse_packet"]

KINDS = {"c": "counter", "ms": "timer", "h": "timer", "g": "gauge", "s": "set"}
_MARK = b"\0statsd-catcher-mark "  # sync()'s datagram: no StatsD line starts with NUL


@dataclass(frozen=True)
class Sample:
    """One metric value as sent: ``value`` is the text after the colon, unparsed for gauges."""

    name: str
    kind: str  # counter | timer | gauge | set
    value: str
    rate: float = 1.0

    @property
    def number(self) -> float:
        return float(self.value)


def parse_packet(data: bytes) -> tuple[list[Sample], list[str]]:
    """The samples in one packet, and the lines that did not parse."""
    samples: list[Sample] = []
    bad: list[str] = []
    for line in data.decode("utf-8", "replace").splitlines():
        if not line.strip():
            continue
        try:
            samples.extend(_parse_line(line))
        except ValueError:
            bad.append(line)
    return samples, bad


def _parse_line(line: str) -> Iterator[Sample]:
    name, sep, rest = line.partition(":")
    if not sep or not name:
        raise ValueError(line)
    parsed = []
    for part in rest.split(":"):
        fields = part.split("|")
        if len(fields) < 2 or fields[1] not in KINDS:
            raise ValueError(line)
        rate = 1.0
        for extra in fields[2:]:
            if extra.startswith("@"):
                rate = float(extra[1:])
        if fields[1] != "s":
            float(fields[0])  # a number, or not a metric
        parsed.append(Sample(name, KINDS[fields[1]], fields[0], rate))
    return iter(parsed)


RECEIVE_BUFFER = 8 << 20  # bytes: a burst of metrics must not overflow while the thread waits


def _enlarge_receive_buffer(sock: socket.socket, size: int) -> None:
    """As large as allowed: SO_RCVBUFFORCE passes net.core.rmem_max when we may (root)."""
    force = getattr(socket, "SO_RCVBUFFORCE", None)
    try:
        if force is not None:
            sock.setsockopt(socket.SOL_SOCKET, force, size)
            return
    except OSError:
        pass
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)


class StatsdCatcher:
    """A StatsD server that only listens: every sample it receives, in order."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        _enlarge_receive_buffer(self._sock, RECEIVE_BUFFER)
        self._sock.bind((host, 0))
        self._sock.settimeout(0.05)
        self.host, self.port = self._sock.getsockname()[:2]
        self._lock = threading.Lock()
        self._samples: list[Sample] = []
        self._bad: list[str] = []
        self.packets = 0
        self._marks_sent = 0
        self._marks_read = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=f"statsd-{self.port}",
                                        daemon=True)
        self._thread.start()

    # -- life cycle --

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._sock.recv(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            if data.startswith(_MARK):
                with self._lock:
                    self._marks_read = int(data[len(_MARK):])
                continue
            samples, bad = parse_packet(data)
            with self._lock:
                self.packets += 1
                self._samples.extend(samples)
                self._bad.extend(bad)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2.0)
        self._sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def sync(self, timeout: float = 5.0) -> None:
        """Return once every datagram sent to the catcher before the call has been read: a
        mark sent after them came in (UDP on loopback keeps the order of the datagrams
        queued to one socket). The mark itself is not recorded."""
        with self._lock:
            self._marks_sent += 1
            mark = self._marks_sent
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as out:
            out.sendto(_MARK + b"%d" % mark, (self.host, self.port))
        if not self.wait_for(lambda: self._marks_read >= mark, timeout):
            raise TimeoutError(f"the catcher's mark {mark} did not come back in {timeout}s")

    # -- reading --

    @property
    def samples(self) -> list[Sample]:
        with self._lock:
            return list(self._samples)

    @property
    def bad_lines(self) -> list[str]:
        """Lines that were not StatsD metrics (a test usually wants none)."""
        with self._lock:
            return list(self._bad)

    @property
    def dropped(self) -> int | None:
        """Packets the kernel dropped for want of buffer space (Linux), None if unknown."""
        try:
            with open("/proc/net/udp", encoding="ascii") as f:
                rows = [line.split() for line in f.readlines()[1:]]
        except OSError:
            return None
        for row in rows:
            if row[1].endswith(f":{self.port:04X}") and row[1] != f"00000000:{self.port:04X}":
                return int(row[-1])
        return None

    def names(self, kind: str | None = None) -> set[str]:
        return {s.name for s in self.samples if kind is None or s.kind == kind}

    def of(self, name: str, kind: str) -> list[Sample]:
        return [s for s in self.samples if s.name == name and s.kind == kind]

    def counter_sum(self, name: str) -> float:
        """The counter's total, each increment divided by its sample rate; 0 if never sent."""
        return sum(s.number / s.rate for s in self.of(name, "counter"))

    def timers(self, name: str) -> list[float]:
        """Every timing sent for `name`, in milliseconds, in arrival order."""
        return [s.number for s in self.of(name, "timer")]

    def gauge(self, name: str) -> float | None:
        """The gauge's value after every sample so far (``+n``/``-n`` are deltas); None if
        never sent."""
        value: float | None = None
        for s in self.of(name, "gauge"):
            if s.value[:1] in "+-":
                value = (value or 0.0) + s.number
            else:
                value = s.number
        return value

    def wait_for(self, condition: Callable[[], bool], timeout: float = 10.0,
                 interval: float = 0.05) -> bool:
        """Poll `condition` until it holds (True) or `timeout` seconds pass (False)."""
        deadline = time.monotonic() + timeout
        while True:
            if condition():
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(interval)
