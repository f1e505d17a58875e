"""A TCP relay on loopback that counts the SMTP sessions a server would count at once, and
`until`, which lets greenlets run until a condition holds (tests of engine.pool on the network)."""
from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable

import gevent


class CountingProxy:
    """A TCP relay that counts the sessions a server would count at once: from accept until
    the server's 221 to QUIT went by, or either side closed."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self._lock = threading.Lock()
        self.active = 0
        self.most = 0
        self.sessions = 0
        self._stop = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)
        self.port = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            with self._lock:
                self.sessions += 1
                self.active += 1
                self.most = max(self.most, self.active)
            upstream = socket.create_connection(self.target)
            self._sockets += [client, upstream]  # closed by stop(), the pumps done
            ended = threading.Event()
            for src, dst, watch in ((client, upstream, False), (upstream, client, True)):
                thread = threading.Thread(target=self._pump, args=(src, dst, watch, ended),
                                          daemon=True)
                thread.start()
                self._threads.append(thread)

    def _pump(self, src: socket.socket, dst: socket.socket, watch: bool,
              ended: threading.Event) -> None:
        try:
            while data := src.recv(65536):
                if watch and b"221 " in data:
                    self._end(ended)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            self._end(ended)
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _end(self, ended: threading.Event) -> None:
        with self._lock:
            if not ended.is_set():
                ended.set()
                self.active -= 1

    def stop(self) -> None:
        self._stop.set()
        self._threads[0].join()
        self._listener.close()
        for sock in self._sockets:  # shut down (ending the pumps), then closed here
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in self._threads[1:]:
            thread.join(5)
        for sock in self._sockets:
            sock.close()


def until(condition: Callable[[], object], timeout: float = 5.0) -> None:
    """Let the greenlets run until `condition` holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        gevent.sleep(0.01)
