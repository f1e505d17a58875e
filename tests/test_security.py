"""Hardening: who may send (CURVE, loopback), what reaches the wire, where mail may go,
and what stays bounded. docs/SECURITY.md explains each rule; the hostile-server suite
is tests/test_hostile.py, the fuzzers tests/test_fuzz.py, the flood tests/test_flood.py.
"""
from __future__ import annotations

import ipaddress
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st
from zmq.utils.monitor import recv_monitor_message

from engine import auth
from engine.config import ConfigError, PoolConfig, Route, SecurityConfig, from_dict
from engine.connector import Connector, Identity
from engine.delivery import Deliverer
from engine.intake import INGEST_HWM
from engine.job import normalise_message, parse_job
from engine.metrics import Metrics
from engine.mx import DestinationPolicy, MxHost, Resolver
from engine.pools import Pools
from engine.protocol import Attempt, Status, Task
from engine.reply import TransientError
from engine.results import RESULTS_HWM
from engine.smtp import MAX_REPLY_TEXT, Connection, ReplyLimits, dot_stuff, send_mail
from engine.supervisor import EVENTS_HWM, Supervisor
from engine.testing.harness import LocalEngine, final_outcomes, make_message
from engine.testing.sink import SinkServer
from engine.tls import TlsPolicy
from tests.support.dnsserver import DnsServer
from tests.support.smtpserver import DATA, WAIT_CLOSE, C, S, ScriptedServer, Step
from tests.test_fuzz import check_client_bytes, check_data_encoding, run_session
from tests.test_smtp import FAST, HELO, MESSAGE, SENDER, connect, greet, mail, rcpt

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent
needs_curve = pytest.mark.skipif(not zmq.has("curve"),
                                 reason="this libzmq has no CURVE (zmq.has('curve') is False)")
Scripted = Callable[..., ScriptedServer]


def minimal(**extra: Any) -> dict[str, Any]:
    return {"hostname": "mta.example.com", "ips": [{"address": "192.0.2.10"}], **extra}


def refused(data: dict[str, Any]) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        from_dict(data)
    return info.value


