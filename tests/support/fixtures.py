"""The pytest fixtures every tier shares: the SMTP test servers, TLS certificates, a whole
engine on loopback. tests/conftest.py takes them all with
``pytest_plugins = ["tests.support.fixtures"]``.

Every server or engine a fixture starts is stopped at teardown, also when the test fails.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest

from engine.testing.harness import LocalEngine
from engine.testing.sink import SinkServer
from engine.testing.tlscert import CABundle, make_ca_and_cert, make_cert
from tests.support.smtpserver import ScriptedServer, Step

__all__ = [
    "ca_bundle",
    "local_engine",
    "plain_sink",
    "scripted",
    "sink",
    "tls_files",
    "unverified_client_context",
]


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """``(certfile, keyfile)``: a self-signed certificate for localhost / 127.0.0.1."""
    return make_cert(tmp_path_factory.mktemp("selfsigned"))


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
