"""The ZAP handler: libzmq asks it, per CURVE handshake, whether a client's key may in.

ZAP (ZeroMQ RFC 27) is a REP socket bound at `inproc://zeromq.zap.01` in the
context of the sockets it guards: for every handshake on a CURVE server socket,
libzmq sends it the socket's ZAP domain, the peer's address and the client's public
key, and lets the connection on only after a `200` answer. Without a handler bound,
libzmq admits any client key, so the handler starts before any CURVE socket binds.

One handler serves every CURVE socket of the supervisor; each socket names its list
of keys by its ZAP domain (`zmq.ZAP_DOMAIN`): the producers' (`security.curve`, the
empty domain) for ingest and events, the operators' (`control.curve`, domain
`control`) for the control socket, so a producer's key opens no control socket and
an operator's submits no mail. A refused client is logged at warning with its
address (`curve_refused`), once per address, key and domain per REFUSAL_LOG_EVERY
seconds: a refused client reconnects every few hundred milliseconds.

Written here rather than taken from `zmq.auth.thread.ThreadAuthenticator` because
pyzmq's logs a refusal at debug only and without the peer's address, and its
internals differ between pyzmq 24 (Debian bookworm) and 27. The thread imports no
gevent (the supervisor never does).
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping

import zmq
from zmq.utils import z85

from engine import logs

log = logging.getLogger("mailengine.supervisor")

ZAP_ENDPOINT = "inproc://zeromq.zap.01"  # fixed by RFC 27: libzmq asks here
VERSION = b"1.0"
REFUSAL_LOG_EVERY = 60.0  # seconds between two log lines for one refused client
START_WAIT = 10.0  # seconds for the thread to bind


class Zap:
    """The handler thread; `allow(domain, keys)` sets (or replaces) a domain's list."""

    def __init__(self, ctx: zmq.Context) -> None:
        self.ctx = ctx
        self._keys: dict[str, frozenset[bytes]] = {}  # domain -> Z85 public keys
        self._refused: dict[tuple[str, str, bytes], float] = {}  # -> last logged (monotonic)
        self._pipe_endpoint = f"inproc://mailengine-zap-{id(self)}"
        self._pipe: zmq.Socket | None = None
        self._thread: threading.Thread | None = None
        self._bound = threading.Event()
        self._error: BaseException | None = None

    def allow(self, domain: str, keys: Mapping[bytes, str] | frozenset[bytes]) -> None:
        """Only these Z85 public keys on sockets of ZAP `domain`, from now on (one
        assignment: the thread sees the old list or the new, never half of one)."""
        self._keys = {**self._keys, domain: frozenset(keys)}

    def start(self) -> None:
        """Bind the handler (in its thread) and return once it answers."""
        self._pipe = self.ctx.socket(zmq.PAIR)
        self._pipe.setsockopt(zmq.LINGER, 0)
        self._pipe.bind(self._pipe_endpoint)
        self._thread = threading.Thread(target=self._run, name="zap", daemon=True)
        self._thread.start()
        if not self._bound.wait(START_WAIT) or self._error is not None:
            self.stop()
            raise RuntimeError(f"the ZAP handler did not start: {self._error}")

    def stop(self) -> None:
        if self._pipe is None:
            return
        if self._thread is not None and self._thread.is_alive():
            self._pipe.send(b"stop")
            self._thread.join(START_WAIT)
        self._pipe.close(linger=0)
        self._pipe = self._thread = None

    # -- the thread ------------------------------------------------------------------

    def _run(self) -> None:
        try:
            zap = self.ctx.socket(zmq.REP)
            zap.setsockopt(zmq.LINGER, 0)
            zap.bind(ZAP_ENDPOINT)
            pipe = self.ctx.socket(zmq.PAIR)
            pipe.setsockopt(zmq.LINGER, 0)
            pipe.connect(self._pipe_endpoint)
        except zmq.ZMQError as err:  # another handler holds the endpoint in this context
            self._error = err
            self._bound.set()
            return
        self._bound.set()
        poller = zmq.Poller()
        poller.register(zap, zmq.POLLIN)
        poller.register(pipe, zmq.POLLIN)
        try:
            while pipe not in dict(poller.poll()):
                zap.send_multipart(self.answer(zap.recv_multipart()))
        finally:
            zap.close(linger=0)
            pipe.close(linger=0)

    def answer(self, request: list[bytes]) -> list[bytes]:
        """The reply to one ZAP request: 200 for a listed CURVE key, 400 otherwise."""
        if len(request) < 6:
            return [VERSION, request[1] if len(request) > 1 else b"", b"400",
                    b"not enough frames", b"", b""]
        version, request_id, domain_b, address_b, _identity, mechanism = request[:6]
        if version != VERSION:
            return [VERSION, request_id, b"400", b"ZAP version 1.0 only", b"", b""]
        if mechanism == b"NULL":  # a socket without CURVE that names a domain: not ours
            return [VERSION, request_id, b"200", b"OK", b"", b""]
        domain = domain_b.decode("utf-8", "replace")
        address = address_b.decode("utf-8", "replace")
        key = z85.encode(request[6]) if mechanism == b"CURVE" and len(request) == 7 \
            and len(request[6]) == 32 else b""
        if key and key in self._keys.get(domain, ()):
            return [VERSION, request_id, b"200", b"OK", key, b""]
        self._refusal(domain, address, key, mechanism)
        return [VERSION, request_id, b"400", b"unknown key", b"", b""]

    def _refusal(self, domain: str, address: str, key: bytes, mechanism: bytes) -> None:
        now = time.monotonic()
        seen = (domain, address, key)
        if now - self._refused.get(seen, -REFUSAL_LOG_EVERY) < REFUSAL_LOG_EVERY:
            return
        if len(self._refused) > 10000:  # a scan from many addresses: forget the old ones
            self._refused.clear()
        self._refused[seen] = now
        log.warning(logs.kv("curve_refused", socket=domain or "ingest/events",
                            address=address,
                            key=key.decode() if key else mechanism.decode("ascii", "replace"),
                            reason="key not allowed" if key else "not CURVE"))
