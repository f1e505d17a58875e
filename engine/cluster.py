"""This host's connection to the Redis that the engine hosts of a cluster share.

Several engines (each with its own sending IPs, spool and workers) may share one Redis
(`cluster.redis`; docs/SCALING.md): de-duplication of job ids at intake
(engine.cluster_dedup), provider rates and hourly budgets for the whole cluster
(engine.cluster_rate, engine.cluster_hourly).
Each process (the supervisor, every worker) holds one `Cluster`, in one of three modes:

- `off`: no `cluster.redis` in the config: nothing is shared, the engine is the single
  host it always was, and redis-py need not be installed;
- `shared`: Redis answered the last command;
- `fallback`: Redis did not (down, unreachable, too slow: `cluster.timeout`, or redis-py
  missing). Nothing waits for it: the callers go on with what they know alone (each
  spool's own duplicate check; a host's share of each cluster rate), and Redis is tried
  again every `cluster.retry` seconds; the first command it answers ends the fallback.

Each change of mode is one log line (`cluster_mode`) and a gauge (`cluster_mode`: 0 off,
1 fallback, 2 shared); each fall back is counted (`cluster_fallbacks`).

Nothing here imports gevent: both sides use it (in the worker, gevent's patched sockets
make redis-py cooperative).
"""
from __future__ import annotations

import logging
import time
import urllib.parse
from collections.abc import Callable
from typing import Any, TypeVar

from engine import logs
from engine.config import ClusterConfig
from engine.metrics import Metrics

log = logging.getLogger("mailengine.cluster")

OFF, FALLBACK, SHARED = "off", "fallback", "shared"
MODE_GAUGE = {OFF: 0, FALLBACK: 1, SHARED: 2}

T = TypeVar("T")


def shown(url: str) -> str:
    """The Redis URL for a log line: its password left out."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname or ''}"
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


class Cluster:
    """The connection to Redis and its health. `run(what, op)` is how every caller uses
    it: `op(client)` in shared mode, None when off or while Redis is unreachable."""

    def __init__(self, cfg: ClusterConfig, hostname: str, metrics: Metrics | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.host = cfg.host or hostname  # this host's name in the cluster
        self._metrics = metrics
        self._clock = clock
        self._client: Any = None
        self._retry_at = 0.0  # fallback: Redis is not tried before this (monotonic)
        # Tried at the first command: "shared" until then (a command waits for nothing
        # else), and logged as whatever the first answer (or its absence) says.
        self.mode = SHARED if cfg.redis else OFF
        self._logged: str | None = None if cfg.redis else OFF
        if self.mode == OFF:
            self._gauge()  # else at the first answer, or its absence

    @property
    def enabled(self) -> bool:
        """A cluster is configured (whether Redis answers or not)."""
        return self.mode != OFF

    def key(self, *parts: str) -> str:
        """A Redis key under `cluster.prefix`: `<prefix>:<part>:<part>...`."""
        return ":".join((self.cfg.prefix, *parts))

    def run(self, what: str, op: Callable[[Any], T]) -> T | None:
        """`op(client)` against Redis; None when off, or while falling back (then `op` is
        not even tried before the next retry). `what` names the caller in the log line."""
        if self.mode == OFF or (self.mode == FALLBACK and self._clock() < self._retry_at):
            return None
        try:
            result = op(self._connection())
        except Exception as err:  # redis-py's errors, OSError, a missing redis-py
            self._failed(what, err)
            return None
        self._succeeded()
        return result

    def script(self, lua: str) -> Callable[..., Any]:
        """A Lua script, run by its SHA (loaded again when Redis forgot it, a restarted
        Redis): call it inside `run` as `script(keys=..., args=..., client=client)`."""
        registered: list[Any] = []

        def call(keys: list[str], args: list[Any], client: Any) -> Any:
            if not registered:
                registered.append(client.register_script(lua))
            return registered[0](keys=keys, args=args, client=client)
        return call

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except Exception:  # closing a connection that is gone: nothing to do
                pass

    def _connection(self) -> Any:
        if self._client is None:
            try:
                import redis  # only a host in a cluster needs redis-py
            except ImportError as err:
                raise RuntimeError("redis-py is not installed (pip install redis;"
                                   " on Debian: apt-get install python3-redis)") from err
            self._client = redis.Redis.from_url(
                self.cfg.redis, socket_timeout=self.cfg.timeout,
                socket_connect_timeout=self.cfg.timeout, health_check_interval=0,
                client_name=f"mailengine-{self.host}")
        return self._client

    def _failed(self, what: str, err: Exception) -> None:
        self._retry_at = self._clock() + self.cfg.retry
        self.mode = FALLBACK
        self.close()  # a fresh connection at the retry
        if self._logged == FALLBACK:
            return
        at_start, self._logged = self._logged is None, FALLBACK
        self._gauge()
        if self._metrics is not None:
            self._metrics.incr("cluster_fallbacks", "all")
        log.warning(logs.kv("cluster_mode", mode=FALLBACK, host=self.host,
                            redis=shown(self.cfg.redis), caller=what, at_start=at_start,
                            retry_every=self.cfg.retry, error=f"{type(err).__name__}: {err}"))

    def _succeeded(self) -> None:
        self.mode = SHARED
        if self._logged == SHARED:
            return
        at_start, self._logged = self._logged is None, SHARED
        self._gauge()
        (log.info if at_start else log.warning)(logs.kv(
            "cluster_mode", mode=SHARED, host=self.host,
                            redis=shown(self.cfg.redis), at_start=at_start))

    def _gauge(self) -> None:
        if self._metrics is not None:
            self._metrics.gauge("cluster_mode", "all", MODE_GAUGE[self.mode])
