"""Metrics: declared in one place (engine/metrics.py), documented (docs/METRICS.md), queried
by the dashboard (conf/grafana-dashboard.json) as declared. These tests read the engine's
source (every `metrics.timing/incr/gauge(...)` call), the docs and the dashboard; the
packets on a UDP socket are tests/conversation/test_metrics.py, the real processes' figures
and the StatsD daemon and Graphite they reach tests/engine/test_metrics.py.
"""
from __future__ import annotations

import ast
import collections
import re
from collections.abc import Iterator

import pytest

from engine import metrics
from engine.metrics import DECLARED, KINDS
from engine.protocol import Status
from tests.support import ROOT
from tests.support.dashboard import classify, dashboard, dashboard_paths, expand, panels

ENGINE = ROOT / "engine"
METRICS_DOC = ROOT / "docs" / "METRICS.md"

METHOD_KIND = {"timing": "timer", "incr": "counter", "gauge": "gauge"}
# Call sites whose metric name is not a literal: the expression -> the names it can take.
# (delivery.py counts each recipient's outcome; only the supervisor decides expiry.)
DYNAMIC_NAMES = {"status.value": {s.value for s in Status if s is not Status.EXPIRED},
                 # the supervisor counts refusals per category, by event
                 "_CATEGORY_METRICS[name]": {"bounced_category", "deferred_category",
                                             "expired_category"},
                 # the worker's per-provider gauges, sent at a change (engine.quiet_gauges)
                 "self.names[i]": {"allowed_rate", "suspended"},
                 # the supervisor counts TLS-RPT's sessions per result type
                 "_SESSION_METRICS[result]": {m.name for m in metrics.DECLARED
                                              if m.name.startswith("tlsrpt_")
                                              and not m.name.startswith("tlsrpt_reports")}}
# Declared for traffic shaping, which has not landed yet; docs/METRICS.md says so. When shaping
# emits them, remove them here and the note in the docs.
NOT_EMITTED_YET: set[str] = set()
SUPERVISOR_FILES = {"supervisor.py", "intake.py", "results.py", "dispatch.py", "workers.py",
                    "spoolhealth.py", "outbox.py", "tlsrpt_store.py", "cluster_dedup.py",
                    "control.py"}  # the supervisor process's modules


# --------------------------------------------------------------------------------------------
# The source: every emission is declared, with the right kind and scope


