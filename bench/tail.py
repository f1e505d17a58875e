"""The tail on a warm pooled path: p99 against p50 (issue #19, item 4).

`python -m bench.tail [--seconds 60] [--rate 10] [--label before] [--docs]`

The whole engine (`mailengine run`) through the latency proxy (50 ms RTT) to the aiosmtpd
sink with STARTTLS (its certificate does not verify: self-signed), PIPELINING and no
CHUNKING, so a message on a warm connection costs 2 round trips (~105 ms). The receiver takes
2 connections from the client (the proxy holds a 3rd until one closes) and the engine's
`pool.max_connections` is 2; `pool.max_messages` and the rest are the shipped defaults. One
message goes through first (the engine has started and met the host), then a paced producer
offers `rate` messages per second for `seconds`. Delivery time is each event's `delay_ms`
(queued to final reply). The receiver counts its TLS handshakes, and those that failed (the
client aborted them: "unknown ca"), over the whole run, the first message included.

Bounded: about `seconds` + 20 s. `--docs` writes the figures into docs/PERFORMANCE.md
("Tail" section, one row per `--label`, kept across runs).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

from bench.common import (
    ROOT,
    Producer,
    engine_config,
    job,
    log,
    running_engine,
    summary,
    write_section,
)
from bench.latency_proxy import ProxyProcess
from engine.testing.sink import SinkServer
from engine.testing.tlscert import server_tls_context

RTT = 0.050
CAP = 2
RESULTS = os.path.join(ROOT, "bench", "results", "tail.json")
DOC = os.path.join(ROOT, "docs", "PERFORMANCE.md")
HEADING = "## Tail: p99 against p50 on a warm pooled path"


class Handshakes:
    """The receiver's count of TLS handshakes: completed and failed."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.done = 0
        self.failed = 0

    def context(self) -> ssl.SSLContext:
        """The sink's server context, its TLS objects counting their handshakes."""
        ctx = server_tls_context()
        counts = self

        class Counting(ssl.SSLObject):
            def do_handshake(self) -> None:
                try:
                    super().do_handshake()
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    raise
                except (ssl.SSLError, OSError):
                    with counts.lock:
                        counts.failed += 1
                    raise
                with counts.lock:
                    counts.done += 1

        ctx.sslobject_class = Counting
        return ctx


def run(workdir: str, seconds: float, rate: float,
        max_messages: int | None = None) -> dict[str, Any]:
    count = int(seconds * rate)
    log(f"tail: {count} messages at {rate:g}/s, STARTTLS, PIPELINING without CHUNKING,"
        f" {RTT * 1000:.0f} ms RTT, {CAP} connections")
    handshakes = Handshakes()
    tag = "tail"
    pool: dict[str, Any] = {"max_connections": CAP}
    if max_messages is not None:
        pool["max_messages"] = max_messages
    with SinkServer(tls=True, pipelining=True, chunking=False,
                    tls_context=handshakes.context()) as sink, \
            ProxyProcess((sink.host, sink.port), RTT, max_connections=CAP,
                         over_limit="queue") as proxy:
        with running_engine(workdir, proxy.port,
                            engine_config(proxy.port, pool)) as engine:
            producer = Producer(engine)
            producer.send(*job(0, f"{tag}-first"))
            producer.wait_final([f"{tag}-first-0"], 30)
            started = time.time()
            producer.paced((job(i, tag) for i in range(count)), rate)
            producer.wait_queued()
            ids = [f"{tag}-{i}" for i in range(count)]
            producer.wait_final(ids, seconds + 30, poll=0.05, strict=False)
            ended = time.time()
            producer.close()
        stats = proxy.stop()
    done = [producer.final[i] for i in ids if i in producer.final]
    waits = [float(e["delay_ms"]) for e in done]
    waits += [(ended - producer.queued[i]["ts"]) * 1000 for i in ids
              if i not in producer.final and i in producer.queued]
    slowest = sorted(((float(e["delay_ms"]), round(producer.queued[e["id"]]["ts"] - started, 2),
                       bool(e["conn_reused"])) for e in done), reverse=True)[:10]
    return {
        "offered": count, "rate": rate, "seconds": seconds, "pool": pool,
        "delivered": sum(1 for e in done if e["event"] == "delivered"),
        "unfinished": count - len(done), "delay": summary(waits),
        "reused": sum(1 for e in done if e["conn_reused"]),
        "connections": sink.connections, "max_concurrent": sink.max_concurrent,
        "handshakes": handshakes.done, "handshakes_failed": handshakes.failed,
        "proxy": stats, "slowest": slowest,
    }


