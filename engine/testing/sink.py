"""A recording SMTP sink on loopback, built on aiosmtpd: for the demo, tests and benchmarks.

It offers STARTTLS (a throwaway self-signed certificate), PIPELINING and CHUNKING
(BDAT), answers recipients by local part (``reject...`` 550, ``defer...`` 451),
and records every message with its envelope, the client's address, whether TLS
was used and on which connection it came. It can rate-limit senders the way
receiving providers do (a token bucket per client IP, checked at MAIL FROM),
recording every throttle it sent and every MAIL it accepted. It serves from a
background thread of the calling process (no gevent), on an ephemeral port.
"""
from __future__ import annotations

import asyncio
import atexit
import base64
import collections
import hashlib
import logging
import re
import shutil
import socket
import ssl
import tempfile
import threading
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, ClassVar, Self, cast

from aiosmtpd.smtp import MISSING, SMTP, Envelope, Session, syntax

from engine.testing.tlscert import make_cert

LOOPBACK = "127.0.0.1"

# --------------------------------------------------------------------------------------------
# TLS


_cert_dir: str | None = None
_cert_dir_lock = threading.Lock()


def server_tls_context(certfile: str | None = None, keyfile: str | None = None) -> ssl.SSLContext:
    """A server-side TLS context; by default with a self-signed localhost certificate.

    The default certificate is made once per process in a temporary directory removed at exit.
    """
    if certfile is None:
        certfile, keyfile = make_cert(_default_cert_dir())
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certfile, keyfile)
    return context


def _default_cert_dir() -> str:
    global _cert_dir
    with _cert_dir_lock:
        if _cert_dir is None:
            _cert_dir = tempfile.mkdtemp(prefix="mailengine-test-certs-")
            atexit.register(shutil.rmtree, _cert_dir, ignore_errors=True)
        return _cert_dir


def _text(line: bytes) -> str:
    return line.rstrip(b"\r\n").decode("utf-8", "backslashreplace")


def _start_thread(target: Any, name: str) -> threading.Thread:
    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    return thread


def _body_summary(body: bytes, content: bool) -> dict[str, Any]:
    summary: dict[str, Any] = {"size": len(body), "sha256": hashlib.sha256(body).hexdigest()}
    if content:
        summary["content_b64"] = base64.b64encode(body).decode("ascii")
    return summary


