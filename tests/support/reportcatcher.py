"""An https rua for tests: real HTTPS (http.server + ssl) on loopback that records the
TLS-RPT reports POSTed to it (RFC 8460 5.4).

`catcher.refuse = N` answers 503 to the next N POSTs (a rua that fails, then recovers).
`catcher.posts` holds every POST as (status answered, Content-Type, body); `wait_for`
waits on the event itself.
"""
from __future__ import annotations

import http.server
import ssl
import sys
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Self

from tests.support.policyserver import TestCA

Post = tuple[int, str, bytes]


class _Server(http.server.ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        if not isinstance(sys.exc_info()[1], ssl.SSLError):
            super().handle_error(request, client_address)  # type: ignore[arg-type]


class ReportCatcher:
    """HTTPS on `host` (an ephemeral port) with a certificate for `name` from `ca`."""

    def __init__(self, ca: TestCA, name: str, host: str = "127.0.0.40") -> None:
        self.name = name
        self.refuse = 0
        self.posts: list[Post] = []
        self._state = threading.Condition()
        self._context = ca.server_context(name)
        self._httpd = _Server((host, 0), self._handler())
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Self:
        raw = self._httpd.socket
        self._httpd.socket = self._context.wrap_socket(raw, server_side=True,
                                                       do_handshake_on_connect=False)
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,),
                                        name=f"reportcatcher-{self.port}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join()

    def wait_for(self, done: Callable[[list[Post]], bool], timeout: float) -> list[Post]:
        with self._state:
            if not self._state.wait_for(lambda: done(self.posts), timeout):
                raise TimeoutError(f"the rua saw {len(self.posts)} POSTs: {self.posts!r:.500}")
            return list(self.posts)

    def _take(self, media: str, body: bytes) -> int:
        with self._state:
            status = 503 if self.refuse > 0 else 200
            self.refuse = max(0, self.refuse - 1)
            self.posts.append((status, media, body))
            self._state.notify_all()
            return status

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(min(length, 1 << 20))
                status = owner._take(self.headers.get("Content-Type") or "", body)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        return Handler
