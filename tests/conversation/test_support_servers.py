"""The test servers themselves (tests/support/: the playbook server, the DNS server;
engine/testing/: the sink, the certificates), driven by the stdlib smtplib, dnspython and
ssl over real loopback sockets, in process and as processes of their own.

Fixtures (sink, plain_sink, scripted, unverified_client_context) come from
tests/support/fixtures.py through conftest.
"""

from __future__ import annotations

import contextlib
import json
import select
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import dns.message
import dns.query
import pytest

from engine.testing.tlscert import make_ca_and_cert
from tests.support import ROOT
from tests.support.smtpserver import (
    BDAT,
    CLOSE,
    DATA,
    INJECT,
    SLEEP,
    TLS,
    WAIT_CLOSE,
    C,
    S,
    ScriptedServer,
    SinkServer,
    server_tls_context,
)

REPO = ROOT
Scripted = Callable[..., ScriptedServer]

GREETING = S("220 mx.test ESMTP")
EHLO = [C("EHLO *"), S("250-mx.test", "250-PIPELINING", "250-STARTTLS", "250 CHUNKING")]


def connect(port: int) -> smtplib.SMTP:
    return smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=5)


def raw_connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5)


def read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    return data


# --- tlscert -----------------------------------------------------------------------------------


def test_ca_signed_cert_verifies_strictly_for_localhost_and_ip(tmp_path: Path) -> None:
    bundle = make_ca_and_cert(tmp_path)
    client = ssl.create_default_context(cafile=bundle.cafile)
    client.verify_flags |= ssl.VERIFY_X509_STRICT
    server = server_tls_context(bundle.certfile, bundle.keyfile)
    for name in ("localhost", "127.0.0.1"):
        assert handshake(server, client, name) == "ok"
    assert "certificate verify failed" in handshake(server, client, "mx.other.test")
    untrusting = ssl.create_default_context()
    assert "certificate verify failed" in handshake(server, untrusting, "localhost")


def handshake(server: ssl.SSLContext, client: ssl.SSLContext, name: str) -> str:
    """One TLS handshake over a loopback socket pair; "ok" or the client's error."""
    left, right = socket.socketpair()
    with left, right:
        errors: list[Exception] = []

        def serve() -> None:
            try:
                server.wrap_socket(right, server_side=True).close()
            except (ssl.SSLError, OSError) as error:
                errors.append(error)

        thread = threading.Thread(target=serve)
        thread.start()
        try:
            client.wrap_socket(left, server_hostname=name).close()
            return "ok"
        except ssl.SSLError as error:
            return str(error)
        finally:
            thread.join(5)


# --- ScriptedServer ----------------------------------------------------------------------------


def test_scripted_plays_a_conversation_and_records_it(scripted: Scripted) -> None:
    server = scripted([
        GREETING, *EHLO,
        C("MAIL FROM:<a@x.test>*"), S("250 2.1.0 ok"),
        C("RCPT TO:<b@y.test>"), S("250 2.1.5 ok"),
        C("DATA"), S("354 go"), DATA(), S("250 2.0.0 queued"),
        C("QUIT"), S("221 bye"), CLOSE(),
    ])
    with connect(server.port) as client:
        refused = client.sendmail("a@x.test", ["b@y.test"], b"Subject: t\r\n\r\n.leading dot\r\n")
    server.wait_finished()
    assert refused == {}
    assert server.errors == []
    assert server.messages == [b"Subject: t\r\n\r\n.leading dot\r\n"]
    assert server.connections == 1
    assert server.client_lines(0) == [
        "ehlo client.test", "mail FROM:<a@x.test>", "rcpt TO:<b@y.test>", "data", "QUIT",
    ]
    transcript = server.transcript(0)
    assert transcript[:2] == [("S", "220 mx.test ESMTP"), ("C", "ehlo client.test")]
    assert ("*", "DATA 28 bytes") in transcript
    assert transcript[-1] == ("*", "closed by server")


