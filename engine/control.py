"""The control socket: the commands `mailengine status` and `mailengine queue` send.

A ZeroMQ REP socket on `control` (default an ipc path under /run/mailengine: it has no
authentication, so config keeps it local, and its ipc file is mode 0660, `restrict`: only
root, the engine's user and its group, `mailengine` under systemd, may connect). A request
is a JSON object `{"command": ...}` with the command's arguments; the answer is a JSON
object, `{"error": ...}` for a request that is not understood or not carried out.
Commands: `status` (the live figures: spool, in flight, event counts, each worker and its
shaping) and the queue's (engine.queue_admin).

A command whose answer needs a long read of the spool (the queue's summary: ~0.4 s for its
100,000 recipients) returns an `OffLoop`: the read runs in a thread of its own, on a
connection of its own, while the supervisor's loop goes on taking jobs and recording
results; the answer is made and sent back in the loop once the read is done. Meanwhile
the socket is not read (a REP socket answers one request at a time): the next request
waits in it.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import zmq

from engine import logs
from engine.cluster import Cluster
from engine.spool import Spool, SpoolDamaged, SpoolError
from engine.workers import Workers

log = logging.getLogger("mailengine.supervisor")

CONTROL_MAX_REQUEST = 64 * 1024  # bytes: a request is a few dozen
SOCKET_MODE = 0o660  # the control socket's ipc file: its user and group may connect

class BadRequest(ValueError):
    """A request the engine does not carry out; the message, the answer's `error`, says
    why (and what to do)."""


@dataclass(frozen=True)
class OffLoop:
    """An answer made in two steps: `read()`, the long read, in a thread of its own (it
    must touch nothing the loop changes: the spool through a connection of its own), then
    `answer(what_it_read)` in the loop."""

    read: Callable[[], Any]
    answer: Callable[[Any], dict[str, Any]]


Handler = Callable[[dict[str, Any]], dict[str, Any] | OffLoop]


class _Reading:
    """An `OffLoop` read under way: its thread, and what it read or raised."""

    def __init__(self, command: str, off_loop: OffLoop) -> None:
        self.command, self.off_loop = command, off_loop
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._read, name=f"control {command}",
                                       daemon=True)  # a stop does not wait for a read
        self.thread.start()

    def _read(self) -> None:
        try:
            self.result = self.off_loop.read()
        except BaseException as err:  # given to the loop, which answers (or stops) with it
            self.error = err
        finally:
            self.done.set()

    def answer(self) -> dict[str, Any]:
        if self.error is not None:
            raise self.error
        return self.off_loop.answer(self.result)


class Control:
    """Answers the control socket's requests, one per call of `answer` (an `OffLoop` one
    when its read is done: `finish`)."""

    def __init__(self, sock: zmq.Socket, status: Callable[[], dict[str, Any]],
                 commands: Mapping[str, Handler] | None = None) -> None:
        self.sock = sock
        self._commands: dict[str, Handler] = {"status": lambda _: status(),
                                              **(commands or {})}
        self._reading: _Reading | None = None

    @property
    def busy(self) -> bool:
        """An answer is being read off the loop: the socket is not read until it is sent."""
        return self._reading is not None

    def answer(self) -> None:
        if self._reading is not None:
            return  # REP: the answer under way goes first
        try:
            request: Any = self.sock.recv_json(zmq.NOBLOCK)
        except zmq.Again:
            return
        except ValueError:
            self.sock.send_json({"error": "request is not JSON"})
            return
        command = request.get("command") if isinstance(request, dict) else None
        answer = self._answered(command, lambda: self._handler(command)(request))
        if isinstance(answer, OffLoop):
            self._reading = _Reading(str(command), answer)
        else:
            self.sock.send_json(answer)

    def finish(self, wait: float = 0.0) -> None:
        """Send the answer read off the loop, if its read is done (waiting up to `wait`
        seconds for it)."""
        reading = self._reading
        if reading is None or not reading.done.wait(wait):
            return
        self._reading = None
        answer = self._answered(reading.command, reading.answer)
        self.sock.send_json(answer if isinstance(answer, dict) else
                            {"error": "internal error: an answer read twice (a bug)"})

    def _handler(self, command: Any) -> Handler:
        run = self._commands.get(command) if isinstance(command, str) else None
        if run is None:
            raise BadRequest(f"unknown command {command!r}; the commands:"
                             f" {', '.join(sorted(self._commands))}")
        return run

    def _answered(self, command: Any, run: Callable[[], dict[str, Any] | OffLoop]
                  ) -> dict[str, Any] | OffLoop:
        """`run()`'s answer, or the error answer for what it raised."""
        try:
            return run()
        except BadRequest as err:
            return {"error": str(err)}
        except SpoolDamaged:
            raise  # the supervisor stops (engine.supervisor)
        except SpoolError as err:
            return {"error": f"{err}; nothing was changed, try again"}
        except Exception as err:  # a bug of one command must not stop the engine
            log.error(logs.kv("control_failed", command=command, error=repr(err)))
            return {"error": f"internal error: {type(err).__name__}: {err} (a bug; see the"
                             " engine's log)"}


def restrict(endpoint: str) -> None:
    """The control socket's ipc file made mode 0660 (it is created with the umask): root,
    the engine's user and its group may connect, nobody else. No-op for tcp (config
    keeps it on loopback)."""
    if endpoint.startswith("ipc://"):
        os.chmod(endpoint[len("ipc://"):], SOCKET_MODE)


def status(spool: Spool, in_flight: int, counters: Mapping[str, int],
           workers: Workers, health: Mapping[str, Any] | None = None,
           cluster: Cluster | None = None) -> dict[str, Any]:
    """The `status` answer: what `mailengine status` shows. `health`: whether the spool
    can be written (engine.spoolhealth), and what waits because it cannot. `cluster`: the
    supervisor's link to the cluster's Redis, if one is configured (its host name, its
    mode as its last command found it); each worker's is its `cluster_mode`."""
    stats = spool.stats()
    return {
        "pid": os.getpid(),
        "spool": {"jobs": stats.jobs, "rcpts_pending": stats.rcpts_pending,
                  "rcpts_deferred": stats.rcpts_deferred,
                  "oldest_queued_ts": stats.oldest_queued_ts, **(health or {})},
        "in_flight": in_flight,
        "events": dict(counters),
        "workers": {h.ip: {"alive": h.alive, "ready": h.ready,
                           "pid": h.proc.pid if h.proc else None,
                           "jobs": len(h.jobs), "restarts": h.failures,
                           "connections_open": h.stats.get("connections_open", 0),
                           "destinations": h.stats.get("destinations", 0),
                           "dns": h.stats.get("dns", {}),
                           "in_flight": h.stats.get("in_flight", 0),
                           "ip_down": h.ip_down,
                           **({"ip_error": h.stats.get("ip_error"),
                               "ip_down_for": round(time.monotonic() - h.ip_down_since, 1)}
                              if h.ip_down_since is not None else {}),
                           "shaping": h.stats.get("shaping", {}),
                           "shaping_idle": h.stats.get("shaping_idle", 0),
                           "shaping_forgotten": h.stats.get("shaping_forgotten", 0),
                           **({"cluster_mode": h.stats["cluster_mode"]}
                              if h.stats.get("cluster_mode") else {})}
                    for h in workers},
        **({"cluster": {"host": cluster.host, "mode": cluster.mode}}
           if cluster is not None else {}),
    }
