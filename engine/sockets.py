"""The supervisor's ZeroMQ sockets: binding them, their ipc paths, the hot path's flags.

Every socket the supervisor binds goes through `bind`: a linger so that what is
queued at a stop still leaves, its options (high-water marks, frame size caps),
CURVE where the caller asks for it, and an ipc path left by a process that died
removed first. The supervisor-worker sockets live in `run_dir` as ipc endpoints.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping

import zmq

# Plain ints: pyzmq's flag enums cost a Python-level `|` on every send and receive.
NOBLOCK = int(zmq.NOBLOCK)
MORE_NOBLOCK = int(zmq.SNDMORE) | int(zmq.NOBLOCK)
RCVMORE = int(zmq.RCVMORE)

LINGER_MS = 1000  # what is still queued at close gets this long to leave

Secure = Callable[[zmq.Socket], None]  # applies CURVE (engine.auth.CurveServer.secure)


def bind(ctx: zmq.Context, kind: int, endpoint: str,
         options: Mapping[int, int] | None = None, secure: Secure | None = None) -> zmq.Socket:
    """A socket of `kind` bound to `endpoint`, with `options` set before the bind."""
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, LINGER_MS)
    for option, value in (options or {}).items():
        sock.setsockopt(option, value)
    if secure is not None:
        secure(sock)
    path = _ipc_path(endpoint)
    if path is not None:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        if os.path.exists(path):
            os.unlink(path)  # left by a process that died
    sock.bind(endpoint)
    return sock


def ipc_endpoint(run_dir: str, name: str) -> str:
    """The endpoint of one of the supervisor's own sockets ("results", a worker's tasks)."""
    return f"ipc://{os.path.join(run_dir, name)}.sock"


def close_and_unlink(sock: zmq.Socket) -> None:
    """Close at once (what is queued is dropped) and remove its ipc path, if any."""
    endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
    sock.close(linger=0)
    path = _ipc_path(endpoint)
    if path is not None and os.path.exists(path):
        os.unlink(path)


def _ipc_path(endpoint: str) -> str | None:
    return endpoint[len("ipc://"):] if endpoint.startswith("ipc://") else None
