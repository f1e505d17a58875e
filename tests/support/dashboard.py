"""conf/grafana-dashboard.json as the tests read it: its panels, the Graphite paths its
queries name ({a,b} lists expanded), and what kind of StatsD series each path is."""
from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterator
from typing import Any

from tests.support import ROOT

DASHBOARD = ROOT / "conf" / "grafana-dashboard.json"

# A Graphite path: dot-separated parts, each a word with $variables and * or a {a,b} list.
_PART = r"(?:[\w$*-]+|\{[^{}]*\})+"


PATH = re.compile(rf"\bstats(?:_counts)?(?:\.{_PART})+")


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])


def dashboard_paths() -> list[str]:
    paths = []
    for panel in panels(dashboard()):
        for target in panel.get("targets", []):
            found = PATH.findall(target["target"])
            assert found, f"panel {panel['title']!r}: no metric path in {target['target']!r}"
            paths.extend(found)
    return paths


def expand(path: str) -> list[str]:
    """Graphite's {a,b} lists expanded: one path per combination."""
    parts = re.split(r"(\{[^{}]*\})", path)
    choices = [p[1:-1].split(",") if p.startswith("{") else [p] for p in parts]
    return ["".join(combo) for combo in itertools.product(*choices)]


def classify(path: str) -> tuple[str, list[str]]:
    """(kind, the parts after the namespace) of a legacy-namespace StatsD path in Graphite."""
    parts = path.split(".")
    if parts[0] == "stats_counts":
        return "counter", parts[1:]
    if parts[1] == "timers":
        return "timer", parts[2:]
    if parts[1] == "gauges":
        return "gauge", parts[2:]
    return "counter", parts[1:]
