"""What the benchmarks share: servers, a producer, a StatsD listener, percentiles, the machine."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import zmq

from engine.testing import procs
from engine.testing.harness import FINAL, LocalEngine, make_message

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMTP_SINK = "/usr/sbin/smtp-sink"
SMTP_SOURCE = "/usr/sbin/smtp-source"
SENDER = "bench@mailengine.test"
RCPT_DOMAIN = "example.test"


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def engine_rev() -> str:
    """The engine measured: BENCH_ENGINE_REV (a snapshot, as bench.run --engine-rev makes
    one), else this tree's HEAD, marked when engine/ has uncommitted changes."""
    if os.environ.get("BENCH_ENGINE_REV"):
        return os.environ["BENCH_ENGINE_REV"][:12] + " (git archive)"
    out = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short=12", "HEAD"],
                         capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--", "engine"],
                           capture_output=True, text=True).stdout.strip()
    return out.stdout.strip() + (" + uncommitted engine changes" if dirty else "")


def cpu_now() -> tuple[float, float, float]:
    """(wall seconds, busy CPU seconds of the whole machine, CPU seconds of this process and
    every child it has waited for, which includes theirs)."""
    with open("/proc/stat", encoding="ascii") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    busy = (sum(fields[:8]) - fields[3] - fields[4]) / tick  # all but idle and iowait
    mine = os.times()
    return time.monotonic(), busy, mine.user + mine.system + mine.children_user + \
        mine.children_system


def cpu_seconds(pid: int) -> float:
    """CPU seconds a process has had so far, every thread alive now (ZeroMQ's I/O threads
    included: they live as long as the process; a thread that ended is not counted): the
    scheduler's nanoseconds (/proc/PID/task/*/schedstat), where the clock ticks of
    /proc/PID/stat (10 ms) would be a quarter of what 250 jobs cost. 0 for a process gone."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat", encoding="ascii") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # a thread that ended meanwhile
    return total / 1e9


def engine_pids(engine: LocalEngine) -> dict[str, int]:
    """The supervisor's and each worker's pid (`mailengine status`)."""
    assert engine.proc is not None
    pids = {"supervisor": engine.proc.pid}
    for ip, worker in engine.status()["workers"].items():
        pids[f"worker {ip}"] = int(worker["pid"])
    return pids


def other_load(before: tuple[float, float, float]) -> float:
    """Share of the machine's cores busy with processes other than this benchmark."""
    wall0, busy0, mine0 = before
    wall1, busy1, mine1 = cpu_now()
    cores = os.cpu_count() or 1
    return max(0.0, ((busy1 - busy0) - (mine1 - mine0)) / max(1e-9, (wall1 - wall0) * cores))


