"""An MTA-STS policy server for tests: real HTTPS (http.server + ssl) on loopback.

It serves `https://mta-sts.<domain>/.well-known/mta-sts.txt` with a certificate from a test
CA (trustme), answering what the test sets: `server.policy = "version: STSv1\\r\\n..."`, or a
whole answer with `server.answer = (status, headers, body)` (a redirect, another type, a body
too large). `server.requests` counts the GETs it answered, so a test tells a cached policy
from a fetched one.

`TestCA` makes the certificates: `ca.server_context(*names)` for a server (the policy server,
an SMTP sink), `ca.ca_file` for the engine (`smtp.ca_file`).
"""
from __future__ import annotations

import http.server
import os
import ssl
import sys
import threading
from types import TracebackType
from typing import Self

import trustme

POLICY_PATH = "/.well-known/mta-sts.txt"


class TestCA:
    """A private CA (trustme) whose certificate the engine trusts through `ca_file`."""

    __test__ = False  # not a test class, whatever pytest thinks of its name

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self._ca = trustme.CA()
        self.ca_file = os.path.join(directory, "test-ca.pem")
        self._ca.cert_pem.write_to_path(self.ca_file)

    def server_context(self, *names: str) -> ssl.SSLContext:
        """A server-side TLS context with a certificate for `names`, signed by this CA."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._ca.issue_cert(*names).configure_cert(context)
        return context


class _Server(http.server.ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        """Quiet about a client that refused the certificate (tests do that on purpose)."""
        if not isinstance(sys.exc_info()[1], ssl.SSLError):
            super().handle_error(request, client_address)  # type: ignore[arg-type]


def policy_text(mode: str, *mx: str, max_age: int = 86400) -> str:
    return "".join([f"version: STSv1\r\nmode: {mode}\r\n", *(f"mx: {m}\r\n" for m in mx),
                    f"max_age: {max_age}\r\n"])


class PolicyServer:
    """HTTPS on `host` (an ephemeral port), serving one domain's policy file."""

    def __init__(self, ca: TestCA, domain: str, host: str = "127.0.0.30",
                 also: tuple[str, ...] = ()) -> None:
        """`also`: other domains whose mta-sts host this server is too (the same policy)."""
        self.domain = domain
        self.host = host
        self.policy = ""
        self.answer: tuple[int, dict[str, str], bytes] | None = None
        self.requests = 0
        self.delay = 0.0  # seconds to wait before answering (a slow server)
        self._lock = threading.Lock()
        self._context = ca.server_context(*(f"mta-sts.{d}" for d in (domain, *also)))
        self._httpd = _Server((host, 0), self._handler())
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> None:
        raw = self._httpd.socket
        self._httpd.socket = self._context.wrap_socket(raw, server_side=True,
                                                       do_handshake_on_connect=False)
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,),
                                        name=f"policyserver-{self.port}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join()

    def _respond(self, path: str) -> tuple[int, dict[str, str], bytes]:
        with self._lock:
            self.requests += 1
        if self.delay:
            self._stopping.wait(self.delay)
        if self.answer is not None:
            return self.answer
        if path != POLICY_PATH or not self.policy:
            return 404, {"Content-Type": "text/plain"}, b"not found\n"
        return 200, {"Content-Type": "text/plain; charset=us-ascii"}, self.policy.encode()

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                status, headers, body = owner._respond(self.path)
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        return Handler
