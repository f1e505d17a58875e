"""The etsy StatsD daemon (npm `statsd`), run with the shipped conf/statsd-config.js on loopback
test ports, flushing to a Graphite plaintext receiver: for the tests that follow the engine's
metrics into Graphite (tests/engine/test_metrics.py, tests/engine/test_dashboard.py).

Debian has no package of the daemon: it is installed once with npm into a cache folder
(`XDG_CACHE_HOME`, else ~/.cache), and the tests that need it skip when node or npm is missing.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from engine.testing import procs
from tests.support import ROOT

STATSD_NPM_VERSION = "0.9.0"
SHIPPED_CONFIG = ROOT / "conf" / "statsd-config.js"


def free_port(kind: int = socket.SOCK_DGRAM) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def statsd_daemon_dir() -> Path:
    """node_modules/statsd, installed once into a cache folder; skips if it cannot be."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        pytest.skip("the StatsD daemon test needs node and npm (apt-get install nodejs npm)")
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    prefix = cache / "mailengine-tests" / f"statsd-{STATSD_NPM_VERSION}"
    stats_js = prefix / "node_modules" / "statsd" / "stats.js"
    if not stats_js.exists():
        prefix.mkdir(parents=True, exist_ok=True)
        try:
            done = subprocess.run(
                [npm, "install", "--prefix", str(prefix), "--no-audit", "--no-fund",
                 "--ignore-scripts", f"statsd@{STATSD_NPM_VERSION}"],
                capture_output=True, text=True, timeout=180, check=False)
        except subprocess.TimeoutExpired:
            pytest.skip("npm install statsd took more than 180 s")
        if done.returncode != 0 or not stats_js.exists():
            pytest.skip(f"npm install statsd@{STATSD_NPM_VERSION} failed: "
                        f"{(done.stderr or done.stdout).strip()[-300:]}")
    return stats_js.parent


def shipped_config(**overrides: Any) -> str:
    """conf/statsd-config.js as a config file the daemon reads (it evaluates the file as one
    JavaScript expression), with `overrides` laid over it: the shipped settings, the
    percentiles above all, are what runs."""
    return (f"Object.assign(\n{SHIPPED_CONFIG.read_text(encoding='utf-8')},\n"
            f"{json.dumps(overrides)})\n")


@contextlib.contextmanager
def running_statsd(workdir: Path, graphite_port: int, flush_ms: int = 1000,
                   dump: bool = True) -> Iterator[tuple[int, Path]]:
    """The daemon with the shipped config on a loopback UDP port, flushing to Graphite at
    `graphite_port` every `flush_ms`; yields (its UDP port, its log)."""
    package = statsd_daemon_dir()
    port = free_port()
    config_js = workdir / "statsd-config.js"
    config_js.write_text(shipped_config(
        port=port, address="127.0.0.1", mgmt_address="127.0.0.1",
        mgmt_port=free_port(socket.SOCK_STREAM), flushInterval=flush_ms, dumpMessages=dump,
        graphiteHost="127.0.0.1", graphitePort=graphite_port), encoding="utf-8")
    log = workdir / "statsd.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([shutil.which("node") or "node", "stats.js", str(config_js)],
                                cwd=package, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for_line(log, "server is up", proc, "statsd")
        yield port, log
    finally:
        procs.stop(proc, grace=5)


def wait_for_line(log: Path, text: str, proc: subprocess.Popen[bytes], what: str,
                  timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"{what} did not start:\n{log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.1)


def whisper_values(whisper_dir: Path, metric_path: str, since: float = 600) -> list[float]:
    """The non-null values of the last `since` seconds of one series, read with
    whisper-fetch (Debian's python3-whisper)."""
    wsp = whisper_dir.joinpath(*metric_path.split(".")).with_suffix(".wsp")
    if not wsp.exists():
        return []
    out = subprocess.run([shutil.which("whisper-fetch") or "whisper-fetch", "--json",
                          f"--from={int(time.time() - since)}", str(wsp)],
                         capture_output=True, text=True, timeout=10, check=True)
    return [v for v in json.loads(out.stdout)["values"] if v is not None]
