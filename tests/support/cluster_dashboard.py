"""conf/grafana-dashboard-cluster.json: the dashboard of conf/grafana-dashboard.json for a
cluster of engine hosts (docs/SCALING.md), made from it so the two never drift apart.

Each host of a cluster sends under its own `statsd.prefix`, the cluster's part then the
host's name (`mail.mta-a`, `mail.mta-b`): its supervisor's gauges would overwrite another
host's under one shared prefix. So the host is the name's part right after the cluster's
prefix, and the cluster dashboard is the single-host one with:

- a `host` variable (the names under `stats.gauges.<prefix>`, multi-select with All),
  put in every query after `$prefix`; the `ip` and `provider` variables list the chosen
  hosts' IPs and providers;
- the supervisor's series, one per host, named by their host (node -4, counted from the
  end as every query does): `alias(X, 'queued')` becomes "mta-a queued", and the
  categories' `aliasByNode(X, -2, -1)` takes the host first.

`python3 -m tests.support.cluster_dashboard` writes the file; tests/unit/
test_monitoring_files.py checks that the shipped one is what this makes.
"""
from __future__ import annotations

import copy
import json
import re
import sys
from typing import Any

from tests.support import ROOT
from tests.support.dashboard import dashboard, panels

CLUSTER_DASHBOARD = ROOT / "conf" / "grafana-dashboard-cluster.json"

HOST_VARIABLE: dict[str, Any] = {
    "type": "query",
    "name": "host",
    "label": "host",
    "datasource": {"type": "graphite", "uid": "${datasource}"},
    "query": "stats.gauges.$prefix.*",
    "definition": "stats.gauges.$prefix.*",
    "regex": "",
    "refresh": 2,
    "sort": 1,
    "multi": True,
    "includeAll": True,
    "allValue": "*",
    "current": {"text": "All", "value": "$__all"},
    "hide": 0,
    "options": [],
    "description": "The hosts of the cluster: each host's statsd.prefix is the prefix above"
                   " followed by the host's name (docs/SCALING.md)",
}
PREFIX_DESCRIPTION = ("The part of statsd.prefix every host of the cluster shares, dots"
                      " allowed: each host's own prefix is this followed by its name (e.g."
                      " mail for mail.mta-a, mail.mta-b). Every query counts the other parts"
                      " of a name from its end.")
_ALIAS = re.compile(r"alias\((?P<expr>.*\.supervisor\..*), '(?P<name>[^']*)'\)")
_BY_NODE = re.compile(r"aliasByNode\((?P<expr>[^()]*\.supervisor\.[^()]*?), (?P<nodes>-[-\d, ]+)\)")


def cluster_query(query: str) -> str:
    """A query of the single-host dashboard for a cluster's hosts."""
    query = query.replace("$prefix.", "$prefix.$host.")
    whole = _ALIAS.fullmatch(query)
    if whole:
        return f"aliasSub(aliasByNode({whole['expr']}, -4), '$', ' {whole['name']}')"
    return _BY_NODE.sub(lambda m: f"aliasByNode({m['expr']}, -4, {m['nodes']})", query)


def cluster_board(board: dict[str, Any]) -> dict[str, Any]:
    """The cluster dashboard made from the single-host `board`."""
    out = copy.deepcopy(board)
    out["uid"] = "mailengine-cluster"
    out["title"] = "mailengine cluster"
    out["description"] = ("mailengine delivery on several hosts, each with its own"
                          " statsd.prefix <prefix>.<host>: StatsD -> Graphite (docs/MONITORING.md,"
                          " \"Several hosts\"). Pick hosts with the host variable.")
    variables = out["templating"]["list"]
    for variable in variables:
        if variable["name"] == "prefix":
            variable["description"] = PREFIX_DESCRIPTION
        if variable["type"] == "query":
            for key in ("query", "definition"):
                variable[key] = variable[key].replace("$prefix.", "$prefix.$host.")
    at = next(i for i, v in enumerate(variables) if v["name"] == "prefix") + 1
    variables.insert(at, copy.deepcopy(HOST_VARIABLE))
    for panel in panels(out):
        for target in panel.get("targets", []):
            target["target"] = cluster_query(target["target"])
    return out


def text() -> str:
    """The file's text, formatted as the single-host dashboard is."""
    return json.dumps(cluster_board(dashboard()), indent=2, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    CLUSTER_DASHBOARD.write_text(text(), encoding="utf-8")
    sys.stdout.write(f"wrote {CLUSTER_DASHBOARD}\n")
