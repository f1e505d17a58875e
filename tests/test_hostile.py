"""Hostile SMTP servers: each must cost a bounded time and end in a transient outcome.

Raw socket servers on loopback (`RawServer`, a behaviour per connection) play what
real tarpits and broken MTAs do: accept and never speak, speak one byte a second,
send a multi-line reply that never ends, lines without end, garbage, hang up early,
say 354 and then never read. The first tests drive the delivery stack in this
process (Deliverer -> Pools -> Connector -> Connection) with short timeouts; the last
runs the real engine with several hostile destinations at once and checks that the
worker keeps delivering to a healthy server meanwhile, and that no hostile one holds
a connection past its deadline (in a gevent worker, where a TLS handshake fed one
byte at a time is only bounded by the `setup` deadline's gevent.Timeout).
"""
from __future__ import annotations

import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import fields, replace

import pytest

from engine.config import PoolConfig, Route, Timeouts
from engine.connector import Connector, Identity
from engine.delivery import Deliverer
from engine.metrics import Metrics
from engine.mx import Resolver
from engine.pools import Pools
from engine.protocol import Attempt, Status, Task
from engine.smtp import ReplyLimits, send_mail
from engine.testing.harness import LocalEngine, final_outcomes, make_message
from engine.testing.sink import SinkServer
from engine.tls import TlsPolicy
from tests.support.smtpserver import BDAT, DATA, WAIT_CLOSE, C, S, ScriptedServer
from tests.test_smtp import HELO, MESSAGE, SENDER, greet, mail, rcpt

pytestmark = pytest.mark.timeout(60)

Behaviour = Callable[["Peer"], None]
PHASE = 1.0  # every per-step timeout in these tests
HOSTILE = replace(Timeouts(**{f.name: PHASE for f in fields(Timeouts)}), setup=1.5,
                  transaction=2.5)
# What one hostile destination may cost at most: a deadline, plus slack for a slow machine.
BOUND = 2.5 + 1.5
RCPT = "rcpt@hostile.test"


# ---------------------------------------------------------------------------------------
# Raw servers


class Peer:
    """One accepted connection, as a behaviour sees it."""

    def __init__(self, sock: socket.socket, stopping: threading.Event) -> None:
        self.sock = sock
        self.stopping = stopping
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        """One client line (without CRLF); raises ConnectionError at end of stream."""
        while b"\r\n" not in self.buffer:
            self.sock.settimeout(0.1)
            while True:
                if self.stopping.is_set():
                    raise ConnectionError("server stopping")
                try:
                    chunk = self.sock.recv(65536)
                    break
                except TimeoutError:
                    continue
            if not chunk:
                raise ConnectionError("client closed")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\r\n")
        return line

    def sleep(self, seconds: float) -> None:
        if self.stopping.wait(seconds):
            raise ConnectionError("server stopping")

    def drip(self, data: bytes, interval: float) -> None:
        """Send `data` one byte at a time, `interval` seconds apart."""
        for byte in data:
            self.send(bytes([byte]))
            self.sleep(interval)

    def hold(self) -> None:
        """Say nothing, read nothing, until the client hangs up or the server stops."""
        while not self.stopping.wait(0.05):
            try:
                self.sock.settimeout(0)
                if self.sock.recv(1, socket.MSG_PEEK) == b"":
                    return
            except (BlockingIOError, TimeoutError):
                continue
            except OSError:
                return


