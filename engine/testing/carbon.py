"""carbon-cache (Graphite's receiver, Debian's ``graphite-carbon``) on loopback, throwaway.

For the tests and the monitoring demo: one folder holds the whole instance (``carbon.conf``,
``storage-schemas.conf``, optionally ``storage-aggregation.conf``, the whisper files, the logs
and the pid file); the line, pickle and cache-query receivers listen on free loopback ports;
:meth:`CarbonCache.start` runs ``carbon-cache --nodaemon start`` and returns once the line
receiver listens, :meth:`CarbonCache.stop` terminates it (TERM, then KILL). Nothing runs as
another user (``USER =``) and nothing is written outside the folder.

    with CarbonCache(tmp_path / "carbon", schemas="[stats]\\npattern = ^stats\\n"
                     "retentions = 1s:1h\\n") as carbon:
        send_to(carbon.line_port)
        ...carbon.whisper / "stats" / ...
"""
from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from engine.testing import procs

__all__ = ["CarbonCache", "CarbonError", "available"]

CONF = """[cache]
STORAGE_DIR = {d}/storage
LOCAL_DATA_DIR = {d}/storage/whisper
WHITELISTS_DIR = {d}/storage/lists
CONF_DIR = {d}
LOG_DIR = {d}/log
PID_DIR = {d}
ENABLE_LOGROTATION = False
ENABLE_TAGS = False
USER =
MAX_CACHE_SIZE = inf
MAX_UPDATES_PER_SECOND = inf
MAX_CREATES_PER_MINUTE = inf
LINE_RECEIVER_INTERFACE = 127.0.0.1
LINE_RECEIVER_PORT = {line}
ENABLE_UDP_LISTENER = False
PICKLE_RECEIVER_INTERFACE = 127.0.0.1
PICKLE_RECEIVER_PORT = {pickle}
CACHE_QUERY_INTERFACE = 127.0.0.1
CACHE_QUERY_PORT = {query}
LOG_UPDATES = False
"""
# Every series in 1 s slots for an hour (a StatsD daemon flushing every 2 s or more never
# writes two flushes into one slot).
DEFAULT_SCHEMAS = "[default]\npattern = .*\nretentions = 1s:1h\n"
ATTEMPTS = 3  # a free port can be taken between choosing it and carbon-cache binding it


class CarbonError(RuntimeError):
    """carbon-cache is not installed, or did not start (the message ends with its log)."""


def available() -> bool:
    """Whether ``carbon-cache`` is on PATH (``apt-get install graphite-carbon``)."""
    return shutil.which("carbon-cache") is not None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class CarbonCache:
    """One carbon-cache process in ``home`` (a new temporary folder, removed by :meth:`stop`,
    when None). ``schemas`` and ``aggregation`` are the texts of ``storage-schemas.conf`` and
    ``storage-aggregation.conf`` (carbon's defaults when ``aggregation`` is None)."""

    def __init__(self, home: str | Path | None = None, schemas: str = DEFAULT_SCHEMAS,
                 aggregation: str | None = None, executable: str | None = None) -> None:
        self._own_home = home is None
        self.home = Path(tempfile.mkdtemp(prefix="mailengine-carbon-") if home is None
                         else home).resolve()
        self.schemas = schemas
        self.aggregation = aggregation
        self.executable = executable or shutil.which("carbon-cache") or ""
        self.whisper = self.home / "storage" / "whisper"
        self.console = self.home / "console.log"
        self.line_port = self.pickle_port = self.query_port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    def write_config(self) -> None:
        """carbon.conf for three new free ports, and the storage rules."""
        (self.home / "log").mkdir(parents=True, exist_ok=True)
        self.line_port, self.pickle_port, self.query_port = (
            _free_port(), _free_port(), _free_port())
        (self.home / "carbon.conf").write_text(CONF.format(
            d=self.home, line=self.line_port, pickle=self.pickle_port, query=self.query_port),
            encoding="utf-8")
        (self.home / "storage-schemas.conf").write_text(self.schemas, encoding="utf-8")
        if self.aggregation is not None:
            (self.home / "storage-aggregation.conf").write_text(self.aggregation,
                                                                encoding="utf-8")

    def start(self, timeout: float = 20.0) -> CarbonCache:
        """Start carbon-cache; return once its line receiver listens."""
        if not self.executable:
            raise CarbonError("carbon-cache not found (apt-get install graphite-carbon)")
        for _attempt in range(ATTEMPTS):
            self.write_config()
            with open(self.console, "ab") as out:
                self.proc = subprocess.Popen(
                    [self.executable, f"--config={self.home / 'carbon.conf'}",
                     f"--pidfile={self.home / 'carbon.pid'}", f"--logdir={self.home / 'log'}",
                     "--nodaemon", "start"],
                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            state = self._wait_listening(timeout)
            if state == "listening":
                return self
            self._terminate()
            if state != "exited":  # a timeout: trying again would only wait as long again
                break
        tail = self.console.read_text(errors="replace")[-2000:] if self.console.exists() else ""
        raise CarbonError(f"carbon-cache did not start ({self.home}); {self.console}:\n{tail}")

    def _wait_listening(self, timeout: float) -> str:
        """"listening", "exited" (e.g. a port taken meanwhile) or "timeout". Twisted logs
        "... starting on PORT" once the line receiver is bound; then it must accept."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        text = f"starting on {self.line_port}"
        while text not in self.console.read_text(errors="replace"):
            if self.proc.poll() is not None:
                return "exited"
            if time.monotonic() > deadline:
                return "timeout"
            time.sleep(0.05)
        try:
            socket.create_connection(("127.0.0.1", self.line_port), timeout=2).close()
        except OSError:
            return "exited" if self.proc.poll() is not None else "timeout"
        return "listening"

    def _terminate(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            procs.stop(proc)

    def stop(self) -> None:
        """Stop carbon-cache (idempotent); remove the folder if it was a temporary one."""
        self._terminate()
        if self._own_home:
            shutil.rmtree(self.home, ignore_errors=True)

    def __enter__(self) -> CarbonCache:
        return self.start() if self.proc is None else self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
