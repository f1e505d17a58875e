"""StatsD packets a second from a worker holding N idle providers (issue #19, quiet_gauges).

`python -m bench.idle_gauges [--providers 1000,10000] [--seconds 10] [--label now] [--docs]`

For each N: the engine's real `Worker` (engine/worker.py) in a process of its own, gevent
patched first as `bin/mailengine-worker` does, its task and result sockets bound by this
script (no supervisor), its StatsD host a real UDP socket here (tests/support/statsd_catcher.py).
It makes N providers' shapers, as N messages to N providers would (`Shaping.get`), and then
runs: nothing more happens, so every provider is held idle and unchanged (forgotten only after
`shaping.forget_after`, 5 minutes). The first stats report, which sends every gauge, is let
pass; then over `--seconds` reports: the UDP packets and the StatsD lines received a second
(all, and the providers' `allowed_rate` and `suspended`), and the worker's CPU a second
(/proc/PID/stat). About `--seconds` + 5 s for each N.

`--docs` writes the table at the end of docs/PERFORMANCE.md's "Many destinations"
(bench/many_destinations.py draws that section; the rows are kept in
bench/results/idle_gauges.json). A row of another engine: from a snapshot of it, as
bench/many_destinations.py says (`git archive REV engine | tar -x -C SNAP; cd SNAP;
BENCH_ENGINE_REV=REV PYTHONPATH=REPO python -m bench.idle_gauges ...`).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

from bench.common import ROOT, Rows, cpu_seconds, load_results, log, shown_command
from tests.support.statsd_catcher import StatsdCatcher

RESULTS = os.path.join(ROOT, "bench", "results", "idle_gauges.json")
IP = "127.0.0.2"
IN_FLIGHT = "mailengine.127_0_0_2.all.in_flight"  # sent at every stats report
PROVIDER_GAUGE = re.compile(r"mailengine\.127_0_0_2\.[^.]+\.(allowed_rate|suspended)$")
READY = "ready"
# The worker's process: gevent patched before anything else is imported.
WORKER = ("from gevent import monkey; monkey.patch_all();"
          " from bench.idle_gauges import worker_main; worker_main()")


# -- the worker's process --------------------------------------------------------------------


def worker_main() -> None:
    """Run a Worker holding argv's N idle providers, sending StatsD to argv's port, until
    SIGTERM (argv: providers, StatsD port, a scratch folder)."""
    import gevent

    from engine import config as config_mod
    from engine.worker import Worker

    providers, port, scratch = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    cfg = config_mod.from_dict({
        "ips": [{"address": IP, "helo": "bench.mailengine.test"}],
        "routes": {"*": "127.0.0.1"}, "spool": scratch, "log_level": "warning",
        "statsd": {"enabled": True, "host": "127.0.0.1", "port": port,
                   "prefix": "mailengine"}})
    worker = Worker(cfg, cfg.ips[0], f"ipc://{scratch}/tasks", f"ipc://{scratch}/results")
    for i in range(providers):
        worker.shaping.get(f"d{i}.test")  # what a message to provider d<i>.test makes
    gevent.signal_handler(signal.SIGTERM, worker.stop)
    runner = gevent.spawn(worker.run)
    print(READY, flush=True)
    runner.join()


def _bind_supervisor_side(scratch: str) -> Any:
    """The sockets a supervisor would bind: the worker's stats frames land there, unread."""
    import zmq

    ctx = zmq.Context()
    tasks = ctx.socket(zmq.PUSH)
    tasks.bind(f"ipc://{scratch}/tasks")
    results = ctx.socket(zmq.PULL)
    results.bind(f"ipc://{scratch}/results")
    return ctx


# -- the measurement ----------------------------------------------------------------------------


def reports(catcher: StatsdCatcher) -> int:
    return len(catcher.of(IN_FLIGHT, "gauge"))


