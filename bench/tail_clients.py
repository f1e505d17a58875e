"""The comparison clients of the tail benchmark (bench/tail.py): the same paced load, sent by a
plain pipelined smtplib client or by python-slimta instead of the engine.

`python -m bench.tail_clients {smtplib,slimta} --port P [--seconds 60] [--rate 10]`

Run by bench/tail.py in a child interpreter (slimta is gevent-based; the child keeps its
hub away from the benchmark's threads), against the same receiver behind the same latency
proxy on 127.0.0.1:P. Both keep 2 connections open with STARTTLS (the receiver's
certificate is self-signed: not verified, as an opportunistic sender does) and never retire
them. One message goes first; then `rate` messages per second, paced, for `seconds`.
Delivery time is from the moment a message is offered (put on the client's queue) to its
final reply. The last stdout line is JSON: the delays, in ms, and what failed.

- *smtplib*: two threads, each holding an `smtplib.SMTP` connection opened before the paced
  run, taking messages from one queue. MAIL, RCPT and DATA go out in one write (RFC 2920),
  through smtplib's low-level `send` and `getreply` (`sendmail` waits for each reply); then the
  message and its dot, and the final reply: 2 round trips a message, the floor without
  CHUNKING. smtplib cannot pipeline across messages (the next MAIL before the dot's reply).
- *slimta*: `slimta.relay.smtp.static.StaticSmtpRelay` with `pool_size=2` and an idle timeout
  longer than the run (its clients keep their connection); slimta pipelines MAIL, RCPT and
  DATA itself when the receiver offers PIPELINING. It opens its second connection when a
  message finds the first one busy. One change to it: it does not send `AUTH=<>` on MAIL
  (the sink, aiosmtpd, offers AUTH after STARTTLS but answers that parameter with 555).
"""
from __future__ import annotations

import argparse
import json
import queue
import re
import smtplib
import ssl
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from bench.common import job

HOST = "127.0.0.1"
CONNECTIONS = 2


