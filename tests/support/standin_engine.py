"""A stand-in for the engine's two public sockets, for `mailengine push` alone: a PULL socket
that takes jobs and a PUB socket that answers each with `queued` (or `rejected`, when
`reject` says why), on ephemeral loopback ports, served by a thread.

It counts what it received, so a test can see how far a pusher has read ahead of the
answers it got: `received` only grows, and a job is answered once received.
"""
from __future__ import annotations

import json
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any, Self

import zmq


class StandinEngine:
    def __init__(self, reject: Callable[[dict[str, Any]], str | None] = lambda _: None) -> None:
        self.ctx = zmq.Context()
        self.pull = self.ctx.socket(zmq.PULL)
        self.pull.bind("tcp://127.0.0.1:*")
        self.pub = self.ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.SNDHWM, 0)
        self.pub.bind("tcp://127.0.0.1:*")
        self.ingest = self.pull.getsockopt_string(zmq.LAST_ENDPOINT)
        self.events = self.pub.getsockopt_string(zmq.LAST_ENDPOINT)
        self.reject = reject
        self.received = 0
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
            if len(self.envelopes) < 100:
                self.envelopes.append(envelope)
            why = self.reject(envelope)
            event = ({"event": "queued", "id": envelope["id"]} if why is None else
                     {"event": "rejected", "id": envelope["id"], "error": why})
            self.pub.send_multipart([event["event"].encode(), json.dumps(event).encode()])