def measure(providers: int, seconds: int) -> dict[str, Any]:
    scratch = tempfile.mkdtemp(prefix="me-idle-gauges-")
    ctx = _bind_supervisor_side(scratch)
    proc = None
    try:
        with StatsdCatcher() as catcher:
            proc = subprocess.Popen([sys.executable, "-c", WORKER, str(providers),
                                     str(catcher.port), scratch],
                                    stdout=subprocess.PIPE, text=True)
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != READY:
                raise RuntimeError("the worker did not start")
            # The first report sends every gauge: let it (and the one after) pass.
            if not catcher.wait_for(lambda: reports(catcher) >= 2, timeout=30):
                raise RuntimeError("no stats report from the worker")
            catcher.sync()
            start_reports, start_packets = reports(catcher), catcher.packets
            start_samples, start_cpu = len(catcher.samples), cpu_seconds(proc.pid)
            started = time.monotonic()
            if not catcher.wait_for(lambda: reports(catcher) >= start_reports + seconds,
                                    timeout=seconds + 30):
                raise RuntimeError("the worker stopped reporting")
            catcher.sync()
            took = time.monotonic() - started
            cpu = cpu_seconds(proc.pid) - start_cpu
            window = catcher.samples[start_samples:]
            packets = catcher.packets - start_packets
            dropped = catcher.dropped
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        ctx.destroy(linger=0)
        shutil.rmtree(scratch, ignore_errors=True)
    provider_lines = sum(1 for s in window if PROVIDER_GAUGE.match(s.name))
    return {"providers": providers, "seconds": round(took, 2),
            "packets_per_s": round(packets / took, 1),
            "lines_per_s": round(len(window) / took, 1),
            "provider_lines_per_s": round(provider_lines / took, 1),
            "cpu_ms_per_s": round(1000 * cpu / took, 1), "dropped": dropped}


# -- the table ---------------------------------------------------------------------------------


def render() -> list[str]:
    """The table's lines, for bench/many_destinations.py's section (none without rows)."""
    rows = load_results(RESULTS)
    if not rows:
        return []
    lines = ["### Idle providers' StatsD gauges", "",
             "A worker holding N providers idle and unchanged (`python -m bench.idle_gauges`:"
             " the real `Worker` in a process of its own, N shapers made as N messages would,"
             " its StatsD packets caught on a UDP socket; the first report, which sends every"
             " gauge, left out), over its next reports:", "",
             "| run | command | engine | date | providers | UDP packets/s | StatsD lines/s"
             " (providers' gauges) | worker CPU ms/s | other load |",
             "|---|---|---|---|---|---|---|---|---|"]
    for label, r in rows.items():
        for m in r["runs"]:
            lines.append(
                f"| {label} | `{shown_command(r['command'])}` | `{r['engine']}` | {r['date']} |"
                f" {m['providers']:,} | {m['packets_per_s']:,.0f} | {m['lines_per_s']:,.0f}"
                f" ({m['provider_lines_per_s']:,.0f}) | {m['cpu_ms_per_s']:.0f} |"
                f" {100 * r['other_load']:.0f}% |")
    return [*lines, "", IDLE_PROSE]


