"""A TCP proxy on loopback that adds a round-trip time: latency without netem.

Every chunk read from one side is written to the other RTT/2 later, in order
(one FIFO and one timer per direction), so a request and its reply cost one RTT
as they would across a WAN. Opening a connection costs what TCP costs: the
upstream server accepts 1.5 RTT after the client's connect (SYN, SYN-ACK, ACK),
so a server-speaks-first banner reaches the client 2 RTT after it dialled. A
close (FIN) travels RTT/2 too.

A destination's connection limit can be enforced here (`max_connections`): a
connection that arrives while that many are open upstream gets
`421 4.7.0 too many connections` (`refuse`, what Postfix's anvil does) or is
held until one closes (`queue`, like a full listen backlog). A connection counts
from its (simulated) accept until its close reaches the server, or the server
closes it.

Bandwidth is not limited and there is no loss or jitter: this models distance,
not a bad link. The overhead of the proxy itself (asyncio, one process) is
measured by `python -m bench.latency_proxy --selftest` and reported in
docs/PERFORMANCE.md: well under a millisecond per round trip at these rates.

Run on its own: `python -m bench.latency_proxy --target 127.0.0.1:2525 --rtt 50ms`
prints `LISTENING <host> <port>`, and a JSON line of figures when it ends (SIGTERM).
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

REFUSAL = b"421 4.7.0 too many connections from your host, try again later\r\n"
_EOF = object()
# asyncio's epoll timeouts are rounded up to the next millisecond: a timer fires 0-1 ms late,
# 0.5 ms on average. Aiming half a millisecond early makes the mean delay the configured one.
_EARLY = 0.0005


@dataclass
class ProxyStats:
    accepted: int = 0
    refused: int = 0
    queued: int = 0
    max_concurrent: int = 0
    bytes_up: int = 0
    bytes_down: int = 0


class _Pipe:
    """One direction of one connection: a FIFO of (due, chunk) and one timer."""

    def __init__(self, loop: asyncio.AbstractEventLoop, delay: float) -> None:
        self.loop = loop
        self.delay = delay
        self.items: collections.deque[tuple[float, Any]] = collections.deque()
        self.target: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.done = False

    def push(self, item: Any) -> None:
        self.items.append((self.loop.time() + self.delay, item))
        self._schedule()

    def attach(self, transport: asyncio.Transport) -> None:
        self.target = transport
        self._schedule()

    def _schedule(self) -> None:
        if self.timer is None and self.items and self.target is not None and not self.done:
            self.timer = self.loop.call_at(self.items[0][0] - _EARLY, self._flush)

    def _flush(self) -> None:
        self.timer = None
        now = self.loop.time()
        out: list[bytes] = []
        while self.items and self.items[0][0] <= now + _EARLY:
            _, item = self.items.popleft()
            if item is _EOF:
                self._write(out)
                out = []
                self._end()
                return
            out.append(item)
        self._write(out)
        self._schedule()

    def _write(self, chunks: list[bytes]) -> None:
        if chunks and self.target is not None and not self.target.is_closing():
            self.target.write(b"".join(chunks))

    def _end(self) -> None:
        self.done = True
        self.items.clear()
        if self.target is not None and not self.target.is_closing():
            self.target.close()  # a half-close is not needed for SMTP; close both ways


class _Client(asyncio.Protocol):
    """The side the engine connected to; owns the connection's two pipes."""

    def __init__(self, proxy: LatencyProxy) -> None:
        self.proxy = proxy
        loop = proxy.loop
        self.up = _Pipe(loop, proxy.rtt / 2)  # client -> server
        self.down = _Pipe(loop, proxy.rtt / 2)  # server -> client
        self.transport: asyncio.Transport | None = None
        self.upstream: asyncio.Transport | None = None
        self.counted = False
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        _nodelay(transport)
        self.proxy.stats.accepted += 1
        self.down.attach(transport)
        # The server accepts when the client's ACK arrives: 1.5 RTT after the SYN.
        self.proxy.loop.call_later(self.proxy.handshake_rtts * self.proxy.rtt, self._arrive)

    def _arrive(self) -> None:
        if self.closed:
            return
        proxy = self.proxy
        limit = proxy.max_connections
        if limit is not None and proxy.open_upstream >= limit:
            if proxy.over_limit == "queue":
                proxy.stats.queued += 1
                proxy.waiting.append(self)
                return
            proxy.stats.refused += 1
            self.down.push(REFUSAL)
            self.down.push(_EOF)
            return
        self._count()
        self.proxy.spawn(self._connect())

    def _count(self) -> None:
        self.counted = True
        self.proxy.open_upstream += 1
        stats = self.proxy.stats
        stats.max_concurrent = max(stats.max_concurrent, self.proxy.open_upstream)

    async def _connect(self) -> None:
        loop = self.proxy.loop
        try:
            transport, _ = await loop.create_connection(lambda: _Server(self),
                                                        *self.proxy.target)
        except OSError:
            self._release()
            if self.transport is not None:
                self.transport.close()
            return
        assert isinstance(transport, asyncio.Transport)
        if self.closed and not self.up.items:
            transport.close()
            return
        self.upstream = transport
        self.up.attach(transport)

    def data_received(self, data: bytes) -> None:
        self.proxy.stats.bytes_up += len(data)
        self.up.push(data)

    def eof_received(self) -> bool:
        self.up.push(_EOF)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.up.done:
            self.up.push(_EOF)
        if self.upstream is None and self.counted and not self.up.items:
            self._release()

    def server_closed(self) -> None:
        self._release()
        if not self.down.done:
            self.down.push(_EOF)

    def _release(self) -> None:
        if self.counted:
            self.counted = False
            self.proxy.open_upstream -= 1
            self.proxy.admit_waiting()


