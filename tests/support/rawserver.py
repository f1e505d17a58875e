"""Raw socket servers on loopback that play what real tarpits and broken MTAs do: accept and
never speak, speak one byte a second, send a multi-line reply that never ends, lines without
end, garbage, hang up early, say 354 and then never read.

`RawServer(behaviour)` listens on 127.0.0.1 (an ephemeral port) and runs `behaviour(peer)` in a
thread of its own for every connection; the `raw` fixture (tests/support/fixtures.py) stops
every server it started. The behaviours below are the ones tests/conversation/test_hostile.py
and tests/engine/test_hostile.py set against the engine.
"""
from __future__ import annotations

import random
import socket
import threading
import time
from collections.abc import Callable

Behaviour = Callable[["Peer"], None]


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

