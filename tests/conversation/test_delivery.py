"""engine.delivery end to end in one process: Deliverer -> Pools -> Connector -> Connection
(tests/support/stack.py) -> scripted servers on loopback (and a real DNS server for MX
fallback). Metrics go to a real StatsD catcher over UDP, so "no deferral was counted" is
checked where operators would see it.
"""
from __future__ import annotations

import select
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import pytest

from engine.config import Route, ShapingConfig, ThrottleConfig
from engine.metrics import Metrics
from engine.mx import Resolver
from engine.pool import DestinationPool, PoolKey
from engine.protocol import Attempt, Status
from engine.shaping import Shaping, ShapingPlan
from engine.smtp import Connection
from engine.testing.sink import SinkServer
from engine.tls import TlsPolicy
from tests.support.dnsserver import DnsServer
from tests.support.playbook import (
    CLIENT_IP,
    HELO,
    MESSAGE,
    MESSAGE_AFTER_A_REPLY,
    MODES,
    RCPTS,
    delivered_once,
    first_flight,
    greet,
    mail,
    partial_refusal_script,
    rcpt,
)
from tests.support.smtpserver import (
    BDAT,
    CLOSE,
    DATA,
    INJECT,
    SLEEP,
    WAIT_CLOSE,
    C,
    S,
    ScriptedServer,
    Step,
)
from tests.support.stack import LOOPBACK_ALLOWED, POOL, Stack
from tests.support.statsd_catcher import StatsdCatcher

Scripted = Callable[..., ScriptedServer]
DOMAIN = "example.test"
RCPT = RCPTS[0]
GARBAGE_TLS = [SLEEP(0.2), INJECT(b"this is not TLS at all\r\n"), CLOSE()]


@dataclass
class Engine:
    """One worker's delivery stack (tests/support/stack.py), its StatsD figures caught."""

    stack: Stack
    statsd: StatsdCatcher

    @property
    def tls(self) -> TlsPolicy:
        return self.stack.tls

    def deliver(self, rcpts: Sequence[str] = (RCPT,), message: bytes = MESSAGE,
                smtputf8: bool = False) -> list[Attempt]:
        return self.stack.deliver(rcpts, message, smtputf8=smtputf8)

    def pool(self, port: int, host: str = "127.0.0.1") -> DestinationPool:
        return self.stack.pools.get(PoolKey(CLIENT_IP, host, port, self.tls.mode), _no_factory)

    def counter(self, metric: str) -> float:
        return sum(self.statsd.counter_sum(name) for name in self.statsd.names("counter")
                   if name.endswith(f".{metric}"))

    def wait_counter(self, metric: str, value: float) -> None:
        assert self.statsd.wait_for(lambda: self.counter(metric) >= value, timeout=3), metric


def _no_factory() -> Connection:
    raise AssertionError("the pool should exist already")


@pytest.fixture
def engine(stack: Callable[..., Stack]) -> Iterator[Callable[..., Engine]]:
    """A factory: `engine(resolver, tls_mode, ip)` -> a stack whose metrics go to a StatsD
    catcher; the stack fixture closes the stacks, this one stops the catchers."""
    catchers: list[StatsdCatcher] = []

    def make(resolver: Resolver, tls_mode: str = "none", ip: str = CLIENT_IP) -> Engine:
        catchers.append(StatsdCatcher())
        metrics = Metrics.create("127.0.0.1", catchers[-1].port, "test", ip)
        return Engine(stack(resolver, ip=ip, tls=tls_mode, policy=LOOPBACK_ALLOWED,
                            metrics=metrics), catchers[-1])

    yield make
    for statsd in catchers:
        statsd.stop()


def routed(server: ScriptedServer | SinkServer) -> Resolver:
    return Resolver(routes={DOMAIN: Route(server.host, server.port)})


def summary(attempts: Sequence[Attempt]) -> list[tuple[str, Status, int, bool]]:
    return [(a.rcpt, a.status, a.reply.code, a.ambiguous) for a in attempts]


