"""CURVE on the control socket without a socket: the `control` key in the config (an
endpoint, or `{endpoint, curve}`), the key files' permissions, a libzmq without CURVE, and
the ZAP handler's answers (engine.zap) to requests as libzmq sends them. The sockets:
tests/conversation/test_control_curve.py."""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from zmq.utils import z85

from engine import auth
from engine.config import ConfigError, ControlCurveConfig, from_dict, to_dict
from engine.zap import Zap

BASE: dict[str, Any] = {"hostname": "mta.example.test", "ips": ["127.0.0.2"]}
needs_curve = pytest.mark.skipif(not zmq.has("curve"), reason="this libzmq has no CURVE")


def test_control_as_a_plain_endpoint_is_read_as_before() -> None:
    cfg = from_dict({**BASE, "control": "ipc:///run/x/control.sock"})
    assert cfg.control == "ipc:///run/x/control.sock"
    assert cfg.control_curve == ControlCurveConfig() and not cfg.control_curve.enabled
    assert to_dict(cfg)["control"] == "ipc:///run/x/control.sock"


def test_control_with_curve_is_read_and_written_back() -> None:
    cfg = from_dict({**BASE, "control": {"endpoint": "tcp://0.0.0.0:5572", "curve": {
        "enabled": True, "server_secret_key": "/k/control.key_secret",
        "allowed_clients": "/k/operators", "client_key": "/k/me.key_secret"}}})
    assert cfg.control == "tcp://0.0.0.0:5572"
    assert cfg.control_curve == ControlCurveConfig(True, "/k/control.key_secret", "/k/operators",
                                                   "/k/me.key_secret")
    assert from_dict(to_dict(cfg)) == cfg
    assert "control_curve" not in to_dict(cfg)


def test_a_remote_control_socket_needs_curve() -> None:
    with pytest.raises(ConfigError, match=r"enable control\.curve") as err:
        from_dict({**BASE, "control": {"endpoint": "tcp://0.0.0.0:5572"}})
    assert err.value.key == "control"
    with pytest.raises(ConfigError, match=r"enable control\.curve"):
        from_dict({**BASE, "control": {"endpoint": "tcp://0.0.0.0:5572",
                                       "curve": {"enabled": False}}})


@pytest.mark.parametrize(("control", "key", "says"), [
    ({"endpoint": "inproc://c", "curve": {"enabled": True}}, "control.curve.enabled",
     "tcp:// or ipc://"),
    ({"endpoint": "tcp://127.0.0.1:1", "curve": {"enable": True}}, "control.curve.enable",
     "unknown key"),
    ({"endpoint": "tcp://127.0.0.1:1", "curve": {"allowed_clients": ""}},
     "control.curve.allowed_clients", "must not be empty"),
    ({"endpoint": "nowhere"}, "control.endpoint", "ZeroMQ endpoint"),
    ({"socket": "tcp://127.0.0.1:1"}, "control.socket", "unknown key"),
])
def test_a_bad_control_section_names_its_key(control: dict[str, Any], key: str,
                                             says: str) -> None:
    with pytest.raises(ConfigError, match=says) as err:
        from_dict({**BASE, "control": control})
    assert err.value.key == key


# -- key files --------------------------------------------------------------------------


@pytest.fixture
def pair(tmp_path: Path) -> tuple[str, str]:
    if not zmq.has("curve"):
        pytest.skip("this libzmq has no CURVE")
    return auth.keygen("control", str(tmp_path))


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o620])
def test_a_secret_key_others_may_read_or_change_is_refused(pair: tuple[str, str],
                                                           mode: int) -> None:
    os.chmod(pair[1], mode)
    with pytest.raises(auth.KeyFileError, match=f"mode {mode:04o} lets others read or change"):
        auth.load_keypair(pair[1])


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o400])
def test_a_secret_key_for_its_owner_and_group_loads(pair: tuple[str, str], mode: int) -> None:
    os.chmod(pair[1], mode)
    assert auth.load_keypair(pair[1]).public == auth.load_public(pair[0])


def test_a_public_key_or_folder_anyone_may_change_is_refused(pair: tuple[str, str],
                                                             tmp_path: Path) -> None:
    os.chmod(pair[0], 0o646)
    with pytest.raises(auth.KeyFileError, match="anyone may change this key file"):
        auth.allowed_clients(str(tmp_path))
    os.chmod(pair[0], 0o644)
    os.chmod(tmp_path, 0o777)
    with pytest.raises(auth.KeyFileError, match="anyone may add a key to this folder"):
        auth.allowed_clients(str(tmp_path))


def test_keygen_writes_the_secret_0600_and_the_public_0644(pair: tuple[str, str]) -> None:
    assert [os.stat(p).st_mode & 0o777 for p in pair] == [0o644, 0o600]


def test_a_libzmq_without_curve_is_a_config_error_naming_control_curve(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(zmq, "has", lambda capability: capability != "curve")
    with pytest.raises(ConfigError, match=r"built without CURVE") as err:
        auth.CurveServer(ControlCurveConfig(enabled=True), "control.curve", "control")
    assert err.value.key == "control.curve.enabled"


# -- the ZAP handler's answers -----------------------------------------------------------


@pytest.fixture
def zap() -> Iterator[Zap]:
    ctx = zmq.Context()
    yield Zap(ctx)  # never started: `answer` is what its thread calls per request
    ctx.term()


def request(domain: bytes, mechanism: bytes, *credentials: bytes,
            version: bytes = b"1.0") -> list[bytes]:
    return [version, b"7", domain, b"192.0.2.1", b"", mechanism, *credentials]


KEY = bytes(range(32))


def test_a_listed_key_is_admitted_on_its_domain_only(zap: Zap) -> None:
    zap.allow("control", {z85.encode(KEY): "operator.key"})
    assert zap.answer(request(b"control", b"CURVE", KEY))[:4] == [b"1.0", b"7", b"200", b"OK"]
    assert zap.answer(request(b"", b"CURVE", KEY))[2] == b"400"  # the producers' list
    assert zap.answer(request(b"other", b"CURVE", KEY))[2] == b"400"
    zap.allow("control", {})
    assert zap.answer(request(b"control", b"CURVE", KEY))[2] == b"400"


def test_requests_that_are_not_a_listed_curve_key_are_refused(zap: Zap) -> None:
    zap.allow("control", {z85.encode(KEY): "operator.key"})
    assert zap.answer(request(b"control", b"CURVE", KEY, version=b"2.0"))[2] == b"400"
    assert zap.answer(request(b"control", b"PLAIN", b"user", b"pw"))[2] == b"400"
    assert zap.answer(request(b"control", b"CURVE", KEY[:31]))[2] == b"400"
    assert zap.answer([b"1.0", b"7"])[:3] == [b"1.0", b"7", b"400"]
    assert zap.answer([])[2] == b"400"
    # NULL: a socket without CURVE that names a domain (none of the engine's) is let be.
    assert zap.answer(request(b"control", b"NULL"))[2] == b"200"
