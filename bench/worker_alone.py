"""One worker's delivery path alone: no supervisor, no spool, no events, no ZeroMQ traffic.

Run as its own process (`python -m bench.worker_alone --port P --sessions S --count N`):
gevent patches the standard library first, exactly as `bin/mailengine-worker` does,
then the script builds the engine's real `Worker` (its config, pools, connector,
TLS policy and `Deliverer`, from `engine/worker.py`) and hands `Deliverer.deliver`
N tasks at once, as the worker's task loop would (one greenlet per task). The
destination's `pool.max_connections` is the number of SMTP sessions. It prints
one JSON line: messages, seconds, messages per second, outcomes.

With `--profile-wait S` it waits S seconds before sending (time for py-spy to attach).
"""
from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import atexit  # noqa: E402
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
from engine import gctune  # noqa: E402
from engine.protocol import Task  # noqa: E402
from engine.testing.harness import make_message  # noqa: E402
from engine.worker import Worker  # noqa: E402


def build_worker(port: int, sessions: int, source_ip: str, tls: str) -> Worker:
    cfg = config_mod.from_dict({
        "ips": [{"address": source_ip, "helo": "bench.mailengine.test"}],
        "routes": {"*": "127.0.0.1"},
        "smtp": {"port": port, "tls": tls},
        "pool": {"max_connections": sessions},  # max_messages: the default (100)
        "statsd": {"enabled": False},
        "log_level": "warning",
    })
    sockdir = tempfile.mkdtemp(prefix="me-bench-")
    atexit.register(shutil.rmtree, sockdir, ignore_errors=True)
    # The task and result sockets are connected but never used: tasks go straight to the
    # deliverer, results to a counter.
    return Worker(cfg, cfg.ips[0], f"ipc://{sockdir}/tasks", f"ipc://{sockdir}/results")


def run(port: int, sessions: int, count: int, size: int, source_ip: str, tls: str,
        in_flight: int) -> dict[str, object]:
    worker = build_worker(port, sessions, source_ip, tls)
    gctune.settle_for_a_long_run()  # as Worker.run does before its loop
    deliverer = worker.deliverer
    outcomes: Counter[str] = Counter()

    def report(attempts: list[Any]) -> None:
        for attempt in attempts:
            outcomes[attempt.status.value] += 1

    message = make_message(0, size, "bench@mailengine.test", "user@example.test")
    group = gevent.pool.Pool(in_flight)
    cpu_before = _cpu()
    started = time.perf_counter()
    for i in range(count):
        task = Task(job_id=f"w{i}", sender="bench@mailengine.test",
                    rcpts=(f"user{i}@example.test",), message=message, queued_ts=time.time())
        group.spawn(deliverer.deliver, task, report)
    group.join()
    seconds = time.perf_counter() - started
    cpu = _cpu() - cpu_before
    worker.pools.close_all()
    gevent.sleep(0.05)
    return {"messages": count, "seconds": seconds, "per_second": count / seconds,
            "cpu_us_per_message": cpu * 1e6 / count,
            "outcomes": dict(outcomes), "sessions": sessions, "size": len(message),
            "rss_mb": _rss_mb()}


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _rss_mb() -> float:
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--sessions", type=int, default=4)
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--size", type=int, default=5000)
    parser.add_argument("--source-ip", default="127.0.0.2")
    parser.add_argument("--tls", default="opportunistic")
    parser.add_argument("--in-flight", type=int, default=1000,
                        help="tasks delivering at once (the engine's limits.max_in_flight)")
    parser.add_argument("--profile-wait", type=float, default=0.0)
    args = parser.parse_args()
    if args.profile_wait:
        print(f"PID {os.getpid()}", file=sys.stderr, flush=True)
        time.sleep(args.profile_wait)
    result = run(args.port, args.sessions, args.count, args.size, args.source_ip, args.tls,
                 args.in_flight)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