def wait_readable_while_idle(stack: Engine, port: int) -> None:
    """Until what the server said to the idle pooled connection is in the client's socket."""
    (conn,) = stack.pool(port).idle_connections
    assert select.select([conn.sock], [], [], 3)[0], "the server said nothing while idle"


PIPELINED = ("PIPELINING",)


def delivering(*extensions: str) -> list[Step]:
    return [*greet(*extensions), *delivered_once(*extensions)]


# -- 1. a pooled connection that died while idle costs nothing -----------------------------

def test_pooled_connection_closed_by_server_while_idle_delivers_on_a_fresh_one(
        scripted: Scripted, engine: Callable[..., Engine]) -> None:
    server = scripted([[*delivering(*PIPELINED), CLOSE()], delivering(*PIPELINED)])
    stack = engine(routed(server))
    assert summary(stack.deliver()) == [(RCPT, Status.DELIVERED, 250, False)]
    server.wait_finished(1)  # the server has hung up on the idle connection
    second = stack.deliver()
    assert summary(second) == [(RCPT, Status.DELIVERED, 250, False)]
    assert not second[0].conn_reused
    assert server.connections == 2 and server.messages == [MESSAGE, MESSAGE]
    assert stack.pool(server.port).stale_dropped == 1
    stack.wait_counter("delivered", 2)
    assert stack.counter("deferred") == 0


def test_pooled_connection_that_sent_421_while_idle_delivers_on_a_fresh_one(
        scripted: Scripted, engine: Callable[..., Engine]) -> None:
    idle_421 = "421 4.4.2 mx.test idle timeout, closing"
    server = scripted([[*delivering(*PIPELINED), S(idle_421), WAIT_CLOSE()],
                       delivering(*PIPELINED)])
    stack = engine(routed(server))
    assert summary(stack.deliver()) == [(RCPT, Status.DELIVERED, 250, False)]
    wait_readable_while_idle(stack, server.port)
    assert summary(stack.deliver()) == [(RCPT, Status.DELIVERED, 250, False)]
    server.wait_finished(2)
    assert server.connections == 2 and server.messages == [MESSAGE, MESSAGE]
    assert len(server.client_lines(0)) == 4  # EHLO MAIL RCPT DATA: nothing after the 421
    assert stack.pool(server.port).stale_dropped == 1
    stack.wait_counter("delivered", 2)
    assert stack.counter("deferred") == 0


@pytest.mark.parametrize("mode", MESSAGE_AFTER_A_REPLY)
def test_pooled_connection_closed_right_after_the_reuse_check_is_retried_on_a_fresh_one(
        scripted: Scripted, engine: Callable[..., Engine], mode: str) -> None:
    # The race: the idle connection passes is_alive(), then the server hangs up on the first
    # command of the next transaction, before any reply and before the message left.
    # StaleConnection -> a fresh connection at once, no attempt, nothing ambiguous.
    extensions = MODES[mode]
    server = scripted([[*delivering(*extensions), mail(), CLOSE()], delivering(*extensions)])
    stack = engine(routed(server))
    assert summary(stack.deliver()) == [(RCPT, Status.DELIVERED, 250, False)]
    second = stack.deliver()
    assert summary(second) == [(RCPT, Status.DELIVERED, 250, False)]
    assert not second[0].conn_reused
    assert server.connections == 2
    assert stack.pool(server.port).stale_dropped == 0
    stack.wait_counter("connections_stale", 1)
    stack.wait_counter("delivered", 2)
    assert stack.counter("deferred") == 0 and stack.counter("ambiguous") == 0