IDLE_PROSE = """\
*Before* (main at fb43a69, from a `git archive` of it), each provider's `allowed_rate` and
`suspended` went out at every report, every second, for as long as the worker held it: two
lines per provider a second, packed by the metrics client into UDP packets of up to 512
bytes; **10,000 providers held idle: ~17,400 lines and ~1,900 packets a second** (not quite
20,000: each report took a while, so they came every 1.2 s). *What changed*
(engine/quiet_gauges.py): a provider's gauge goes out at the report after its value changed,
and otherwise once a minute, at the provider's own point of the minute (a hash of its name),
so N providers held unchanged make about 2N/60 lines a second, evenly, never a burst of all;
one forgotten is no longer sent. The worker's own four gauges (`ip_down`, `in_flight`,
`connections_open`, `shaping_providers`) still go every second. *After:* **~315 lines and 35
packets a second at 10,000 providers** (2N/60 = 333), 32 lines and 4 packets at 1,000. The
worker's CPU for its reports fell from ~82 to ~49 ms a second at 10,000 providers: what is
left is walking every shaper held each second (for these gauges and for the report to the
supervisor, engine/shaping_idle.py); these runs had 73-74% of the 2 cores taken by other
sessions' tests and benchmarks, so the CPU figures are rough. Bounds asserted without timing:
tests/unit/test_quiet_gauges.py (1,200 providers on a fake clock: at most twice 2N/60 lines a
second, each gauge once a minute, a change at the next report, a forgotten provider silent)
and tests/engine/test_provider_gauges.py (the whole engine, 100 providers held: 10 lines over
3 reports where main sent 600; none once they are forgotten).

*Walking only the active providers* (rows `before (walks every provider held)`, main at
3ddfe09, and `after (walks the active ones)`; same lines and packets, the CPU is what
changed). Before, each second's report asked every shaper held whether `status` shows it
(engine/shaping_idle.py `worth_showing`) and gave quiet_gauges every provider's values to
compare: ~32-49 ms of worker CPU a second at 10,000 providers held idle (three runs: 48, 32,
39 ms at 35%, 29%, 27% other load), 5% of a core for as long as they are held. Now a shaper
marks itself active when anything `status` or its gauges follow happens (a turn, a
connection let in, a reply judged, a suspension, a limit; made), the report visits only the
active ones and lets go of those with nothing left to show (what ends with time alone, the
current rate's 10 s or a suspension, ends while they are visited), and quiet_gauges finds
the refreshes due on a wheel of 60 slots by each provider's point of the minute: ~2N/60
looked at a second, not N. **8-9 ms a second at 10,000 held idle** (7.9, 9.0, 7.9 at 40%,
16%, 8% other load), 3-4 at 1,000. py-spy (200 Hz) of what is left at 10,000: about 60%
sending the ~330 refresh lines a second (the once-a-minute contract), 20% `forget_idle` and
15% `save`, which still look at every shaper held, every 5 s and every 10 s. Tests without
timing: tests/unit/test_shaping_idle.py (1,000 held idle: a report asks none of them; one
sending is visited while in the current rate's window, then not; a suspension's end seen;
each event that shows a provider makes it active) and tests/unit/test_quiet_gauges.py (the
wheel sends exactly what a look at every provider would, at irregular report times; ~N/60
looked up a second; an active-then-idle provider refreshed once a cycle).
*Commands:* `python -m bench.idle_gauges --label NAME [--providers 1000,10000] [--seconds 10]`
in a tree (`--docs` writes this section, `--render-only` rewrites it); a `before` row from a
snapshot of main: `git archive REV engine conf bin | tar -x -C SNAP; cd SNAP;
BENCH_ENGINE_REV=REV PYTHONPATH=REPO python -m bench.idle_gauges ...` (fb43a69f3a1f,
3ddfe0916f0f). About 20 s for each N at `--seconds 10`, 40 s at 30."""


def _section(_rows: dict[str, Any]) -> str:
    """The whole "Many destinations" section, which ends with this table (its rows read
    from RESULTS, saved just before)."""
    from bench import many_destinations
    return many_destinations.render(load_results(many_destinations.RESULTS))


ROWS = Rows("python -m bench.idle_gauges", RESULTS, os.path.join(ROOT, "docs", "PERFORMANCE.md"),
            "## Many destinations", _section)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=ROWS.prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--providers", default="1000,10000",
                        help="comma-separated numbers of providers held (default 1000,10000)")
    parser.add_argument("--seconds", type=int, default=10,
                        help="stats reports measured for each (one a second; default 10)")
    ROWS.add_options(parser)
    args = parser.parse_args(argv)
    if args.render_only:
        ROWS.write_doc()
        return 0
    ROWS.record(args, argv, lambda: {"runs": measure_all(args.providers, args.seconds)})
    return 0


def measure_all(providers: str, seconds: int) -> list[dict[str, Any]]:
    """`measure` for each number of providers in the comma-separated `providers`."""
    runs = []
    for count in (int(n) for n in providers.split(",")):
        log(f"idle gauges: {count} providers, {seconds} reports")
        runs.append(measure(count, seconds))
        log(f"  {runs[-1]}")
    return runs


if __name__ == "__main__":
    sys.exit(main())
