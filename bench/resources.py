"""Memory with 1,000 open TLS connections, and a py-spy profile of the loopback hot path.

Both drive gevent scripts in child processes (bench/memory.py, bench/worker_alone.py);
this module itself never patches.
"""
from __future__ import annotations

import collections
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Any

from bench.common import ROOT, PostfixSink, log, terminate

# py-spy's collapsed stacks (one line per stack and its sample count: flamegraph.pl and
# speedscope read them); the flame graph SVG goes to docs/img.
RAW_DIR = os.path.join(ROOT, "bench", "results")


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.getcwd(), ROOT, env.get("PYTHONPATH"))
                                        if p)
    return env


def memory(connections: int = 1000, sinks: int = 4) -> dict[str, Any]:
    log(f"memory: {connections} TLS connections from one worker to {sinks} aiosmtpd sinks")
    procs = [subprocess.Popen([sys.executable, "-m", "bench.tls_sink"], stdout=subprocess.PIPE,
                              text=True, env=_child_env()) for _ in range(sinks)]
    try:
        ports = []
        for proc in procs:
            assert proc.stdout is not None
            ports.append(int(proc.stdout.readline().split()[1]))
        cmd = [sys.executable, "-m", "bench.memory", "--ports", ",".join(map(str, ports)),
               "--connections", str(connections)]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=170,
                             env=_child_env())
        if out.returncode != 0:
            raise RuntimeError(f"bench.memory failed:\n{out.stderr[-3000:]}")
        result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
        result["command"] = "python -m bench.memory --ports P1,P2,P3,P4 --connections " \
                            f"{connections}"
    finally:
        sink_figures = []
        for proc in procs:
            terminate(proc)
            assert proc.stdout is not None
            tail = [x for x in proc.stdout.read().splitlines() if x.startswith("{")]
            sink_figures.append(json.loads(tail[-1]) if tail else {})
    result["sinks"] = sink_figures
    log(f"  RSS {result['rss_before_mb']:.1f} -> {result['rss_after_mb']:.1f} MB with"
        f" {result['open_after']} open; {result['kb_per_connection']:.1f} KB per connection")
    return result


# -- profile ----------------------------------------------------------------------------------


def _spy(pid: int, seconds: int, fmt: str, path: str) -> subprocess.Popen[str]:
    return subprocess.Popen(["py-spy", "record", "--pid", str(pid), "--duration", str(seconds),
                             "--rate", "200", "--format", fmt, "--output", path,
                             "--nonblocking"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def profile(img_dir: str, workdir: str, quick: bool, sessions: int = 4) -> dict[str, Any]:
    """py-spy during the loopback throughput runs: the worker alone (a flame graph and
    the top costs), then the whole engine (the supervisor and its worker at once)."""
    if shutil.which("py-spy") is None:
        log("profile: py-spy not installed (pip install py-spy): skipped")
        return {"skipped": "py-spy not installed"}
    seconds = 4 if quick else 8
    count = 4500 * (2 * seconds + 4)  # lasts through both recordings at ~4,000/s
    result: dict[str, Any] = {"seconds": seconds, "sessions": sessions}
    os.makedirs(RAW_DIR, exist_ok=True)
    with PostfixSink() as sink:
        cmd = [sys.executable, "-m", "bench.worker_alone", "--port", str(sink.port),
               "--sessions", str(sessions), "--count", str(count), "--profile-wait", "1"]
        log(f"profile: py-spy on the worker alone, {count} messages, {sessions} sessions")
        child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True, env=_child_env())
        assert child.stderr is not None
        pid = int(child.stderr.readline().split()[1])
        time.sleep(1.5)  # past the wait, into the sending
        # One after the other: two samplers on one process would skew each other.
        raw = os.path.join(RAW_DIR, "profile-worker.txt")
        _spy(pid, seconds, "raw", raw).wait(seconds + 30)
        _spy(pid, seconds, "flamegraph", os.path.join(img_dir, "profile-worker.svg")).wait(
            seconds + 30)
        out, _ = child.communicate(timeout=120)
        result["worker"] = json.loads(out.strip().splitlines()[-1])
        result["worker"].update(_top(raw))
        result["worker"]["command"] = (
            f"python -m bench.worker_alone --sessions {sessions} --count {count};"
            f" py-spy record --pid PID --rate 200 --duration {seconds} --format raw|flamegraph")

        # The whole engine: supervisor and worker sampled together, same run.
        from bench.loopback import whole_engine
        paths = {"supervisor": os.path.join(RAW_DIR, "profile-supervisor.txt"),
                 "engine_worker": os.path.join(RAW_DIR, "profile-engine-worker.txt")}

        def attach(engine: Any) -> None:
            assert engine.proc is not None
            worker_pid = next(iter(engine.status()["workers"].values()))["pid"]
            spies = [_spy(engine.proc.pid, seconds, "raw", paths["supervisor"]),
                     _spy(worker_pid, seconds, "raw", paths["engine_worker"])]
            for spy in spies:
                spy.wait(seconds + 30)

        engine_count = 2500 * (seconds + 3)
        log(f"profile: py-spy on the supervisor and the worker, {engine_count} messages")
        result["engine"] = whole_engine(os.path.join(workdir, "profile"), sink.port, sessions,
                                        engine_count, attach)
        for name, path in paths.items():
            result[name] = _top(path)
        result["engine"]["command"] = (
            f"whole engine, {engine_count} messages pushed at once; py-spy record --pid"
            f" SUPERVISOR_PID and --pid WORKER_PID --rate 200 --duration {seconds}"
            " --format raw")
    return result


def _top(raw_path: str, limit: int = 25) -> dict[str, Any]:
    """Self and inclusive sample shares per function, from py-spy's collapsed stacks."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    by_file: collections.Counter[str] = collections.Counter()
    total = 0
    try:
        with open(raw_path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError:
        return {"samples": 0, "self": [], "inclusive": [], "by_module": []}
    for line in lines:
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = [_frame(f) for f in stack.split(";") if f]
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            incl[frame] += count
        by_file[_module(frames[-1])] += count

    def share(count: int) -> float:
        return round(100.0 * count / max(1, total), 1)

    return {
        "samples": total,
        "self": [(name, share(c)) for name, c in own.most_common(limit)],
        "inclusive": [(name, share(c)) for name, c in incl.most_common(limit * 2)],
        "by_module": [(name, share(c)) for name, c in by_file.most_common(15)],
    }


def _frame(text: str) -> str:
    """'send_mail_tx (engine/smtp.py:245)' -> 'send_mail_tx (engine/smtp.py)'."""
    name, _, where = text.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "lib/python3.11/", "/engine/", "/bench/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            if marker in ("/engine/", "/bench/"):
                path = marker.strip("/") + "/" + path
            break
    return f"{name} ({path})"


def _module(frame: str) -> str:
    path = frame.partition(" (")[2].rstrip(")")
    if path.startswith("engine/"):
        return path
    if path.startswith("gevent/"):
        return "gevent/" + path.split("/")[1] if "/" in path[7:] else path
    return path.split("/")[0] if "/" in path else path
