"""Metrics that keep what they would send, for tests of what a component counts without a
StatsD socket (the cluster tests)."""
from __future__ import annotations

from engine.metrics import Metrics


class Recorded(Metrics):
    """Metrics that keep what they would send: (method, name, value)."""

    def __init__(self) -> None:
        super().__init__(None, "127.0.0.2")
        self.sent: list[tuple[str, str, float]] = []

    def _send(self, method: str, name: str, value: float) -> None:
        self.sent.append((method, name, value))

    def count(self, method: str, metric: str) -> int:
        return sum(1 for m, name, _ in self.sent if m == method and name.endswith("." + metric))

    def total(self, metric: str) -> float:
        return sum(v for m, name, v in self.sent if m == "incr" and name.endswith("." + metric))
