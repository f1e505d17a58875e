"""CURVE on a tcp control socket, in process with real ZeroMQ sockets on loopback: the
engine's ZAP handler (engine.zap) with its two lists (the producers' for ingest and events,
the operators' for control), the control socket answering a listed operator, refusing an
unknown key, a producer's key and a plain client, and the refusal logged at warning with
the client's address; the client side (engine.controlclient) says "refused" at once.
The whole engine is tests/engine/test_control_curve.py."""
from __future__ import annotations

import logging
import shutil
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from engine import auth, controlclient
from engine.config import ControlCurveConfig, CurveConfig
from engine.control import Control
from engine.zap import Zap
from tests.support.wait import HANDSHAKE_ENDS, socket_event


def free_endpoint() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{probe.getsockname()[1]}"


class Keys:
    """The control pair, the ingest pair, and operator, producer and stranger clients."""

    def __init__(self, base: Path) -> None:
        (base / "operators").mkdir(parents=True)
        (base / "producers").mkdir()
        for name in ("control", "server"):
            auth.keygen(name, str(base))
        for name in ("operator", "producer", "stranger"):
            auth.keygen(name, str(base / "private"))
        shutil.copy(base / "private" / "operator.key", base / "operators")
        shutil.copy(base / "private" / "producer.key", base / "producers")
        self.base = base
        self.control = ControlCurveConfig(enabled=True,
                                          server_secret_key=str(base / "control.key_secret"),
                                          allowed_clients=str(base / "operators"))
        self.ingest = CurveConfig(enabled=True, server_secret_key=str(base / "server.key_secret"),
                                  allowed_clients=str(base / "producers"))

    def client(self, name: str) -> auth.CurveClient:
        return auth.CurveClient.from_files(str(self.base / "control.key"),
                                           str(self.base / "private" / f"{name}.key_secret"))


class ControlServer:
    """A control socket (engine.control.Control) as the supervisor binds it, answered by
    a thread; ingest's CURVE server shares the ZAP handler, as in the supervisor."""

    def __init__(self, keys: Keys) -> None:
        self.ctx = zmq.Context()
        self.zap = Zap(self.ctx)
        self.zap.start()
        self.ingest = auth.CurveServer(keys.ingest)
        self.ingest.start(self.zap)
        self.curve = auth.CurveServer(keys.control, "control.curve", "control")
        self.curve.start(self.zap)
        sock = self.ctx.socket(zmq.REP)
        self.curve.secure(sock)
        self.endpoint = free_endpoint()
        sock.bind(self.endpoint)
        self.control = Control(sock, lambda: {"pid": 1})
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopping.is_set():
            if self.control.sock.poll(50):
                self.control.answer()

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(5)
        self.control.sock.close(linger=0)
        self.zap.stop()
        self.ctx.term()


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    if not zmq.has("curve"):
        pytest.skip("this libzmq has no CURVE (zmq.has('curve') is False)")
    return Keys(tmp_path / "keys")


@pytest.fixture
def server(keys: Keys) -> Iterator[ControlServer]:
    running = ControlServer(keys)
    yield running
    running.close()


def refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and "event=curve_refused" in r.getMessage()]


def test_a_listed_operator_is_answered(server: ControlServer, keys: Keys) -> None:
    answer = controlclient.request(server.endpoint, {"command": "status"}, 10,
                                   curve=keys.client("operator"))
    assert answer == {"pid": 1}


@pytest.mark.parametrize("name", ["stranger", "producer"])
def test_an_unlisted_key_gets_nothing_and_is_logged_with_its_address(
        server: ControlServer, keys: Keys, name: str, caplog: pytest.LogCaptureFixture) -> None:
    """A producer's key, listed for ingest and events, opens no control socket."""
    caplog.set_level(logging.WARNING, "mailengine.supervisor")
    with pytest.raises(controlclient.Refused, match="refused this client's CURVE key"):
        controlclient.request(server.endpoint, {"command": "status"}, 10,
                              curve=keys.client(name))
    key = auth.load_public(str(keys.base / "private" / f"{name}.key")).decode()
    [line] = refusals(caplog)
    assert "socket=control" in line and "address=127.0.0.1" in line and key in line


def test_a_plain_client_gets_nothing(server: ControlServer) -> None:
    ctx = zmq.Context()
    try:
        plain = ctx.socket(zmq.REQ)
        monitor = plain.get_monitor_socket()
        plain.connect(server.endpoint)
        plain.send_json({"command": "status"})
        assert socket_event(monitor, HANDSHAKE_ENDS) != zmq.EVENT_HANDSHAKE_SUCCEEDED
        assert not plain.poll(0)
        plain.disable_monitor()
        monitor.close(linger=0)
        plain.close(linger=0)
    finally:
        ctx.term()


def test_a_refused_client_is_logged_once_per_minute(
        server: ControlServer, keys: Keys, caplog: pytest.LogCaptureFixture) -> None:
    """A refused client reconnects every few hundred milliseconds: one line, not a flood."""
    caplog.set_level(logging.WARNING, "mailengine.supervisor")
    for _ in range(3):
        with pytest.raises(controlclient.Refused):
            controlclient.request(server.endpoint, {"command": "status"}, 10,
                                  curve=keys.client("stranger"))
    assert len(refusals(caplog)) == 1


def test_a_reloaded_list_admits_a_new_operator_at_once(server: ControlServer,
                                                       keys: Keys) -> None:
    shutil.copy(keys.base / "private" / "stranger.key", keys.base / "operators")
    assert server.curve.reload_clients() == 2
    answer = controlclient.request(server.endpoint, {"command": "status"}, 10,
                                   curve=keys.client("stranger"))
    assert answer == {"pid": 1}


def test_the_producers_list_still_guards_ingest(server: ControlServer, keys: Keys) -> None:
    """The operators' list is for the control socket only: an operator's key submits no
    mail, a producer's still does."""
    ingest = server.ctx.socket(zmq.PULL)
    server.ingest.secure(ingest)
    endpoint = free_endpoint()
    ingest.bind(endpoint)
    ctx = zmq.Context()
    try:
        outcomes = {}
        for name in ("producer", "operator"):
            push = ctx.socket(zmq.PUSH)
            auth.CurveClient.from_files(str(keys.base / "server.key"),
                                        str(keys.base / "private" / f"{name}.key_secret")
                                        ).secure(push)
            monitor = push.get_monitor_socket()
            push.connect(endpoint)
            outcomes[name] = socket_event(monitor, HANDSHAKE_ENDS)
            push.disable_monitor()
            monitor.close(linger=0)
            push.close(linger=0)
        assert outcomes == {"producer": zmq.EVENT_HANDSHAKE_SUCCEEDED,
                            "operator": zmq.EVENT_HANDSHAKE_FAILED_AUTH}
    finally:
        ingest.close(linger=0)
        ctx.term()
