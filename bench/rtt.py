"""The engine at 50 ms RTT (through bench/latency_proxy.py), against the aiosmtpd sink.

Two experiments, each on the whole engine (`mailengine run`: supervisor, durable
spool, one worker, events log) and a destination that takes at most 2
connections at once (engine `pool.max_connections: 2`; the proxy refuses a 3rd
with a 421 and counts it):

- `modes`: for each way of sending (a connection per message, as a naive client
  does it, in lock step: the engine told to ignore the sink's PIPELINING and
  CHUNKING with `smtp.discard_ehlo_keywords`, what `smtplib.sendmail` per message
  does; a connection per message as the engine does it, with PIPELINING and
  CHUNKING; pooled against a sink without PIPELINING or CHUNKING; with
  PIPELINING; with PIPELINING and CHUNKING), plain and with STARTTLS:
  - warm latency: messages one at a time, each sent when the previous one is
    final, on a pool opened beforehand; delivery time from the events
    (`delay_ms`, queued to final reply) and the worker's StatsD `transaction`
    timer (MAIL to the final reply alone);
  - throughput: a burst of messages pushed at once, messages per second from the
    first `queued` to the last final outcome.
- `headline`: 10 messages per second offered for a minute (a paced producer), at
  50 ms RTT with STARTTLS, a connection per message against pooled delivery:
  delivery time p50 and p99 including the wait in the queue.
"""
from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from typing import Any

from bench.common import (
    Producer,
    StatsdCatcher,
    engine_config,
    job,
    log,
    percentile,
    running_engine,
    summary,
)
from bench.latency_proxy import ProxyProcess
from engine.testing.harness import LocalEngine
from engine.testing.sink import SinkServer

RTT = 0.050
CAP = 2  # the destination's connection limit
# A 3rd connection waits at the proxy until one of the 2 closes (a full listen backlog), rather
# than getting a 421: aiosmtpd closes a TLS session only once the client's FIN arrives, which
# races with the engine's next connection (see "Findings" in docs/PERFORMANCE.md).
OVER_LIMIT = "queue"

NAIVE = "connect per message, naive (no PIPELINING/CHUNKING)"
CONNECT = "connect per message, engine (PIPELINING+CHUNKING)"
POOLED = "pooled + CHUNKING"

# name -> (pool settings, engine `smtp` settings, sink PIPELINING, sink CHUNKING)
MODES: dict[str, tuple[dict[str, Any], dict[str, Any], bool, bool]] = {
    # The naive engine of the issue: a connection per message and lock step (banner, EHLO,
    # STARTTLS, TLS, EHLO, MAIL, RCPT, DATA, message), against the same sink as the next row.
    NAIVE: ({"max_connections": CAP, "max_messages": 1},
            {"discard_ehlo_keywords": ["PIPELINING", "CHUNKING"]}, True, True),
    CONNECT: ({"max_connections": CAP, "max_messages": 1}, {}, True, True),
    "pooled": ({"max_connections": CAP}, {}, False, False),
    "pooled + PIPELINING": ({"max_connections": CAP}, {}, True, False),
    POOLED: ({"max_connections": CAP}, {}, True, True),
}
SLUGS = {NAIVE: "naive", CONNECT: "connect", "pooled": "pooled",
         "pooled + PIPELINING": "pipelining", POOLED: "chunking"}