@pytest.mark.parametrize("mode", MODES)
def test_pooled_connection_whose_421_crossed_our_mail_is_retried_on_a_fresh_one(
        scripted: Scripted, engine: Callable[..., Engine], mode: str) -> None:
    # The 421 race: the idle-timeout farewell arrives just after the reuse check passed. The
    # server closed the session before it read our commands, the whole BDAT flight too.
    extensions = MODES[mode]
    server = scripted([[*delivering(*extensions), *first_flight(mode),
                        S("421 4.4.2 idle timeout"), WAIT_CLOSE()], delivering(*extensions)])
    stack = engine(routed(server))
    assert summary(stack.deliver()) == [(RCPT, Status.DELIVERED, 250, False)]
    assert summary(stack.deliver()) == [(RCPT, Status.DELIVERED, 250, False)]
    assert server.connections == 2
    stack.wait_counter("connections_stale", 1)
    stack.wait_counter("delivered", 2)
    assert stack.counter("deferred") == 0 and stack.counter("ambiguous") == 0


def test_pooled_connection_lost_after_the_whole_bdat_flight_defers_ambiguous_not_stale(
        scripted: Scripted, engine: Callable[..., Engine]) -> None:
    """Issue #14: on a reused connection with PIPELINING and CHUNKING the whole message
    leaves with MAIL, before the first reply. A server that takes it and dies before
    answering may have it: the attempt is ambiguous, counted and deferred by the retry
    schedule, not sent again at once as if the connection had been stale (a duplicate
    nobody counted). One connection only: no fresh one was opened for it."""
    extensions = ("PIPELINING", "CHUNKING")
    server = scripted([*delivering(*extensions), mail(), rcpt(RCPT), BDAT(last=True), CLOSE()])
    stack = engine(routed(server))
    assert summary(stack.deliver()) == [(RCPT, Status.DELIVERED, 250, False)]
    second = stack.deliver()
    assert summary(second) == [(RCPT, Status.DEFERRED, 451, True)]
    assert second[0].conn_reused and not second[0].throttled
    assert "may have been delivered" in second[0].reply.text
    server.wait_finished(1)
    assert server.messages == [MESSAGE, MESSAGE]  # it did arrive: the retry may duplicate it
    assert server.connections == 1 and server.errors == []
    stack.wait_counter("ambiguous", 1)
    stack.wait_counter("deferred", 1)
    assert stack.counter("connections_stale") == 0


def test_healthy_pooled_connection_is_reused(scripted: Scripted,
                                             engine: Callable[..., Engine]) -> None:
    server = scripted([*greet(*PIPELINED), *delivered_once(*PIPELINED),
                       *delivered_once(*PIPELINED)])
    stack = engine(routed(server))
    first, second = stack.deliver(), stack.deliver()
    assert [a.conn_reused for a in first + second] == [False, True]
    assert server.connections == 1 and server.messages == [MESSAGE, MESSAGE]
    stack.wait_counter("connections_reused", 1)


# -- 2. MX fallback -----------------------------------------------------------------------

MX_ZONE = {
    DOMAIN: {"MX": [(10, "mx1.example.test"), (20, "mx2.example.test")]},
    "mx1.example.test": {"A": ["127.0.0.10"]},
    "mx2.example.test": {"A": ["127.0.0.11"]},
}


def two_mx(scripted: Scripted, first: list[Step] | None,
           second: list[Step]) -> tuple[ScriptedServer | None, ScriptedServer]:
    """Servers for mx1 (127.0.0.10) and mx2 (127.0.0.11) on one port; `first` None: mx1 has
    nothing listening (connection refused)."""
    for _ in range(5):  # the port is free on 127.0.0.11 too, almost surely
        mx2 = scripted(second, host="127.0.0.11")
        try:
            mx1 = None if first is None else scripted(first, host="127.0.0.10", port=mx2.port)
        except OSError:
            mx2.stop()
            continue
        return mx1, mx2
    raise AssertionError("no port free on both addresses")


