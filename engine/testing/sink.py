"""A recording SMTP sink on loopback, built on aiosmtpd: for the demo, tests and benchmarks.

It offers STARTTLS (a throwaway certificate nobody trusts, trustme's), PIPELINING and CHUNKING
(BDAT), answers recipients by local part (``reject...`` 550, ``defer...`` 451),
and records every message with its envelope, the client's address, whether TLS
was used and on which connection it came. It can rate-limit senders the way
receiving providers do (a token bucket per client IP, checked at MAIL FROM),
recording every throttle it sent and every MAIL it accepted. It serves from a
background thread of the calling process (no gevent), on an ephemeral port.

The server (`SinkServer`, here) keeps what its sessions record; one session, on aiosmtpd, and
the `SinkMessage` it records are in engine/testing/sink_session.py; the server's TLS context
is engine/testing/tlscert.py's `server_tls_context`.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import random
import re
import socket
import ssl
import threading
import time
from types import TracebackType
from typing import Any, ClassVar, Self

from engine.testing.limits import Policy, RateLimit
from engine.testing.limits import TokenBucket as TokenBucket

# Re-exported: tests/support/smtpserver.py and bench/monitoring_demo.py take them from here.
from engine.testing.sink_session import SinkMessage as SinkMessage
from engine.testing.sink_session import _body_summary as _body_summary
from engine.testing.sink_session import _SinkHandler as _SinkHandler
from engine.testing.sink_session import _SinkSMTP as _SinkSMTP
from engine.testing.tlscert import server_tls_context as server_tls_context

LOOPBACK = "127.0.0.1"


def _text(line: bytes) -> str:
    return line.rstrip(b"\r\n").decode("utf-8", "backslashreplace")


def _start_thread(target: Any, name: str) -> threading.Thread:
    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    return thread


# --------------------------------------------------------------------------------------------
# The sink


class SinkServer:
    """A recording SMTP sink on loopback, built on aiosmtpd, serving from a background thread.

    It advertises SIZE, 8BITMIME, SMTPUTF8, PIPELINING, CHUNKING and (``tls=True``) STARTTLS with
    the test certificate; ``require_tls=True`` answers ``530`` to mail commands before STARTTLS.
    Recipients are accepted unless their local part starts with a key of ``RCPT_RULES``
    (``reject...`` -> 550, ``defer...`` -> 451; pass ``rcpt_rules`` to change the table).

    ``policy`` (engine.testing.limits) limits senders as receiving providers do: a token bucket,
    a fixed window, a connection cap, greylisting, a block. ``rate_limit`` (messages per second)
    is the usual one made simple: a token bucket of ``rate_burst`` tokens (default: one second's
    worth, at least 1) per client IP (``per_ip=False``: one for everybody), checked at MAIL FROM;
    past it the server answers ``throttle_reply``. A ``421`` reply then closes the connection, as
    real servers do; any other (``451 4.7.1 ...``) keeps it open for the next transaction.
    ``throttled`` counts the refusals the policy made per client IP; ``throttle_times()`` and
    ``accept_times()`` give the moments (Unix time) of each refusal and of each accepted MAIL
    FROM, to measure rates over windows.

    ``drop_after_dot`` (a fraction, default 0: never) makes the sink take a message and then
    drop the connection instead of replying to its final dot (or ``BDAT ... LAST``): the
    message is recorded (``SinkMessage.unanswered``), the client never hears it was delivered,
    and whatever it pipelined behind it is read into nothing. It is the ambiguous case of
    RFC 5321 section 4.1.1.4 (a client that retries delivers a duplicate). Which messages are
    dropped is drawn from ``random.Random(drop_seed)``, one draw per message in arrival order:
    the same seed gives the same sequence of decisions.

    ``requiretls=True`` offers REQUIRETLS (RFC 8689) in the EHLO after STARTTLS and takes
    MAIL's ``REQUIRETLS`` parameter (recorded in ``SinkMessage.mail_options``).
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
        policy: Policy | None = None,
        drop_after_dot: float = 0.0,
        drop_seed: int | None = None,
        requiretls: bool = False,
    ) -> None:
        # aiosmtpd logs a traceback for every aborted handshake; the engine's
        # verify-first TLS probe aborts one per new host on purpose.
        logging.getLogger("mail.log").setLevel(logging.CRITICAL)
        self.rcpt_rules = dict(self.RCPT_RULES if rcpt_rules is None else rcpt_rules)
        offered = (("PIPELINING", pipelining), ("CHUNKING", chunking))
        self.extensions = [name for name, on in offered if on]
        # REQUIRETLS (RFC 8689): offered after STARTTLS only; MAIL's REQUIRETLS parameter is
        # then taken and recorded in the message's mail_options.
        self.requiretls = requiretls
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
        if not re.fullmatch(r"[45]\d\d [^\r\n]*", throttle_reply):
            raise ValueError(f"throttle_reply must be a 4xx or 5xx reply line: {throttle_reply!r}")
        if rate_limit is not None:
            policy = RateLimit(rate_limit, rate_burst, per_ip, throttle_reply)
        self.policy = policy
        if not 0.0 <= drop_after_dot <= 1.0:
            raise ValueError(f"drop_after_dot is a fraction in [0, 1]: {drop_after_dot!r}")
        self.drop_after_dot = drop_after_dot
        self._drops = random.Random(drop_seed)
        self._throttles: list[tuple[float, str]] = []  # policy refusals: (when, client IP)
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
    def unanswered(self) -> list[SinkMessage]:
        """Messages kept but never answered: their connection was dropped (``drop_after_dot``)."""
        with self._state:
            return [m for m in self._messages if m.unanswered]

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
            if isinstance(self.policy, RateLimit):
                self.policy.reset()
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

    def _drop_now(self) -> bool:
        """Whether the message just read is to be kept without a reply (``drop_after_dot``)."""
        if self.drop_after_dot <= 0.0:
            return False
        with self._state:
            return self._drops.random() < self.drop_after_dot

    def _refuse(self, conn_id: int, address: str, reply: str) -> None:
        with self._state:
            self._refused.append((conn_id, address, reply))

    def _admit(self, stage: str, client_ip: str, sender: str = "", rcpt: str = "") -> str | None:
        """Ask the policy about one step of a session (`stage`: "connect", "mail", "rcpt");
        None to go on, else the refusing reply. Accepted MAIL FROMs and refusals are
        recorded."""
        now = time.time()
        with self._state:
            refusal = None
            if self.policy is not None:
                if stage == "connect":
                    refusal = self.policy.on_connect(client_ip, self._open_from(client_ip), now)
                elif stage == "mail":
                    refusal = self.policy.on_mail(client_ip, now)
                else:
                    refusal = self.policy.on_rcpt(client_ip, sender, rcpt, now)
            if refusal is not None:
                self._throttles.append((now, client_ip))
                self._state.notify_all()
            elif stage == "mail":
                self._accepts.append((now, client_ip))
            return refusal

    def _open_from(self, client_ip: str) -> int:
        """Connections open now from `client_ip` (the one asking included)."""
        return sum(1 for session in self._active.values() if session.peer_ip == client_ip)