# --------------------------------------------------------------------------------------------
# Rate limiting


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up; a MAIL FROM takes one.

    Only accepted transactions take a token: a sender that keeps knocking while throttled
    is not punished further, so the accepted rate converges on ``rate`` and never exceeds
    ``rate`` (plus the initial ``burst``) over any window.
    """

    def __init__(self, rate: float, burst: float, clock: Any = time.monotonic) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("a token bucket needs rate > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = burst
        self._at = clock()

    def take(self) -> bool:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


# --------------------------------------------------------------------------------------------
# The sink


@dataclass(frozen=True)
class SinkMessage:
    """One message the sink accepted, with its envelope and how it arrived."""

    mail_from: str  # "" for the null sender <>
    rcpt_tos: tuple[str, ...]  # accepted recipients only
    content: bytes  # exactly the bytes received, dot-stuffing undone
    peer: tuple[str, int]  # the client's address: check the engine's source IP here
    tls: str | None  # "TLSv1.3", or None for plaintext
    conn_id: int  # 1, 2, ... in order of accepted connections
    seq: int  # 1, 2, ... messages on that connection (2+ means the connection was reused)
    helo: str | None
    via: str  # "DATA" or "BDAT"
    mail_options: tuple[str, ...] = ()
    received: float = field(default_factory=time.time)

    @property
    def size(self) -> int:
        return len(self.content)

    def to_json(self, content: bool = False) -> dict[str, Any]:
        data: dict[str, Any] = {
            "mail_from": self.mail_from,
            "rcpt_tos": list(self.rcpt_tos),
            "peer": list(self.peer),
            "tls": self.tls,
            "conn_id": self.conn_id,
            "seq": self.seq,
            "helo": self.helo,
            "via": self.via,
            "mail_options": list(self.mail_options),
            "received": self.received,
        }
        return data | _body_summary(self.content, content)


class SinkServer:
    """A recording SMTP sink on loopback, built on aiosmtpd, serving from a background thread.

    It advertises SIZE, 8BITMIME, SMTPUTF8, PIPELINING, CHUNKING and (``tls=True``) STARTTLS with
    the test certificate; ``require_tls=True`` answers ``530`` to mail commands before STARTTLS.
    Recipients are accepted unless their local part starts with a key of ``RCPT_RULES``
    (``reject...`` -> 550, ``defer...`` -> 451; pass ``rcpt_rules`` to change the table).

    ``rate_limit`` (messages per second) throttles senders as receiving providers do: a token
    bucket of ``rate_burst`` tokens (default: one second's worth, at least 1) per client IP
    (``per_ip=False``: one for everybody) is checked at MAIL FROM; past it the server answers
    ``throttle_reply``. A ``421`` reply then closes the connection, as real servers do; any
    other (``451 4.7.1 ...``) keeps it open for the next transaction. ``throttled`` counts the
    throttles sent per client IP; ``throttle_times()`` and ``accept_times()`` give the moments
    (Unix time) of each throttle and of each accepted MAIL FROM, to measure rates over windows.
    """

    RCPT_RULES: ClassVar[dict[str, str]] = {
        "reject": "550 5.1.1 no such user",
        "defer": "451 4.3.0 try later",
    }

    def __init__(
        self,
        tls: bool = True,
        require_tls: bool = False,
        host: str = LOOPBACK,
        *,
        port: int = 0,
        tls_context: ssl.SSLContext | None = None,
        pipelining: bool = True,
        chunking: bool = True,
        rcpt_rules: dict[str, str] | None = None,
        idle_timeout: float = 300.0,
        data_size_limit: int = 64 << 20,
        hostname: str = "sink.test",
        rate_limit: float | None = None,
        rate_burst: float | None = None,
        per_ip: bool = True,
        throttle_reply: str = "421 4.7.0 Rate limited, slow down",
    ) -> None:
        # aiosmtpd logs a traceback for every aborted handshake; the engine's
        # verify-first TLS probe aborts one per new host on purpose.
        logging.getLogger("mail.log").setLevel(logging.CRITICAL)
        self.rcpt_rules = dict(self.RCPT_RULES if rcpt_rules is None else rcpt_rules)
        offered = (("PIPELINING", pipelining), ("CHUNKING", chunking))
        self.extensions = [name for name, on in offered if on]
        self._smtp_options: dict[str, Any] = {
            "hostname": hostname,
            "tls_context": (tls_context or server_tls_context()) if tls else None,
            "require_starttls": require_tls,
            "timeout": idle_timeout,
            "data_size_limit": data_size_limit,
            "enable_SMTPUTF8": True,
        }
        self._state = threading.Condition()
        self._messages: list[SinkMessage] = []
        self._refused: list[tuple[int, str, str]] = []
        self._connections = 0
        self._active: dict[int, _SinkSMTP] = {}
        self._max_concurrent = 0
        self._stopped = False
        self.rate_limit = rate_limit
        self.rate_burst = rate_burst if rate_burst is not None else max(1.0, rate_limit or 1.0)
        self.per_ip = per_ip
        if not re.fullmatch(r"[45]\d\d [^\r\n]*", throttle_reply):
            raise ValueError(f"throttle_reply must be a 4xx or 5xx reply line: {throttle_reply!r}")
        self.throttle_reply = throttle_reply
        self._buckets: dict[str, TokenBucket] = {}
        self._throttles: list[tuple[float, str]] = []  # (when, client IP)
        self._accepts: list[tuple[float, str]] = []  # MAIL FROMs accepted: (when, client IP)
        listener = socket.create_server((host, port), backlog=128)
        self.host, self.port = listener.getsockname()[:2]
        self._loop = asyncio.new_event_loop()
        self._thread = _start_thread(self._loop.run_forever, f"sink-{self.port}")
        try:
            self._server = self._call(self._loop.create_server(self._new_session, sock=listener))
        except BaseException:
            listener.close()
            self._end_loop(5.0)
            raise

    # -- results (thread-safe copies) --

    @property
    def messages(self) -> list[SinkMessage]:
        with self._state:
            return list(self._messages)

    @property
    def connections(self) -> int:
        """Accepted TCP connections (a STARTTLS upgrade is still the same connection)."""
        with self._state:
            return self._connections

    @property
    def active(self) -> int:
        """Connections open right now."""
        with self._state:
            return len(self._active)

    @property
    def max_concurrent(self) -> int:
        with self._state:
            return self._max_concurrent

    @property
    def refused(self) -> list[tuple[int, str, str]]:
        """Recipients refused by ``rcpt_rules``, as ``(conn_id, address, reply)``."""
        with self._state:
            return list(self._refused)

    @property
    def throttled(self) -> dict[str, int]:
        """Throttle replies sent, per client IP."""
        with self._state:
            return dict(collections.Counter(ip for _, ip in self._throttles))

    def throttle_times(self, ip: str | None = None) -> list[float]:
        """When each throttle reply went out (Unix time), for one client IP or all."""
        with self._state:
            return [t for t, peer in self._throttles if ip is None or peer == ip]

    def accept_times(self, ip: str | None = None) -> list[float]:
        """When each MAIL FROM was accepted (Unix time), for one client IP or all: what the
        rate limit counts, and what ``rate`` measures."""
        with self._state:
            return [t for t, peer in self._accepts if ip is None or peer == ip]

    def rate(self, start: float, end: float, ip: str | None = None) -> float:
        """Accepted MAIL FROMs per second in [start, end) (Unix time)."""
        if end <= start:
            raise ValueError("an empty window has no rate")
        return sum(1 for t in self.accept_times(ip) if start <= t < end) / (end - start)

    def wait_for(self, count: int, timeout: float = 5.0) -> list[SinkMessage]:
        """Block until at least ``count`` messages arrived; return them all."""
        with self._state:
            if not self._state.wait_for(lambda: len(self._messages) >= count, timeout):
                raise TimeoutError(f"{len(self._messages)} of {count} messages in {timeout}s")
            return list(self._messages)

    def wait_idle(self, timeout: float = 5.0) -> None:
        """Block until no connection is open (clients hung up and the server noticed)."""
        with self._state:
            if not self._state.wait_for(lambda: not self._active, timeout):
                raise TimeoutError(f"{len(self._active)} connections still open after {timeout}s")

    def clear(self) -> None:
        """Forget messages, refusals and counts (open connections stay counted as concurrent)."""
        with self._state:
            self._messages.clear()
            self._refused.clear()
            self._throttles.clear()
            self._accepts.clear()
            self._buckets.clear()
            self._connections = 0
            self._max_concurrent = len(self._active)

    def rcpt_reply(self, address: str) -> str | None:
        """The programmed refusal for a recipient, or None to accept it."""
        local = address.rpartition("@")[0].lower()
        for prefix, reply in self.rcpt_rules.items():
            if local.startswith(prefix):
                return reply
        return None

    def summary(self, content: bool = False) -> dict[str, Any]:
        """Everything recorded, as JSON-ready data (bodies base64-encoded if ``content``)."""
        with self._state:
            return {
                "server": "sink",
                "port": self.port,
                "connections": self._connections,
                "max_concurrent": self._max_concurrent,
                "messages": [message.to_json(content) for message in self._messages],
                "refused": [
                    {"conn_id": conn, "rcpt": rcpt, "reply": reply}
                    for conn, rcpt, reply in self._refused
                ],
                "throttled": dict(collections.Counter(ip for _, ip in self._throttles)),
                "accepted_mail_from": len(self._accepts),
            }

    # -- lifecycle --

    def stop(self, timeout: float = 5.0) -> None:
        """Close the listener and every session, then end the event loop and its thread."""
        if self._stopped:
            return
        self._stopped = True
        try:
            self._call(self._shutdown(timeout), timeout + 1)
        finally:
            self._end_loop(timeout)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _end_loop(self, timeout: float) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)
        self._loop.close()

    # -- inside the event loop thread --

    def _call(self, coroutine: Any, timeout: float = 5.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    def _new_session(self) -> _SinkSMTP:
        return _SinkSMTP(self, _SinkHandler(self), loop=self._loop, **self._smtp_options)

    async def _shutdown(self, timeout: float) -> None:
        self._server.close()
        for session in list(self._active.values()):
            session.hang_up()
        deadline = time.monotonic() + timeout / 2
        while self._active and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for session in list(self._active.values()):
            session.hang_up(abort=True)
        await self._server.wait_closed()
        others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)

    def _opened(self, session: _SinkSMTP) -> int:
        with self._state:
            self._connections += 1
            conn_id = self._connections
            self._active[conn_id] = session
            self._max_concurrent = max(self._max_concurrent, len(self._active))
            return conn_id

    def _closed(self, conn_id: int) -> None:
        with self._state:
            self._active.pop(conn_id, None)
            self._state.notify_all()

    def _received(self, message: SinkMessage) -> None:
        with self._state:
            self._messages.append(message)
            self._state.notify_all()

    def _refuse(self, conn_id: int, address: str, reply: str) -> None:
        with self._state:
            self._refused.append((conn_id, address, reply))

    def _admit(self, client_ip: str) -> bool:
        """A MAIL FROM from ``client_ip``: within the rate limit (recorded either way)?"""
        now = time.time()
        with self._state:
            if self.rate_limit is None:
                self._accepts.append((now, client_ip))
                return True
            key = client_ip if self.per_ip else "*"
            bucket = self._buckets.get(key)
            if bucket is None:
                bucket = self._buckets[key] = TokenBucket(self.rate_limit, self.rate_burst)
            if bucket.take():
                self._accepts.append((now, client_ip))
                return True
            self._throttles.append((now, client_ip))
            self._state.notify_all()
            return False


class _SinkEnvelope(Envelope):
    def __init__(self) -> None:
        super().__init__()
        self.chunks: list[bytes] = []
        self.via = "DATA"


class _SinkSMTP(SMTP):
    """aiosmtpd's SMTP session plus connection accounting and BDAT (RFC 3030)."""

    _BDAT_ARG = re.compile(r"(\d+)( +LAST)? *", re.IGNORECASE)

    def __init__(self, sink: SinkServer, handler: _SinkHandler, **options: Any) -> None:
        # aiosmtpd keeps these limits in one dict shared by all sessions: each EHLO raises the
        # MAIL limit for everyone, each new session resets it. Give every session its own.
        self.command_size_limits = collections.defaultdict(lambda: SMTP.command_size_limit)
        super().__init__(handler, **options)
        self.sink = sink
        self.conn_id = 0
        self.delivered = 0
        self._counted = False

    def _create_envelope(self) -> _SinkEnvelope:
        return _SinkEnvelope()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        upgrade = self._original_transport is not None  # called again after STARTTLS
        super().connection_made(transport)
        if not upgrade:
            # aiosmtpd writes each pipelined reply on its own; without NODELAY,
            # Nagle holds the second until the client's delayed ACK (40 ms).
            # Real servers (Postfix) coalesce pipelined replies instead.
            sock = transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.conn_id = self.sink._opened(self)
            self._counted = True

    def connection_lost(self, error: Exception | None) -> None:
        try:
            super().connection_lost(error)
        finally:
            if self._counted:
                self._counted = False
                self.sink._closed(self.conn_id)

    async def smtp_MAIL(self, arg: str | None) -> None:
        """MAIL FROM, behind the sink's rate limit (a refused MAIL takes no token)."""
        assert self.session is not None and self.envelope is not None
        if self.session.host_name and arg is not None and not self.envelope.mail_from:
            peer = cast(tuple[str, int], self.session.peer)
            if not self.sink._admit(peer[0]):
                await self.push(self.sink.throttle_reply)
                if self.sink.throttle_reply.startswith("421"):
                    self.hang_up()  # 421: the server closes the connection (RFC 5321 3.8)
                return
        await super().smtp_MAIL(arg)

    def hang_up(self, abort: bool = False) -> None:
        transport = self._original_transport or self.transport
        if transport is None:
            return
        if abort:
            transport.abort()  # type: ignore[attr-defined]
        else:
            transport.close()

    @syntax("BDAT <size> [LAST]")
    async def smtp_BDAT(self, arg: str | None) -> None:
        command = self._BDAT_ARG.fullmatch(arg or "")
        if command is None:
            await self.push("501 5.5.4 Syntax: BDAT <size> [LAST]")
            return
        try:
            chunk = await self._reader.readexactly(int(command[1]))
        except asyncio.IncompleteReadError:
            self.hang_up()
            return
        await self._take_chunk(chunk, last=command[2] is not None)

    async def _take_chunk(self, chunk: bytes, last: bool) -> None:
        envelope = self.envelope
        assert isinstance(envelope, _SinkEnvelope) and self.session is not None
        if not self.session.host_name or not envelope.rcpt_tos:
            envelope.chunks.clear()
            await self.push("503 5.5.1 Error: need EHLO, MAIL and RCPT before BDAT")
            return
        envelope.chunks.append(chunk)
        if not last:
            await self.push(f"250 2.0.0 {len(chunk)} octets received")
            return
        envelope.content = envelope.original_content = b"".join(envelope.chunks)
        envelope.via = "BDAT"
        status = await self._call_handler_hook("DATA")
        self.envelope = self._create_envelope()  # what aiosmtpd's DATA does next
        await self.push("250 OK" if status is MISSING else status)


class _SinkHandler:
    """aiosmtpd hooks: advertise extensions, apply recipient rules, record messages."""

    def __init__(self, sink: SinkServer) -> None:
        self.sink = sink

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        extensions = [f"250-{name}" for name in self.sink.extensions]
        return responses[:-1] + extensions + responses[-1:]

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        refusal = self.sink.rcpt_reply(address)
        if refusal is not None:
            assert isinstance(server, _SinkSMTP)
            self.sink._refuse(server.conn_id, address, refusal)
            return refusal
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 2.1.5 OK"

    async def handle_DATA(
        self, server: SMTP, session: Session, envelope: Envelope
    ) -> str:
        assert isinstance(server, _SinkSMTP) and isinstance(envelope, _SinkEnvelope)
        server.delivered += 1
        peer = cast(tuple[str, int], session.peer)  # aiosmtpd annotates it as str
        message = SinkMessage(
            mail_from="" if envelope.mail_from == "<>" else str(envelope.mail_from),
            rcpt_tos=tuple(envelope.rcpt_tos),
            content=bytes(envelope.original_content or b""),
            peer=(peer[0], peer[1]),
            tls=session.ssl["ssl_object"].version() if session.ssl else None,
            conn_id=server.conn_id,
            seq=server.delivered,
            helo=session.host_name,
            via=envelope.via,
            mail_options=tuple(envelope.mail_options),
        )
        self.sink._received(message)
        return f"250 2.0.0 OK queued as {message.conn_id}.{message.seq}"