def mailengine(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, "-m", "engine.cli", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


HANDSHAKE_ENDS = {zmq.EVENT_HANDSHAKE_SUCCEEDED, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL,
                  zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_AUTH}


def socket_event(monitor: zmq.Socket, until: set[int]) -> int:
    """The first of the events `until` on the ZeroMQ socket `monitor` watches (10 s at most)."""
    while monitor.poll(10_000):
        event: int = recv_monitor_message(monitor)["event"]
        if event in until:
            return event
    raise AssertionError(f"no socket event {sorted(until)} within 10 s")


def free_tcp_endpoint() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{probe.getsockname()[1]}"


# =======================================================================================
# 1. Who may send: the loopback rule and CURVE
# =======================================================================================

REMOTE = ["tcp://0.0.0.0:5570", "tcp://*:5570", "tcp://[::]:5570", "tcp://192.0.2.7:5570",
          "tcp://10.1.2.3:5570", "tcp://eth0:5570", "tcp://mta.example.com:5570",
          "tcp://[::ffff:10.0.0.1]:5570"]
LOCAL = ["tcp://127.0.0.1:5570", "tcp://127.0.0.9:5570", "tcp://[::1]:5570",
         "tcp://localhost:5570", "tcp://lo:5570", "tcp://127.0.0.1:*",
         "tcp://[::ffff:127.0.0.1]:5570", "ipc:///run/mailengine/ingest.sock",
         "inproc://ingest"]


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
    assert again.returncode == 1 and "exists already" in again.stderr
    assert auth.load_keypair(str(secret)) == pair


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


@pytest.mark.integration
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
    assert stranger.returncode == 1 and "not acknowledged stranger" in stranger.stderr
    assert plain.returncode == 1 and "not acknowledged plain" in plain.stderr
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


@pytest.mark.integration
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


@pytest.mark.integration
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


@pytest.mark.parametrize("field", ["sender", "rcpt"])
def test_nul_in_an_envelope_address_is_refused_unsent(scripted: Scripted, field: str) -> None:
    server = scripted([*greet(), WAIT_CLOSE()])
    conn = connect(server)
    evil = "a\0b@example.test"
    sender, rcpts = (evil, ("r@example.test",)) if field == "sender" else (SENDER, (evil,))
    results = send_mail(conn, sender, rcpts, MESSAGE)
    assert [r.reply.code for r in results] == [501]
    conn.close()
    server.wait_finished()
    assert [line.split()[0].upper() for line in server.client_lines()] == ["EHLO"]


def test_mail_parameters_come_from_the_engine_not_the_data(scripted: Scripted) -> None:
    """SIZE is the message's length, BODY and SMTPUTF8 fixed words; nothing else."""
    server = scripted([*greet("SIZE 1000", "8BITMIME", "SMTPUTF8"),
                       C(f"MAIL FROM:<{SENDER}> SIZE={len(MESSAGE)} BODY=8BITMIME SMTPUTF8"),
                       S("250 ok"), rcpt("j\u00f6@example.test"), S("250 ok"), C("DATA"),
                       S("354 go"), DATA(), S("250 queued")])
    conn = connect(server)
    results = send_mail(conn, SENDER, ("j\u00f6@example.test",), MESSAGE, smtputf8=True,
                                eightbit=True)
    assert [r.reply.code for r in results] == [250]
    conn.close()
    server.wait_finished()
    assert server.errors == []


def test_a_hostile_reply_text_is_cut_before_it_reaches_events(scripted: Scripted) -> None:
    long_lines = [f"550-{'x' * 4000}" for _ in range(50)]
    server = scripted([*greet(), mail(), S(*long_lines, "550 5.7.1 no"), C("RSET"),
                       S("250 ok"), WAIT_CLOSE()])
    conn = connect(server)
    results = send_mail(conn, SENDER, ("r@example.test",), MESSAGE)
    assert results[0].reply.code == 550
    assert len(results[0].reply.text) <= MAX_REPLY_TEXT + 3
    conn.close()


# =======================================================================================
# 3. The body cannot smuggle a second message
# =======================================================================================

LINE_BITS = st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b".", b"..", b"x", b" ",
                                      b"\r\n.\r\n", b"\n.\n", b"\r.\r", b"MAIL FROM:<a@b.c>",
                                      b"\xff"]), max_size=60).map(b"".join)
BODIES = st.one_of(LINE_BITS, st.binary(max_size=2000)).filter(lambda b: b and b"\0" not in b)


@settings(max_examples=500, deadline=None)
@given(BODIES)
def test_data_encoding_has_one_terminator_at_the_end_and_unstuffs_to_the_message(
        raw: bytes) -> None:
    check_data_encoding(normalise_message(raw))


@settings(max_examples=200, deadline=None)
@given(BODIES, st.booleans())
def test_the_bytes_written_carry_the_message_once_and_nothing_else(raw: bytes,
                                                                   chunking: bool) -> None:
    """On the wire, through a real Connection: BDAT's length is the message's, DATA's body
    is the stuffed message with one terminator, and no other line appears."""
    message = normalise_message(raw)
    ehlo = b"250-mx\r\n250-PIPELINING\r\n250 CHUNKING\r\n" if chunking else b"250 mx\r\n"
    replies = b"220 mx\r\n" + ehlo + b"250 ok\r\n250 ok\r\n"
    replies += b"250 ok\r\n" if chunking else b"354 go\r\n250 ok\r\n"
    session = run_session(replies, "s@example.test", ["r@example.test"], message)
    assert [r.reply.code for r in session.results] == [250]
    assert check_client_bytes(session.wrote, "s@example.test", ["r@example.test"], message,
                              False, False)
    if chunking:
        assert b"BDAT %d LAST\r\n" % len(message) + message in session.wrote
    else:
        assert b"DATA\r\n" + dot_stuff(message) + b".\r\nQUIT\r\n" in session.wrote


