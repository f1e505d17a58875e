"""The control socket: the commands `mailengine status` and `mailengine queue` send.

A ZeroMQ REP socket on `control` (default an ipc path under /run/mailengine: it has no
authentication, so config keeps it local, and its ipc file is mode 0660, `restrict`: only
root, the engine's user and its group, `mailengine` under systemd, may connect). A request
is a JSON object `{"command": ...}` with the command's arguments; the answer is a JSON
object, `{"error": ...}` for a request that is not understood or not carried out.
Commands: `status` (the live figures: spool, in flight, event counts, each worker and its
shaping) and the queue's (engine.queue_admin).
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import zmq

from engine import logs
from engine.cluster import Cluster
from engine.spool import Spool, SpoolDamaged, SpoolError
from engine.workers import Workers

log = logging.getLogger("mailengine.supervisor")

CONTROL_MAX_REQUEST = 64 * 1024  # bytes: a request is a few dozen
SOCKET_MODE = 0o660  # the control socket's ipc file: its user and group may connect

Handler = Callable[[dict[str, Any]], dict[str, Any]]


class BadRequest(ValueError):
    """A request the engine does not carry out; the message, the answer's `error`, says
    why (and what to do)."""


class Control:
    """Answers the control socket's requests, one per call of `answer`."""

    def __init__(self, sock: zmq.Socket, status: Callable[[], dict[str, Any]],
                 commands: Mapping[str, Handler] | None = None) -> None:
        self.sock = sock
        self._commands: dict[str, Handler] = {"status": lambda _: status(),
                                              **(commands or {})}

    def answer(self) -> None:
        try:
            request = self.sock.recv_json(zmq.NOBLOCK)
        except zmq.Again:
            return
        except ValueError:
            self.sock.send_json({"error": "request is not JSON"})
            return
        self.sock.send_json(self._run(request))

    def _run(self, request: Any) -> dict[str, Any]:
        command = request.get("command") if isinstance(request, dict) else None
        run = self._commands.get(command) if isinstance(command, str) else None
        if run is None:
            return {"error": f"unknown command {command!r}; the commands:"
                             f" {', '.join(sorted(self._commands))}"}
        try:
            return run(request)
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
