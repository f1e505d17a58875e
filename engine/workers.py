"""The worker processes: one per sending IP, spawned, watched and restarted by the supervisor.

Each worker gets a task socket of its own (a new one per spawn, so tasks queued
for a dead predecessor die with its socket: they are still due in the spool) and
pushes results and a stats frame a second to the supervisor's results socket. A
worker counts as `ready` once its first stats frame arrives: a task sent earlier
could wait in a socket nobody reads. A worker that dies is restarted with
back-off (RESTART_BACKOFF, reset after STABLE_AFTER seconds up); what it had in
flight is simply due again. A reload retires the removed IPs' workers (drain,
then forget) and replaces the others (drain, then a fresh worker at once); a new IP
the host does not hold gets no worker (engine.hostcheck).

A worker whose sending IP the host no longer holds says so in its stats frames
(`ip_down`, engine.sendingip): it takes no new jobs until it reports the IP back.

The worker's entry point is `bin/mailengine-worker` (it monkey-patches before
anything else): beside the engine package in a checkout and in the Debian
package, or on PATH where pip installed it.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import zmq

import engine
from engine import hostcheck, logs, sockets
from engine.config import Config

log = logging.getLogger("mailengine.supervisor")

RESTART_BACKOFF = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
STABLE_AFTER = 60.0  # a worker up this long has its restart backoff reset
WORKER_ENTRY = "mailengine-worker"


@dataclass
class WorkerHandle:
    """One sending IP's worker, as the supervisor sees it."""

    ip: str
    tasks: zmq.Socket | None = None
    generation: int = 0
    proc: subprocess.Popen[bytes] | None = None
    jobs: set[str] = field(default_factory=set)  # in flight there (engine.dispatch)
    started: float = 0.0
    failures: int = 0
    restart_at: float = 0.0
    retiring: bool = False  # removed from the config: drain, then forget it
    replacing: bool = False  # draining for a reload: a fresh worker follows at once
    stats: dict[str, Any] = field(default_factory=dict)
    ip_down_since: float | None = None  # the host does not hold the IP, says the worker

    @property
    def ip_down(self) -> bool:
        return self.ip_down_since is not None

    @property
    def takes_jobs(self) -> bool:
        """Ready, and its IP is an address of the host: a job sent now can leave."""
        return self.ready and self.ip_down_since is None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def ready(self) -> bool:
        """Alive, connected, and said hello: a task sent now reaches it. (A PUSH to a
        socket nobody has connected to yet cannot send, and the job would wait.)

        Alive as last seen by `Workers.check` (every tick), not with a waitpid per
        dispatched job: a task sent to a worker that has just died dies with its
        socket, and the job is due again once the death is seen."""
        proc = self.proc
        return (proc is not None and proc.returncode is None and not self.retiring
                and not self.replacing and self.stats.get("pid") == proc.pid)


