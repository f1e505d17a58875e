"""What would a fix gain? Candidate optimisations of the worker, tried at run time.

The engine is not edited: each variant patches a method of the engine's classes in
this process only (gevent first, as in bench/worker_alone.py), then runs the same
loopback delivery as the worker-alone benchmark. `python -m bench.experiments
--port P --variant NAME` prints one JSON line; `bench.experiments.compare()` runs
every variant against smtp-sink, interleaved, several times, and reports medians.

Variants (each is a proposed change, described in docs/PERFORMANCE.md, Findings):
- `baseline`: the engine as it is;
- `inline`: `Deliverer.deliver` runs a single-domain task in the caller's greenlet
  instead of spawning one greenlet per domain and joining it;
- `no-alive-check`: `Connection.is_alive` skips its select() when the connection
  finished a transaction less than a second ago (a 421 crossing MAIL is already
  handled as a stale connection and retried);
- `phase`: `Connection.phase` as a small class with `__enter__`/`__exit__` instead of a
  generator-based `@contextmanager` (entered 4-5 times per message), same semantics;
- `today`: `ProviderShaper._today` (shaping) formats the UTC date only when the day
  changes, instead of at every message;
- `all`: the four together.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any


def apply(variant: str) -> None:
    from engine import delivery, smtp
    if variant in ("inline", "all"):
        original = delivery.Deliverer.deliver

        def deliver(self: Any, task: Any, report: Any) -> None:
            domains = {r.rpartition("@")[2].lower() for r in task.rcpts}
            if len(domains) != 1:
                return original(self, task, report)
            self._deliver_domain(task, domains.pop(), list(task.rcpts), report)
            return None

        delivery.Deliverer.deliver = deliver  # type: ignore[method-assign]
    if variant in ("phase", "all"):
        _light_phase(smtp)
    if variant in ("today", "all"):
        _cached_today()
    if variant in ("no-alive-check", "all"):
        checked = smtp.Connection.is_alive

        def is_alive(self: Any) -> bool:
            if self.sock is not None and not self._rbuf and \
                    time.monotonic() - self.last_used < 1.0:
                return True
            return bool(checked(self))

        smtp.Connection.is_alive = is_alive  # type: ignore[method-assign]


def _light_phase(smtp: Any) -> None:
    from engine import classify
    from engine.reply import DeliveryError

    class Phase:
        __slots__ = ("command", "conn", "timeout")

        def __init__(self, conn: Any, command: str, timeout: float) -> None:
            self.conn, self.command, self.timeout = conn, command, timeout

        def __enter__(self) -> None:
            self.conn._deadlines.command = self.command
            if self.conn.sock is not None:
                self.conn.sock.settimeout(self.timeout)

        def __exit__(self, kind: Any, exc: Any, tb: Any) -> None:
            if exc is None or isinstance(exc, DeliveryError) or not isinstance(exc, Exception):
                return  # propagate as it is
            raise classify.translate(exc, self.command, self.timeout) from exc

    smtp.Connection.phase = lambda self, command, timeout: Phase(self, command, timeout)


def _cached_today() -> None:
    try:
        from engine import shaping
    except ImportError:
        return
    if not hasattr(shaping, "ProviderShaper") or not hasattr(shaping.ProviderShaper, "_today"):
        return
    original = shaping.ProviderShaper._today
    cache: dict[int, str] = {}

    def today(self: Any) -> str:
        day = int(self._wall() // 86400)  # UTC days since the epoch
        if day not in cache:
            cache.clear()
            cache[day] = original(self)
        return cache[day]

    shaping.ProviderShaper._today = today  # type: ignore[method-assign]


def child(argv: list[str]) -> int:
    from gevent import monkey
    monkey.patch_all()
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--variant", default="baseline")
    parser.add_argument("--sessions", type=int, default=4)
    parser.add_argument("--count", type=int, default=12000)
    args = parser.parse_args(argv)
    apply(args.variant)
    from bench import worker_alone
    result = worker_alone.run(args.port, args.sessions, args.count, 5000, "127.0.0.2",
                              "opportunistic", 1000)
    result["variant"] = args.variant
    print(json.dumps(result))
    return 0


VARIANTS = ("baseline", "inline", "no-alive-check", "phase", "today", "all")


def compare(quick: bool, sessions: int = 4) -> dict[str, Any]:
    from bench.common import PostfixSink, log, run_child
    repeats = 3 if quick else 5
    count = 5000 if quick else 8000
    rates: dict[str, list[float]] = {v: [] for v in VARIANTS}
    cpu: dict[str, list[float]] = {v: [] for v in VARIANTS}
    with PostfixSink() as sink:
        log(f"experiments: {', '.join(VARIANTS)}; {repeats} runs each, interleaved")
        for _ in range(repeats):
            for variant in VARIANTS:
                out = run_child([sys.executable, "-m", "bench.experiments", "--port",
                                 str(sink.port), "--variant", variant, "--sessions",
                                 str(sessions), "--count", str(count)], timeout=120)
                rates[variant].append(out["per_second"])
                cpu[variant].append(out["cpu_us_per_message"])
    medians = {v: sorted(r)[len(r) // 2] for v, r in rates.items()}
    cpu_medians = {v: sorted(r)[len(r) // 2] for v, r in cpu.items()}
    base = medians["baseline"]
    gains = {v: 100.0 * (m / base - 1) for v, m in medians.items()}
    # CPU per message hardly depends on what else runs on the machine: the steadier figure.
    cpu_gains = {v: 100.0 * (cpu_medians["baseline"] / m - 1) for v, m in cpu_medians.items()}
    result: dict[str, Any] = {"sessions": sessions, "count": count, "repeats": repeats,
                              "runs": rates, "median": medians, "gain_percent": gains,
                              "cpu_runs": cpu, "cpu_median": cpu_medians,
                              "cpu_gain_percent": cpu_gains}
    log("  " + ", ".join(f"{v} {m:.0f}/s ({gains[v]:+.0f}%), {cpu_medians[v]:.0f} us CPU"
                         f" ({cpu_gains[v]:+.0f}%)" for v, m in medians.items()))
    return result


if __name__ == "__main__":
    sys.exit(child(sys.argv[1:]))
