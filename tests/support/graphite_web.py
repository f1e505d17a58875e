"""graphite-web (Debian's ``graphite-web``, Django) on loopback, throwaway: the render API the
dashboard's and the alert rules' Graphite queries run on, over a carbon-cache's whisper files.

graphite-web is a package of Debian's own Python (``/usr/bin/python3``), whatever Python runs
the tests: it runs as a child process of that interpreter, with its settings in a folder of its
own (no /etc/graphite, no /var/lib/graphite), Django's development server on a free port, and
carbon-cache's cache-query port so that points not yet written to disk are read too.

    with GraphiteWeb(tmp_path / "gw", carbon.whisper, carbon.query_port) as web:
        web.render(["aliasByNode(stats.gauges.mail.outbound.*.all.in_flight, -3)"], start, end)
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

from engine.testing import procs

DEBIAN_PYTHON = "/usr/bin/python3"

SETTINGS = """# graphite-web settings for one test run (GRAPHITE_SETTINGS_MODULE)
SECRET_KEY = "mailengine-tests"
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
DEBUG = False
TIME_ZONE = "UTC"
CONF_DIR = {home!r}
STORAGE_DIR = {storage!r}
WHISPER_DIR = {whisper!r}
STANDARD_DIRS = [{whisper!r}]
LOG_DIR = {home!r} + "/log"
INDEX_FILE = {home!r} + "/index"
CARBONLINK_HOSTS = {hosts!r}
DATABASES = {{"default": {{"ENGINE": "django.db.backends.sqlite3",
                         "NAME": {home!r} + "/graphite.db"}}}}
"""


class GraphiteWebError(RuntimeError):
    """graphite-web is not installed, did not start, or refused a query."""


def available() -> bool:
    """Whether Debian's graphite-web can run here (``apt-get install graphite-web``)."""
    if not os.path.exists(DEBIAN_PYTHON):
        return False
    found = subprocess.run([DEBIAN_PYTHON, "-c", "import graphite, django, cairocffi"],
                           capture_output=True, check=False, timeout=60)
    return found.returncode == 0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class GraphiteWeb:
    """graphite-web reading `whisper` (and carbon-cache's cache at `carbon_query`, if not 0)."""

    def __init__(self, home: Path, whisper: Path, carbon_query: int = 0) -> None:
        self.home = Path(home).resolve()
        self.whisper = Path(whisper).resolve()
        self.carbon_query = carbon_query
        self.console = self.home / "graphite-web.log"
        self.base = ""
        self.proc: subprocess.Popen[bytes] | None = None

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}  # Debian's Python, its packages
        env.update(PYTHONPATH=str(self.home), GRAPHITE_SETTINGS_MODULE="me_graphite_settings",
                   DJANGO_SETTINGS_MODULE="graphite.settings")
        return env

    def start(self, timeout: float = 60.0) -> GraphiteWeb:
        (self.home / "log").mkdir(parents=True, exist_ok=True)
        (self.home / "me_graphite_settings.py").write_text(SETTINGS.format(
            home=str(self.home), storage=str(self.whisper.parent), whisper=str(self.whisper),
            hosts=[f"127.0.0.1:{self.carbon_query}"] if self.carbon_query else []),
            encoding="utf-8")
        env = self._env()
        with open(self.console, "ab") as out:
            subprocess.run([DEBIAN_PYTHON, "-m", "django", "migrate", "--run-syncdb", "-v", "0"],
                           env=env, stdout=out, stderr=subprocess.STDOUT, check=True,
                           timeout=timeout, cwd=self.home)
            port = _free_port()
            self.proc = subprocess.Popen(
                [DEBIAN_PYTHON, "-m", "django", "runserver", "--noreload", f"127.0.0.1:{port}"],
                env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=self.home)
        self.base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{self.base}/metrics/find?query=*", timeout=5):
                    return self
            except (OSError, ValueError):
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise GraphiteWebError(f"graphite-web did not start; {self.console}:\n"
                                       + self.console.read_text(errors="replace")[-2000:])
            time.sleep(0.3)

    def render(self, targets: list[str], start: int, end: int) -> list[dict[str, Any]]:
        """The render API's JSON for `targets` from `start` to `end` (Unix seconds): a list of
        {"target": name, "datapoints": [[value, ts], ...]}; a query graphite-web refuses
        raises GraphiteWebError with its message."""
        query = [("target", t) for t in targets] + [
            ("from", str(start)), ("until", str(end)), ("format", "json")]
        url = f"{self.base}/render?{urllib.parse.urlencode(query)}"
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                return list(json.load(response))
        except urllib.error.HTTPError as err:
            body = err.read().decode(errors="replace")[-1500:]
            raise GraphiteWebError(f"{targets}: HTTP {err.code}: {body}") from err

    def png(self, targets: list[str], start: int, end: int,
            params: dict[str, str] | None = None) -> bytes:
        """The render API's PNG of `targets` (graph options in `params`: title, width...)."""
        query = [("target", t) for t in targets] + [
            ("from", str(start)), ("until", str(end)), ("format", "png"),
            *(params or {}).items()]
        url = f"{self.base}/render?{urllib.parse.urlencode(query)}"
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                return bytes(response.read())
        except urllib.error.HTTPError as err:
            body = err.read().decode(errors="replace")[-1500:]
            raise GraphiteWebError(f"{targets}: HTTP {err.code}: {body}") from err

    def find(self, query: str) -> list[str]:
        """The node names /metrics/find gives for `query` (what a Grafana variable lists)."""
        url = f"{self.base}/metrics/find?{urllib.parse.urlencode({'query': query})}"
        with urllib.request.urlopen(url, timeout=30) as response:
            return [str(node["text"]) for node in json.load(response)]

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            procs.stop(proc)

    def __enter__(self) -> GraphiteWeb:
        return self.start() if self.proc is None else self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def installed_hint() -> str:
    return ("the dashboard test needs Debian's graphite-web (apt-get install graphite-web)"
            + ("" if shutil.which("carbon-cache") else " and graphite-carbon"))
