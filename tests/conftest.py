"""Shared fixtures: the SMTP test servers, and a whole engine on loopback."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from engine.testing.harness import LocalEngine
from tests.servers_fixtures import (  # noqa: F401 (fixtures)
    ca_bundle,
    plain_sink,
    scripted,
    sink,
    tls_files,
    unverified_client_context,
)


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
