"""conf/grafana-dashboard.json as the tests read it: its panels, the Graphite paths its
queries name ({a,b} lists expanded), and what kind of StatsD series each path is; and the
alert rules of conf/grafana-alerts.yaml and their queries."""
from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterator
from typing import Any

import yaml

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


# --------------------------------------------------------------------------------------------
# Whole queries, and the alert rules (conf/grafana-alerts.yaml)

ALERTS = ROOT / "conf" / "grafana-alerts.yaml"
ALERTS_PREFIX = ".mailengine."  # what docs/MONITORING.md's sed replaces with another prefix


def dashboard_targets() -> list[tuple[str, str]]:
    """(panel title, Graphite query) of every query of the dashboard."""
    return [(panel["title"], target["target"]) for panel in panels(dashboard())
            for target in panel.get("targets", [])]


def interpolate(query: str, values: dict[str, str]) -> str:
    """Grafana's template variables of a query replaced, longest name first."""
    for name in sorted(values, key=len, reverse=True):
        query = query.replace(f"${name}", values[name])
    return query


def alert_rules() -> list[dict[str, Any]]:
    provisioning = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    return [rule for group in provisioning["groups"] for rule in group["rules"]]


def alert_query(rule: dict[str, Any], prefix: str = "mailengine") -> tuple[str, dict[str, Any]]:
    """(the Graphite query, its data entry) of a rule, for statsd.prefix `prefix` (the
    substitution docs/MONITORING.md gives)."""
    graphite = [d for d in rule["data"] if d["datasourceUid"] != "__expr__"]
    assert len(graphite) == 1, rule["uid"]
    target = graphite[0]["model"]["target"]
    return target.replace(ALERTS_PREFIX, f".{prefix}."), graphite[0]


def glob_regex(path: str) -> re.Pattern[str]:
    """A Graphite path glob (`*` within one node, after {a,b} lists are expanded)."""
    return re.compile("".join("[^.]*" if c == "*" else re.escape(c) for c in path) + "$")
