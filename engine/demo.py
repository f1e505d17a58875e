"""`mailengine demo`: real mail through the real engine to a local SMTP server, then the figures.

It starts an SMTP server with STARTTLS, PIPELINING and CHUNKING on 127.0.0.1,
runs the engine (supervisor, spool, one worker on 127.0.0.2) twice on the same
messages, once with a connection per message (what a naive sender does) and
once pooled (the engine's default), and prints what happened side by side:
delivered, connections opened against messages sent, share over TLS, and
delivery time p50/p95 from queued to the server's reply.
"""
from __future__ import annotations

import os
import shutil
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from engine.testing.harness import LocalEngine, final_outcomes, make_message

DOMAINS = ("example-one.test", "example-two.test", "example-three.test")


@dataclass
class RunFigures:
    label: str
    messages: int
    delivered: int
    connections: int
    tls_share: float
    p50_ms: float
    p95_ms: float
    seconds: float
    via: str


def main(messages: int = 300, keep: bool = False) -> int:
    try:
        from engine.testing.sink import SinkServer
    except ImportError as err:
        print(f"mailengine demo needs aiosmtpd and trustme for its local SMTP server ({err});"
              f" install them with: {install_aiosmtpd()}", file=sys.stderr)
        return 2
    workdir = tempfile.mkdtemp(prefix="mailengine-demo-")
    print(f"mailengine demo: {messages} messages of ~5 KB to {len(DOMAINS)} domains, from"
          " 127.0.0.2 to a local SMTP server with STARTTLS on 127.0.0.1\n")
    results: list[RunFigures] = []
    try:
        for label, pool in (("connect per message", {"max_messages": 1}),
                            ("pooled (default)", {})):
            with SinkServer(tls=True) as sink:
                results.append(_run(label, pool, sink, messages, f"{workdir}/{len(results)}"))
        _print_table(results)
        print(f"\nevents and logs: {workdir}" if keep else "")
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0 if all(r.delivered == r.messages for r in results) else 1


def install_aiosmtpd(prefix: str | None = None, base_prefix: str | None = None,
                     stdlib: str | None = None) -> str:
    """The command that installs aiosmtpd for this Python (or the one described): Debian's
    package where the distribution manages it (PEP 668's EXTERNALLY-MANAGED: pip refuses
    there; the Debian package suggests python3-aiosmtpd and python3-trustme), else pip (a
    virtual environment). trustme makes the sink's TLS certificate."""
    managed = os.path.join(stdlib or sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")
    if (prefix or sys.prefix) == (base_prefix or sys.base_prefix) and os.path.exists(managed):
        return "sudo apt install python3-aiosmtpd python3-trustme"
    return "pip install aiosmtpd trustme"


def _run(label: str, pool: dict[str, Any], sink: Any, count: int, workdir: str) -> RunFigures:
    extra = {"pool": {"max_connections": 2, **pool}}
    with LocalEngine(workdir, sink.port, extra=extra) as engine:
        engine.start()
        jobs = []
        for i in range(count):
            rcpt = f"user{i}@{DOMAINS[i % len(DOMAINS)]}"
            jobs.append(({"id": f"demo-{i}", "from": "demo@mailengine.test", "to": [rcpt]},
                         make_message(i, 5000, "demo@mailengine.test", rcpt)))
        print(f"{label}:")
        started = time.monotonic()
        if not engine.push(jobs, timeout=60):
            raise RuntimeError("the engine did not accept every job")
        _follow(engine, count)
        seconds = time.monotonic() - started
        engine.stop()
        finals = list(final_outcomes(engine.events()).values())
    received = sink.messages
    delays = sorted(e["delay_ms"] for e in finals if e["event"] == "delivered")
    via = {m.via for m in received}
    return RunFigures(
        label=label, messages=count,
        delivered=sum(1 for e in finals if e["event"] == "delivered"),
        connections=len({m.conn_id for m in received}),
        tls_share=sum(1 for m in received if m.tls) / max(1, len(received)),
        p50_ms=_percentile(delays, 50), p95_ms=_percentile(delays, 95), seconds=seconds,
        via="/".join(sorted(via)))


def _follow(engine: LocalEngine, count: int, timeout: float = 300.0) -> None:
    """A progress bar of final outcomes, until every message has one."""
    deadline = time.monotonic() + timeout
    shown = -1
    while True:
        done = len(final_outcomes(engine.events()))
        filled = int(40 * done / count)
        if filled != shown:
            sys.stdout.write(f"\r  [{'#' * filled}{'.' * (40 - filled)}] {done}/{count} done ")
            sys.stdout.flush()
            shown = filled
        if done >= count:
            sys.stdout.write("\n")
            return
        if time.monotonic() > deadline:
            raise TimeoutError("demo timed out; see the engine log")
        time.sleep(0.1)


def _percentile(values: list[float], pct: float) -> float:
    if not values:
        return 0.0
    index = min(len(values) - 1, round(pct / 100 * (len(values) - 1)))
    return float(values[index])


def _print_table(results: list[RunFigures]) -> None:
    print()
    print(f"{'':24}" + "".join(f"{r.label:>24}" for r in results))
    rows = [
        ("delivered", lambda r: f"{r.delivered}/{r.messages}"),
        ("connections opened", lambda r: str(r.connections)),
        ("messages per connection", lambda r: f"{r.messages / max(1, r.connections):.1f}"),
        ("share over TLS", lambda r: f"{r.tls_share:.0%}"),
        ("sent with", lambda r: r.via),
        ("delivery time p50", lambda r: f"{r.p50_ms:.0f} ms"),
        ("delivery time p95", lambda r: f"{r.p95_ms:.0f} ms"),
        ("whole run", lambda r: f"{r.seconds:.1f} s"),
    ]
    for name, cell in rows:
        print(f"{name:24}" + "".join(f"{cell(r):>24}" for r in results))
    naive, pooled = results[0], results[-1]
    if pooled.p50_ms > 0:
        print(f"\npooled delivery: {naive.p50_ms / pooled.p50_ms:.0f}x faster at the median,"
              f" {naive.connections / max(1, pooled.connections):.0f}x fewer connections"
              " (the queue behind a 2-connection cap is what handshakes cost)")