def measured(run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """`run()`'s figures and `other_load`: the share of the machine's cores that other
    processes kept busy meanwhile (rounded to 0.1%)."""
    before = cpu_now()
    result = run()
    result["other_load"] = round(other_load(before), 3)
    return result


def load_results(path: str) -> dict[str, Any]:
    """A benchmark's saved results (JSON); empty when there are none yet, or unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            return dict(json.load(f))
    except (OSError, ValueError):
        return {}


@dataclass(frozen=True)
class Rows:
    """Where a benchmark keeps its runs: one row per `--label` in a JSON file of results, and
    the section of a Markdown file drawn from all of them. Its options, `--label`, `--docs`
    and `--render-only`, mean the same in every benchmark that keeps rows."""

    prog: str  # how the benchmark is run, e.g. "python -m bench.burst"
    results: str  # the JSON file of every row so far
    doc: str  # the Markdown file
    heading: str  # the section's heading line
    render: Callable[[dict[str, Any]], str]  # every row -> the section's text

    def add_options(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--label", default="now", help="the row's name in the results")
        parser.add_argument("--docs", action="store_true", help=f"write {self.doc_name}")
        parser.add_argument("--render-only", action="store_true",
                            help=f"write {self.doc_name} from {self.results_name}, no run")

    @property
    def doc_name(self) -> str:
        return os.path.relpath(self.doc, ROOT)

    @property
    def results_name(self) -> str:
        return os.path.relpath(self.results, ROOT)

    def write_doc(self, rows: dict[str, Any] | None = None) -> None:
        """The section drawn again from `rows` (default: the saved ones)."""
        text = self.render(load_results(self.results) if rows is None else rows)
        write_section(self.doc, self.heading, text.rstrip("\n") + "\n")

    def stamp(self, argv: Sequence[str] | None) -> dict[str, Any]:
        """What a row says of its run besides its figures: the command, the engine, when."""
        command = f"{self.prog} {shlex.join(sys.argv[1:] if argv is None else argv)}"
        return {"command": command.strip(), "engine": engine_rev(),
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}

    def save(self, rows: dict[str, Any], docs: bool) -> dict[str, Any]:
        """`rows` added to the saved ones (a label run again replaces its row); the section
        drawn again when `docs`. Returns every row."""
        results = load_results(self.results)
        results.update(rows)
        os.makedirs(os.path.dirname(self.results), exist_ok=True)
        with open(self.results, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
        if docs:
            self.write_doc(results)
        return results

    def record(self, args: argparse.Namespace, argv: Sequence[str] | None,
               run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """A run kept as the row `args.label`: `run()`'s figures `measured`, stamped at its
        end, the other load logged, then `keep`. Returns the row."""
        result = measured(run)
        result.update(self.stamp(argv))
        log(f"other load {100 * result['other_load']:.0f}%")
        self.keep(args, {args.label: result}, result)
        return result

    def main(self, parser: argparse.ArgumentParser, argv: Sequence[str] | None,
             run: Callable[[argparse.Namespace], Callable[[], dict[str, Any]]]) -> int:
        """A benchmark's `main` once its own options are in `parser`: the rows' options
        added, then `--render-only` draws the section, else `run(args)()` is `record`ed."""
        self.add_options(parser)
        args = parser.parse_args(argv)
        if args.render_only:
            self.write_doc()
        else:
            self.record(args, argv, run(args))
        return 0

    def keep(self, args: argparse.Namespace, rows: dict[str, Any],
             printed: dict[str, Any]) -> None:
        """`rows` saved (the section drawn again with `--docs`); `printed` on stdout, one
        line of JSON."""
        self.save(rows, args.docs)
        print(json.dumps(printed))


# options that change where a run's figures go, not what it measures: left out of the command
# a row shows (a label, quoted or not; --docs)
_BOOKKEEPING = re.compile(r" --(?:label(?:=| )(?:'[^']*(?:'\"'\"'[^']*)*'|\S+)|docs)(?=\s|$)")


def shown_command(command: str) -> str:
    """A row's command as its table shows it: without `--label ...` and `--docs`."""
    return _BOOKKEEPING.sub("", command)


# -- figures ----------------------------------------------------------------------------------


# a section's last lines that separate it from the next one: `---` rules, `<a id>` anchors
_TRAIL = re.compile(r'(?:\n(?:---|<a id="[^"]*"></a>)[ \t]*\n*)+\Z')


def write_section(path: str, heading: str, text: str, separator: str = "\n\n---\n\n") -> None:
    """Replace the section of the Markdown file at `path` that starts with the `heading`
    line (up to the next `## `), or append it after `separator`. The file is re-read just
    before writing (other benchmarks write their sections too), nothing outside the section
    changes, and the new file replaces the old one whole (a new file, renamed). What ends
    the old section before the next heading and belongs to neither, a `---` rule or an
    `<a id>` anchor line, stays between them (unless `text` ends with it already)."""
    with open(path, encoding="utf-8") as f:
        current = f.read()
    at = current.find(heading + "\n")
    if at >= 0:
        following = current.find("\n## ", at + len(heading))
        rest = current[following + 1:] if following >= 0 else ""
        trail = ""
        if rest:
            ending = _TRAIL.search(current[at:following + 1])
            trail = ending.group(0).strip("\n") + "\n\n" if ending else ""
            if trail and text.rstrip("\n").endswith(trail.rstrip("\n")):
                trail = ""
        updated = current[:at] + text + ("\n" + trail + rest if rest else "")
    else:
        updated = current.rstrip("\n") + separator + text
    tmp = path + ".section.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(updated)
    os.replace(tmp, path)


def percentile(values: Sequence[float], pct: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); nan if empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * pct / 100.0
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summary(values: Sequence[float]) -> dict[str, float]:
    return {"n": len(values), "p50": percentile(values, 50), "p90": percentile(values, 90),
            "p99": percentile(values, 99), "min": min(values) if values else float("nan"),
            "max": max(values) if values else float("nan")}


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import ssl

    import gevent
    return {"cores": os.cpu_count(), "cpu": cpu, "kernel": platform.release(),
            "python": platform.python_version(), "gevent": gevent.__version__,
            "pyzmq": zmq.__version__, "openssl": ssl.OPENSSL_VERSION}


# -- servers ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as s:
        return int(s.getsockname()[1])


def wait_listening(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class PostfixSink:
    """Postfix's `smtp-sink` (PIPELINING, no CHUNKING, no STARTTLS) on an ephemeral port."""

    def __init__(self, backlog: int = 1000) -> None:
        if not os.path.exists(SMTP_SINK):
            raise RuntimeError(f"{SMTP_SINK} not found (apt-get install postfix)")
        self.port = free_port()
        cmd = [SMTP_SINK]
        if os.geteuid() == 0:
            cmd += ["-u", "nobody"]  # it refuses to run as root
        cmd += [f"127.0.0.1:{self.port}", str(backlog)]
        self.cmd = " ".join(cmd)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_listening(self.port)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(5)

    def __enter__(self) -> PostfixSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class StatsdCatcher:
    """A UDP StatsD listener on loopback: keeps every timer value by metric name."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.lock = threading.Lock()
        self.samples: list[tuple[float, str, str, float]] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return
            now = time.time()
            for line in data.decode("utf-8", "replace").splitlines():
                name, _, rest = line.partition(":")
                value, _, kind = rest.partition("|")
                with contextlib.suppress(ValueError), self.lock:
                    self.samples.append((now, name, kind.split("|")[0], float(value)))

    def timers(self, suffix: str, since: float = 0.0) -> list[float]:
        with self.lock:
            return [v for t, n, k, v in self.samples
                    if k == "ms" and n.endswith("." + suffix) and t >= since]

    def last_gauge(self, suffix: str) -> float | None:
        with self.lock:
            values = [v for _, n, k, v in self.samples if k == "g" and n.endswith("." + suffix)]
        return values[-1] if values else None

    def close(self) -> None:
        self.sock.close()


# -- the engine ---------------------------------------------------------------------------------


def engine_config(port: int, pool: dict[str, Any], statsd_port: int | None = None,
                  smtp: dict[str, Any] | None = None) -> dict[str, Any]:
    extra: dict[str, Any] = {"pool": pool, "log_level": "warning",
                             "smtp": {"port": port, **(smtp or {})}}
    if statsd_port is not None:
        extra["statsd"] = {"enabled": True, "host": "127.0.0.1", "port": statsd_port,
                           "prefix": "bench"}
    return extra


def job(index: int, tag: str, size: int = 5000) -> tuple[dict[str, Any], bytes]:
    rcpt = f"user{index}@{RCPT_DOMAIN}"
    return ({"id": f"{tag}-{index}", "from": SENDER, "to": [rcpt]},
            make_message(index, size, SENDER, rcpt))


class Producer:
    """A producer that keeps its PUSH socket: sends jobs (paced or all at once) and follows
    the engine's events log for `queued` and final outcomes; re-sends what was not queued."""

    RESEND = 3.0

    def __init__(self, engine: LocalEngine) -> None:
        self.engine = engine
        self.ctx = zmq.Context()
        self.push = self.ctx.socket(zmq.PUSH)
        self.push.setsockopt(zmq.LINGER, 1000)
        self.push.setsockopt(zmq.SNDHWM, 0)
        self.push.connect(str(engine.config["ingest"]))
        self.frames: dict[str, list[bytes]] = {}
        self.sent_at: dict[str, float] = {}
        self.queued: dict[str, dict[str, Any]] = {}
        self.unqueued: set[str] = set()  # sent, no `queued` event yet
        self.final: dict[str, dict[str, Any]] = {}
        self.deferred = 0
        self._seen = 0

    def send(self, envelope: dict[str, Any], message: bytes) -> None:
        frames = [json.dumps(envelope).encode(), message]
        self.frames[envelope["id"]] = frames
        self.sent_at[envelope["id"]] = time.time()
        if envelope["id"] not in self.queued:
            self.unqueued.add(envelope["id"])
        self.push.send_multipart(frames)

    def paced(self, jobs: Iterable[tuple[dict[str, Any], bytes]], rate: float) -> float:
        """Send one job every 1/rate seconds (on a fixed schedule, not drifting); returns
        the seconds it took."""
        started = time.monotonic()
        for i, (envelope, message) in enumerate(jobs):
            delay = started + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            self.send(envelope, message)
            if i % 20 == 0:
                self.update()
        return time.monotonic() - started

    def update(self) -> None:
        events = self.engine.events()
        for event in events[self._seen:]:
            name = event["event"]
            if name == "queued":
                self.queued.setdefault(event["id"], event)
                self.unqueued.discard(event["id"])
            elif name in FINAL:
                self.final[event["id"]] = event
            elif name == "deferred":
                self.deferred += 1
            elif name == "rejected":
                raise RuntimeError(f"job rejected: {event}")
        self._seen = len(events)

    def wait_queued(self, timeout: float = 120.0) -> None:
        """Until every job sent is queued, re-sending what waited RESEND seconds. The jobs
        still missing are kept as a set, not found again by a pass over all jobs every
        10 ms: in the loopback runs that pass cost this process (which shares the
        machine with the engine) ~10 us of CPU per message."""
        deadline = time.monotonic() + timeout
        next_check = 0.0
        while True:
            self.update()
            missing = self.unqueued
            if not missing:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(missing)} jobs not queued; {self.engine.log_tail()}")
            now = time.time()
            if now >= next_check:
                next_check = now + self.RESEND / 4
                for job_id in list(missing):
                    if now - self.sent_at[job_id] > self.RESEND:
                        self.sent_at[job_id] = now
                        self.push.send_multipart(self.frames[job_id])
            time.sleep(0.01)

    def wait_final(self, ids: Iterable[str] | None = None, timeout: float = 120.0,
                   poll: float = 0.005, strict: bool = True) -> bool:
        wanted = set(self.frames if ids is None else ids)
        deadline = time.monotonic() + timeout
        while True:
            self.update()
            if wanted <= self.final.keys():
                return True
            if time.monotonic() > deadline:
                if strict:
                    raise TimeoutError(f"{len(wanted - self.final.keys())} jobs not final"
                                       f" after {timeout}s; {self.engine.log_tail()}")
                return False
            time.sleep(poll)

    def close(self) -> None:
        self.ctx.destroy(linger=1000)


@contextlib.contextmanager
def running_engine(workdir: str, port: int, extra: dict[str, Any]) -> Iterator[LocalEngine]:
    shutil.rmtree(workdir, ignore_errors=True)
    engine = LocalEngine(workdir, port, extra=extra)
    try:
        engine.start()
        yield engine
        engine.stop()
    finally:
        engine.cleanup()


def run_child(cmd: list[str], timeout: float) -> dict[str, Any]:
    """Run a bench script in a child interpreter; its last stdout line is JSON."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def terminate(proc: subprocess.Popen[Any]) -> None:
    procs.stop(proc)
