"""Memory of one worker holding 1,000 open TLS connections.

Run as its own process (`python -m bench.memory --ports P1,P2,... --connections 1000`):
gevent patches first, then the script builds the engine's real `Worker` (as
bench/worker_alone.py does) with routes spreading recipient domains over the
given sink ports (aiosmtpd sinks with STARTTLS, one process each: see
bench/tls_sink.py), `pool.max_connections` = connections.

1. Baseline: one message per sink, one at a time (one TLS connection each; the TLS
   policy learns that the test certificate does not verify), then RSS.
2. All connections at once: `connections` tasks delivered concurrently; none finds
   an idle connection, so each opens its own; after delivery they stay in the pools
   (idle_timeout 10 min). RSS again, and the pools' open-connection count.

Prints one JSON line: RSS before and after, per connection, connections open.
"""
from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import atexit  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from typing import Any  # noqa: E402

import gevent  # noqa: E402
import gevent.pool  # noqa: E402

from engine import config as config_mod  # noqa: E402
from engine.protocol import Task  # noqa: E402
from engine.testing.harness import make_message  # noqa: E402
from engine.worker import Worker  # noqa: E402


def rss_mb() -> float:
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def build(ports: list[int], connections: int) -> Worker:
    cfg = config_mod.from_dict({
        "ips": [{"address": "127.0.0.2", "helo": "bench.mailengine.test"}],
        "routes": {f"d{i}.example.test": f"127.0.0.1:{port}" for i, port in enumerate(ports)},
        # Per destination and (shaping's default) per provider: all four sinks are one
        # provider (127.0.0.1), so the cap is the total.
        "pool": {"max_connections": connections, "idle_timeout": 600},
        "statsd": {"enabled": False},
        "log_level": "warning",
    })
    sockdir = tempfile.mkdtemp(prefix="me-bench-")
    atexit.register(shutil.rmtree, sockdir, ignore_errors=True)
    return Worker(cfg, cfg.ips[0], f"ipc://{sockdir}/tasks", f"ipc://{sockdir}/results")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ports", required=True, help="comma-separated sink ports")
    parser.add_argument("--connections", type=int, default=1000)
    args = parser.parse_args()
    ports = [int(p) for p in args.ports.split(",")]
    worker = build(ports, args.connections)
    deliverer = worker.deliverer
    outcomes: Counter[str] = Counter()
    tls: Counter[str] = Counter()

    def report(attempts: list[Any]) -> None:
        for attempt in attempts:
            outcomes[attempt.status.value] += 1
            tls[str(attempt.tls)] += 1

    message = make_message(0, 5000, "bench@mailengine.test", "user@example.test")

    def task(i: int) -> Task:
        return Task(job_id=f"m{i}", sender="bench@mailengine.test",
                    rcpts=(f"user{i}@d{i % len(ports)}.example.test",), message=message,
                    queued_ts=time.time())

    for i in range(len(ports)):
        deliverer.deliver(task(i), report)
    gc.collect()
    gevent.sleep(0.5)
    before, open_before = rss_mb(), worker.pools.open_connections
    group = gevent.pool.Pool(args.connections)
    started = time.perf_counter()
    for i in range(args.connections):
        group.spawn(deliverer.deliver, task(i), report)
    group.join()
    seconds = time.perf_counter() - started
    gc.collect()
    gevent.sleep(0.5)
    after, open_after = rss_mb(), worker.pools.open_connections
    result = {
        "connections_requested": args.connections, "open_before": open_before,
        "open_after": open_after, "rss_before_mb": before, "rss_after_mb": after,
        "rss_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "kb_per_connection": (after - before) * 1024 / max(1, open_after - open_before),
        "seconds_to_open": seconds, "outcomes": dict(outcomes), "tls": dict(tls),
        "sinks": len(ports),
    }
    worker.pools.close_all()
    gevent.sleep(1.0)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