def emission_sites() -> Iterator[tuple[str, int, str, ast.expr, ast.expr | None]]:
    """(file, line, kind, name expression, provider expression) of every emission in engine/."""
    for path in sorted(ENGINE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            method, target = node.func.attr, ast.unparse(node.func.value)
            is_emitter = target.endswith("metrics") or (
                path.name == "metrics.py" and target == "self")
            if method in METHOD_KIND and is_emitter and node.args:
                provider = node.args[1] if len(node.args) > 1 else None
                yield (path.name, node.lineno, METHOD_KIND[method], node.args[0], provider)


def names_of(expr: ast.expr, where: str) -> set[str]:
    if isinstance(expr, ast.Constant) and isinstance(expr.value, str):
        return {expr.value}
    text = ast.unparse(expr)
    assert text in DYNAMIC_NAMES, (f"{where}: metric name {text!r} is not a literal; add it to"
                                   " DYNAMIC_NAMES with the names it can take")
    return DYNAMIC_NAMES[text]


def emitted() -> dict[str, set[str]]:
    """metric -> the files that emit it."""
    found: dict[str, set[str]] = collections.defaultdict(set)
    for file, line, _kind, expr, _provider in emission_sites():
        for metric in names_of(expr, f"{file}:{line}"):
            found[metric].add(file)
    return found


def test_the_source_scan_finds_the_emissions():
    sites = list(emission_sites())
    files = {file for file, *_ in sites}
    assert {"delivery.py", "connector.py", "worker.py", "supervisor.py", "metrics.py"} <= files
    assert len(sites) >= 20


def test_every_metric_the_engine_emits_is_declared_with_its_kind():
    for file, line, kind, expr, _provider in emission_sites():
        for metric in names_of(expr, f"{file}:{line}"):
            where = f"{file}:{line}: {metric!r}"
            assert metric in KINDS, f"{where} is not declared in engine/metrics.py"
            assert KINDS[metric] == kind, f"{where} is a {KINDS[metric]}, sent as a {kind}"


def test_every_emission_uses_the_provider_its_scope_promises():
    scopes = {m.name: m.scope for m in DECLARED}
    for file, line, _kind, expr, provider in emission_sites():
        for metric in names_of(expr, f"{file}:{line}"):
            scope = scopes[metric]
            where = f"{file}:{line}: {metric} ({scope})"
            if file in SUPERVISOR_FILES:
                assert scope in (metrics.SUPERVISOR, metrics.EVERY_PROCESS,
                                 metrics.PER_CATEGORY), where
            elif file != "metrics.py":
                assert scope not in (metrics.SUPERVISOR, metrics.PER_CATEGORY), where
            literal_all = isinstance(provider, ast.Constant) and provider.value == "all"
            assert literal_all == (scope not in (metrics.PER_PROVIDER, metrics.PER_CATEGORY)), \
                where


def test_every_declared_metric_is_emitted_except_those_awaiting_shaping():
    missing = set(KINDS) - set(emitted())
    assert missing <= NOT_EMITTED_YET, f"declared but never emitted: {missing - NOT_EMITTED_YET}"
    assert missing == NOT_EMITTED_YET, (
        f"now emitted: {NOT_EMITTED_YET - missing}; remove them from NOT_EMITTED_YET here and"
        " their 'Not emitted yet' note in docs/METRICS.md")


def test_declarations_are_unique_and_well_formed():
    assert len(KINDS) == len(DECLARED)
    for m in DECLARED:
        assert re.fullmatch(r"[a-z][a-z0-9_]*", m.name), m.name
        assert m.kind in ("timer", "counter", "gauge")
        assert m.scope in metrics.PATTERNS
        assert m.doc and m.units


def test_metric_names_replace_the_dots_of_the_ip_and_the_provider():
    emitter = metrics.Metrics(None, "203.0.113.10")
    assert emitter.name("delivered", "mx.example.com") == "203_0_113_10.mx_example_com.delivered"
    assert metrics.Metrics(None, "2001:db8::1").name("in_flight", "all") == \
        "2001_db8__1.all.in_flight"
    with pytest.raises(KeyError):
        emitter.name("no_such_metric", "all")


# --------------------------------------------------------------------------------------------
# docs/METRICS.md


def documented() -> dict[str, list[str]]:
    """metric -> the cells of its row in the docs' table."""
    rows = {}
    for line in METRICS_DOC.read_text(encoding="utf-8").splitlines():
        match = re.match(r"\| `([a-z0-9_]+)` \|", line)
        if match:
            assert match.group(1) not in rows, f"{match.group(1)} documented twice"
            rows[match.group(1)] = [c.strip() for c in line.strip().strip("|").split("|")]
    return rows


def test_every_declared_metric_is_documented_and_every_documented_one_declared():
    assert set(documented()) == set(KINDS)


def test_the_docs_give_each_metric_its_full_names_kind_and_unit():
    rows = documented()
    for m in DECLARED:
        _name, full, kind, unit, meaning = rows[m.name]
        assert re.findall(r"`([^`]+)`", full) == list(m.patterns), m.name
        assert (kind, unit) == (m.kind, m.units), m.name
        assert meaning


def test_the_docs_say_which_metrics_are_not_emitted_yet():
    rows = documented()
    marked = {metric for metric, cells in rows.items() if "not emitted yet" in cells[-1].lower()}
    assert marked == NOT_EMITTED_YET


# --------------------------------------------------------------------------------------------
# conf/grafana-dashboard.json

TIMER_STATS = re.compile(r"(mean|median|upper|lower|count|count_ps|sum|sum_squares|std)"
                         r"|((mean|upper|sum|sum_squares)_\d+)")


def test_every_metric_the_dashboard_queries_is_declared_with_its_kind_and_scope():
    scopes = {m.name: m.scope for m in DECLARED}
    seen = set()
    for path in dashboard_paths():
        for one in expand(path):
            kind, parts = classify(one)
            prefix, ip, provider, metric, *rest = parts
            where = f"{one} ({kind})"
            assert prefix == "$prefix", where
            assert metric in KINDS, f"{where}: {metric!r} is not declared"
            assert KINDS[metric] == kind, f"{where}: {metric} is a {KINDS[metric]}"
            if kind == "timer":
                assert len(rest) == 1 and TIMER_STATS.fullmatch(rest[0]), where
            else:
                assert not rest, where
            expected = {metrics.PER_PROVIDER: {("$ip", "$provider")},
                        metrics.PER_IP: {("$ip", "all")},
                        metrics.SUPERVISOR: {("supervisor", "all")},
                        metrics.PER_CATEGORY: {("supervisor", "*")},
                        metrics.EVERY_PROCESS: {("$ip", "all"), ("supervisor", "all")}}
            assert (ip, provider) in expected[scopes[metric]], where
            seen.add(metric)
    wanted = {"delivery_time", "delivered", "deferred", "bounced", "connections_reused",
              "connections_opened", "tls_negotiated", "throttled", "allowed_rate", "pool_wait",
              "spool_depth", "memory_rss", "bounced_category"}
    assert wanted <= seen


def test_the_dashboard_has_ip_and_provider_variables_and_the_percentiles():
    board = dashboard()
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert {"datasource", "prefix", "ip", "provider"} <= set(variables)
    assert variables["datasource"]["query"] == "graphite"
    assert variables["ip"]["multi"] and variables["provider"]["multi"]
    for panel in panels(board):
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
    paths = " ".join(dashboard_paths())
    for pct in (50, 95, 99):
        assert f"delivery_time.upper_{pct}" in paths