def mode_run(workdir: str, mode: str, tls: bool, sequential: int, burst: int) -> dict[str, Any]:
    pool, smtp, pipelining, chunking = MODES[mode]
    label = f"{mode}, {'STARTTLS' if tls else 'plain'}"
    log(f"rtt: {label}: {sequential} one at a time, then a burst of {burst}")
    stats = StatsdCatcher()
    with SinkServer(tls=tls, pipelining=pipelining, chunking=chunking) as sink, \
            ProxyProcess((sink.host, sink.port), RTT, max_connections=CAP,
                         over_limit=OVER_LIMIT) as proxy:
        extra = engine_config(proxy.port, pool, stats.port, smtp)
        with running_engine(workdir, proxy.port, extra) as engine:
            producer = Producer(engine)
            tag = f"{SLUGS[mode]}-{'tls' if tls else 'plain'}"
            # Warm up: the pool opens (and the TLS policy learns the sink's certificate).
            for i in range(2):
                producer.send(*job(i, f"warm-{tag}"))
                producer.wait_final([f"warm-{tag}-{i}"], 30)
            since = time.time()
            one_by_one = []
            for i in range(sequential):
                envelope, message = job(i, f"seq-{tag}")
                producer.send(envelope, message)
                producer.wait_final([envelope["id"]], 30, poll=0.002)
                one_by_one.append(producer.final[envelope["id"]])
            time.sleep(0.3)  # the last timers reach the catcher
            transactions = stats.timers("transaction", since)
            pool_waits = stats.timers("pool_wait", since)
            burst_ids = []
            burst_start = time.time()
            for i in range(burst):
                envelope, message = job(i, f"burst-{tag}")
                producer.send(envelope, message)
                burst_ids.append(envelope["id"])
            producer.wait_queued()
            producer.wait_final(burst_ids, 150, strict=False)
            producer.close()
    proxy_stats = proxy.stats
    stats.close()
    burst_events = [producer.final[i] for i in burst_ids if i in producer.final]
    first = min(producer.queued[i]["ts"] for i in burst_ids)
    last = max(e["ts"] for e in burst_events)
    received = sink.messages
    delays = [float(e["delay_ms"]) for e in one_by_one]
    return {
        "mode": mode, "tls": tls, "label": label,
        "sequential": {
            "delay_ms": delays, "summary": summary(delays),
            "transaction_ms": transactions, "transaction": summary(transactions),
            "pool_wait": summary(pool_waits),
            "delivered": sum(1 for e in one_by_one if e["event"] == "delivered"),
            "reused": sum(1 for e in one_by_one if e["conn_reused"]),
            "tls_versions": sorted({str(e["tls"]) for e in one_by_one}),
        },
        "burst": {
            "messages": burst, "seconds": last - first,
            "per_second": len(burst_events) / max(1e-9, last - first),
            "submit_seconds": first - burst_start, "unfinished": burst - len(burst_events),
            "delivered": sum(1 for e in burst_events if e["event"] == "delivered"),
            "delay_ms": summary([float(e["delay_ms"]) for e in burst_events]),
        },
        "sink": {"messages": len(received), "connections": sink.connections,
                 "max_concurrent": sink.max_concurrent,
                 "via": sorted({m.via for m in received}),
                 "tls": sum(1 for m in received if m.tls)},
        "proxy": proxy_stats, "deferred": producer.deferred,
    }


def modes(workdir: str, quick: bool) -> list[dict[str, Any]]:
    sequential, burst = (15, 60) if quick else (40, 200)
    results: list[dict[str, Any]] = []
    for tls in (False, True):
        for mode in MODES:
            slug = f"{SLUGS[mode]}-{int(tls)}-{len(results)}"
            results.append(mode_run(os.path.join(workdir, slug), mode, tls, sequential, burst))
            r = results[-1]
            log(f"  p50 {r['sequential']['summary']['p50']:.0f} ms delivery,"
                f" {percentile(r['sequential']['transaction_ms'], 50):.0f} ms transaction;"
                f" burst {r['burst']['per_second']:.1f}/s; proxy {r['proxy']}")
    return results


@contextlib.contextmanager
def warmed_up(workdir: str, mode: str, tag: str, over_limit: str
              ) -> Iterator[tuple[SinkServer, ProxyProcess, LocalEngine, Producer]]:
    """The STARTTLS sink behind the proxy and the engine in `mode`, after one message
    (`{tag}-warm-0`) went through, so that a run starts with what a long-running engine
    knows about the host (its certificate does not verify)."""
    pool, smtp, pipelining, chunking = MODES[mode]
    with SinkServer(tls=True, pipelining=pipelining, chunking=chunking) as sink, \
            ProxyProcess((sink.host, sink.port), RTT, max_connections=CAP,
                         over_limit=over_limit) as proxy:
        with running_engine(workdir, proxy.port,
                            engine_config(proxy.port, pool, smtp=smtp)) as engine:
            producer = Producer(engine)
            producer.send(*job(0, f"{tag}-warm"))
            producer.wait_final([f"{tag}-warm-0"], 30)
            yield sink, proxy, engine, producer