@pytest.mark.parametrize("first", ["421-banner", "554-banner", "connection-refused"])
def test_unusable_first_mx_delivers_via_the_next_mx(scripted: Scripted,
                                                    engine: Callable[..., Engine],
                                                    first: str) -> None:
    scripts = {"421-banner": [S("421 4.3.2 too busy, try another"), WAIT_CLOSE()],
               "554-banner": [S("554 5.7.1 no service here"), WAIT_CLOSE()],
               "connection-refused": None}
    mx1, mx2 = two_mx(scripted, scripts[first], delivering(*PIPELINED))
    with DnsServer(MX_ZONE) as dns:
        stack = engine(Resolver(nameservers=["127.0.0.1"], port=dns.port, smtp_port=mx2.port))
        attempts = stack.deliver()
    assert summary(attempts) == [(RCPT, Status.DELIVERED, 250, False)]
    assert attempts[0].mx == "mx2.example.test"
    if mx1 is not None:
        mx1.wait_finished()
        assert mx1.connections == 1 and mx1.messages == [] and mx1.client_lines() == []
    assert mx2.messages == [MESSAGE]


def test_a_message_whose_turn_taken_again_is_not_now_uses_up_no_cap(
        scripted: Scripted, engine: Callable[..., Engine]) -> None:
    """Regression: mx1 throttled at its banner (421, "slow down"): the pace fell, and the
    message's turn, taken again for mx2, was beyond max_wait. It went back to the spool
    untried, mx2 never asked, but its first turn had counted it against the hourly cap
    and the day's: a message never sent used up a cap."""
    _, mx2 = two_mx(scripted, [S("421 4.7.0 Rate limited, slow down"), WAIT_CLOSE()],
                    delivering(*PIPELINED))
    with DnsServer(MX_ZONE) as dns:
        stack = engine(Resolver(nameservers=["127.0.0.1"], port=dns.port, smtp_port=mx2.port))
        stack.stack.deliverer.shaping = shaping = Shaping(ShapingPlan(
            pool=POOL, throttle=ThrottleConfig(slow_start=False),
            shaping=ShapingConfig(hourly=5, max_wait=0.0)))
        attempts = stack.deliver()
    assert [(a.status, a.attempted, a.reply.status) for a in attempts] == [
        (Status.DEFERRED, False, "4.4.5")], attempts
    ((_, shaper),) = shaping.items()
    assert shaper.triggers == {"rule:rate-text": 1}
    assert shaper.sent_today == 0 and not shaper.caps.counted_this_hour()
    assert mx2.connections == 0


def test_every_mx_refusing_at_the_banner_defers_with_the_last_reply(
        scripted: Scripted, engine: Callable[..., Engine]) -> None:
    _, mx2 = two_mx(scripted, [S("421 4.3.2 busy one"), WAIT_CLOSE()],
                      [S("421 4.3.2 busy two"), WAIT_CLOSE()])
    with DnsServer(MX_ZONE) as dns:
        stack = engine(Resolver(nameservers=["127.0.0.1"], port=dns.port, smtp_port=mx2.port))
        attempts = stack.deliver()
    assert summary(attempts) == [(RCPT, Status.DEFERRED, 421, False)]
    assert attempts[0].mx == "mx2.example.test" and "busy two" in attempts[0].reply.text


def test_every_mx_refusing_with_554_at_the_banner_defers_never_bounces(
        scripted: Scripted, engine: Callable[..., Engine]) -> None:
    """A 554 banner (often a blocklist of our IP) says nothing final about the recipient."""
    _, mx2 = two_mx(scripted, [S("554 5.7.1 no service one"), WAIT_CLOSE()],
                      [S("554 5.7.1 blocked two"), WAIT_CLOSE()])
    with DnsServer(MX_ZONE) as dns:
        stack = engine(Resolver(nameservers=["127.0.0.1"], port=dns.port, smtp_port=mx2.port))
        attempts = stack.deliver()
    assert summary(attempts) == [(RCPT, Status.DEFERRED, 451, False)]
    assert "blocked two" in attempts[0].reply.text


# -- 3, 4. STARTTLS gone wrong --------------------------------------------------------------