SMUGGLER = (b"Subject: one message\n\n"
            b"first\n.\nMAIL FROM:<evil@example.test>\nRCPT TO:<victim@example.test>\nDATA\n"
            b"\r.\rsecond\r\n.\r\nthird\r\n.\nfourth\n.\r\n..\r\n.\r\r\n. \r\nend")


@pytest.mark.parametrize("chunking", [False, True], ids=["data", "bdat"])
def test_smuggling_attempts_arrive_as_one_message_intact(chunking: bool) -> None:
    job = parse_job([json.dumps({"from": "s@example.test", "to": ["r@example.test"]}).encode(),
                     SMUGGLER], 10**6, 10)
    with SinkServer(tls=False, chunking=chunking) as sink:
        conn = Connection(HELO, "127.0.0.1", FAST, ReplyLimits())
        conn.open(sink.host, sink.port)
        conn.hello()
        results = send_mail(conn, job.sender, job.rcpts, job.message)
        assert [r.reply.code for r in results] == [250]
        conn.quit_quietly()
        sink.wait_idle()
        assert len(sink.messages) == 1
        got = sink.messages[0]
    assert got.via == ("BDAT" if chunking else "DATA")
    assert got.rcpt_tos == ("r@example.test",)
    assert got.content == job.message == normalise_message(SMUGGLER)
    assert b"\r\n.\r\nMAIL FROM:<evil@example.test>\r\n" in got.content  # data, not a command


@pytest.mark.integration
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


def stack(resolver: Resolver, policy: DestinationPolicy | None = None,
          connect_backoff: float = 0.0) -> Deliverer:
    metrics = Metrics(None, "127.0.0.1")
    connector = Connector(Identity("127.0.0.1", HELO), resolver, TlsPolicy("none"), FAST,
                          ReplyLimits(), metrics, policy)
    pools = Pools(PoolConfig(max_connections=2, max_messages=10, idle_timeout=60.0,
                             connect_backoff=connect_backoff))
    return Deliverer("127.0.0.1", "none", resolver, connector, pools, metrics)


def deliver(deliverer: Deliverer, rcpt: str) -> Attempt:
    attempts: list[Attempt] = []
    deliverer.deliver(Task("job", SENDER, (rcpt,), MESSAGE, time.time()), attempts.extend)
    deliverer.pools.close_all()
    assert len(attempts) == 1
    return attempts[0]


def delivering_script() -> list[Step]:
    return [*greet(), mail(), S("250 ok"), C("RCPT TO:*"), S("250 ok"), C("DATA"),
            S("354 go"), DATA(), S("250 queued")]


def test_mx_resolving_to_loopback_is_deferred_and_never_connected(scripted: Scripted) -> None:
    server = scripted(delivering_script(), host="127.0.0.10")
    zone = {"evil.test": {"MX": [(10, "mx.evil.test")]}, "mx.evil.test": {"A": ["127.0.0.10"]}}
    with DnsServer(zone) as dns:
        resolver = Resolver(["127.0.0.1"], port=dns.port, smtp_port=server.port)
        attempt = deliver(stack(resolver), "x@evil.test")
    assert attempt.status is Status.DEFERRED
    assert (attempt.reply.code, attempt.reply.enhanced) == (451, "4.4.4")
    assert "prohibited destination: 127.0.0.10 is a loopback address" in attempt.reply.text
    assert attempt.mx == "mx.evil.test"
    time.sleep(0.2)
    assert server.connections == 0


def test_address_literal_recipient_at_a_private_address_is_deferred(scripted: Scripted) -> None:
    server = scripted(delivering_script())
    attempt = deliver(stack(Resolver(smtp_port=server.port)), "x@[127.0.0.1]")
    assert attempt.status is Status.DEFERRED and "prohibited destination" in attempt.reply.text
    assert server.connections == 0


