"""A burst's first deliveries: from the push to the 1st and the 250th `delivered` (issue #19,
item 5).

`python -m bench.burst [--count 10000] [--bursts 3] [--label now] [--docs]`

The whole engine (`mailengine run`: supervisor, durable spool, one worker, events log) and
Postfix's `smtp-sink` on loopback, the engine's defaults otherwise. One message goes through
first (the worker has met the host: a connection is open), then, after a second with the
ingest socket idle, a producer pushes `count` 5 KB jobs at once; when all are final, the
next burst, after another idle second. Times are from the producer's first send (wall clock)
to each event's `ts` (the engine's clock on the same machine, in milliseconds): the first
`queued`, the first `delivered`, the 250th `delivered`, the last one; and how long the push
itself took (the producer hands 10,000 jobs to ZeroMQ).

Bounded: about 5 s per burst of 10,000. `--docs` writes the figures into
docs/PERFORMANCE.md ("A burst's first deliveries" section, one row per `--label`, kept across
runs in bench/results/burst.json).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from typing import Any

from bench.common import (
    ROOT,
    PostfixSink,
    Producer,
    engine_config,
    job,
    log,
    running_engine,
    write_section,
)
from bench.run import _cpu_now as run_cpu_now
from bench.run import other_load

NTH = 250  # the target's count: the first 250 delivered
IDLE = 1.0  # seconds the ingest socket is idle before each burst
RESULTS = os.path.join(ROOT, "bench", "results", "burst.json")
DOC = os.path.join(ROOT, "docs", "PERFORMANCE.md")
HEADING = "## A burst's first deliveries"


def one_burst(producer: Producer, tag: str, count: int) -> dict[str, float]:
    """Push `count` jobs at once; the burst's times (ms from the first send)."""
    jobs = [job(i, tag) for i in range(count)]
    started = time.time()
    for envelope, message in jobs:
        producer.send(envelope, message)
    pushed = time.time()
    producer.wait_queued(timeout=120)
    producer.wait_final([envelope["id"] for envelope, _ in jobs], timeout=120, poll=0.05)
    mine = [e for i, e in producer.final.items() if i.startswith(tag + "-")]
    delivered = sorted(e["ts"] for e in mine if e["event"] == "delivered")
    queued = min(e["ts"] for i, e in producer.queued.items() if i.startswith(tag + "-"))
    if len(delivered) < NTH:
        raise RuntimeError(f"{tag}: only {len(delivered)} delivered")

    def ms(ts: float) -> float:
        return round((ts - started) * 1000, 1)
    return {"push_ms": ms(pushed), "first_queued_ms": ms(queued),
            "first_delivered_ms": ms(delivered[0]), "nth_delivered_ms": ms(delivered[NTH - 1]),
            "last_delivered_ms": ms(delivered[-1]), "delivered": len(delivered)}


def run(workdir: str, count: int, bursts: int) -> dict[str, Any]:
    log(f"burst: {bursts} bursts of {count} jobs, smtp-sink on loopback")
    with PostfixSink() as sink, \
            running_engine(workdir, sink.port, engine_config(sink.port, {})) as engine:
        producer = Producer(engine)
        producer.send(*job(0, "warm"))
        producer.wait_final(["warm-0"], 30)
        rows = []
        for n in range(bursts):
            time.sleep(IDLE)
            rows.append(one_burst(producer, f"burst{n}", count))
            log(f"burst {n}: {rows[-1]}")
        producer.close()
    return {"count": count, "bursts": rows}


def _median(rows: list[dict[str, float]], key: str) -> float:
    values = sorted(r[key] for r in rows)
    return values[len(values) // 2]


def _cell(rows: list[dict[str, float]], key: str) -> str:
    each = ", ".join(f"{row[key]:.0f}" for row in rows)
    return f"{_median(rows, key):.0f} ms ({each})"


def _rev() -> str:
    """The engine measured: BENCH_ENGINE_REV (a snapshot), else this tree's HEAD."""
    if os.environ.get("BENCH_ENGINE_REV"):
        return os.environ["BENCH_ENGINE_REV"][:12] + " (git archive)"
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
    lines = [HEADING, "", '<a id="bench-burst"></a>', "",
             "Issue #19 item 5, `bench/burst.py`: the whole engine and Postfix's `smtp-sink`"
             " on loopback, the engine's defaults; one message first (a connection is open),"
             " then, after a second with the ingest socket idle, 10,000 5 KB jobs pushed at"
             " once, three bursts a run. Milliseconds from the producer's first send to the"
             " events' `ts`; each cell is the median of the run's bursts, every burst's figure"
             " in brackets. Target: the 250th `delivered` within 50 ms.", "",
             "| run | command | engine | date | push took | first `queued` | first `delivered`"
             f" | {NTH}th `delivered` | last `delivered` | other load |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for label, r in results.items():
        rows = r["bursts"]
        command = r["command"].replace(" --docs", "")
        command = command.replace(f" --label {shlex.quote(label)}", "")
        lines.append(f"| {label} | `{command}` | `{r['engine']}` | {r['date']} |"
                     f" {_cell(rows, 'push_ms')} | {_cell(rows, 'first_queued_ms')} |"
                     f" {_cell(rows, 'first_delivered_ms')} | {_cell(rows, 'nth_delivered_ms')} |"
                     f" {_cell(rows, 'last_delivered_ms')} |"
                     f" {100 * r.get('other_load', float('nan')):.0f}% |")
    lines += ["", PROSE]
    return "\n".join(lines) + "\n"


PROSE = """\
*Commands:* `python -m bench.burst --label NAME` in a tree (`--docs` writes this section,
`--render-only` rewrites it from bench/results/burst.json); a row of another revision from
a `git archive` of it, as the Tail section says. *Other load* is the share of the machine's
cores other processes kept busy during the run.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.burst", description=__doc__)
    parser.add_argument("--count", type=int, default=10000)
    parser.add_argument("--bursts", type=int, default=3)
    parser.add_argument("--label", default="now", help="the row's name in the results")
    parser.add_argument("--docs", action="store_true", help="write docs/PERFORMANCE.md")
    parser.add_argument("--render-only", action="store_true",
                        help="write docs/PERFORMANCE.md from bench/results/burst.json, no run")
    args = parser.parse_args(argv)
    if args.render_only:
        write_section(DOC, HEADING, render(_load()))
        return 0
    workdir = tempfile.mkdtemp(prefix="mailengine-burst-")
    before = run_cpu_now()
    result = run(workdir, args.count, args.bursts)
    result["other_load"] = round(other_load(before), 3)
    command = "python -m bench.burst " + shlex.join(argv if argv is not None else sys.argv[1:])
    result.update(command=command.strip(), engine=_rev(),
                  date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    log(f"other load {100 * result['other_load']:.0f}%")
    results = _load()
    results[args.label] = result
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
    if args.docs:
        write_section(DOC, HEADING, render(results))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
