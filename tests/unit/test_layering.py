"""The house's rules: which engine modules may import which (read from the source), and
what importing the supervisor side loads (in a fresh interpreter).

The supervisor never runs delivery code: it must not load smtplib or gevent, whose
monkey-patching belongs to the worker's entry point alone. The SMTP layer knows nothing
of queues, pacing or pools; config is the foundation and depends on nothing of the engine.
docs/ARCHITECTURE.md draws the same picture.
"""
from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT

ENGINE = ROOT / "engine"

SUPERVISOR_SIDE = ("engine.supervisor", "engine.intake", "engine.results", "engine.dispatch",
                   "engine.categories",
                   "engine.workers", "engine.control", "engine.spool", "engine.events",
                   "engine.job", "engine.address", "engine.sockets", "engine.retry",
                   "engine.auth", "engine.curve", "engine.zap", "engine.salvage", "engine.clock",
                   "engine.tlsrpt_store", "engine.tlsrpt_report", "engine.cluster_dedup")
WORKER_SIDE = ("engine.worker", "engine.delivery", "engine.connector", "engine.pool",
               "engine.shaping", "engine.smtp", "engine.mx", "engine.tls", "engine.waiters",
               "engine.mtasts", "engine.tlspolicy", "engine.dane", "engine.cluster_rate",
               "engine.cluster_connections", "engine.gate", "engine.cluster_hourly",
               "engine.cluster_limits", "engine.cluster_lease", "engine.quiet_gauges")
SMTP_LAYER = ("engine.smtp",)

# (modules the rule is about, what they must not import, why)
RULES = [
    (("engine.config",), ("engine",), "config is the foundation: it imports no engine module"),
    (SMTP_LAYER, ("zmq", "engine.spool", "engine.shaping", "engine.pool", "engine.delivery",
                  "engine.worker", "engine.supervisor"),
     "the SMTP layer knows nothing of queues, pacing or pools"),
    (("engine.metrics",), ("engine.delivery", "engine.pool", "engine.smtp", "engine.connector",
                           "engine.shaping", "engine.worker", "gevent"),
     "metrics imports nothing of delivery"),
    (SUPERVISOR_SIDE, (*WORKER_SIDE, "gevent", "smtplib"),
     "the supervisor side never loads delivery code"),
    (WORKER_SIDE, SUPERVISOR_SIDE, "a worker talks to the supervisor only through engine.protocol"),
    (("engine.protocol",), (*WORKER_SIDE, *SUPERVISOR_SIDE, "zmq", "gevent"),
     "the protocol is shared by both sides and depends on neither"),
    (("engine.crash",), ("engine", "zmq", "gevent"),
     "crash points are shared by both sides and depend on nothing"),
    (("engine.cluster",), (*WORKER_SIDE, *SUPERVISOR_SIDE, "zmq", "gevent"),
     "the link to the cluster's Redis is shared by both sides and depends on neither"),
]
# engine.classify, where every reply is judged: what it may import, nothing else of the engine.
CLASSIFY_MAY_IMPORT = ("engine.reply", "engine.protocol", "engine.config", "engine.text")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module `path` imports (`from engine import x` counts as engine.x)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


SOURCES = {module_name(p): p for p in sorted(ENGINE.rglob("*.py"))}


@pytest.mark.parametrize(("subjects", "forbidden", "why"), RULES, ids=[r[2] for r in RULES])
def test_layering(subjects: tuple[str, ...], forbidden: tuple[str, ...], why: str) -> None:
    covered = [name for name in SOURCES if within(name, subjects)]
    assert covered, f"no module matches {subjects}: the rule checks nothing"
    broken = []
    for name in covered:
        for imported in imports_of(SOURCES[name]):
            # A module may import its own package (engine.config.* imports engine.config).
            if within(imported, forbidden) and not within(imported, subjects):
                broken.append(f"{name} imports {imported}")
    assert not broken, f"{why}:\n" + "\n".join(broken)


def test_classify_builds_only_on_replies_the_protocol_and_config() -> None:
    engine_imports = {name for name in imports_of(SOURCES["engine.classify"])
                      if within(name, ("engine",))}
    assert {name for name in engine_imports if not within(name, CLASSIFY_MAY_IMPORT)} == set()


def test_nothing_in_engine_monkey_patches() -> None:
    """bin/mailengine-worker patches first thing; a patch at import inside engine/ would
    patch whatever process imported it (the supervisor, a test, a producer)."""
    patching = [name for name, path in SOURCES.items() if _calls(path, "patch_all")]
    assert patching == []
    entry = ast.parse((ROOT / "bin" / "mailengine-worker").read_text(encoding="utf-8"))
    statements = [ast.unparse(node) for node in entry.body
                  if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant))]
    assert statements[:2] == ["from gevent import monkey", "monkey.patch_all()"]


def _calls(path: Path, function: str) -> bool:
    return any(isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute | ast.Name)
               and getattr(node.func, "attr", getattr(node.func, "id", "")) == function
               for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))))


@pytest.mark.timeout(60)
def test_importing_the_supervisor_loads_neither_smtplib_nor_gevent() -> None:
    probe = ("import sys, engine.supervisor, engine.cli, engine.status, engine.push;"
             " print(sorted(m for m in ('smtplib', 'gevent', 'gevent.monkey', 'engine.smtp',"
             " 'engine.delivery', 'engine.pool', 'engine.shaping') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                         text=True, timeout=50, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


@pytest.mark.timeout(60)
def test_the_engine_runs_without_redis_py_when_no_cluster_is_configured() -> None:
    """redis-py is needed only by a host in a cluster: without it (imports of `redis` fail
    here), every module loads, and a config without `cluster.redis` builds its intake's
    and its shapers' parts as before, never reaching for it."""
    probe = ("import sys; sys.modules['redis'] = None;"
             " import engine.supervisor, engine.intake, engine.worker, engine.shaping;"
             " from engine.config import from_dict; from engine.shaping import Shaping, plan_for;"
             " cfg = from_dict({'ips': ['127.0.0.2'],"
             " 'shaping': {'providers': {'google': {'cluster_rate': 60}}}});"
             " shaper = Shaping(plan_for(cfg, '127.0.0.2')).get('google');"
             " print(shaper.cluster, engine.intake.Cluster(cfg.cluster, 'h').mode)")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                         text=True, timeout=50, check=True)
    assert out.stdout.strip() == "None off", out.stdout + out.stderr


def test_the_architecture_page_names_only_what_exists() -> None:
    """docs/ARCHITECTURE.md follows a job through modules and functions by name: each
    `module.name` and `Class.method` it gives must exist, so the page stays true."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    classes = {node.name: name for name, path in SOURCES.items()
               for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
               if isinstance(node, ast.ClassDef)}
    missing = []
    for dotted in re.findall(r"`([A-Za-z_]+(?:\.[A-Za-z_]+)+)(?:\(\))?`", text):
        first, *rest = dotted.split(".")
        module = _longest_module([first, *rest]) if f"engine.{first}" in SOURCES else None
        if module is not None:
            target, rest = importlib.import_module(module[0]), module[1]
        elif first in classes:
            target = getattr(importlib.import_module(classes[first]), first)
        else:
            continue  # not a name of the engine (a config key, a file)
        for part in rest:
            target = getattr(target, part, None)
        if target is None:
            missing.append(dotted)
    assert missing == []


def _longest_module(parts: list[str]) -> tuple[str, list[str]] | None:
    for i in range(len(parts), 0, -1):
        name = "engine." + ".".join(parts[:i])
        if name in SOURCES:
            return name, parts[i:]
    return None
