"""The shipped monitoring files, read statically against engine/metrics.py's table: the Grafana
dashboard counts name parts from the end (any statsd.prefix), the alert rules are well-formed
Grafana provisioning that read declared series, the StatsD daemon's config has every percentile
they read, and the statsd_exporter mapping maps every name the engine emits. What the queries
find in a real Graphite is tests/engine/test_dashboard.py.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from engine import metrics
from engine.metrics import DECLARED, KINDS
from tests.support import ROOT
from tests.support.dashboard import (
    ALERTS_PREFIX,
    PATH,
    alert_query,
    alert_rules,
    classify,
    dashboard_targets,
    expand,
    panels,
)

STATSD_CONFIG = ROOT / "conf" / "statsd-config.js"
EXPORTER = ROOT / "conf" / "statsd-exporter-mapping.yaml"
MONITORING_DOC = ROOT / "docs" / "MONITORING.md"


# --------------------------------------------------------------------------------------------
# Graphite queries, parsed: function calls, paths, numbers, strings

_TOKEN = re.compile(r"""\s*(?:(?P<str>'[^']*'|"[^"]*")|(?P<num>-?\d+(?:\.\d+)?)(?![\w.])"""
                    r"""|(?P<path>(?:[\w$*.\-]|\{[^{}]*\})+)|(?P<punct>[(),]))""")