def test_prohibited_addresses_of_a_host_are_skipped_and_the_allowed_one_used(
        scripted: Scripted) -> None:
    server = scripted(delivering_script(), host="127.0.0.10")
    zone = {"mixed.test": {"MX": [(10, "mx.mixed.test")]},
            "mx.mixed.test": {"A": ["127.0.0.11", "127.0.0.10", "127.0.0.12"]}}
    only_10 = DestinationPolicy(allowed=(ipaddress.ip_network("127.0.0.10/32"),))
    with DnsServer(zone) as dns:
        resolver = Resolver(["127.0.0.1"], port=dns.port, smtp_port=server.port)
        attempt = deliver(stack(resolver, only_10), "x@mixed.test")
    assert attempt.status is Status.DELIVERED
    assert server.connections == 1


def test_routes_are_exempt(scripted: Scripted) -> None:
    server = scripted(delivering_script())
    resolver = Resolver(routes={"internal.test": Route("127.0.0.1", server.port)})
    assert deliver(stack(resolver), "x@internal.test").status is Status.DELIVERED


def test_a_refused_mx_does_not_put_a_route_to_the_same_host_in_backoff(
        scripted: Scripted) -> None:
    """An MX record naming the route's own host and port shares its pool: the refusal must
    come before the pool, or one hostile message would stall the route for connect_backoff."""
    server = scripted(delivering_script())
    zone = {"evil.test": {"MX": [(10, "127.0.0.1")]}}
    with DnsServer(zone) as dns:
        resolver = Resolver(["127.0.0.1"], port=dns.port, smtp_port=server.port,
                            routes={"internal.test": Route("127.0.0.1", server.port)})
        deliverer = stack(resolver, connect_backoff=60.0)
        evil = deliver(deliverer, "x@evil.test")
        internal = deliver(deliverer, "x@internal.test")
    assert evil.status is Status.DEFERRED and "prohibited destination" in evil.reply.text
    assert internal.status is Status.DELIVERED
    assert server.connections == 1


def test_the_connector_refuses_before_connecting() -> None:
    connector = Connector(Identity("127.0.0.1", HELO), Resolver(), TlsPolicy("none"), FAST,
                          ReplyLimits(), Metrics(None, "127.0.0.1"))
    with pytest.raises(TransientError) as caught:
        connector.open(MxHost("10.9.8.7", 10, 25), "test")
    assert caught.value.reply.enhanced == "4.4.4" and caught.value.command == "CONNECT"


@pytest.mark.integration
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

@pytest.fixture
def supervisor(tmp_path: Path) -> Iterator[Supervisor]:
    sockets = tempfile.mkdtemp(prefix="me-")
    cfg = from_dict({"hostname": "mta.test", "ips": ["127.0.0.2"],
                     "ingest": f"ipc://{sockets}/in", "events": f"ipc://{sockets}/ev",
                     "control": f"ipc://{sockets}/ctl", "run_dir": sockets,
                     "spool": str(tmp_path / "spool"), "events_log": "",
                     "statsd": {"enabled": False}, "limits": {"max_message_size": "1MiB"}})
    sup = Supervisor(cfg, None)
    yield sup
    sup.events.close()
    sup.spool.close()
    sup.zctx.destroy(linger=0)
    shutil.rmtree(sockets, ignore_errors=True)


def test_every_supervisor_socket_is_bounded(supervisor: Supervisor) -> None:
    assert supervisor.intake.sock.getsockopt(zmq.RCVHWM) == INGEST_HWM
    assert supervisor.intake.sock.getsockopt(zmq.MAXMSGSIZE) == 2**20 + 2**20  # message + envelope
    assert supervisor.events.socket is not None
    assert supervisor.events.socket.getsockopt(zmq.SNDHWM) == EVENTS_HWM
    assert supervisor.results.sock.getsockopt(zmq.RCVHWM) == RESULTS_HWM
    assert supervisor.control.sock.getsockopt(zmq.MAXMSGSIZE) > 0
    assert supervisor.control.sock.getsockopt(zmq.RCVHWM) > 0


@pytest.mark.integration
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