def test_failed_tls_handshake_delivers_in_plaintext_on_a_new_connection(
        scripted: Scripted, engine: Callable[..., Engine]) -> None:
    offered = ("PIPELINING", "STARTTLS")
    server = scripted([[*greet(*offered), C("STARTTLS"), S("220 2.0.0 go ahead"), *GARBAGE_TLS],
                       [*greet(*offered), *delivered_once(*PIPELINED)]])
    stack = engine(routed(server), "opportunistic")
    attempts = stack.deliver()
    assert summary(attempts) == [(RCPT, Status.DELIVERED, 250, False)]
    assert attempts[0].tls is None
    assert stack.tls.is_broken("127.0.0.1")
    assert server.connections == 2 and server.messages == [MESSAGE]
    stack.wait_counter("tls_failed", 1)
    stack.wait_counter("delivered", 1)
    assert stack.counter("deferred") == 0


def test_injection_after_starttls_220_defers_without_sending(
        scripted: Scripted, engine: Callable[..., Engine]) -> None:
    server = scripted([*greet("PIPELINING", "STARTTLS"), C("STARTTLS"),
                       INJECT(b"220 2.0.0 go ahead\r\n250 injected\r\n"), WAIT_CLOSE()])
    stack = engine(routed(server), "opportunistic")
    attempts = stack.deliver()
    assert summary(attempts) == [(RCPT, Status.DEFERRED, 451, False)]
    assert attempts[0].reply.enhanced == "4.5.0" and "injection" in attempts[0].reply.text
    assert not stack.tls.is_broken("127.0.0.1")
    server.wait_finished()
    assert server.connections == 1 and server.messages == []
    assert [line.upper() for line in server.client_lines()] == [f"EHLO {HELO}".upper(),
                                                                "STARTTLS"]


def test_required_tls_without_starttls_defers_4_7_4_unsent(
        scripted: Scripted, engine: Callable[..., Engine]) -> None:
    server = scripted([*greet(*PIPELINED), WAIT_CLOSE()])
    stack = engine(routed(server), "required")
    attempts = stack.deliver()
    assert summary(attempts) == [(RCPT, Status.DEFERRED, 451, False)]
    assert attempts[0].reply.enhanced == "4.7.4"
    server.wait_finished()
    assert server.messages == [] and len(server.client_lines()) == 1  # EHLO only


# -- 5, 6. what the transaction says, per recipient ------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_refused_recipients_are_delivered_deferred_bounced_each(
        scripted: Scripted, engine: Callable[..., Engine], mode: str) -> None:
    server = scripted(partial_refusal_script(mode))
    stack = engine(routed(server))
    attempts = stack.deliver(RCPTS)
    assert summary(attempts) == [
        ("ok@example.test", Status.DELIVERED, 250, False),
        ("bad@example.test", Status.BOUNCED, 550, False),
        ("later@example.test", Status.DEFERRED, 451, False),
    ]
    assert {a.mx for a in attempts} == {"127.0.0.1"}
    assert server.messages == [MESSAGE]
    stack.wait_counter("delivered", 1)
    stack.wait_counter("bounced", 1)
    stack.wait_counter("deferred", 1)


def test_mail_refused_bounces_every_recipient(scripted: Scripted,
                                              engine: Callable[..., Engine]) -> None:
    server = scripted([*greet(), mail(), S("550 5.7.1 sender blocked"), C("RSET"),
                       S("250 ok")])
    stack = engine(routed(server))
    attempts = stack.deliver(RCPTS[:2])
    assert [(a.status, a.reply.enhanced) for a in attempts] == [(Status.BOUNCED, "5.7.1")] * 2


@pytest.mark.parametrize("mode", ["data", "bdat"])
def test_drop_after_the_final_dot_defers_ambiguous(scripted: Scripted,
                                                   engine: Callable[..., Engine],
                                                   mode: str) -> None:
    if mode == "data":
        script = [*greet(), mail(), S("250 ok"), rcpt(RCPT), S("250 ok"), C("DATA"),
                  S("354 go on"), DATA(), CLOSE()]
    else:
        script = [*greet("PIPELINING", "CHUNKING"), mail(), rcpt(RCPT), BDAT(last=True),
                  S("250 ok", "250 ok"), CLOSE()]
    server = scripted(script)
    stack = engine(routed(server))
    attempts = stack.deliver()
    assert summary(attempts) == [(RCPT, Status.DEFERRED, 451, True)]
    assert server.messages == [MESSAGE]  # it did arrive: a retry may duplicate it
    stack.wait_counter("ambiguous", 1)


