"""Hardening without a socket: who may listen where (the loopback rule, CURVE keys), what
names and bodies may reach the wire, which destinations are prohibited. docs/SECURITY.md
explains each rule; the same rules on the wire are tests/conversation/test_security.py, and in
the whole engine tests/engine/test_security.py.
"""
from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import pytest
import zmq
from hypothesis import given, settings

from engine import auth
from engine.config import ConfigError, SecurityConfig, from_dict
from engine.connector import Connector, Identity
from engine.job import normalise_message
from engine.metrics import Metrics
from engine.mx import DestinationPolicy, MxHost, Resolver
from engine.reply import TransientError
from engine.smtp import Connection, ReplyLimits
from engine.tls import TlsPolicy
from tests.support.cli import mailengine
from tests.support.fuzz import BODIES, check_data_encoding
from tests.support.playbook import FAST, HELO

needs_curve = pytest.mark.skipif(not zmq.has("curve"),
                                 reason="this libzmq has no CURVE (zmq.has('curve') is False)")


def minimal(**extra: Any) -> dict[str, Any]:
    return {"hostname": "mta.example.com", "ips": [{"address": "192.0.2.10"}], **extra}


def refused(data: dict[str, Any]) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        from_dict(data)
    return info.value


REMOTE = ["tcp://0.0.0.0:5570", "tcp://*:5570", "tcp://[::]:5570", "tcp://192.0.2.7:5570",
          "tcp://10.1.2.3:5570", "tcp://eth0:5570", "tcp://mta.example.com:5570",
          "tcp://[::ffff:10.0.0.1]:5570"]


LOCAL = ["tcp://127.0.0.1:5570", "tcp://127.0.0.9:5570", "tcp://[::1]:5570",
         "tcp://localhost:5570", "tcp://lo:5570", "tcp://127.0.0.1:*",
         "tcp://[::ffff:127.0.0.1]:5570", "ipc:///run/mailengine/ingest.sock",
         "inproc://ingest"]


# =======================================================================================
# 1. Who may send: the loopback rule and CURVE
# =======================================================================================

def test_defaults_listen_on_loopback_only_with_curve_off() -> None:
    cfg = from_dict(minimal())
    assert cfg.security == SecurityConfig()
    assert not cfg.security.curve.enabled and not cfg.security.allow_plain_remote
    assert cfg.ingest.startswith("tcp://127.0.0.1:") and cfg.events.startswith("tcp://127.0.0.1:")


@pytest.mark.parametrize("endpoint", REMOTE)
@pytest.mark.parametrize("key", ["ingest", "events", "control"])
def test_a_remote_endpoint_without_curve_is_refused_naming_its_key(key: str,
                                                                   endpoint: str) -> None:
    others = {k: f"ipc:///tmp/{k}" for k in ("ingest", "events", "control") if k != key}
    err = refused(minimal(**others, **{key: endpoint}))
    assert err.key == key
    assert str(err).startswith(f"{key}: {endpoint} can be reached from other machines")
    assert "security.allow_plain_remote" in str(err)
    assert ("security.curve" in str(err)) is (key != "control")  # CURVE does not cover control


@pytest.mark.parametrize("endpoint", LOCAL)
def test_loopback_and_local_endpoints_are_allowed(endpoint: str) -> None:
    assert from_dict(minimal(ingest=endpoint, events="ipc:///tmp/e")).ingest == endpoint


def test_curve_lets_ingest_and_events_listen_remotely_but_not_control() -> None:
    curve = {"curve": {"enabled": True}}
    cfg = from_dict(minimal(ingest="tcp://0.0.0.0:5570", events="tcp://*:5571", security=curve))
    assert cfg.security.curve.enabled
    err = refused(minimal(control="tcp://0.0.0.0:5572", security=curve))
    assert err.key == "control"


def test_allow_plain_remote_lets_every_endpoint_listen_remotely() -> None:
    cfg = from_dict(minimal(ingest="tcp://0.0.0.0:1", events="tcp://*:2", control="tcp://eth0:3",
                            security={"allow_plain_remote": True}))
    assert cfg.security.allow_plain_remote


@pytest.mark.parametrize(("value", "path", "words"), [
    ({"curve": {"enabled": "yes"}}, "security.curve.enabled", "true or false"),
    ({"curve": {"server_secret_key": ""}}, "security.curve.server_secret_key", "not be empty"),
    ({"curve": {"allowed_client": "/x"}}, "security.curve.allowed_client", "did you mean"),
    ({"allowed_destinations": ["10.1.2.3/8"]}, "security.allowed_destinations[0]",
     "host bits set"),
    ({"allowed_destinations": ["nope"]}, "security.allowed_destinations[0]", "not a network"),
    ({"allow_private_destinations": 1}, "security.allow_private_destinations", "true or false"),
])
def test_security_keys_are_checked_with_their_path(value: Any, path: str, words: str) -> None:
    err = refused(minimal(security=value))
    assert err.key == path and words in str(err)