def _rev() -> str:
    out = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short=12", "HEAD"],
                         capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--", "engine"],
                           capture_output=True, text=True).stdout.strip()
    return out.stdout.strip() + (" + uncommitted engine changes" if dirty else "")


def _load() -> dict[str, Any]:
    try:
        with open(RESULTS, encoding="utf-8") as f:
            return dict(json.load(f))
    except (OSError, ValueError):
        return {}


def render(results: dict[str, Any]) -> str:
    lines = [HEADING, "",
             "The scenario of issue #19 item 4, `bench/tail.py`: the whole engine through the"
             " latency proxy (50 ms RTT) to a receiver with STARTTLS (a certificate that does"
             " not verify), PIPELINING and no CHUNKING, taking 2 connections from the client"
             " (`pool.max_connections: 2`, the other pool keys at their defaults); one message"
             " first, then 10 messages per second, paced, for 60 s. Delivery time is the"
             " event's `delay_ms` (queued to final reply). *Handshakes* are the receiver's"
             " TLS handshakes over the whole run, first message included, and those the"
             " client aborted (a verifying handshake that failed: \"unknown ca\").", "",
             "| run | command | engine | date | `pool` | delivered | p50 | p90 | p99 | max"
             " | p99/p50 | connections | most at once | handshakes (failed) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, r in results.items():
        d = r["delay"]
        lines.append(
            f"| {label} | `{r['command']}` | `{r['engine']}` | {r['date']} |"
            f" `{json.dumps(r.get('pool', {}))}` |"
            f" {r['delivered']}/{r['offered']} | {d['p50']:.0f} ms | {d['p90']:.0f} ms |"
            f" {d['p99']:.0f} ms | {d['max']:.0f} ms | {d['p99'] / d['p50']:.2f} |"
            f" {r['connections']} | {r['max_concurrent']} |"
            f" {r['handshakes'] + r['handshakes_failed']} ({r['handshakes_failed']}) |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tail", description=__doc__)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--rate", type=float, default=10.0)
    parser.add_argument("--max-messages", type=int, help="pool.max_messages (default: the"
                        " engine's)")
    parser.add_argument("--label", default="now", help="the row's name in the results")
    parser.add_argument("--docs", action="store_true", help="write docs/PERFORMANCE.md")
    args = parser.parse_args(argv)
    workdir = tempfile.mkdtemp(prefix="mailengine-tail-")
    result = run(workdir, args.seconds, args.rate, args.max_messages)
    command = "python -m bench.tail " + shlex.join(argv if argv is not None else sys.argv[1:])
    result.update(command=command.strip(), engine=_rev(),
                  date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    d = result["delay"]
    log(f"p50 {d['p50']:.0f} ms, p90 {d['p90']:.0f} ms, p99 {d['p99']:.0f} ms, max"
        f" {d['max']:.0f} ms; {result['connections']} connections, handshakes"
        f" {result['handshakes']} + {result['handshakes_failed']} failed; slowest"
        f" {result['slowest'][:5]}")
    results = _load()
    results[args.label] = result
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
    if args.docs:
        write_section(DOC, HEADING, render(results))
    print(json.dumps({k: v for k, v in result.items() if k != "slowest"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