def tokens(query: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(query.rstrip()):
        match = _TOKEN.match(query, pos)
        assert match, f"cannot read {query[pos:]!r} in {query!r}"
        kind = match.lastgroup
        assert kind is not None
        out.append((kind, match.group(kind)))
        pos = match.end()
    return out


def parse(query: str) -> Any:
    """A call as (name, [args]); a path as ("path", text); a number, a string as themselves."""
    toks = tokens(query)
    pos = 0

    def expr() -> Any:
        nonlocal pos
        kind, text = toks[pos]
        pos += 1
        if kind == "str":
            return text[1:-1]
        if kind == "num":
            return float(text) if "." in text else int(text)
        assert kind == "path", (query, text)
        if pos < len(toks) and toks[pos] == ("punct", "("):
            pos += 1
            args = []
            while toks[pos] != ("punct", ")"):
                args.append(expr())
                if toks[pos] == ("punct", ","):
                    pos += 1
            pos += 1
            return (text, args)
        return ("path", text)

    tree = expr()
    assert pos == len(toks), f"trailing text in {query!r}"
    return tree


def calls(tree: Any) -> Iterator[tuple[str, list[Any]]]:
    if isinstance(tree, tuple) and tree[0] != "path":
        yield tree
        for arg in tree[1]:
            yield from calls(arg)


# Where a function takes node indexes: the arguments from this position on.
NODE_ARGS = {"aliasByNode": 1, "groupByNodes": 2, "groupByNode": 1, "asPercent": 2}
# Functions whose node positions count from the start only (a dotted prefix shifts them).
FROM_THE_START = {"sumSeriesWithWildcards", "averageSeriesWithWildcards",
                  "aggregateWithWildcards", "multiplySeriesWithWildcards", "substr"}


def all_queries() -> list[tuple[str, str]]:
    out = list(dashboard_targets())
    out += [(f"cluster: {title}", query) for title, query in cluster_targets()]
    out += [(rule["uid"], alert_query(rule)[0]) for rule in alert_rules()]
    return out


def cluster_targets() -> list[tuple[str, str]]:
    from tests.support.cluster_dashboard import CLUSTER_DASHBOARD
    board = json.loads(CLUSTER_DASHBOARD.read_text(encoding="utf-8"))
    return [(panel["title"], target["target"]) for panel in panels(board)
            for target in panel.get("targets", [])]


def test_the_cluster_dashboard_is_the_dashboard_with_a_host_filter():
    """conf/grafana-dashboard-cluster.json is made from conf/grafana-dashboard.json (run
    `python3 -m tests.support.cluster_dashboard` after changing that one)."""
    from tests.support.cluster_dashboard import CLUSTER_DASHBOARD, text
    assert CLUSTER_DASHBOARD.read_text(encoding="utf-8") == text()
    assert len(cluster_targets()) == len(dashboard_targets())
    for _title, query in cluster_targets():
        assert "$prefix.$host." in query, query
        assert query.count("$prefix.") == query.count("$prefix.$host."), query
        if ".supervisor." in query:  # one series per host, named by it (node -4)
            assert "-4" in query, query


def test_the_parser_reads_a_query():
    tree = parse("aliasByNode(groupByNodes(stats.$prefix.{a,b}.x, 'sum', -2), -1)")
    assert tree == ("aliasByNode", [("groupByNodes", [("path", "stats.$prefix.{a,b}.x"), "sum",
                                                      -2]), -1])


@pytest.mark.parametrize(("where", "query"), all_queries())
def test_every_query_counts_name_parts_from_the_end(where, query):
    """A node index from the start names a part of a one-part prefix: with `mail.outbound`
    it names another part (issue #15). Negative indexes count from the end, where the IP,
    provider, metric and timer statistic always are."""
    for name, args in calls(parse(query)):
        assert name not in FROM_THE_START, f"{where}: {name} counts nodes from the start"
        if name in NODE_ARGS:
            nodes = args[NODE_ARGS[name]:]
            assert all(isinstance(n, int) and n < 0 for n in nodes), f"{where}: {name}{nodes}"


def test_the_dashboard_prefix_is_a_text_variable_defaulting_to_the_engines():
    from tests.support.dashboard import dashboard
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert variables["prefix"]["type"] == "textbox"
    assert variables["prefix"]["query"] == "mailengine"
    from engine.config import schema
    assert schema.StatsdConfig().prefix == "mailengine"


# --------------------------------------------------------------------------------------------
# The alert rules


def test_alert_rules_are_grafana_provisioning_of_the_four_rules():
    provisioning = yaml.safe_load((ROOT / "conf" / "grafana-alerts.yaml").read_text())
    assert provisioning["apiVersion"] == 1
    rules = alert_rules()
    uids = [rule["uid"] for rule in rules]
    assert uids == ["mailengine-spool-growth", "mailengine-oldest-queued-age",
                    "mailengine-deferral-ratio", "mailengine-worker-restarts"]
    for rule in rules:
        refs = {d["refId"]: d for d in rule["data"]}
        assert len(refs) == len(rule["data"]), rule["uid"]
        query, data = alert_query(rule)
        assert data["datasourceUid"] == "graphite" and data["model"]["refId"] == data["refId"]
        assert data["relativeTimeRange"]["from"] > data["relativeTimeRange"]["to"] == 0
        condition = refs[rule["condition"]]["model"]
        assert condition["type"] == "threshold"
        reduction = refs[condition["expression"]]["model"]
        assert reduction["type"] == "reduce" and reduction["expression"] == data["refId"]
        assert reduction["reducer"] in ("last", "min", "max", "sum", "mean")
        assert rule["noDataState"] in ("OK", "NoData", "Alerting")
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["uid"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        # No dashboard variable (alert rules have none); the prefix is the one sed replaces.
        assert "$" not in query, rule["uid"]
        assert all(ALERTS_PREFIX in path for path in PATH.findall(query)), rule["uid"]


def test_every_metric_the_alert_rules_read_is_declared_with_its_kind():
    read = set()
    for rule in alert_rules():
        query, _data = alert_query(rule, "$prefix")
        for path in PATH.findall(query):
            for one in expand(path):
                kind, (prefix, _ip, _provider, metric, *_rest) = classify(one)
                assert prefix == "$prefix" and KINDS.get(metric) == kind, (rule["uid"], one)
                read.add(metric)
    assert read == {"spool_depth", "oldest_queued_age", "delivered", "deferred", "bounced",
                    "worker_restarts"}


# --------------------------------------------------------------------------------------------
# The StatsD daemon's config


def test_the_statsd_config_has_every_percentile_the_queries_read():
    text = STATSD_CONFIG.read_text(encoding="utf-8")
    listed = re.search(r"^\s*percentThreshold:\s*\[([\d,\s]+)\]", text, re.MULTILINE)
    assert listed, "percentThreshold not found"
    percentiles = {int(p) for p in listed.group(1).split(",")}
    read = {int(p) for _where, query in all_queries()
            for p in re.findall(r"\.(?:upper|mean|sum)_(\d+)\b", query)}
    assert read and read <= percentiles, read - percentiles
    assert re.search(r"legacyNamespace:\s*true", text)
    assert re.search(r"^\s*deleteGauges:\s*false", text, re.MULTILINE)  # quiet gauges kept
    assert re.search(r'^\s*address:\s*"127\.0\.0\.1"', text, re.MULTILINE)
    assert re.search(r'^\s*mgmt_address:\s*"127\.0\.0\.1"', text, re.MULTILINE)


# --------------------------------------------------------------------------------------------
# The statsd_exporter mapping


def mappings(prefix: str = "mailengine") -> list[dict[str, Any]]:
    """The mapping file, with the prefix changed the way its header says."""
    text = EXPORTER.read_text(encoding="utf-8")
    text = re.sub(r'^(  - match: ")mailengine\.', lambda m: f"{m.group(1)}{prefix}.", text,
                  flags=re.MULTILINE)
    loaded = yaml.safe_load(text)
    assert loaded["defaults"]["match_type"] == "glob"
    return list(loaded["mappings"])


def exporter_map(name: str, rules: list[dict[str, Any]]) -> tuple[str, dict[str, str]] | None:
    """What statsd_exporter makes of a StatsD name: the first glob mapping that matches
    (`*` is one whole dot-separated part), its `$n` references filled in."""
    for rule in rules:
        pattern = "^" + r"\.".join("([^.]+)" if part == "*" else re.escape(part)
                                   for part in rule["match"].split(".")) + "$"
        found = re.match(pattern, name)
        if found:
            def fill(value: str, found: re.Match[str] = found) -> str:
                return re.sub(r"\$\{?(\d+)\}?", lambda m: found.group(int(m.group(1))), value)
            return fill(rule["name"]), {k: fill(v) for k, v in rule.get("labels", {}).items()}
    return None


def examples(metric: metrics.Metric, prefix: str) -> list[tuple[str, dict[str, str]]]:
    """The engine's names of `metric` for a worker of 127.0.0.2 sending to google and the
    supervisor, with the labels each must get."""
    ip = metrics.ip_segment("127.0.0.2")
    scope = metric.scope
    if scope == metrics.PER_PROVIDER:
        return [(f"{prefix}.{ip}.google.{metric.name}", {"ip": ip, "provider": "google"})]
    if scope == metrics.PER_IP:
        return [(f"{prefix}.{ip}.all.{metric.name}", {"ip": ip})]
    if scope == metrics.SUPERVISOR:
        return [(f"{prefix}.supervisor.all.{metric.name}", {})]
    if scope == metrics.PER_CATEGORY:
        return [(f"{prefix}.supervisor.bad-mailbox.{metric.name}", {"category": "bad-mailbox"})]
    return [(f"{prefix}.{ip}.all.{metric.name}", {"process": ip}),
            (f"{prefix}.supervisor.all.{metric.name}", {"process": "supervisor"})]


PROM_SUFFIX = {"timer": "_seconds", "counter": "_total"}
UNIT_SUFFIX = {"bytes": "_bytes", "seconds": "_seconds"}


@pytest.mark.parametrize("prefix", ["mailengine", "mail.outbound"])
def test_the_exporter_mapping_maps_every_name_the_engine_emits(prefix):
    rules = mappings(prefix)
    for metric in DECLARED:
        suffix = PROM_SUFFIX.get(metric.kind) or UNIT_SUFFIX.get(metric.units, "")
        for name, labels in examples(metric, prefix):
            mapped = exporter_map(name, rules)
            assert mapped == (f"mailengine_{metric.name}{suffix}", labels), (name, mapped)
    # A name of another program under the prefix, or of another prefix, is left alone.
    assert exporter_map(f"{prefix}.127_0_0_2.google.no_such_metric", rules) is None
    assert exporter_map("other.127_0_0_2.google.delivered", rules) is None


def test_the_exporter_mapping_has_one_rule_per_metric_and_consistent_labels():
    rules = mappings()
    assert [rule["match"].rsplit(".", 1)[1] for rule in rules] == [m.name for m in DECLARED]
    labels_of: dict[str, set[str]] = {}
    for rule in rules:
        assert rule["help"], rule["match"]
        names = set(rule.get("labels", {}))
        assert labels_of.setdefault(rule["name"], names) == names  # Prometheus requires it
        assert re.fullmatch(r"[a-zA-Z_:][a-zA-Z0-9_:]*", rule["name"])
    buckets = yaml.safe_load(EXPORTER.read_text())["defaults"]["histogram_options"]["buckets"]
    assert buckets == sorted(buckets) and buckets[0] <= 0.01 and buckets[-1] >= 3600


# --------------------------------------------------------------------------------------------
# The docs


def test_the_monitoring_doc_explains_every_panel_and_alert_rule():
    doc = MONITORING_DOC.read_text(encoding="utf-8")
    for title in {title for title, _query in dashboard_targets()}:
        assert title in doc, f"panel {title!r} is not in docs/MONITORING.md"
    for rule in alert_rules():
        assert rule["title"] in doc, f"alert rule {rule['title']!r} is not in docs/MONITORING.md"
    for path in ("conf/statsd-config.js", "conf/grafana-alerts.yaml",
                 "conf/statsd-exporter-mapping.yaml", "conf/grafana-dashboard.json",
                 "/usr/share/mailengine/monitoring/"):
        assert path in doc, path