def test_ambiguous_losses_that_make_push_back_are_deferred_not_throttled(
        scripted: Scripted, engine: Callable[..., Engine]) -> None:
    """Two hang-ups in a row after the whole message was sent, right after a delivery: the
    provider is pushing back (engine.pushback), and the rate comes down. But the recipient
    is not throttled: a throttled one goes again at its next turn with no attempt counted,
    and this one the server may have taken. It is deferred by the retry schedule, counted."""
    extensions = ("PIPELINING", "CHUNKING")
    taken_then_lost = [mail(), rcpt(RCPT), BDAT(last=True), CLOSE()]
    server = scripted([[*delivering(*extensions), *taken_then_lost],
                       [*greet(*extensions), *taken_then_lost]])
    stack = engine(routed(server))
    assert summary(stack.deliver()) == [(RCPT, Status.DELIVERED, 250, False)]
    for _ in range(2):  # the first loss waits for the next one's verdict (pushback.HOLD)
        (lost,) = stack.deliver()
        assert (lost.status, lost.ambiguous, lost.throttled, lost.retried) == \
            (Status.DEFERRED, True, False, False)
    stack.wait_counter("pushback", 1)  # the losses still slow the pace down
    stack.wait_counter("ambiguous", 2)
    assert server.connections == 2 and server.messages == [MESSAGE] * 3


def test_smtputf8_recipient_to_a_server_without_smtputf8_bounces_5_6_7(
        scripted: Scripted, engine: Callable[..., Engine]) -> None:
    server = scripted([*greet(*PIPELINED), WAIT_CLOSE()])
    stack = engine(routed(server))
    attempts = stack.deliver(("jos\u00e9@example.test",), smtputf8=True)
    assert summary(attempts) == [("jos\u00e9@example.test", Status.BOUNCED, 553, False)]
    assert attempts[0].reply.enhanced == "5.6.7"
    assert server.messages == []


# -- against a real server (aiosmtpd) ------------------------------------------------------

def test_messages_reuse_one_connection_from_the_sending_ip(plain_sink: SinkServer,
                                                           engine: Callable[..., Engine]) -> None:
    stack = engine(routed(plain_sink), ip="127.0.0.2")
    attempts = [a for _ in range(3) for a in stack.deliver(RCPTS[:1])]
    assert [a.status for a in attempts] == [Status.DELIVERED] * 3
    assert [a.conn_reused for a in attempts] == [False, True, True]
    received = plain_sink.wait_for(3)
    assert {m.peer[0] for m in received} == {"127.0.0.2"}  # bound to the sending IP
    assert [(m.conn_id, m.seq, m.via) for m in received] == [(1, 1, "BDAT"), (1, 2, "BDAT"),
                                                             (1, 3, "BDAT")]
    assert received[0].content == MESSAGE and received[0].rcpt_tos == (RCPTS[0],)


def test_opportunistic_tls_to_a_self_signed_server(sink: SinkServer,
                                                   engine: Callable[..., Engine]) -> None:
    stack = engine(routed(sink), "opportunistic")
    attempts = stack.deliver(("a@example.test", "reject-me@example.test"))
    assert [(a.status, a.tls) for a in attempts] == [(Status.DELIVERED, "TLSv1.3"),
                                                     (Status.BOUNCED, "TLSv1.3")]
    [message] = sink.wait_for(1)
    assert message.tls == "TLSv1.3" and message.rcpt_tos == ("a@example.test",)
    assert not stack.tls.is_broken(sink.host)
    stack.wait_counter("tls_negotiated", 1)
