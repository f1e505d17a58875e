"""Hardening of the whole engine (`mailengine run`, its workers, `push`): CURVE admits the
listed producers and subscribers only, a bad security config stops the start, a smuggling
body arrives as one message, an MX on loopback is deferred, an oversized frame drops its
sender. docs/SECURITY.md explains each rule.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import zmq

from engine import auth
from engine.job import normalise_message
from engine.testing.harness import LocalEngine, final_outcomes, make_message
from engine.testing.sink import SinkServer
from tests.support.cli import mailengine
from tests.support.control import free_tcp_endpoint
from tests.support.dnsserver import DnsServer
from tests.support.fuzz import SMUGGLER
from tests.support.wait import HANDSHAKE_ENDS, socket_event

pytestmark = pytest.mark.timeout(60)


# =======================================================================================
# 1. Who may send: the loopback rule and CURVE
# =======================================================================================

@pytest.fixture
def keys(tmp_path: Path) -> dict[str, str]:
    """The engine's pair, one allowed producer, one stranger (not in the allow-list)."""
    if not zmq.has("curve"):
        pytest.skip("this libzmq has no CURVE (zmq.has('curve') is False)")
    base = tmp_path / "keys"
    (base / "clients").mkdir(parents=True)
    auth.keygen("server", str(base))
    auth.keygen("producer", str(base / "private"))
    auth.keygen("stranger", str(base / "private"))
    shutil.copy(base / "private" / "producer.key", base / "clients" / "producer.key")
    return {"server_secret": str(base / "server.key_secret"), "server": str(base / "server.key"),
            "clients": str(base / "clients"),
            "producer": str(base / "private" / "producer.key_secret"),
            "stranger": str(base / "private" / "stranger.key_secret"),
            "stranger_public": str(base / "private" / "stranger.key")}


def curve_config(keys: dict[str, str]) -> dict[str, Any]:
    return {"ingest": free_tcp_endpoint(), "events": free_tcp_endpoint(),
            "security": {"curve": {"enabled": True, "server_secret_key": keys["server_secret"],
                                   "allowed_clients": keys["clients"]}}}


def eml(tmp_path: Path, name: str) -> str:
    path = tmp_path / f"{name}.eml"
    path.write_bytes(make_message(0, 300, rcpt=f"{name}@example.test"))
    return str(path)


