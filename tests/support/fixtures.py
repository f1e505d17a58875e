"""The pytest fixtures every tier shares: the SMTP test servers, TLS certificates, a whole
engine on loopback, connections to a playbook server, the delivery stack in this process, a
redis-server for the cluster tests.
tests/conftest.py takes them all with ``pytest_plugins = ["tests.support.fixtures"]``.

Every server, engine or connection a fixture starts is stopped or closed at teardown, also
when the test fails.
"""

from __future__ import annotations

import shutil
import ssl
import tempfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest

from engine.mx import Resolver
from engine.smtp import Connection
from engine.testing.harness import LocalEngine
from engine.testing.sink import SinkServer
from engine.testing.tlscert import CABundle, make_ca_and_cert, make_cert
from tests.support.playbook import open_connection
from tests.support.rawserver import Behaviour, RawServer
from tests.support.redis import RedisServer, serving
from tests.support.smtpserver import ScriptedServer, Step
from tests.support.stack import Stack, build

__all__ = [
    "ca_bundle",
    "connect",
    "local_engine",
    "plain_sink",
    "raw",
    "redis_server",
    "scripted",
    "sink",
    "sockdir",
    "stack",
    "tls_files",
    "unverified_client_context",
]


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """``(certfile, keyfile)``: a certificate for localhost / 127.0.0.1 that nobody trusts."""
    return make_cert(tmp_path_factory.mktemp("untrusted"))


@pytest.fixture(scope="session")
def ca_bundle(tmp_path_factory: pytest.TempPathFactory) -> CABundle:
    """A private CA (``cafile``) and a localhost certificate it signed (``certfile``,
    ``keyfile``)."""
    return make_ca_and_cert(tmp_path_factory.mktemp("ca"))


@pytest.fixture
def sink() -> Iterator[SinkServer]:
    """A recording sink offering STARTTLS, PIPELINING and CHUNKING."""
    with SinkServer() as server:
        yield server


@pytest.fixture
def plain_sink() -> Iterator[SinkServer]:
    """A recording sink without STARTTLS."""
    with SinkServer(tls=False) as server:
        yield server


@pytest.fixture
def scripted() -> Iterator[Callable[..., ScriptedServer]]:
    """A factory: ``scripted([S(...), C(...), ...], **options)`` starts a ScriptedServer."""
    servers: list[ScriptedServer] = []

    def start(scripts: Sequence[Sequence[Step]] | Sequence[Step], **options: Any) -> ScriptedServer:
        servers.append(ScriptedServer(scripts, **options))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def unverified_client_context() -> ssl.SSLContext:
    """A client TLS context that accepts any certificate, as opportunistic STARTTLS does."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


@pytest.fixture
def local_engine(tmp_path: Any) -> Iterator[Callable[..., LocalEngine]]:
    """A factory: `local_engine(smtp_port, ips=..., extra={...})` -> a started LocalEngine.

    Every engine it started is stopped (SIGTERM, then SIGKILL) at teardown.
    """
    engines: list[LocalEngine] = []

    def start(smtp_port: int, start: bool = True, **options: Any) -> LocalEngine:
        engine = LocalEngine(str(tmp_path / f"engine{len(engines)}"), smtp_port, **options)
        engines.append(engine)
        if start:
            engine.start()
        return engine

    yield start
    for engine in engines:
        try:
            if engine.proc is not None:
                engine.stop(timeout=20)
        except Exception:
            pass
        engine.cleanup()


@pytest.fixture
def connect() -> Iterator[Callable[..., Connection]]:
    """A factory: ``connect(server, timeouts=FAST, limits=None)`` -> a Connection past banner
    and EHLO (tests/support/playbook.py's `open_connection`); each is closed at teardown."""
    opened: list[Connection] = []

    def open_one(server: ScriptedServer, *args: Any, **kwargs: Any) -> Connection:
        opened.append(open_connection(server, *args, **kwargs))
        return opened[-1]

    yield open_one
    for conn in opened:
        conn.close()


@pytest.fixture
def stack() -> Iterator[Callable[..., Stack]]:
    """A factory: ``stack(resolver, **options)`` -> tests/support/stack.py's `build`; every
    stack it built is closed at teardown (its idle connections, its StatsD socket)."""
    built: list[Stack] = []

    def make(resolver: Resolver, **options: Any) -> Stack:
        built.append(build(resolver, **options))
        return built[-1]

    yield make
    for one in built:
        one.close()


@pytest.fixture
def raw() -> Iterator[Callable[..., RawServer]]:
    """A factory: ``raw(behaviour, rcvbuf=None)`` starts a tests/support/rawserver.py
    RawServer playing `behaviour` on every connection."""
    servers: list[RawServer] = []

    def start(behaviour: Behaviour, **options: int) -> RawServer:
        servers.append(RawServer(behaviour, **options))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A redis-server of its own (tests.support.redis); the test skips without Redis (fails
    when MAILENGINE_REDIS=required). A test module that must close what it made before the
    server stops keeps a fixture of this name of its own."""
    with serving([]) as server:
        yield server


@pytest.fixture
def sockdir() -> Iterator[str]:
    """A temporary folder for ipc sockets, with a short path: ipc paths have a length limit."""
    path = tempfile.mkdtemp(prefix="me-")
    yield path
    shutil.rmtree(path, ignore_errors=True)
