"""A stand-in for the engine's two public sockets, for `mailengine push` alone: a PULL socket
that takes jobs and a PUB socket that answers each with `queued` (or `rejected`, when
`reject` says why), on ephemeral loopback ports, served by a thread.

It counts what it received, so a test can see how far a pusher has read ahead of the
answers it got: `received` only grows, and a job is answered once received. With
`answer_from` N, the first N - 1 copies of each job id are taken and not answered (an
engine that died before its commit), so a producer is seen to send a job again. With
`curve_secret` (a Z85 secret key) both sockets are CURVE servers with that key (any client
key is let in: no ZAP handler).
"""
from __future__ import annotations

import collections
import json
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any, Self

import zmq


class StandinEngine:
    def __init__(self, reject: Callable[[dict[str, Any]], str | None] = lambda _: None,
                 answer_from: int = 1, curve_secret: bytes | None = None) -> None:
        self.ctx = zmq.Context()
        self.pull = self.ctx.socket(zmq.PULL)
        self.pub = self.ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.SNDHWM, 0)
        for sock in (self.pull, self.pub):
            if curve_secret is not None:
                sock.setsockopt(zmq.CURVE_SERVER, 1)
                sock.setsockopt(zmq.CURVE_SECRETKEY, curve_secret)
            sock.bind("tcp://127.0.0.1:*")
        self.ingest = self.pull.getsockopt_string(zmq.LAST_ENDPOINT)
        self.events = self.pub.getsockopt_string(zmq.LAST_ENDPOINT)
        self.reject = reject
        self.answer_from = answer_from
        self.received = 0
        self.copies: collections.Counter[str] = collections.Counter()  # by job id
        self.envelopes: list[dict[str, Any]] = []  # the first few, as sent
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.ctx.destroy(linger=0)

    def _serve(self) -> None:
        while not self._stop.is_set():
            if not self.pull.poll(50):
                continue
            envelope = json.loads(self.pull.recv_multipart()[0])
            self.received += 1
            self.copies[envelope["id"]] += 1
            if len(self.envelopes) < 100:
                self.envelopes.append(envelope)
            if self.copies[envelope["id"]] < self.answer_from:
                continue
            why = self.reject(envelope)
            event = ({"event": "queued", "id": envelope["id"]} if why is None else
                     {"event": "rejected", "id": envelope["id"], "error": why})
            self.pub.send_multipart([event["event"].encode(), json.dumps(event).encode()])
