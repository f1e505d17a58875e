"""The tail benchmark's smtplib comparison client (bench/tail_clients.py) against the real
sink on loopback: what it sends pipelined arrives whole, on one connection kept, over
STARTTLS; a refused recipient is reported, not counted as delivered."""
from __future__ import annotations

from bench.tail_clients import connect, data_payload, pipelined_send
from engine.testing.sink import SinkServer


def test_data_payload_doubles_leading_dots_and_ends_with_the_dot_line() -> None:
    assert data_payload(b"a\n.b\r\n..c") == b"a\r\n..b\r\n...c\r\n.\r\n"


def test_pipelined_messages_arrive_whole_on_one_kept_connection() -> None:
    message = b"Subject: x\r\n\r\nline\r\n.leading dot\r\n"
    with SinkServer(tls=True, pipelining=True, chunking=False) as sink:
        conn = connect(sink.port)
        try:
            codes = [pipelined_send(conn, "a@example.test", f"b{i}@example.test", message)
                     for i in range(3)]
        finally:
            conn.quit()
        got = sink.wait_for(3)
    assert codes == [250, 250, 250]
    assert [m.content for m in got] == [message] * 3
    assert {m.conn_id for m in got} == {1} and [m.seq for m in got] == [1, 2, 3]
    assert all(m.tls and m.via == "DATA" for m in got)


def test_a_refused_recipient_is_its_code_and_the_connection_goes_on() -> None:
    with SinkServer(tls=True, pipelining=True, chunking=False) as sink:
        conn = connect(sink.port)
        try:
            refused = pipelined_send(conn, "a@example.test", "reject@example.test", b"x\r\n")
            after = pipelined_send(conn, "a@example.test", "b@example.test", b"x\r\n")
        finally:
            conn.quit()
        got = sink.wait_for(1)
    assert (refused, after) == (550, 250)
    assert [m.rcpt_tos for m in got] == [("b@example.test",)]