def headline_run(workdir: str, mode: str, seconds: float, rate: float,
                 drain: float) -> dict[str, Any]:
    count = int(seconds * rate)
    log(f"headline: {mode}: {count} messages at {rate:g}/s, STARTTLS, {RTT * 1000:.0f} ms RTT,"
        f" {CAP} connections")
    tag = f"head-{SLUGS[mode]}"
    with warmed_up(workdir, mode, tag, OVER_LIMIT) as (sink, proxy, _engine, producer):
        started = time.time()
        offered = producer.paced((job(i, tag) for i in range(count)), rate)
        producer.wait_queued()
        ids = [f"{tag}-{i}" for i in range(count)]
        complete = producer.wait_final(ids, drain, poll=0.05, strict=False)
        ended = time.time()
        producer.close()
    queued_ts = {i: producer.queued[i]["ts"] for i in ids if i in producer.queued}
    done = [producer.final[i] for i in ids if i in producer.final]
    # A message still waiting at the end counts with the time it has waited so far (a
    # lower bound), so an overloaded run's percentiles are never flattered.
    waits = [float(e["delay_ms"]) for e in done]
    waits += [(ended - queued_ts[i]) * 1000 for i in ids if i not in producer.final]
    timeline = sorted((queued_ts[e["id"]] - started, float(e["delay_ms"]),
                       e["ts"] - started) for e in done)
    received = sink.messages
    return {
        "mode": mode, "offered": count, "rate": rate, "seconds": seconds,
        "offered_seconds": offered, "complete": complete,
        "delivered": sum(1 for e in done if e["event"] == "delivered"),
        "unfinished": count - len(done),
        "delay": summary(waits), "timeline": timeline,
        "per_second": len(done) / max(1e-9, max((e["ts"] for e in done), default=started)
                                      - started),
        "reused": sum(1 for e in done if e["conn_reused"]),
        "sink": {"messages": len(received), "connections": sink.connections,
                 "max_concurrent": sink.max_concurrent,
                 "via": sorted({m.via for m in received}),
                 "tls": sum(1 for m in received if m.tls)},
        "proxy": proxy.stats, "deferred": producer.deferred,
    }


def headline(workdir: str, quick: bool) -> list[dict[str, Any]]:
    seconds = 20.0 if quick else 60.0
    results: list[dict[str, Any]] = []
    for mode in (CONNECT, POOLED):
        run = headline_run(os.path.join(workdir, f"head-{len(results)}"), mode, seconds, 10.0,
                           drain=seconds + 60.0)
        log(f"  p50 {run['delay']['p50']:.0f} ms, p99 {run['delay']['p99']:.0f} ms,"
            f" unfinished {run['unfinished']}, proxy {run['proxy']}")
        results.append(run)
    return results


def refusal_run(workdir: str, mode: str, count: int, wait: float) -> dict[str, Any]:
    """A burst against a destination that *refuses* a 3rd connection (421 at the banner)."""
    log(f"refusal: {mode}: {count} messages at once, the proxy answers a 3rd connection 421")
    tag = f"refuse-{SLUGS[mode]}"
    with warmed_up(workdir, mode, tag, "refuse") as (_sink, proxy, engine, producer):
        started = time.time()
        ids = []
        for i in range(count):
            envelope, message = job(i, tag)
            producer.send(envelope, message)
            ids.append(envelope["id"])
        producer.wait_queued()
        producer.wait_final(ids, wait, poll=0.05, strict=False)
        producer.close()
        events = [e for e in engine.events() if e.get("id") in set(ids)]
    deferred = [e for e in events if e["event"] == "deferred"]
    return {
        "mode": mode, "messages": count, "waited": wait,
        "delivered": sum(1 for i in ids if producer.final.get(i, {}).get("event") == "delivered"),
        "deferred_events": len(deferred),
        "deferred_jobs": len({e["id"] for e in deferred}),
        "retry_after_s": sorted({round(e["next_attempt"] - e["ts"]) for e in deferred
                                 if "next_attempt" in e}),
        "replies": sorted({f"{e['code']} {e['reply']}" for e in deferred})[:3],
        "seconds": time.time() - started, "proxy": proxy.stats,
    }


def refusal(workdir: str, quick: bool) -> list[dict[str, Any]]:
    count, wait = (30, 20.0) if quick else (40, 30.0)
    results: list[dict[str, Any]] = []
    for mode in (CONNECT, POOLED):
        run = refusal_run(os.path.join(workdir, f"refuse-{len(results)}"), mode, count, wait)
        log(f"  delivered {run['delivered']}/{count} within {wait:.0f} s, deferred"
            f" {run['deferred_jobs']} jobs, proxy {run['proxy']}")
        results.append(run)
    return results
