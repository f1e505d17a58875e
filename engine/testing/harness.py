"""A whole engine on loopback with a throwaway config: for the demo, tests and benchmarks.

`LocalEngine` writes a config (sockets over ipc in a short temporary folder,
spool and events log in `workdir`), runs the real `mailengine run` as a child
process, pushes jobs the way a producer would, and reads what happened from the
events log. Nothing here is a mock: the processes, sockets and files are the
production ones.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import yaml

from engine import status as status_mod
from engine.push import Pusher
from engine.pushreport import Progress

FINAL = ("delivered", "bounced", "expired")


def deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


class LocalEngine:
    """`env`: variables added to the engine's environment (its workers inherit them), e.g.
    engine.crash's MAILENGINE_CRASH_AT; `wrapper`: a command the engine runs under, e.g.
    `strace -f -o FILE`. Both may be changed between a stop and the next `start`."""

    def __init__(self, workdir: str, smtp_port: int, ips: Iterable[str] = ("127.0.0.2",),
                 route: str | None = "127.0.0.1", extra: Mapping[str, Any] | None = None,
                 python: str = sys.executable, env: Mapping[str, str] | None = None,
                 wrapper: Sequence[str] = ()) -> None:
        self.workdir = os.path.abspath(workdir)
        os.makedirs(self.workdir, exist_ok=True)
        # ipc paths are limited to ~107 bytes: keep the sockets in a short folder.
        self.sockdir = tempfile.mkdtemp(prefix="me-")
        self.events_log = os.path.join(self.workdir, "events.jsonl")
        self.log_path = os.path.join(self.workdir, "engine.log")
        self.config: dict[str, Any] = {
            "ingest": f"ipc://{self.sockdir}/ingest",
            "events": f"ipc://{self.sockdir}/events",
            "control": f"ipc://{self.sockdir}/control",
            "run_dir": self.sockdir,
            "events_log": self.events_log,
            "spool": os.path.join(self.workdir, "spool"),
            "ips": [{"address": ip, "helo": f"mta-{ip.replace('.', '-')}.test"} for ip in ips],
            "smtp": {"port": smtp_port},
            "statsd": {"enabled": False},
        }
        if route is not None:
            self.config["routes"] = {"*": route}
        if extra:
            self.config = deep_merge(self.config, extra)
        self.config_path = os.path.join(self.workdir, "mailengine.yaml")
        self.python = python
        self.env = dict(env or {})  # added to the engine's environment (e.g. LD_PRELOAD)
        self.wrapper = list(wrapper)  # a command to run the engine under (strace)
        self.proc: subprocess.Popen[bytes] | None = None
        self._events_offset = 0
        self._events: list[dict[str, Any]] = []
        self.unparsable: list[str] = []  # events log lines that are not JSON
        self.write_config()

    # -- life cycle ------------------------------------------------------------

    def write_config(self) -> None:
        with open(self.config_path, "w", encoding="utf-8") as f:
            yaml.safe_dump(self.config, f)

    def start(self, timeout: float = 20.0) -> None:
        log = open(self.log_path, "ab")
        env = dict(os.environ) | self.env
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen([*self.wrapper, self.python, "-m", "engine.cli", "run",
                                      "-c", self.config_path], stdout=log, stderr=log, env=env)
        log.close()
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 20.0) -> dict[str, Any]:
        """Until the supervisor answers and every worker is ready for tasks."""
        deadline = time.monotonic() + timeout
        while True:
            self._check_running()
            try:
                figures = self.status(timeout=0.5)
                if figures["workers"] and all(w["ready"] for w in figures["workers"].values()):
                    return figures
            except TimeoutError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"engine not ready within {timeout}s; see {self.log_path}")
            time.sleep(0.1)

    def status(self, timeout: float = 3.0) -> dict[str, Any]:
        return status_mod.query(str(self.config["control"]), timeout)

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM (graceful drain) and wait; returns the exit code."""
        if self.proc is None:
            return 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self.proc = None

    def kill(self) -> None:
        """SIGKILL the supervisor (its workers die with it: PR_SET_PDEATHSIG)."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def reload(self) -> None:
        assert self.proc is not None
        self.write_config()
        self.proc.send_signal(signal.SIGHUP)

    def cleanup(self) -> None:
        if self.proc is not None:
            self.kill()
        shutil.rmtree(self.sockdir, ignore_errors=True)

    def _check_running(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"engine exited with {self.proc.returncode}; see {self.log_path}:\n"
                               + self.log_tail())

    def log_tail(self, lines: int = 30) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def __enter__(self) -> LocalEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    # -- jobs and events -----------------------------------------------------------

    def push(self, jobs: Iterable[tuple[dict[str, Any], bytes]], timeout: float = 60.0,
             progress: bool = False) -> bool:
        """Push jobs (envelope, message) until each is acknowledged; True if all queued."""
        frames = [(env["id"], [json.dumps(env).encode(), msg]) for env, msg in jobs]
        ingest = str(self.config["ingest"])
        pusher = Pusher(ingest, str(self.config["events"]), resend=3.0, timeout=timeout)
        shown = Progress(sys.stderr, progress, ingest)
        return pusher.push(frames, len(frames), shown).exit_status() == 0

    def events(self) -> list[dict[str, Any]]:
        """Every event logged so far (read incrementally)."""
        try:
            with open(self.events_log, encoding="utf-8") as f:
                f.seek(self._events_offset)
                chunk = f.read()
        except FileNotFoundError:
            return self._events
        complete = chunk[:chunk.rfind("\n") + 1]
        self._events_offset += len(complete.encode("utf-8"))
        # split("\n"), not splitlines(): events are JSON written with ensure_ascii=False,
        # so a reply or meta may hold U+2028 or U+0085, which splitlines() breaks on.
        for line in complete.split("\n"):
            if not line:
                continue
            try:
                self._events.append(json.loads(line))
            except ValueError:  # a line torn by a kill -9 of the engine: kept for tests
                self.unparsable.append(line)
        return self._events

    def wait_for(self, done: Callable[[list[dict[str, Any]]], bool], timeout: float = 60.0,
                 what: str = "events") -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            events = self.events()
            if done(events):
                return events
            self._check_running()
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for {what}; log tail:\n{self.log_tail()}")
            time.sleep(0.05)

    def wait_final(self, rcpt_count: int, timeout: float = 60.0) -> list[dict[str, Any]]:
        """Until `rcpt_count` recipients have a final outcome."""
        return self.wait_for(lambda evs: len(final_outcomes(evs)) >= rcpt_count, timeout,
                             f"{rcpt_count} final outcomes")


def final_outcomes(events: Iterable[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """(job id, rcpt) -> its final event."""
    return {(e["id"], e["rcpt"]): e for e in events if e["event"] in FINAL}


def make_message(index: int, size: int = 5000, sender: str = "sender@example.test",
                 rcpt: str = "rcpt@example.test") -> bytes:
    """A plain RFC 5322 message of about `size` bytes with a unique Message-ID."""
    head = (f"From: <{sender}>\r\nTo: <{rcpt}>\r\nSubject: test message {index}\r\n"
            f"Message-ID: <{index}.{time.time_ns()}@example.test>\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n")
    line = f"message {index} " + "abcdefghijklmnopqrstuvwxyz0123456789" * 2 + "\r\n"
    body = line * max(1, (size - len(head)) // len(line))
    return (head + body).encode("ascii")
