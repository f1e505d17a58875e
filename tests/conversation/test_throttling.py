"""A server that throttles, on the wire: the sink's token bucket (421 closes, 451 keeps the
connection; per client IP or for everyone) and the SMTP client's reading of a throttle. The
whole engine against throttling sinks is tests/engine/test_throttling.py.
"""
from __future__ import annotations

import smtplib
import time

import pytest

from engine.config import Route, Timeouts
from engine.mx import Resolver
from engine.protocol import Status
from engine.smtp import Connection, send_mail
from engine.smtp import ReplyLimits as WireLimits
from engine.testing.harness import make_message
from engine.testing.sink import SinkServer
from tests.support.shaping import SLOW_DOWN_421, SLOW_DOWN_451
from tests.support.stack import build

# -- the sink's rate limit -------------------------------------------------------------------


@pytest.mark.timeout(20)
def test_sink_token_bucket_421_closes_the_connection_451_keeps_it() -> None:
    for reply, closes in ((SLOW_DOWN_421, True), (SLOW_DOWN_451, False)):
        with SinkServer(tls=False, rate_limit=2, rate_burst=2, throttle_reply=reply) as sink:
            client = smtplib.SMTP(sink.host, sink.port, source_address=("127.0.0.2", 0))
            client.ehlo("client.test")
            codes: list[int | str] = []
            for _ in range(4):
                try:
                    codes.append(client.mail("a@example.test")[0])
                    client.rset()
                except smtplib.SMTPServerDisconnected:
                    codes.append("closed")
                    break
            client.close()
            if closes:
                assert codes == [250, 250, 421, "closed"]
                assert sink.throttled == {"127.0.0.2": 1}
            else:
                assert codes == [250, 250, 451, 451]
                assert sink.throttled == {"127.0.0.2": 2}
            assert len(sink.accept_times("127.0.0.2")) == 2
            assert sink.summary()["throttled"] == sink.throttled


@pytest.mark.timeout(20)
@pytest.mark.parametrize("per_ip", [True, False])
def test_sink_limits_each_client_ip_or_everyone_together(per_ip: bool) -> None:
    with SinkServer(tls=False, rate_limit=1, rate_burst=3, per_ip=per_ip,
                    throttle_reply=SLOW_DOWN_451) as sink:
        for ip in ("127.0.0.2", "127.0.0.3"):
            client = smtplib.SMTP(sink.host, sink.port, source_address=(ip, 0))
            client.ehlo("client.test")
            for _ in range(4):
                client.mail("a@example.test")
                client.rset()
            client.quit()
        if per_ip:
            assert sink.throttled == {"127.0.0.2": 1, "127.0.0.3": 1}
        else:
            assert sink.throttled == {"127.0.0.2": 1, "127.0.0.3": 4}
        accepted = sink.accept_times()
        assert len(accepted) == (6 if per_ip else 3)
        assert sink.rate(min(accepted), max(accepted) + 1, "127.0.0.2") > 0


# -- the SMTP client reading a throttle ---------------------------------------------------


def _client(sink: SinkServer) -> Connection:
    conn = Connection("client.test", "127.0.0.2", Timeouts(connect=5, banner=5, ehlo=5,
                                                            mail=5, rcpt=5, data=5,
                                                            data_block=5, final_dot=5,
                                                            rset=5, quit=5), WireLimits())
    assert conn.open(sink.host, sink.port).code == 220
    assert conn.hello().code == 250
    return conn


@pytest.mark.timeout(20)
@pytest.mark.parametrize("reused", [False, True])
def test_pipelined_mail_answered_421_then_hangup_is_a_throttle_not_an_ambiguous_loss(
        reused: bool) -> None:
    """Regression: MAIL, RCPT and BDAT leave in one write; the server answers MAIL with
    "421 4.7.0 rate limited" and hangs up, as servers do. The client reported a lost
    connection "after the final dot, may have been delivered" (451 4.4.2, ambiguous) for
    a message the server never took, and no throttle rule could see the 421. On a reused
    connection the 4.7.0 421 was taken for a stale connection and retried at once."""
    with SinkServer(tls=False, rate_limit=0.01, rate_burst=1,
                    throttle_reply=SLOW_DOWN_421) as sink:
        conn = _client(sink)
        if reused:
            first = send_mail(conn, "s@example.test", ["r@example.test"], b"x\r\n")
            assert first[0].reply.code == 250
        else:  # another client from the same IP takes the only token first
            other = smtplib.SMTP(sink.host, sink.port, source_address=("127.0.0.2", 0))
            other.ehlo("other.test")
            assert other.mail("o@example.test")[0] == 250
            other.quit()
        results = send_mail(conn, "s@example.test", ["r@example.test", "q@example.test"],
                                    make_message(1, 3000))
        assert [(r.reply.code, r.reply.enhanced, r.ambiguous) for r in results] == \
            [(421, "4.7.0", False)] * 2
        assert "Rate limited" in results[0].reply.text
        assert sink.throttled == {"127.0.0.2": 1}
        conn.close()


# -- the worker's answer: a throttled recipient goes again at its next turn ------------------


@pytest.mark.timeout(20)
def test_a_throttled_recipient_is_sent_again_at_its_next_turn_by_the_worker() -> None:
    """The second message finds the bucket empty (421, a throttle rule); the provider backs
    off and the recipient, first in line, is the probe a second later: its throttled try is
    reported (`retried`, the trigger named, no attempt counted) and then its delivery, from
    the same task, without a trip to the spool and the retry schedule."""
    with SinkServer(tls=False, rate_limit=2.0, rate_burst=1,  # a token every 0.5 s
                    throttle_reply=SLOW_DOWN_421) as sink:
        stack = build(Resolver(routes={"example.test": Route("127.0.0.1", sink.port)}),
                      policy=None)
        try:
            first = stack.deliver(["a@example.test"], job_id="one")
            started = time.monotonic()
            second = stack.deliver(["b@example.test"], job_id="two")
            took = time.monotonic() - started
        finally:
            stack.close()
    assert [(a.status, a.reply.code) for a in first] == [(Status.DELIVERED, 250)]
    assert [(a.status, a.throttled, a.trigger, a.retried) for a in second] == [
        (Status.DEFERRED, True, "rule:rate-text", True),
        (Status.DELIVERED, False, None, False)]
    assert sum(sink.throttled.values()) == 1  # one knock while the bucket was empty
    assert took < 5.0  # the next turn (a probe after `probe_interval`), not the schedule