class RawServer:
    """Listens on loopback; every connection runs `behaviour` in a thread of its own."""

    def __init__(self, behaviour: Behaviour, rcvbuf: int | None = None) -> None:
        self.behaviour = behaviour
        self.listener = socket.create_server(("127.0.0.1", 0))
        if rcvbuf is not None:  # inherited by accepted sockets: a small window fills fast
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.listener.settimeout(0.05)
        self.port = self.listener.getsockname()[1]
        self.stopping = threading.Event()
        self.connections = 0
        self.accepted = threading.Event()  # set at the first connection
        self.ended: list[float] = []  # when each connection ended (monotonic)
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                sock, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            self.accepted.set()
            thread = threading.Thread(target=self._serve, args=(sock,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, sock: socket.socket) -> None:
        try:
            self.behaviour(Peer(sock, self.stopping))
        except OSError:
            pass  # the client hung up: what a hostile server is for
        finally:
            self.ended.append(time.monotonic())
            sock.close()

    def stop(self) -> None:
        self.stopping.set()
        self._acceptor.join(2)
        self.listener.close()
        for thread in self._threads:
            thread.join(2)


@pytest.fixture
def raw() -> Iterator[Callable[..., RawServer]]:
    servers: list[RawServer] = []

    def start(behaviour: Behaviour, **options: int) -> RawServer:
        servers.append(RawServer(behaviour, **options))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


# -- the behaviours ------------------------------------------------------------------------

def silent(peer: Peer) -> None:
    """A tarpit: accepts, never speaks."""
    peer.hold()


def dripping_banner(peer: Peer) -> None:
    """Speaks one byte every 0.2 s, always well inside any read timeout."""
    peer.drip(b"220 " + b"x" * 400 + b"\r\n", 0.2)


def slow_steps_every(delay: float) -> Behaviour:
    """Answers every step after `delay`, just inside the step timeout: only the `setup`
    deadline stops banner + EHLO (+ STARTTLS + EHLO...)."""
    def slow_steps(peer: Peer) -> None:
        peer.sleep(delay)
        peer.send(b"220 slow.test\r\n")
        while True:
            peer.line()
            peer.sleep(delay)
            peer.send(b"250 slow.test\r\n")
    return slow_steps


def slow_transaction(peer: Peer) -> None:
    """A quick greeting, then every reply of the transaction after 0.8 s."""
    peer.send(b"220 slow.test\r\n")
    peer.line()
    peer.send(b"250 slow.test\r\n")  # no PIPELINING: one command at a time
    while True:
        peer.line()
        peer.sleep(0.8)
        peer.send(b"250 ok\r\n")


def endless_multiline(peer: Peer) -> None:
    peer.send(b"220 mx\r\n")
    peer.line()
    while True:
        peer.send(b"250-still going\r\n" * 100)


def slow_multiline(peer: Peer) -> None:
    """A multi-line EHLO reply, one line every 0.1 s: under the line cap for 10 s."""
    peer.send(b"220 mx\r\n")
    peer.line()
    while True:
        peer.send(b"250-still going\r\n")
        peer.sleep(0.1)


def endless_line(peer: Peer) -> None:
    peer.send(b"220 ")
    while True:
        peer.send(b"x" * 65536)


def garbage(peer: Peer) -> None:
    rng = random.Random(7)
    peer.send(bytes(rng.randrange(256) for _ in range(5000)))
    peer.hold()


def early_close(peer: Peer) -> None:
    """Greets, then hangs up in the middle of the EHLO reply."""
    peer.send(b"220 mx\r\n")
    peer.line()
    peer.send(b"250-mx\r\n250-PIPE")


def stops_reading_after_354(peer: Peer) -> None:
    peer.send(b"220 mx\r\n")
    peer.line()
    peer.send(b"250 mx\r\n")  # no PIPELINING, no CHUNKING: DATA, one step at a time
    for reply in (b"250 ok\r\n", b"250 ok\r\n", b"354 go ahead\r\n"):
        peer.line()
        peer.send(reply)
    peer.hold()  # never reads the message


def stops_reading_bdat(peer: Peer) -> None:
    """Offers PIPELINING and CHUNKING, then reads nothing of MAIL, RCPT and BDAT."""
    peer.send(b"220 mx\r\n")
    peer.line()
    peer.send(b"250-mx\r\n250-PIPELINING\r\n250 CHUNKING\r\n")
    peer.hold()


# ---------------------------------------------------------------------------------------
# The delivery stack in this process


def deliver(port: int, message: bytes = MESSAGE) -> tuple[list[Attempt], float]:
    """One task to RCPT via a route to 127.0.0.1:`port`; the attempts and the time taken."""
    resolver = Resolver(routes={"hostile.test": Route("127.0.0.1", port)})
    metrics = Metrics(None, "127.0.0.1")
    connector = Connector(Identity("127.0.0.1", HELO), resolver, TlsPolicy("none"), HOSTILE,
                          ReplyLimits(), metrics)
    pools = Pools(PoolConfig(max_connections=2, max_messages=10, idle_timeout=60.0,
                             connect_backoff=0.0))
    deliverer = Deliverer("127.0.0.1", "none", resolver, connector, pools, metrics)
    attempts: list[Attempt] = []
    started = time.monotonic()
    deliverer.deliver(Task("job-1", SENDER, (RCPT,), message, time.time()), attempts.extend)
    elapsed = time.monotonic() - started
    pools.close_all()
    return attempts, elapsed


def deferred(attempts: list[Attempt]) -> Attempt:
    assert [(a.rcpt, a.status) for a in attempts] == [(RCPT, Status.DEFERRED)], attempts
    assert attempts[0].reply.code // 100 == 4
    return attempts[0]


HOSTILE_CASES: dict[str, tuple[Behaviour, float, str]] = {
    # behaviour, the most it may take, words in the reply
    "tarpit-silent": (silent, PHASE + 1.0, "timeout after 1s in BANNER"),
    "tarpit-one-byte-a-second": (dripping_banner, PHASE + 1.0, "timeout after 1s in BANNER"),
    "slow-steps-under-each-timeout": (slow_steps_every(0.8), BOUND,
                                      "setup took longer than 1.5s (in EHLO)"),
    "endless-multiline-reply": (endless_multiline, 1.0, "reply longer than 100 lines"),
    "slow-endless-multiline-reply": (slow_multiline, PHASE + 1.0, "timeout after 1s in EHLO"),
    "endless-line": (endless_line, 1.0, "reply line longer than 4096 bytes"),
    "garbage": (garbage, 1.0, "malformed reply line"),
    "early-close": (early_close, 1.0, "connection lost"),
}


@pytest.mark.parametrize("case", HOSTILE_CASES)
def test_hostile_server_costs_bounded_time_and_defers(raw: Callable[..., RawServer],
                                                      case: str) -> None:
    behaviour, bound, words = HOSTILE_CASES[case]
    server = raw(behaviour)
    attempts, elapsed = deliver(server.port)
    attempt = deferred(attempts)
    assert words in attempt.reply.text
    assert elapsed < bound, f"{case} took {elapsed:.1f}s"
    assert not attempt.ambiguous  # nothing of the message reached the server


def test_replies_each_just_in_time_end_at_the_transaction_deadline(
        raw: Callable[..., RawServer]) -> None:
    server = raw(slow_transaction)
    many = tuple(f"r{i}@hostile.test" for i in range(6))  # 6 x 0.8 s > 2.5 s
    resolver = Resolver(routes={"hostile.test": Route("127.0.0.1", server.port)})
    connector = Connector(Identity("127.0.0.1", HELO), resolver, TlsPolicy("none"), HOSTILE,
                          ReplyLimits(), Metrics(None, "127.0.0.1"))
    conn = connector.open(resolver.destination("hostile.test").hosts[0], "test", routed=True)
    started = time.monotonic()
    results = send_mail(conn, SENDER, many, MESSAGE)
    elapsed = time.monotonic() - started
    assert 2.4 < elapsed < BOUND
    assert {r.reply.code for r in results} == {451}
    assert all("transaction took longer than 2.5s (in RCPT)" in r.reply.text for r in results)
    assert conn.sock is None  # a connection cut off mid-transaction is not pooled again


@pytest.mark.parametrize("behaviour", [stops_reading_after_354, stops_reading_bdat],
                         ids=["data", "bdat"])
def test_server_that_stops_reading_the_message_times_out_unambiguously(
        raw: Callable[..., RawServer], behaviour: Behaviour) -> None:
    server = raw(behaviour, rcvbuf=4096)
    big = b"Subject: big\r\n\r\n" + (b"y" * 998 + b"\r\n") * 16000  # 16 MB: fills any window
    attempts, elapsed = deliver(server.port, big)
    attempt = deferred(attempts)
    assert "timeout after 1s" in attempt.reply.text
    assert not attempt.ambiguous  # the whole message never left: no duplicate risk
    assert elapsed < BOUND


# -- replies where a success code does not mean success (found by tests/test_fuzz.py) ------

def test_250_to_data_is_a_protocol_error_not_a_delivery(scripted: Callable[..., ScriptedServer]
                                                        ) -> None:
    """Regression: the recipients were reported delivered, the body never sent."""
    server = scripted([*greet(), mail(), S("250 ok"), rcpt(RCPT), S("250 ok"), C("DATA"),
                       S("250 2.0.0 sure"), WAIT_CLOSE()])
    attempts, _ = deliver(server.port)
    attempt = deferred(attempts)
    assert "250 reply to DATA" in attempt.reply.text and not attempt.ambiguous
    server.wait_finished()
    assert server.messages == []


@pytest.mark.parametrize("chunking", [False, True], ids=["data", "bdat"])
def test_3xx_after_the_message_is_a_protocol_error_not_a_delivery(
        scripted: Callable[..., ScriptedServer], chunking: bool) -> None:
    """Regression: "354" to the final dot (or BDAT LAST) counted as delivered."""
    if chunking:
        script = [*greet("PIPELINING", "CHUNKING"), mail(), rcpt(RCPT), BDAT(last=True),
                  S("250 ok", "250 ok", "354 what?"), WAIT_CLOSE()]
    else:
        script = [*greet(), mail(), S("250 ok"), rcpt(RCPT), S("250 ok"), C("DATA"),
                  S("354 go"), DATA(), S("354 what?"), WAIT_CLOSE()]
    server = scripted(script)
    attempts, _ = deliver(server.port)
    attempt = deferred(attempts)
    assert "354 reply to" in attempt.reply.text
    assert attempt.ambiguous  # the message went out: the server may have it


# ---------------------------------------------------------------------------------------
# The real engine: several hostile destinations at once, and a healthy one


def tls_dripper(peer: Peer) -> None:
    """Offers STARTTLS, says 220, then feeds the TLS handshake one byte at a time: a
    gevent worker's socket timeouts restart with every byte; only `setup` ends it."""
    peer.send(b"220 mx\r\n")
    peer.line()
    peer.send(b"250-mx\r\n250 STARTTLS\r\n")
    peer.line()
    peer.send(b"220 2.0.0 go ahead\r\n")
    # Answer the ClientHello, as a TLS server would: bytes sent before it arrives are
    # (rightly) taken for injected plaintext, which made this test depend on timing.
    while not peer.buffer:
        peer.sock.settimeout(0.1)
        try:
            peer.buffer = peer.sock.recv(65536)
        except TimeoutError:
            if peer.stopping.is_set():
                raise ConnectionError("server stopping") from None
            continue
        if not peer.buffer:
            raise ConnectionError("client closed")
    peer.drip(b"\x16\x03\x03\x40\x00" + b"\x02" * 16000, 0.2)  # a ServerHello that never ends


ENGINE_HOSTILES: dict[str, Behaviour] = {
    "silent": silent, "drip": dripping_banner, "slowsteps": slow_steps_every(2.8),
    "endless": endless_multiline, "tlsdrip": tls_dripper, "stopsreading": stops_reading_after_354,
}


@pytest.mark.integration
@pytest.mark.timeout(90)
def test_engine_keeps_delivering_while_hostile_servers_hold_connections(
        raw: Callable[..., RawServer], sink: SinkServer,
        local_engine: Callable[..., LocalEngine]) -> None:
    servers = {name: raw(behaviour, rcvbuf=4096) for name, behaviour in ENGINE_HOSTILES.items()}
    slow = {**{f.name: "3s" for f in fields(Timeouts)}, "setup": "5s", "transaction": "5s"}
    engine = local_engine(sink.port, extra={
        "routes": {f"{name}.test": f"127.0.0.1:{s.port}" for name, s in servers.items()},
        "smtp": {"timeouts": slow, "tls": "opportunistic"},
        "retry": {"schedule": ["1h"]},
    })
    big = b"Subject: big\r\n\r\n" + (b"y" * 998 + b"\r\n") * 8000
    hostile_jobs = [({"id": f"h-{name}", "from": "s@example.test", "to": [f"x@{name}.test"]},
                     big if name == "stopsreading" else make_message(0, 500))
                    for name in servers]
    pushed = time.monotonic()
    assert engine.push(hostile_jobs)
    for server in servers.values():  # every hostile connection is open (and stuck)
        assert server.accepted.wait(10)
    healthy = [({"id": f"ok-{i}", "from": "s@example.test", "to": [f"u{i}@ok.test"]},
                make_message(i, 500)) for i in range(20)]
    assert engine.push(healthy)
    engine.wait_for(lambda evs: sum(e["event"] == "delivered" for e in evs) >= 20, timeout=10,
                    what="20 healthy deliveries")
    healthy_done = time.monotonic() - pushed
    events = engine.wait_for(
        lambda evs: {e["id"] for e in evs if e["event"] == "deferred"} >= {j["id"] for j, _ in
                                                                          hostile_jobs},
        timeout=30, what="a deferral for every hostile destination")
    hostile_done = time.monotonic() - pushed
    assert healthy_done < 3.0 + 1.0, "healthy mail waited behind hostile servers"
    assert hostile_done < 5.0 + 3.0, f"a hostile server held on for {hostile_done:.1f}s"
    assert not final_outcomes(e for e in events if e["id"].startswith("h-"))
    replies = {e["id"]: e["reply"] for e in events if e["event"] == "deferred"}
    assert "setup took longer than 5s" in replies["h-tlsdrip"]  # the gevent.Timeout backstop
    assert "setup took longer than 5s" in replies["h-slowsteps"]
    assert "timeout after 3s in BANNER" in replies["h-silent"]
    assert "timeout after 3s in BANNER" in replies["h-drip"]
    assert "100 lines" in replies["h-endless"]
    assert "timeout after 3s in DATA" in replies["h-stopsreading"]
    assert len(sink.messages) == 20