def unverified_context(cls: type[ssl.SSLContext] = ssl.SSLContext) -> ssl.SSLContext:
    """A client context that does not verify. For slimta, `cls` is gevent's SSLContext:
    without monkey-patching, a stdlib context (which is also what gevent.ssl's
    create_default_context returns) wraps slimta's gevent socket in a blocking stdlib one,
    and its two connections then take turns, each holding the hub for a whole transaction."""
    ctx = cls(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def data_payload(message: bytes) -> bytes:
    """The message as DATA sends it: CRLF line ends, leading dots doubled, the dot line."""
    text = re.sub(rb"\r?\n", b"\r\n", message)
    if not text.endswith(b"\r\n"):
        text += b"\r\n"
    return re.sub(rb"(?m)^\.", b"..", text) + b".\r\n"


def pipelined_send(conn: smtplib.SMTP, sender: str, rcpt: str, message: bytes) -> int:
    """One transaction on `conn`, MAIL, RCPT and DATA in one write; the final reply's code."""
    conn.send(f"MAIL FROM:<{sender}>\r\nRCPT TO:<{rcpt}>\r\nDATA\r\n")
    codes = [conn.getreply()[0] for _ in range(3)]
    if codes[0] != 250 or codes[1] not in (250, 251) or codes[2] != 354:
        if codes[2] == 354:  # the DATA went through anyway: end it empty
            conn.send(b".\r\n")
            conn.getreply()
        conn.rset()
        return codes[0] if codes[0] != 250 else codes[1] if codes[1] not in (250, 251) \
            else codes[2]
    conn.send(data_payload(message))
    return int(conn.getreply()[0])


def connect(port: int) -> smtplib.SMTP:
    conn = smtplib.SMTP(HOST, port, local_hostname="bench.mailengine.test", timeout=30)
    conn.ehlo()
    if not conn.has_extn("pipelining"):
        raise RuntimeError("the receiver does not offer PIPELINING")
    conn.starttls(context=unverified_context())
    conn.ehlo()
    return conn


def paced(rate: float, count: int, offer: Callable[[int], None]) -> None:
    """`offer(i)` for i in range(count), one every 1/rate seconds on a fixed schedule."""
    started = time.monotonic()
    for i in range(count):
        delay = started + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        offer(i)


def slowest(delays: dict[int, float], offered: dict[int, float], start: float) -> list[Any]:
    """The 10 slowest: (delay ms, offered at s after the paced start), as bench/tail.py's."""
    return sorted(((round(delays[i]), round(offered[i] - start, 2)) for i in delays if i >= 0),
                  reverse=True)[:10]


def run_smtplib(port: int, seconds: float, rate: float) -> dict[str, Any]:
    work: queue.Queue[tuple[int, float] | None] = queue.Queue()
    delays: dict[int, float] = {}
    offers: dict[int, float] = {}
    errors: list[str] = []
    lock = threading.Lock()
    conns = [connect(port) for _ in range(CONNECTIONS)]

    def sender(conn: smtplib.SMTP) -> None:
        while (item := work.get()) is not None:
            index, offered = item
            offers[index] = offered
            envelope, message = job(index, "tail-smtplib")
            try:
                code = pipelined_send(conn, envelope["from"], envelope["to"][0], message)
            except (OSError, smtplib.SMTPException) as exc:
                code, detail = 0, repr(exc)
            else:
                detail = str(code)
            with lock:
                if code == 250:
                    delays[index] = (time.time() - offered) * 1000
                else:
                    errors.append(f"{index}: {detail}")
        conn.quit()

    threads = [threading.Thread(target=sender, args=(c,), daemon=True) for c in conns]
    for t in threads:
        t.start()
    count = int(seconds * rate)
    work.put((-1, time.time()))  # the first message, alone
    while -1 not in delays and not errors:
        time.sleep(0.01)
    time.sleep(0.3)
    start = time.time()
    paced(rate, count, lambda i: work.put((i, time.time())))
    for _ in threads:
        work.put(None)
    for t in threads:
        t.join(seconds + 60)
    delays.pop(-1, None)
    return {"client": f"smtplib (Python {sys.version.split()[0]})", "offered": count,
            "delays_ms": [delays[i] for i in sorted(delays)], "errors": errors[:10],
            "slowest": slowest(delays, offers, start)}


def _slimta() -> Any:
    """Import slimta. python-slimta 5.0.5 asks `pkg_resources` for its own version at import;
    with the setuptools of pyenv's Python 3.11 (65.5) that fails on a dependency whose
    metadata directory has the normalized name (`zope_interface-*.dist-info`:
    "DistributionNotFound: The 'zope.interface' distribution was not found"). Only then,
    and only in this child, the question is answered from importlib.metadata."""
    import importlib.metadata

    import pkg_resources  # type: ignore[import-untyped]
    try:
        pkg_resources.require("python-slimta")
    except pkg_resources.DistributionNotFound:
        class _Dist:
            version = importlib.metadata.version("python-slimta")
        pkg_resources.require = lambda *_: [_Dist()]
    import slimta.envelope  # type: ignore[import-untyped]
    import slimta.relay.smtp.client  # type: ignore[import-untyped]
    import slimta.relay.smtp.static  # type: ignore[import-untyped]
    return slimta


def run_slimta(port: int, seconds: float, rate: float) -> dict[str, Any]:
    import importlib.metadata

    import gevent
    import gevent.ssl
    slimta = _slimta()

    class Client(slimta.relay.smtp.client.SmtpRelayClient):  # type: ignore[name-defined]
        """slimta's client, but it does not add `AUTH=<>` to MAIL: slimta does when the
        receiver offers AUTH, and aiosmtpd (the sink) offers AUTH after STARTTLS but
        refuses that parameter (555)."""

        def _handshake(self) -> None:
            super()._handshake()
            self.client.extensions.drop("AUTH")

    relay = slimta.relay.smtp.static.StaticSmtpRelay(
        HOST, port, pool_size=CONNECTIONS, client_class=Client,
        context=unverified_context(gevent.ssl.SSLContext),
        ehlo_as="bench.mailengine.test", idle_timeout=seconds + 60, command_timeout=30)
    delays: dict[int, float] = {}
    offers: dict[int, float] = {}
    errors: list[str] = []

    def send(index: int) -> None:
        offered = offers[index] = time.time()
        envelope, message = job(index, "tail-slimta")
        env = slimta.envelope.Envelope(envelope["from"], list(envelope["to"]))
        env.parse(message)
        try:
            relay.attempt(env, 0)
        except Exception as exc:  # any failure: counted and shown
            errors.append(f"{index}: {exc!r}")
        else:
            delays[index] = (time.time() - offered) * 1000

    count = int(seconds * rate)
    send(-1)  # the first message, alone
    gevent.sleep(0.3)
    greenlets = []
    start = time.time()
    started = time.monotonic()
    for i in range(count):
        delay = started + i / rate - time.monotonic()
        if delay > 0:
            gevent.sleep(delay)
        greenlets.append(gevent.spawn(send, i))
    gevent.joinall(greenlets, timeout=seconds + 60)
    for client in list(relay.pool):  # (relay.kill() iterates the set its clients leave)
        client.kill()
    delays.pop(-1, None)
    return {"client": f"python-slimta {importlib.metadata.version('python-slimta')}"
                      f" (gevent {gevent.__version__})",
            "offered": count, "delays_ms": [delays[i] for i in sorted(delays)],
            "errors": errors[:10], "slowest": slowest(delays, offers, start)}


CLIENTS = {"smtplib": run_smtplib, "slimta": run_slimta}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tail_clients", description=__doc__)
    parser.add_argument("client", choices=sorted(CLIENTS))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--rate", type=float, default=10.0)
    args = parser.parse_args(argv)
    result = CLIENTS[args.client](args.port, args.seconds, args.rate)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