class Workers:
    """Every worker of the engine, by sending IP."""

    def __init__(self, ctx: zmq.Context, cfg: Config, config_path: str | None) -> None:
        self._ctx = ctx
        self.cfg = cfg
        self._config_path = config_path
        self.results_endpoint = sockets.ipc_endpoint(cfg.run_dir, "results")
        self.handles: dict[str, WorkerHandle] = {}
        self._restarts = 0  # unasked exits not yet counted in the worker_restarts metric

    def __iter__(self) -> Iterator[WorkerHandle]:
        return iter(self.handles.values())

    def get(self, ip: str) -> WorkerHandle | None:
        return self.handles.get(ip)

    def add(self, ip: str) -> None:
        handle = WorkerHandle(ip)
        self.handles[ip] = handle
        self._start(handle)

    def on_stats(self, stats: dict[str, Any]) -> bool:
        """A worker's stats frame; True when it made that worker take jobs (a fresh start,
        or its IP back)."""
        handle = self.handles.get(stats.get("ip"))  # type: ignore[arg-type]
        if handle is None:
            return False
        took_jobs = handle.takes_jobs
        was_ready = handle.ready
        handle.stats = stats
        if handle.ready and not was_ready:
            log.info(logs.kv("worker_ready", ip=handle.ip, pid=stats.get("pid")))
        if handle.ready:
            _ip_held(handle, not stats.get("ip_down"), stats.get("ip_error"))
        return handle.takes_jobs and not took_jobs

    def check(self, now: float) -> dict[str, bool]:
        """See deaths, start what is due to start, forget retired workers that are gone.
        Returns the jobs the dead workers had in flight: id -> whether results may have
        died with the worker (it did not exit cleanly, see `_died`)."""
        lost: dict[str, bool] = {}
        for handle in list(self.handles.values()):
            if handle.proc is not None and handle.proc.poll() is not None:
                lost.update(self._died(handle, now))
            if handle.proc is None and not handle.retiring and now >= handle.restart_at:
                self._start(handle)
            if handle.retiring and handle.proc is None:
                del self.handles[handle.ip]
        return lost

    def reconfigure(self, cfg: Config) -> tuple[set[str], set[str]]:
        """A reloaded config: removed IPs' workers drain and go, kept ones are replaced by a
        fresh worker that reads the new config, new IPs get one. Returns (added, removed)."""
        old = set(self.handles)
        new = {ip.address for ip in cfg.ips}
        self.cfg = cfg
        for ip in old - new:
            self.handles[ip].retiring = True
            self._signal(self.handles[ip], signal.SIGTERM)
        for ip in old & new:
            self.handles[ip].replacing = True
            self._signal(self.handles[ip], signal.SIGTERM)
        added = {ip for ip in new - old if _may_add(ip)}
        for ip in added:
            self.add(ip)
        return added, old - new

    def take_restarts(self) -> int:
        """Workers that exited unasked (each restarted) since the last call."""
        count, self._restarts = self._restarts, 0
        return count

    # -- stopping ------------------------------------------------------------------

    def terminate(self) -> None:
        """SIGTERM to every worker: each finishes the transactions it has open and exits."""
        for handle in self.handles.values():
            self._signal(handle, signal.SIGTERM)

    def any_alive(self) -> bool:
        return any(handle.alive for handle in self.handles.values())

    def kill(self) -> None:
        """SIGKILL to whatever is still running, and reap it."""
        for handle in self.handles.values():
            if handle.alive and handle.proc is not None:
                handle.proc.kill()
                handle.proc.wait(5)

    # -- internals ---------------------------------------------------------------

    def _start(self, handle: WorkerHandle) -> None:
        """Spawn a worker with a task socket of its own: tasks queued for a dead
        predecessor die with its socket (they are still due in the spool)."""
        handle.generation += 1
        endpoint = sockets.ipc_endpoint(self.cfg.run_dir,
                                        f"worker-{handle.ip}-{handle.generation}")
        handle.tasks = sockets.bind(self._ctx, zmq.PUSH, endpoint,
                                    {zmq.SNDHWM: self.cfg.limits.max_in_flight * 2 + 100})
        cmd = [sys.executable, worker_entry(), "--ip", handle.ip, "--tasks", endpoint,
               "--results", self.results_endpoint, "--parent-pid", str(os.getpid())]
        if self._config_path:
            cmd += ["--config", self._config_path]
        handle.proc = subprocess.Popen(cmd)
        handle.started = time.monotonic()
        log.info(logs.kv("worker_spawned", ip=handle.ip, pid=handle.proc.pid))

    def _died(self, handle: WorkerHandle, now: float) -> dict[str, bool]:
        """Book a worker's exit and plan its restart; the jobs it had in flight, each with
        whether its results may be lost. A worker exits 0 only after its drain, having
        reported every recipient whose message it wrote (engine.worker; save a frame it
        could not send at all, logged `results_lost`); any other exit (killed, crashed) may
        have taken deliveries it had not reported with it."""
        assert handle.proc is not None
        code = handle.proc.returncode
        expected = handle.retiring or handle.replacing
        if now - handle.started >= STABLE_AFTER or handle.replacing:
            handle.failures = 0
        delay = 0.0 if handle.replacing else \
            RESTART_BACKOFF[min(handle.failures, len(RESTART_BACKOFF) - 1)]
        if not expected:
            handle.failures += 1
            self._restarts += 1
        handle.replacing = False
        handle.restart_at = now + delay
        handle.proc = None
        lost = dict.fromkeys(handle.jobs, code != 0)
        handle.jobs.clear()
        if handle.tasks is not None:
            sockets.close_and_unlink(handle.tasks)
            handle.tasks = None
        level = logging.INFO if expected else logging.ERROR
        log.log(level, logs.kv("worker_exited", ip=handle.ip, code=code, requeued=len(lost),
                               restart_in=None if handle.retiring else delay))
        return lost

    @staticmethod
    def _signal(handle: WorkerHandle, signum: int) -> None:
        if handle.alive and handle.proc is not None:
            handle.proc.send_signal(signum)


def _ip_held(handle: WorkerHandle, held: bool, error: object) -> None:
    """What the worker's frame says of its IP: a change is logged (a warning when it goes)."""
    if held == (handle.ip_down_since is None):
        return
    if held:
        assert handle.ip_down_since is not None
        down_for = round(time.monotonic() - handle.ip_down_since, 1)
        handle.ip_down_since = None
        log.warning(logs.kv("sending_ip_up", ip=handle.ip, down_for=down_for))
    else:
        handle.ip_down_since = time.monotonic()
        log.warning(logs.kv("sending_ip_down", ip=handle.ip, error=error,
                            in_flight=len(handle.jobs)))


def _may_add(ip: str) -> bool:
    """A reload's new IP, if the host holds it; else refused (an error line), no worker."""
    err = hostcheck.bind_error(ip)
    if err is None:
        return True
    log.error(logs.kv("reload_ip_refused", ip=ip, error=hostcheck.describe(ip, err)))
    return False


def worker_entry() -> str:
    """The path of `bin/mailengine-worker`: beside the engine package (a checkout, the
    Debian package), else the one on PATH (installed by pip)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(engine.__file__)))
    beside = os.path.join(root, "bin", WORKER_ENTRY)
    if os.path.isfile(beside):
        return beside
    found = shutil.which(WORKER_ENTRY)
    if found is None:
        raise FileNotFoundError(f"{WORKER_ENTRY} is neither at {beside} nor on PATH")
    return found