def test_scripted_consumes_pipelined_commands_in_order(scripted: Scripted) -> None:
    server = scripted([
        GREETING, *EHLO,
        C("MAIL FROM:<a@x.test>"), C("RCPT TO:<b@y.test>"), C("RCPT TO:<c@y.test>"), C("DATA"),
        S("250 ok"), S("250 ok b"), S("550 5.1.1 no c"), S("354 go"),  # replies after all four
        DATA(), S("250 queued"), C("QUIT"), S("221 bye"),
    ])
    with connect(server.port) as client:
        client.ehlo()
        client.send(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nRCPT TO:<c@y.test>\r\nDATA\r\n")
        replies = [client.getreply() for _ in range(4)]
        client.send(b"body\r\n.\r\n")
        assert client.getreply() == (250, b"queued")
    server.wait_finished()
    assert replies == [(250, b"ok"), (250, b"ok b"), (550, b"5.1.1 no c"), (354, b"go")]
    assert server.errors == []
    assert server.messages == [b"body\r\n"]


def test_scripted_starttls_upgrades_the_same_connection(
    scripted: Scripted, unverified_client_context: ssl.SSLContext
) -> None:
    server = scripted([
        GREETING, *EHLO, C("STARTTLS"), S("220 2.0.0 go ahead"), TLS(),
        C("EHLO client.test"), S("250 mx.test"), C("QUIT"), S("221 bye"),
    ])
    with connect(server.port) as client:
        client.starttls(context=unverified_client_context)
        assert client.ehlo() == (250, b"mx.test")
        assert isinstance(client.sock, ssl.SSLSocket)
    server.wait_finished()
    assert server.errors == []
    assert ("*", "TLS TLSv1.3") in server.transcript(0)
    assert server.client_lines(0) == ["ehlo client.test", "STARTTLS", "ehlo client.test", "QUIT"]


def test_scripted_mismatch_is_answered_500_recorded_and_closed(scripted: Scripted) -> None:
    server = scripted([GREETING, *EHLO, C("MAIL FROM:<a@x.test>"), S("250 ok")])
    with connect(server.port) as client:
        client.ehlo()
        code, text = client.docmd("MAIL", "FROM:<someone@else.test>")
        assert code == 500
        assert text.startswith(b"5.5.2 script mismatch: expected 'MAIL FROM:<a@x.test>', got")
        with pytest.raises(smtplib.SMTPServerDisconnected):
            client.noop()
    server.wait_finished()
    [error] = server.errors
    assert error.startswith("conn 0 step 3 C('MAIL FROM:<a@x.test>'): script mismatch")
    assert "'MAIL FROM:<someone@else.test>'" in error


def test_scripted_inject_sends_raw_bytes_then_close(scripted: Scripted) -> None:
    server = scripted([
        GREETING, C("EHLO *"), INJECT(b"250-first half"), SLEEP(0.05),
        INJECT(b" of a line\r\n250 rest\r\n"), CLOSE(),
    ])
    with raw_connect(server.port) as sock:
        sock.sendall(b"EHLO client.test\r\n")
        assert read_all(sock) == b"220 mx.test ESMTP\r\n250-first half of a line\r\n250 rest\r\n"
    server.wait_finished()
    assert server.errors == []


def test_scripted_close_with_reset_sends_rst(scripted: Scripted) -> None:
    server = scripted([GREETING, CLOSE(reset=True)])
    # The RST can beat the end of connect() itself (a timed connect polls, then reads the
    # socket's error) on a loaded machine: either way, the client sees a reset.
    with pytest.raises(ConnectionResetError), raw_connect(server.port) as sock:
        server.wait_finished()
        read_all(sock)
    server.wait_finished()


def test_scripted_bdat_chunks_make_one_message(scripted: Scripted) -> None:
    server = scripted([
        GREETING, *EHLO, C("MAIL FROM:<a@x.test>"), C("RCPT TO:<b@y.test>"),
        BDAT(last=False), S("250 ok"), S("250 ok"), S("250 2.0.0 5 octets"),
        BDAT(last=True), S("250 2.0.0 queued"), C("QUIT"), S("221 bye"),
    ])
    with connect(server.port) as client:
        client.ehlo()
        client.send(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nBDAT 5\r\nhello")
        assert [client.getreply()[0] for _ in range(3)] == [250, 250, 250]
        client.send(b"BDAT 8 LAST\r\n\r\n.world")
        assert client.getreply() == (250, b"2.0.0 queued")
    server.wait_finished()
    assert server.errors == []
    assert server.messages == [b"hello\r\n.world"]


def test_scripted_wait_close_holds_the_connection_until_the_client_leaves(
    scripted: Scripted,
) -> None:
    server = scripted([GREETING, *EHLO, WAIT_CLOSE()])
    with connect(server.port) as client:
        client.ehlo()
        client.send(b"NOOP\r\n")  # recorded, never answered
        deadline = time.monotonic() + 5
        while server.transcript(0)[-1] != ("C", "NOOP"):
            assert time.monotonic() < deadline, server.transcript(0)
            time.sleep(0.01)
        assert not select.select([client.sock], [], [], 0.2)[0]  # still open: no reply, no close
        client.close()
    server.wait_finished()
    assert server.errors == []
    assert server.transcript(0)[-1] == ("*", "closed by client")


def test_scripted_extra_connections_are_refused_or_replay_the_last_script(
    scripted: Scripted,
) -> None:
    strict = scripted([GREETING, CLOSE()])
    lenient = scripted([[GREETING, CLOSE()], [S("220 second"), CLOSE()]], extra="repeat_last")
    for _ in range(2):
        for server in (strict, lenient):
            with raw_connect(server.port) as sock:
                read_all(sock)
    strict.wait_finished(2)
    lenient.wait_finished(2)
    assert strict.transcript(1)[0] == ("S", "421 4.3.2 no script for this connection")
    assert strict.errors == ["conn 1: unexpected connection, no script left"]
    with raw_connect(lenient.port) as sock:
        assert read_all(sock) == b"220 second\r\n"
    lenient.wait_finished(3)
    assert lenient.errors == []
    assert lenient.connections == 3


def test_scripted_silent_client_times_out_with_an_error(scripted: Scripted) -> None:
    server = scripted([GREETING, C("EHLO *")], timeout=0.2)
    with raw_connect(server.port) as sock:
        assert read_all(sock) == b"220 mx.test ESMTP\r\n"
    server.wait_finished()
    assert server.errors == ["conn 0 step 1 C('EHLO *'): timeout: client silent for 0.2s"]


def test_scripted_stop_cuts_a_waiting_conversation_short() -> None:
    server = ScriptedServer([GREETING, C("EHLO *")], timeout=30)
    with raw_connect(server.port) as sock:
        sock.recv(100)
        started = time.monotonic()
        server.stop()
        assert time.monotonic() - started < 1
        assert read_all(sock) == b""
    assert server.errors == []


# --- SinkServer --------------------------------------------------------------------------------


def test_sink_starttls_records_envelope_tls_and_peer(
    sink: SinkServer, unverified_client_context: ssl.SSLContext
) -> None:
    with connect(sink.port) as client:
        client.ehlo()
        assert client.has_extn("starttls")
        assert client.has_extn("pipelining") and client.has_extn("chunking")
        client.starttls(context=unverified_client_context)
        client.ehlo()
        assert not client.has_extn("starttls")
        client.sendmail("a@x.test", ["b@y.test", "c@y.test"], b"Subject: x\r\n\r\n..dot\r\n")
        client.sendmail("", ["b@y.test"], b"second\r\n")
        assert client.sock is not None
        local = client.sock.getsockname()
    first, second = sink.wait_for(2)
    assert (first.mail_from, first.rcpt_tos) == ("a@x.test", ("b@y.test", "c@y.test"))
    assert first.content == b"Subject: x\r\n\r\n..dot\r\n"  # smtplib stuffs, the sink unstuffs
    assert (first.tls, first.helo, first.via) == ("TLSv1.3", "client.test", "DATA")
    assert first.peer == local[:2]
    assert (second.mail_from, second.conn_id, second.seq) == ("", first.conn_id, 2)
    assert sink.connections == 1


def test_sink_replies_to_recipients_by_local_part(plain_sink: SinkServer) -> None:
    with connect(plain_sink.port) as client:
        refused = client.sendmail(
            "a@x.test", ["ok@y.test", "reject-1@y.test", "Defer.me@y.test"], b"x\r\n"
        )
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            client.sendmail("a@x.test", ["rejectall@y.test"], b"x\r\n")
    assert refused == {
        "reject-1@y.test": (550, b"5.1.1 no such user"),
        "Defer.me@y.test": (451, b"4.3.0 try later"),
    }
    [message] = plain_sink.wait_for(1)
    assert message.rcpt_tos == ("ok@y.test",) and message.tls is None
    assert [(rcpt, reply[:3]) for _, rcpt, reply in plain_sink.refused] == [
        ("reject-1@y.test", "550"), ("Defer.me@y.test", "451"), ("rejectall@y.test", "550"),
    ]


def test_sink_without_tls_does_not_offer_starttls(plain_sink: SinkServer) -> None:
    with connect(plain_sink.port) as client:
        client.ehlo()
        assert not client.has_extn("starttls")
        assert client.has_extn("size") and client.esmtp_features["size"] == str(64 << 20)


def test_sink_require_tls_refuses_mail_before_starttls(
    unverified_client_context: ssl.SSLContext,
) -> None:
    with SinkServer(require_tls=True) as sink, connect(sink.port) as client:
        client.ehlo()
        assert client.mail("a@x.test")[0] == 530
        client.starttls(context=unverified_client_context)
        client.ehlo()
        assert client.sendmail("a@x.test", ["b@y.test"], b"x\r\n") == {}
        assert sink.wait_for(1)[0].tls == "TLSv1.3"


def test_sink_accepts_pipelined_commands_and_bdat(plain_sink: SinkServer) -> None:
    with connect(plain_sink.port) as client:
        client.ehlo()
        client.send(
            b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nRCPT TO:<reject@y.test>\r\n"
            b"BDAT 7\r\nchunk-1BDAT 0 LAST\r\n"
        )
        replies = [client.getreply()[0] for _ in range(5)]
        client.send(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<c@y.test>\r\nDATA\r\n")
        assert [client.getreply()[0] for _ in range(3)] == [250, 250, 354]
        client.send(b"via data\r\n.\r\n")
        assert client.getreply()[1].startswith(b"2.0.0 OK queued as")
    assert replies == [250, 250, 550, 250, 250]
    first, second = plain_sink.wait_for(2)
    assert (first.content, first.via, first.rcpt_tos) == (b"chunk-1", "BDAT", ("b@y.test",))
    assert (second.content, second.via, second.seq) == (b"via data\r\n", "DATA", 2)


def test_sink_counts_connections_and_max_concurrent(plain_sink: SinkServer) -> None:
    clients = [connect(plain_sink.port) for _ in range(3)]
    for client in clients:
        client.ehlo()
    assert (plain_sink.connections, plain_sink.active, plain_sink.max_concurrent) == (3, 3, 3)
    for client in clients:
        client.quit()
    plain_sink.wait_idle()
    with connect(plain_sink.port) as client:
        client.noop()
    assert (plain_sink.connections, plain_sink.max_concurrent) == (4, 3)
    plain_sink.clear()
    assert plain_sink.connections == 0 and plain_sink.messages == []


def test_sink_wait_for_times_out_with_the_count(plain_sink: SinkServer) -> None:
    with pytest.raises(TimeoutError, match="0 of 1 messages"):
        plain_sink.wait_for(1, timeout=0.1)


def test_sink_records_the_source_address_of_the_client(plain_sink: SinkServer) -> None:
    try:
        client = smtplib.SMTP(
            "127.0.0.1", plain_sink.port, source_address=("127.0.0.2", 0), timeout=5
        )
    except OSError as error:
        pytest.skip(f"cannot bind 127.0.0.2 here: {error}")
    with client:
        client.sendmail("a@x.test", ["b@y.test"], b"x\r\n")
    assert plain_sink.wait_for(1)[0].peer[0] == "127.0.0.2"


def test_sink_takes_hundreds_of_messages_over_twenty_connections(
    sink: SinkServer, unverified_client_context: ssl.SSLContext
) -> None:
    start = threading.Barrier(20)
    body = b"x" * 76 + b"\r\n"
    failures: list[Exception] = []

    def send_batch(worker: int) -> None:
        try:
            with connect(sink.port) as client:
                client.starttls(context=unverified_client_context)
                start.wait()
                for number in range(15):
                    client.sendmail("a@x.test", [f"r{worker}.{number}@y.test"], body * 30)
        except Exception as error:  # reported by the assertion below
            failures.append(error)

    threads = [threading.Thread(target=send_batch, args=(worker,)) for worker in range(20)]
    began = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    messages = sink.wait_for(300)
    assert time.monotonic() - began < 10
    assert len({message.rcpt_tos for message in messages}) == 300
    assert (sink.connections, sink.max_concurrent) == (20, 20)
    assert {message.tls for message in messages} == {"TLSv1.3"}


def test_sink_drop_after_dot_keeps_the_message_and_hangs_up_without_a_reply() -> None:
    with SinkServer(tls=False, drop_after_dot=1.0) as sink, raw_connect(sink.port) as sock:
        assert sock.recv(100).startswith(b"220 ")
        sock.sendall(b"EHLO client.test\r\n")
        while not sock.recv(4096).endswith(b"250 HELP\r\n"):
            pass
        # The message and, pipelined behind it, a second transaction the server never reads.
        sock.sendall(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nBDAT 5 LAST\r\nfirst"
                     b"MAIL FROM:<a@x.test>\r\nRCPT TO:<c@y.test>\r\nBDAT 6 LAST\r\nsecond")
        replies = b""
        with contextlib.suppress(ConnectionResetError):  # a hang-up (FIN or RST), no reply
            while chunk := sock.recv(4096):
                replies += chunk
    assert replies == b"250 OK\r\n250 2.1.5 OK\r\n"  # MAIL and RCPT, nothing after
    [kept] = sink.messages
    assert (kept.content, kept.rcpt_tos, kept.unanswered) == (b"first", ("b@y.test",), True)
    assert sink.unanswered == [kept]


def test_sink_drop_after_dot_is_a_fraction_drawn_from_its_seed() -> None:
    def unanswered_pattern(seed: int) -> list[bool]:
        with SinkServer(tls=False, drop_after_dot=0.3, drop_seed=seed) as sink:
            for number in range(40):
                try:
                    with connect(sink.port) as client:
                        client.sendmail("a@x.test", [f"r{number}@y.test"], b"x\r\n")
                except smtplib.SMTPServerDisconnected:
                    pass  # dropped after the dot: expected now and then
            messages = sink.wait_for(40)
        assert [m.rcpt_tos for m in messages] == [(f"r{n}@y.test",) for n in range(40)]
        return [m.unanswered for m in messages]

    first = unanswered_pattern(7)
    assert first == unanswered_pattern(7)
    assert first != unanswered_pattern(8)
    assert 4 <= sum(first) <= 20  # about 30% of 40


def test_sink_never_drops_by_default(plain_sink: SinkServer) -> None:
    with connect(plain_sink.port) as client:
        for number in range(20):
            client.sendmail("a@x.test", [f"r{number}@y.test"], b"x\r\n")
    assert not any(m.unanswered for m in plain_sink.wait_for(20))
    with pytest.raises(ValueError, match="fraction"):
        SinkServer(tls=False, drop_after_dot=1.5)


def test_sink_stop_closes_open_sessions() -> None:
    sink = SinkServer(tls=False)
    with raw_connect(sink.port) as sock:
        assert sock.recv(100).startswith(b"220 sink.test")
        sink.stop()
        assert read_all(sock) == b""
    assert sink.active == 0


# --- as processes ------------------------------------------------------------------------------


@pytest.fixture
def run_server(tmp_path: Path) -> Iterator[Callable[..., tuple[int, Callable[[], dict]]]]:
    """Start ``python -m tests.support.smtpserver ARGS --report FILE``; return its port and a
    stopper."""
    processes: list[subprocess.Popen[str]] = []

    def start(*args: str) -> tuple[int, Callable[[], dict]]:
        report = tmp_path / f"report-{len(processes)}.json"
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.support.smtpserver", "--report", str(report), *args],
            cwd=REPO, stdout=subprocess.PIPE, text=True,
        )
        processes.append(process)
        assert process.stdout is not None
        port = int(process.stdout.readline())

        def stop() -> dict:
            process.send_signal(signal.SIGTERM)
            assert process.wait(10) == 0
            return json.loads(report.read_text())

        return port, stop

    yield start
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()
        assert process.stdout is not None
        process.stdout.close()


def test_sink_as_a_process_reports_on_sigterm(
    run_server: Callable[..., tuple[int, Callable[[], dict]]],
    unverified_client_context: ssl.SSLContext,
) -> None:
    port, stop = run_server("--report-content", "sink", "--tls")
    with connect(port) as client:
        client.starttls(context=unverified_client_context)
        client.sendmail("a@x.test", ["b@y.test", "defer@y.test"], b"hello\r\n")
    report = stop()
    assert (report["server"], report["port"], report["connections"]) == ("sink", port, 1)
    [message] = report["messages"]
    assert (message["mail_from"], message["rcpt_tos"]) == ("a@x.test", ["b@y.test"])
    assert (message["size"], message["content_b64"]) == (7, "aGVsbG8NCg==")  # b"hello\r\n"
    assert (message["tls"], message["peer"][0]) == ("TLSv1.3", "127.0.0.1")
    assert report["refused"] == [
        {"conn_id": 1, "rcpt": "defer@y.test", "reply": "451 4.3.0 try later"}
    ]


def test_scripted_as_a_process_plays_a_json_script(
    run_server: Callable[..., tuple[int, Callable[[], dict]]], tmp_path: Path
) -> None:
    script = tmp_path / "script.json"
    script.write_text(json.dumps([[["S", "220 mx.test"], ["C", "EHLO *"], ["S", "250 mx.test"],
                                   ["C", "QUIT"], ["S", "221 bye"], ["CLOSE"]]]))
    port, stop = run_server("scripted", "--script", str(script))
    with connect(port) as client:
        assert client.ehlo() == (250, b"mx.test")
    report = stop()
    assert report["errors"] == []
    assert report["transcripts"][0][:2] == [["S", "220 mx.test"], ["C", "ehlo client.test"]]


def test_dnsserver_runs_as_a_process(tmp_path: Path) -> None:
    zone = tmp_path / "zone.json"
    zone.write_text(json.dumps({"example.test": {"MX": [[10, "mx1.example.test"]]}}))
    with subprocess.Popen([sys.executable, "-m", "tests.support.dnsserver", str(zone)],
                          stdout=subprocess.PIPE, text=True,
                          cwd=REPO) as proc:
        try:
            assert proc.stdout is not None
            port = int(proc.stdout.readline())
            query = dns.message.make_query("example.test", "MX")
            response = dns.query.udp(query, "127.0.0.1", port=port, timeout=2)
            assert [rd.to_text() for rd in response.answer[0]] == ["10 mx1.example.test."]
        finally:
            proc.terminate()
            assert proc.wait(timeout=5) == 0