class _Server(asyncio.Protocol):
    """The proxy's connection to the real server."""

    def __init__(self, client: _Client) -> None:
        self.client = client

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        _nodelay(transport)

    def data_received(self, data: bytes) -> None:
        self.client.proxy.stats.bytes_down += len(data)
        self.client.down.push(data)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.server_closed()


def _nodelay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class LatencyProxy:
    def __init__(self, target: tuple[str, int], rtt: float, listen: tuple[str, int] = (
            "127.0.0.1", 0), max_connections: int | None = None, over_limit: str = "refuse",
                 handshake_rtts: float = 1.5) -> None:
        self.target = target
        self.rtt = rtt
        self.listen = listen
        self.max_connections = max_connections
        self.over_limit = over_limit
        self.handshake_rtts = handshake_rtts
        self.stats = ProxyStats()
        self.open_upstream = 0
        self.waiting: collections.deque[_Client] = collections.deque()
        self.tasks: set[asyncio.Future[Any]] = set()
        self.loop: asyncio.AbstractEventLoop  # set by start()
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> int:
        self.loop = asyncio.get_running_loop()
        self.server = await self.loop.create_server(lambda: _Client(self), *self.listen,
                                                    backlog=1024)
        self.port = self.server.sockets[0].getsockname()[1]
        return self.port

    def spawn(self, coroutine: Any) -> None:
        """Run a task, holding a reference until it is done (asyncio keeps weak ones)."""
        task = asyncio.ensure_future(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def admit_waiting(self) -> None:
        while self.waiting and (self.max_connections is None
                                or self.open_upstream < self.max_connections):
            client = self.waiting.popleft()
            if not client.closed:
                client._count()
                self.spawn(client._connect())


# -- running it ---------------------------------------------------------------------------


def parse_seconds(text: str) -> float:
    text = text.strip()
    if text.endswith("ms"):
        return float(text[:-2]) / 1000.0
    if text.endswith("s"):
        return float(text[:-1])
    return float(text)


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


async def _serve(args: argparse.Namespace) -> None:
    proxy = LatencyProxy(_hostport(args.target), parse_seconds(args.rtt), _hostport(args.listen),
                         args.max_connections, args.over_limit, args.handshake_rtts)
    port = await proxy.start()
    print(f"LISTENING {proxy.listen[0]} {port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    print(json.dumps(asdict(proxy.stats)), flush=True)


class ProxyProcess:
    """The proxy in a child process (its own interpreter: no GIL shared with the sink)."""

    def __init__(self, target: tuple[str, int], rtt: float, max_connections: int | None = None,
                 over_limit: str = "refuse", handshake_rtts: float = 1.5) -> None:
        cmd = [sys.executable, "-m", "bench.latency_proxy", "--target",
               f"{target[0]}:{target[1]}", "--rtt", f"{rtt}s", "--over-limit", over_limit,
               "--handshake-rtts", str(handshake_rtts)]
        if max_connections is not None:
            cmd += ["--max-connections", str(max_connections)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().split()
        if not line or line[0] != "LISTENING":
            self.proc.kill()
            raise RuntimeError("latency proxy did not start")
        self.host, self.port = line[1], int(line[2])
        self.stats: dict[str, int] = {}

    def stop(self) -> dict[str, int]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            out, _ = self.proc.communicate(timeout=10)
            lines = [x for x in out.splitlines() if x.startswith("{")]
            self.stats = json.loads(lines[-1]) if lines else {}
        return self.stats

    def __enter__(self) -> ProxyProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- measuring its overhead -----------------------------------------------------------------


def _echo_server() -> tuple[socket.socket, threading.Thread]:
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=_echo, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener, thread


def _echo(conn: socket.socket) -> None:
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn.sendall(b"220 hello\r\n")
    with conn:
        while True:
            data = conn.recv(65536)
            if not data:
                return
            conn.sendall(data)


def _ping(port: int, rounds: int, size: int) -> tuple[float, list[float]]:
    """(connect-to-banner seconds, per-round-trip seconds) through 127.0.0.1:port."""
    payload = b"x" * (size - 2) + b"\r\n"
    started = time.perf_counter()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.recv(100)
    banner = time.perf_counter() - started
    times = []
    with sock:
        for _ in range(rounds):
            t = time.perf_counter()
            sock.sendall(payload)
            got = 0
            while got < len(payload):
                got += len(sock.recv(65536))
            times.append(time.perf_counter() - t)
    return banner, times


def selftest(rtt: float = 0.05, rounds: int = 40) -> dict[str, Any]:
    """Round trips through the proxy against the configured RTT: the proxy's own cost."""
    listener, _ = _echo_server()
    port = listener.getsockname()[1]
    rows: list[dict[str, Any]] = []
    try:
        for configured in (0.0, rtt):
            for size in (100, 5000):
                with ProxyProcess(("127.0.0.1", port), configured) as proxy:
                    n = rounds if configured else rounds * 10
                    banner, times = _ping(proxy.port, n, size)
                times.sort()
                rows.append({
                    "rtt_ms": configured * 1000, "size": size, "rounds": n,
                    "banner_ms": banner * 1000,
                    "p50_ms": statistics.median(times) * 1000,
                    "p99_ms": times[int(0.99 * (len(times) - 1))] * 1000,
                    "mean_ms": statistics.fmean(times) * 1000,
                    "overhead_p50_ms": (statistics.median(times) - configured) * 1000,
                })
        direct_banner, direct = _ping(port, rounds * 10, 100)
        rows.append({"rtt_ms": None, "size": 100, "rounds": len(direct),
                     "banner_ms": direct_banner * 1000,
                     "p50_ms": statistics.median(direct) * 1000,
                     "p99_ms": sorted(direct)[int(0.99 * (len(direct) - 1))] * 1000,
                     "mean_ms": statistics.fmean(direct) * 1000, "overhead_p50_ms": 0.0})
    finally:
        listener.close()
    return {"rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.latency_proxy",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", help="host:port of the real server")
    parser.add_argument("--rtt", default="50ms", help="round-trip time to add (50ms, 0.05)")
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--max-connections", type=int, default=None)
    parser.add_argument("--over-limit", choices=("refuse", "queue"), default="refuse")
    parser.add_argument("--handshake-rtts", type=float, default=1.5,
                        help="RTTs from the client's connect to the server's accept (1.5)")
    parser.add_argument("--selftest", action="store_true",
                        help="measure the proxy's own overhead and print it as JSON")
    args = parser.parse_args(argv)
    if args.selftest:
        print(json.dumps(selftest(parse_seconds(args.rtt)), indent=1))
        return 0
    if not args.target:
        parser.error("--target is required")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