def push(engine: LocalEngine, eml_path: str, job_id: str, *flags: str,
         timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return mailengine("push", "--ingest", str(engine.config["ingest"]), "--events",
                      str(engine.config["events"]), "--from", "s@example.test", "--to",
                      f"{job_id}@example.test", "--id", job_id, "--timeout", "3", *flags,
                      eml_path, timeout=timeout)


@pytest.mark.timeout(90)
def test_curve_admits_listed_clients_only_and_reloads_the_list(
        keys: dict[str, str], sink: SinkServer, local_engine: Callable[..., LocalEngine],
        tmp_path: Path) -> None:
    engine = local_engine(sink.port, extra=curve_config(keys))
    message = eml(tmp_path, "m")
    allowed = push(engine, message, "allowed", "--curve-server-key", keys["server"],
                   "--curve-client-key", keys["producer"])
    assert allowed.returncode == 0, allowed.stderr
    # With the engine's config, the server's public key is found next to its secret.
    by_config = mailengine("push", "-c", engine.config_path, "--curve-client-key",
                           keys["producer"], "--from", "s@example.test", "--to",
                           "byconfig@example.test", "--id", "byconfig", message)
    assert by_config.returncode == 0, by_config.stderr
    stranger = push(engine, message, "stranger", "--curve-server-key", keys["server"],
                    "--curve-client-key", keys["stranger"])
    plain = push(engine, message, "plain")
    assert stranger.returncode == 1 and "not acknowledged 1: " in stranger.stderr
    assert stranger.stderr.rstrip().endswith("(stranger)")
    assert plain.returncode == 1 and plain.stderr.rstrip().endswith("(plain)")
    needs_key = mailengine("push", "-c", engine.config_path, "--to", "x@example.test",
                           "--from", "", message)
    assert needs_key.returncode == 2 and "--curve-client-key" in needs_key.stderr

    engine.wait_final(2, timeout=20)
    ids = {e["id"] for e in engine.events()}
    assert {"allowed", "byconfig"} <= ids and not {"stranger", "plain"} & ids
    assert sorted(r for m in sink.messages for r in m.rcpt_tos) == [
        "allowed@example.test", "byconfig@example.test"]

    # Adding a client is a file copy and a reload, no restart.
    shutil.copy(keys["stranger_public"], os.path.join(keys["clients"], "stranger.key"))
    engine.reload()
    engine.wait_for(lambda _: "curve_clients_reloaded clients=2" in engine.log_tail(50), 10,
                    "the reload")
    welcome = push(engine, message, "welcome", "--curve-server-key", keys["server"],
                   "--curve-client-key", keys["stranger"])
    assert welcome.returncode == 0, welcome.stderr


def test_curve_events_reach_listed_subscribers_only(
        keys: dict[str, str], sink: SinkServer, local_engine: Callable[..., LocalEngine],
        tmp_path: Path) -> None:
    engine = local_engine(sink.port, extra=curve_config(keys))
    ctx = zmq.Context()
    try:
        listed, plain = ctx.socket(zmq.SUB), ctx.socket(zmq.SUB)
        auth.CurveClient.from_files(keys["server"], keys["producer"]).secure(listed)
        monitors = [sub.get_monitor_socket() for sub in (listed, plain)]
        for sub in (listed, plain):
            sub.setsockopt(zmq.SUBSCRIBE, b"")
            sub.setsockopt(zmq.LINGER, 0)
            sub.connect(str(engine.config["events"]))
        # Each handshake is over: the listed subscriber's subscription (queued since connect)
        # goes out right behind it, long before `push` starts; the plain one is turned away.
        assert socket_event(monitors[0], HANDSHAKE_ENDS) == zmq.EVENT_HANDSHAKE_SUCCEEDED
        assert socket_event(monitors[1], HANDSHAKE_ENDS) != zmq.EVENT_HANDSHAKE_SUCCEEDED
        done = push(engine, eml(tmp_path, "e"), "evt", "--curve-server-key", keys["server"],
                    "--curve-client-key", keys["producer"])
        assert done.returncode == 0, done.stderr
        assert listed.poll(5000), "the listed subscriber got no event"
        topic, body = listed.recv_multipart()
        assert topic == b"queued" and json.loads(body)["id"] == "evt"
        assert not plain.poll(500)
    finally:
        ctx.destroy(linger=0)


@pytest.mark.parametrize(("case", "words"), [
    ("missing-key", "security.curve.server_secret_key: "),
    ("public-key-only", "holds only a public key"),
    ("no-clients", "security.curve.allowed_clients: no client public keys"),
    ("remote-plain", "ingest: tcp://0.0.0.0:"),
])
def test_engine_refuses_to_start_naming_the_key(
        keys: dict[str, str], local_engine: Callable[..., LocalEngine], tmp_path: Path,
        case: str, words: str) -> None:
    extra = curve_config(keys)
    curve = extra["security"]["curve"]
    if case == "missing-key":
        curve["server_secret_key"] = str(tmp_path / "nope.key_secret")
    elif case == "public-key-only":
        curve["server_secret_key"] = keys["server"]
    elif case == "no-clients":
        curve["allowed_clients"] = str(tmp_path)
    else:
        extra = {"ingest": "tcp://0.0.0.0:5570"}
    engine = local_engine(9, start=False, extra=extra)
    done = mailengine("run", "-c", engine.config_path, timeout=30)
    assert done.returncode == 2, done.stderr
    assert words in done.stderr


# =======================================================================================
# 3. The body cannot smuggle a second message
# =======================================================================================

def test_smuggling_through_the_engine_arrives_as_one_message(
        sink: SinkServer, local_engine: Callable[..., LocalEngine]) -> None:
    engine = local_engine(sink.port)
    assert engine.push([({"id": "smuggle", "from": "s@example.test", "to": ["r@example.test"]},
                         SMUGGLER)])
    finals = final_outcomes(engine.wait_final(1, timeout=20))
    assert [e["event"] for e in finals.values()] == ["delivered"]
    assert engine.stop(timeout=20) == 0  # stopped: whatever it had to send, it has sent
    sink.wait_idle()
    assert len(sink.messages) == 1
    assert sink.messages[0].content == normalise_message(SMUGGLER)


# =======================================================================================
# 4. Prohibited destinations
# =======================================================================================

@pytest.mark.parametrize("allowed", [False, True], ids=["default", "allow-listed"])
def test_engine_defers_mail_whose_mx_is_loopback_unless_allowed(
        sink: SinkServer, local_engine: Callable[..., LocalEngine], allowed: bool) -> None:
    zone = {"example.test": {"MX": [(10, "mx.example.test")]},
            "mx.example.test": {"A": ["127.0.0.1"]}}
    with DnsServer(zone) as dns:
        extra: dict[str, Any] = {"dns": {"nameservers": ["127.0.0.1"], "port": dns.port},
                                 "retry": {"schedule": ["1h"]}}
        if allowed:
            extra["security"] = {"allowed_destinations": ["127.0.0.0/8"]}
        engine = local_engine(sink.port, route=None, extra=extra)
        assert engine.push([({"id": "j", "from": "s@example.test", "to": ["r@example.test"]},
                             make_message(0, 300))])
        events = engine.wait_for(lambda evs: any(e["event"] in ("delivered", "deferred")
                                                 for e in evs), 20, "an outcome")
    outcome = next(e for e in events if e["event"] in ("delivered", "deferred"))
    if allowed:
        assert outcome["event"] == "delivered" and len(sink.messages) == 1
    else:
        assert outcome["event"] == "deferred" and outcome["enhanced"] == "4.4.4"
        assert "127.0.0.1 is a loopback address" in outcome["reply"]
        assert sink.connections == 0
        assert "event=prohibited_destination mx=mx.example.test" in engine.log_tail(50)


# =======================================================================================
# 5. Bounded resources
# =======================================================================================

def test_a_frame_larger_than_any_job_drops_its_sender_not_the_engine(
        sink: SinkServer, local_engine: Callable[..., LocalEngine]) -> None:
    engine = local_engine(sink.port, extra={"limits": {"max_message_size": "10KB"}})
    envelope = json.dumps({"id": "huge", "from": "s@example.test", "to": ["r@example.test"]})
    ctx = zmq.Context()
    try:
        hostile = ctx.socket(zmq.PUSH)
        hostile.setsockopt(zmq.LINGER, 0)
        monitor = hostile.get_monitor_socket()
        hostile.connect(str(engine.config["ingest"]))
        hostile.send_multipart([envelope.encode(), b"x" * (4 * 2**20)])  # over 10 KB + 1 MiB
        socket_event(monitor, {zmq.EVENT_DISCONNECTED})  # the engine dropped the sender
    finally:
        ctx.destroy(linger=0)
    jobs = [({"id": "over", "from": "s@example.test", "to": ["r@example.test"]},
             b"x" * 11_000), ({"id": "fine", "from": "s@example.test", "to": ["r@example.test"]},
                              make_message(0, 300))]
    engine.push(jobs, timeout=10)
    events = engine.wait_final(1, timeout=20)
    by_id = {e["id"]: e["event"] for e in events if e["event"] in ("rejected", "delivered")}
    assert by_id == {"over": "rejected", "fine": "delivered"}  # no event for the huge frame
    assert not any(e["id"] == "huge" for e in events)