def test_allowed_destinations_are_normalised_networks() -> None:
    cfg = from_dict(minimal(security={"allowed_destinations": ["10.20.0.0/16", "192.0.2.5",
                                                               "FD00:1::/48"]}))
    assert cfg.security.allowed_destinations == ("10.20.0.0/16", "192.0.2.5/32", "fd00:1::/48")


@needs_curve
def test_keygen_writes_a_z85_pair_with_a_private_secret_and_never_overwrites(
        tmp_path: Path) -> None:
    done = mailengine("keygen", "server", "--dir", str(tmp_path / "keys"))
    assert done.returncode == 0, done.stderr
    public, secret = tmp_path / "keys" / "server.key", tmp_path / "keys" / "server.key_secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert stat.S_IMODE(public.stat().st_mode) == 0o644
    pair = auth.load_keypair(str(secret))
    assert len(pair.public) == len(pair.secret) == 40
    assert auth.load_public(str(public)) == pair.public
    again = mailengine("keygen", "server", "--dir", str(tmp_path / "keys"))
    assert again.returncode == 2 and "exists already" in again.stderr
    assert auth.load_keypair(str(secret)) == pair


# =======================================================================================
# 2. Nothing from data reaches the wire unchecked
# =======================================================================================

@pytest.mark.parametrize("helo", ["mx.test\r\nRSET", "mx.test\n", "mx\0", "mx test", "",
                                  "m\u00e9x.test", "mx\x7f"])
def test_an_ehlo_name_that_could_inject_is_refused_before_any_connection(helo: str) -> None:
    with pytest.raises(ValueError, match="EHLO name"):
        Connection(helo, "127.0.0.1", FAST, ReplyLimits())


@pytest.mark.parametrize("helo", ["mx.test\r\nRSET", "mx test", "[127.0.0.1]\n"])
def test_config_refuses_an_ehlo_name_with_cr_lf_or_space(helo: str) -> None:
    assert refused(minimal(hostname=helo)).key == "hostname"
    assert refused(minimal(ips=[{"address": "192.0.2.1", "helo": helo}])).key == "ips[0].helo"


# =======================================================================================
# 3. The body cannot smuggle a second message
# =======================================================================================

@settings(max_examples=500, deadline=None)
@given(BODIES)
def test_data_encoding_has_one_terminator_at_the_end_and_unstuffs_to_the_message(
        raw: bytes) -> None:
    check_data_encoding(normalise_message(raw))


# =======================================================================================
# 4. Prohibited destinations
# =======================================================================================

@pytest.mark.parametrize(("address", "words"), [
    ("127.0.0.1", "loopback"), ("127.255.0.9", "loopback"), ("::1", "loopback"),
    ("10.1.2.3", "private"), ("172.16.5.4", "private"), ("192.168.1.1", "private"),
    ("fd12:3456::1", "unique local"), ("169.254.169.254", "link-local"), ("fe80::1", "link-local"),
    ("0.0.0.0", "unspecified"), ("::", "unspecified"), ("224.0.0.251", "multicast"),
    ("ff02::1", "multicast"), ("240.0.0.1", "reserved"), ("255.255.255.255", "reserved"),
    ("100.64.0.1", "shared"), ("192.0.2.1", "documentation"), ("2001:db8::1", "documentation"),
    ("198.18.0.1", "benchmarking"), ("::ffff:127.0.0.1", "IPv6 form of a loopback"),
    ("64:ff9b::a00:1", "IPv6 form of a private"), ("2002:c0a8:101::1", "IPv6 form of a private"),
])
def test_special_addresses_are_prohibited_by_default(address: str, words: str) -> None:
    why = DestinationPolicy().refusal(address)
    assert why is not None and why.startswith(address) and words in why


@pytest.mark.parametrize("address", ["8.8.8.8", "142.250.74.27", "2a00:1450:4001:80b::201b",
                                     "::ffff:8.8.8.8", "64:ff9b::808:808"])
def test_public_addresses_are_allowed(address: str) -> None:
    assert DestinationPolicy().refusal(address) is None


def test_allowed_networks_and_the_switch() -> None:
    cfg = from_dict(minimal(security={"allowed_destinations": ["10.20.0.0/16"]}))
    policy = DestinationPolicy.from_config(cfg.security)
    assert policy.refusal("10.20.1.1") is None
    assert policy.refusal("10.21.1.1") is not None
    off = from_dict(minimal(security={"allow_private_destinations": True}))
    assert DestinationPolicy.from_config(off.security).refusal("127.0.0.1") is None


def test_the_connector_refuses_before_connecting() -> None:
    connector = Connector(Identity("127.0.0.1", HELO), Resolver(), TlsPolicy("none"), FAST,
                          ReplyLimits(), Metrics(None, "127.0.0.1"))
    with pytest.raises(TransientError) as caught:
        connector.open(MxHost("10.9.8.7", 10, 25), "test")
    assert caught.value.reply.enhanced == "4.4.4" and caught.value.command == "CONNECT"
