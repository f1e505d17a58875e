"""The client side of the control socket: one request, one answer, CURVE when asked.

`mailengine status` and `mailengine queue` (and check-config, asking whether the
engine runs) send a JSON request to the supervisor's control socket (engine.control)
and wait for its answer. Over a tcp control socket with `control.curve`, the client
is a CURVE client: the engine's control public key (`--curve-server-key`, by default
the `.key` next to the config's `control.curve.server_secret_key`) and an operator's
key pair (`--curve-client-key`, by default `control.curve.client_key`), whose public
half the engine lists in `control.curve.allowed_clients`. An engine that refuses the
key answers nothing; the client sees the handshake fail (a socket monitor) and says
so at once instead of waiting for its time-out; so does a client without keys whose
engine speaks CURVE. docs/OPERATIONS.md, "The control
socket".
"""
from __future__ import annotations

import argparse
import time
from typing import TYPE_CHECKING, Any, cast

import zmq

from engine import cliargs
from engine.config import Config

if TYPE_CHECKING:
    from engine.auth import CurveClient

# The handshake ends that mean the engine will not talk to this client.
_REFUSED = zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL


class Refused(Exception):
    """The engine refused this client's CURVE handshake (an unlisted key, or none)."""


def add_options(parser: argparse.ArgumentParser, default: Any = None) -> None:
    """`--curve-server-key` and `--curve-client-key` for a command that asks the engine."""
    parser.add_argument("--curve-server-key", metavar="FILE", default=default,
                        help="the engine's control public key (control.key): talk CURVE"
                             " (default: the config's control.curve, when enabled)")
    parser.add_argument("--curve-client-key", metavar="FILE", default=default,
                        help="this operator's key pair (NAME.key_secret, from mailengine"
                             " keygen; default: the config's control.curve.client_key)")


def curve_from(args: argparse.Namespace, cfg: Config | None) -> CurveClient | None:
    """The CURVE keys the options or the config ask for; None for a plain socket.
    cliargs.UsageError when half given, unreadable, or libzmq has no CURVE."""
    server_key = getattr(args, "curve_server_key", None)
    client_key = getattr(args, "curve_client_key", None)
    on = cfg is not None and cfg.control_curve.enabled
    if server_key is None and on and cfg is not None:
        from engine import auth
        server_key = auth.public_file_for(cfg.control_curve.server_secret_key)
    if client_key is None and on and cfg is not None:
        client_key = cfg.control_curve.client_key or None
    if server_key is None and client_key is None:
        return None
    if client_key is None:
        raise cliargs.UsageError(
            "the control socket speaks CURVE: give --curve-client-key NAME.key_secret (make"
            " a pair with `mailengine keygen NAME`; the engine must list NAME.key in"
            " control.curve.allowed_clients), or set control.curve.client_key")
    if server_key is None:
        raise cliargs.UsageError("--curve-client-key needs --curve-server-key (the engine's"
                                 " control.key)")
    from engine import auth
    if not auth.available():
        raise cliargs.UsageError("this libzmq has no CURVE support (zmq.has('curve') is False)")
    try:
        return auth.CurveClient.from_files(server_key, client_key)
    except auth.KeyFileError as err:
        raise cliargs.UsageError(str(err)) from None


def request(endpoint: str, payload: dict[str, Any], timeout: float, option: str = "control",
            curve: CurveClient | None = None) -> dict[str, Any]:
    """The engine's answer to `payload`. TimeoutError if none came within `timeout`,
    Refused if the engine refused the CURVE handshake, cliargs.UsageError (naming
    `option`) for an endpoint libzmq refuses."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    if curve is not None:
        curve.secure(sock)
    monitor = sock.get_monitor_socket(_REFUSED)
    try:
        cliargs.connect(sock, endpoint, option)
        sock.send_json(payload)
        _wait(sock, monitor, endpoint, timeout, curve is not None)
        return cast(dict[str, Any], sock.recv_json())  # the supervisor answers an object
    finally:
        sock.disable_monitor()
        monitor.close(linger=0)
        sock.close()


def _wait(sock: zmq.Socket, monitor: zmq.Socket, endpoint: str, timeout: float,
          curve: bool) -> None:
    """Until the answer is there; raises TimeoutError or Refused."""
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    poller.register(monitor, zmq.POLLIN)
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        ready = dict(poller.poll(max(1, int(left * 1000))))
        if sock in ready:
            return
        if monitor in ready:
            monitor.recv_multipart()  # a failed handshake: the only events asked for
            raise Refused(_refusal(endpoint, curve))
    raise TimeoutError(f"no answer from {endpoint} within {timeout:g}s")


def _refusal(endpoint: str, curve: bool) -> str:
    if curve:
        return (f"{endpoint} refused this client's CURVE key (is its .key in the engine's"
                " control.curve.allowed_clients? is --curve-server-key the engine's"
                " control.key?)")
    return (f"{endpoint} speaks CURVE (control.curve) and this client does not: give"
            " --curve-server-key and --curve-client-key (docs/OPERATIONS.md)")
