"""A real redis-server for the cluster tests: Debian's, on an ephemeral loopback port, in a
temporary folder, nothing saved (`--save ''`, no AOF), stopped by its pid.

    with RedisServer() as redis:
        redis.url          # redis://127.0.0.1:PORT/0, for `cluster.redis`
        redis.kill()       # SIGKILL, as a crash would
        redis.start()      # again, on the same port, empty

`serving(made)`: one for a test, what the test made on it (`made`) closed at its end. The
`redis_server` fixture (tests/support/fixtures.py) is one with nothing to close.

`missing()` says what is not installed: the tests skip, or fail when MAILENGINE_REDIS=required
(.ci/run installs redis-server and python3-redis).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from types import TracebackType
from typing import Protocol, Self, TypeVar

import pytest

from engine.testing import procs
from tests.support.wait import until

REQUIRE = "MAILENGINE_REDIS"
SBIN = ("/usr/bin", "/usr/sbin", "/usr/local/bin")


def binary() -> str | None:
    return shutil.which("redis-server") or next(
        (os.path.join(d, "redis-server") for d in SBIN
         if os.access(os.path.join(d, "redis-server"), os.X_OK)), None)


def missing() -> str | None:
    """What is not installed, as a sentence; None when everything is."""
    absent = []
    if binary() is None:
        absent.append("redis-server")
    try:
        import redis  # noqa: F401
    except ImportError:
        absent.append("python3-redis (or pip install redis)")
    return f"Redis tests need: apt-get install {' '.join(absent)}" if absent else None


def need_redis() -> None:
    """Skip the test when Redis or redis-py is missing; fail when it is required."""
    problem = missing()
    if problem is None:
        return
    if os.environ.get(REQUIRE) == "required":
        pytest.fail(f"{problem} ({REQUIRE}=required)")
    pytest.skip(problem)


class Closable(Protocol):
    def close(self) -> None: ...


Made = TypeVar("Made", bound=Closable)


@contextlib.contextmanager
def serving(made: list[Made]) -> Iterator[RedisServer]:
    """A redis-server for one test (skips without Redis, fails when it is required); at the
    test's end what it `made` on it is closed (their greenlets stop, as at a worker's end),
    then the server stops."""
    need_redis()
    with RedisServer() as server:
        yield server
        while made:
            made.pop().close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    def __init__(self) -> None:
        self.port = _free_port()
        self.dir = tempfile.mkdtemp(prefix="me-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        server = binary()
        assert server is not None
        log = open(os.path.join(self.dir, "redis.log"), "ab")
        self.proc = subprocess.Popen(
            [server, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir, "--daemonize", "no",
             "--protected-mode", "yes"], stdout=log, stderr=log)
        log.close()
        until(self.answers, timeout=10, what=f"redis-server on port {self.port}")

    def answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def client(self) -> object:
        import redis
        return redis.Redis.from_url(self.url, socket_timeout=2)

    def kill(self) -> None:
        """SIGKILL, as a crash would; its data is gone (nothing is saved)."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            procs.stop(self.proc)
            self.proc = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
