"""What the tests of a tcp control socket share: a free loopback endpoint, and an engine
whose own readiness check (`status`) speaks CURVE when it has a client key pair."""
from __future__ import annotations

import socket
from typing import Any

from engine import auth, status
from engine.testing.harness import LocalEngine


def free_tcp_endpoint() -> str:
    """A tcp endpoint on 127.0.0.1 whose port was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{probe.getsockname()[1]}"


class CurveEngine(LocalEngine):
    """A LocalEngine whose config writes `control` as {endpoint, curve}; its own `status`
    (the readiness check) speaks CURVE with `client` when set."""

    client: auth.CurveClient | None = None

    def status(self, timeout: float = 3.0) -> dict[str, Any]:
        return status.query(str(self.config["control"]["endpoint"]), timeout,
                            curve=self.client)
