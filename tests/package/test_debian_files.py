"""The Debian packaging, read statically: fast checks that keep debian/ true to the engine.

No build, no install: `.ci/debian-test` does that for real. These catch drift between
the unit, the control file, the shipped config and the code (a new dependency in
setup.py, a default path that moved, a log event nobody documented).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import engine
from engine import cli, demo, supervisor
from engine import config as config_mod
from tests.support import ROOT

DEBIAN = ROOT / "debian"
UNIT = DEBIAN / "mailengine.service"

# setup.py's install_requires -> the Debian bookworm package that provides it.
DEBIAN_PACKAGE_OF = {
    "gevent": "python3-gevent",
    "pyzmq": "python3-zmq",
    "dnspython": "python3-dnspython",
    "statsd": "python3-statsd",
    "pyyaml": "python3-yaml",
    "tqdm": "python3-tqdm",
    "cryptography": "python3-cryptography",
    # engine/provider.py reads only the list's data file: Debian has it, not the module
    "publicsuffixlist": "publicsuffix",
}


def unit_entries(section: str) -> list[tuple[str, str]]:
    """(key, value) pairs of one section of the unit, in order; keys may repeat."""
    entries: list[tuple[str, str]] = []
    current = None
    for raw in UNIT.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = line.strip("[]")
        elif current == section:
            key, _, value = line.partition("=")
            entries.append((key.strip(), value.strip()))
    return entries


def service() -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    for key, value in unit_entries("Service"):
        values.setdefault(key, []).append(value)
    return values


def one(key: str) -> str:
    values = service().get(key)
    assert values is not None, f"{key}= missing from {UNIT.name}"
    assert len(values) == 1, f"{key}= given {len(values)} times"
    return values[0]


def control_field(field: str, paragraph: int) -> str:
    """A field of debian/control's `paragraph` (0: source, 1: the binary), folded to one line."""
    text = (DEBIAN / "control").read_text(encoding="utf-8")
    block = text.split("\n\n")[paragraph]
    match = re.search(rf"^{field}:(.*(?:\n[ \t].*)*)", block, re.MULTILINE)
    assert match, f"{field} missing from debian/control"
    return " ".join(match.group(1).split())


def relations(field: str, paragraph: int = 1) -> dict[str, str]:
    """Package name -> its version constraint ("" if none) in a relationship field."""
    out: dict[str, str] = {}
    for item in control_field(field, paragraph).split(","):
        item = item.strip()
        if item:
            name, _, version = item.partition(" ")
            out[name] = version.strip()
    return out


def shipped_config() -> config_mod.Config:
    return config_mod.load(str(ROOT / "conf" / "mailengine.yaml"))


# --- the unit --------------------------------------------------------------------------


def test_unit_runs_the_engine_in_the_foreground_with_the_packaged_config() -> None:
    assert one("ExecStart") == f"/usr/bin/mailengine run -c {config_mod.DEFAULT_PATH}"
    # The supervisor does not fork away, and says when it is up (engine.sdnotify).
    assert one("Type") == "notify"
    assert one("User") == "mailengine"
    assert one("Group") == "mailengine"


def test_unit_watches_the_supervisor_loop_and_hears_only_the_supervisor() -> None:
    """The watchdog: pings come every half of WatchdogSec from a loop that turns every
    TICK, so one step may block for half of it; a minute at least (spool writes with an
    fsync on a busy disk take seconds), and far from the drain (not watched: STOPPING=1)."""
    assert one("NotifyAccess") == "main"  # the workers do not speak for the service
    watchdog = seconds(one("WatchdogSec"))
    assert watchdog / 2 >= max(60.0, 100 * supervisor.TICK)
    assert one("Restart") == "on-failure"  # which a watchdog timeout is
    assert seconds(one("TimeoutStartSec")) >= 300  # the spool's check before READY=1


def seconds(value: str) -> float:
    """A systemd time span of the forms the unit uses: 90, 5s, 2min, 10min."""
    match = re.fullmatch(r"(\d+)(s|min)?", value)
    assert match, f"unexpected time span {value!r}"
    return float(match.group(1)) * (60 if match.group(2) == "min" else 1)


def test_unit_stops_by_draining_the_supervisor_only() -> None:
    # SIGTERM to the supervisor alone: it drains its workers itself.
    assert one("KillMode") == "mixed"
    assert service().get("KillSignal", ["SIGTERM"]) == ["SIGTERM"]
    # systemd's SIGKILL must not cut the drain short.
    assert seconds(one("TimeoutStopSec")) > shipped_config().drain_timeout
    assert one("Restart") == "on-failure"


def test_reload_is_sighup_to_the_supervisor_after_a_config_check() -> None:
    reload = service()["ExecReload"]
    assert reload[-1] == "/bin/kill -HUP $MAINPID"
    assert all("check-config" in cmd for cmd in reload[:-1])


@pytest.mark.parametrize(("key", "value"), [
    ("NoNewPrivileges", "yes"),
    ("ProtectSystem", "strict"),
    ("ProtectHome", "yes"),
    ("PrivateTmp", "yes"),
    ("PrivateDevices", "yes"),
    ("ProtectKernelTunables", "yes"),
    ("ProtectKernelModules", "yes"),
    ("ProtectKernelLogs", "yes"),
    ("ProtectControlGroups", "yes"),
    ("RestrictNamespaces", "yes"),
    ("LockPersonality", "yes"),
    ("MemoryDenyWriteExecute", "yes"),
    ("SystemCallArchitectures", "native"),
    ("CapabilityBoundingSet", ""),
    ("AmbientCapabilities", ""),
    ("LimitNOFILE", "65536"),
])
def test_unit_hardening(key: str, value: str) -> None:
    assert one(key) == value


def test_unit_allows_only_the_address_families_the_engine_uses() -> None:
    assert set(one("RestrictAddressFamilies").split()) == {
        "AF_INET", "AF_INET6", "AF_UNIX", "AF_NETLINK"}


def test_syscall_filter_leaves_libzmq_its_sched_setscheduler() -> None:
    # libzmq sets the scheduling of its I/O threads and aborts the process when the
    # kernel refuses: denying @resources (which holds sched_setscheduler) killed the
    # engine at start under the unit's filter.
    filters = service()["SystemCallFilter"]
    assert filters[0] == "@system-service"
    denied = " ".join(f for f in filters[1:] if f.startswith("~"))
    assert "@resources" not in denied and "sched_setscheduler" not in denied


def test_unit_lets_the_engine_write_where_the_shipped_config_points() -> None:
    cfg = shipped_config()
    writable = one("ReadWritePaths").split()
    assert cfg.spool in writable
    assert str(Path(cfg.events_log).parent) in writable
    # run_dir and the control socket live in the RuntimeDirectory systemd creates.
    run_dir = "/run/" + one("RuntimeDirectory")
    assert cfg.run_dir == run_dir
    assert cfg.control == f"ipc://{run_dir}/control.sock"


def test_unit_file_has_no_unknown_sections() -> None:
    text = UNIT.read_text(encoding="utf-8")
    assert re.findall(r"^\[(\w+)\]", text, re.MULTILINE) == ["Unit", "Service", "Install"]
    assert ("WantedBy", "multi-user.target") in unit_entries("Install")


# --- control, rules, versions ------------------------------------------------------------


def test_depends_on_debians_python_packages_never_pip() -> None:
    depends = relations("Depends")
    for package in DEBIAN_PACKAGE_OF.values():
        assert package in depends
    assert "${python3:Depends}" in depends
    assert "${misc:Depends}" in depends
    assert not [name for name in depends if "pip" in name.split("-")]
    rules = (DEBIAN / "rules").read_text(encoding="utf-8")
    assert "pip " not in rules and "pip3" not in rules


def test_every_requirement_of_setup_py_is_a_debian_dependency() -> None:
    setup = (ROOT / "setup.py").read_text(encoding="utf-8")
    block = re.search(r"install_requires=\[(.*?)\]", setup, re.DOTALL)
    assert block, "install_requires not found in setup.py"
    depends = relations("Depends")
    for requirement in re.findall(r"[\"']([^\"']+)[\"']", block.group(1)):
        name = re.split(r"[<>=!~ \[;]", requirement, maxsplit=1)[0].lower()
        assert name in DEBIAN_PACKAGE_OF, (
            f"setup.py requires {name}: add its Debian package to debian/control and here")
        assert DEBIAN_PACKAGE_OF[name] in depends


def test_build_depends() -> None:
    build = relations("Build-Depends", paragraph=0)
    assert build["debhelper-compat"] == "(= 13)"
    for package in ("dh-python", "python3-all", "python3-setuptools"):
        assert package in build
    assert control_field("Architecture", 1) == "all"


def test_rules_build_with_pybuild_and_skip_tests_that_need_servers() -> None:
    rules = (DEBIAN / "rules").read_text(encoding="utf-8")
    assert re.search(r"dh \$@ --with python3 --buildsystem=pybuild", rules)
    assert re.search(r"PYBUILD_DISABLE\s*=\s*test", rules)
    assert (DEBIAN / "rules").stat().st_mode & 0o111


def test_rules_put_the_executables_beside_the_engine_and_link_the_command() -> None:
    rules = (DEBIAN / "rules").read_text(encoding="utf-8")
    install_dir = re.search(r"PYBUILD_INSTALL_DIR\s*=\s*(\S+)", rules)
    assert install_dir
    assert re.search(rf"BIN = debian/mailengine{re.escape(install_dir.group(1))}/bin\b", rules)
    assert "for exe in mailengine mailengine-worker" in rules
    links = (DEBIAN / "mailengine.links").read_text(encoding="utf-8").split()
    assert links == [f"{install_dir.group(1).lstrip('/')}/bin/mailengine", "usr/bin/mailengine"]


@pytest.mark.timeout(60)
def test_installed_layout_runs_the_command_and_finds_the_worker(tmp_path: Path) -> None:
    """The layout the package installs (/usr/share/mailengine/{engine,bin}, /usr/bin a
    symlink), rebuilt in a folder: the command runs from the symlink with no PYTHONPATH,
    and the supervisor finds the worker's entry beside the engine."""
    share = tmp_path / "share" / "mailengine"
    shutil.copytree(ROOT / "engine", share / "engine",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "bin", share / "bin")
    (tmp_path / "usr-bin").mkdir()
    (tmp_path / "usr-bin" / "mailengine").symlink_to(share / "bin" / "mailengine")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    version = subprocess.run([sys.executable, str(tmp_path / "usr-bin" / "mailengine"),
                              "--version"], env=env, cwd=tmp_path, capture_output=True,
                             text=True, timeout=30)
    assert version.stdout.strip() == f"mailengine {engine.__version__}", version.stderr
    found = subprocess.run([sys.executable, "-c", "import engine.workers as w;"
                            " print(w.__file__); print(w.worker_entry())"],
                           env={**env, "PYTHONPATH": str(share)}, cwd=tmp_path,
                           capture_output=True, text=True, timeout=30)
    assert found.stdout.split() == [str(share / "engine" / "workers.py"),
                                    str(share / "bin" / "mailengine-worker")], found.stderr


def test_package_version_is_the_engines() -> None:
    first = (DEBIAN / "changelog").read_text(encoding="utf-8").splitlines()[0]
    match = re.match(r"mailengine \(([^)]+)\)", first)
    assert match
    setup_version = re.search(r'version="([^"]+)"', (ROOT / "setup.py").read_text("utf-8"))
    assert setup_version
    # A native package: the Debian version is the engine's version.
    assert (DEBIAN / "source" / "format").read_text(encoding="utf-8").strip() == "3.0 (native)"
    assert match.group(1) == engine.__version__ == setup_version.group(1)


def test_copyright_is_machine_readable_mit() -> None:
    text = (DEBIAN / "copyright").read_text(encoding="utf-8")
    assert text.startswith("Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/")
    assert "License: MIT" in text


def test_what_the_demo_needs_is_suggested_and_its_message_names_the_package(
        tmp_path: Path) -> None:
    """`mailengine demo` from the .deb told the user to `pip install aiosmtpd`, which
    Debian's python3 refuses (PEP 668)."""
    suggests = relations("Suggests")
    testing = ROOT / "engine" / "testing"
    assert "from aiosmtpd" in (testing / "sink_session.py").read_text(encoding="utf-8")
    assert "python3-aiosmtpd" in suggests
    assert "import trustme" in (testing / "tlscert.py").read_text(encoding="utf-8")
    assert "python3-trustme" in suggests
    (tmp_path / "EXTERNALLY-MANAGED").touch()  # what Debian's python3 has beside its stdlib
    command = demo.install_aiosmtpd(prefix="/usr", base_prefix="/usr", stdlib=str(tmp_path))
    assert command == "sudo apt install python3-aiosmtpd python3-trustme"


def test_autopkgtest_runs_the_delivery_smoke_test_with_only_what_the_demo_needs() -> None:
    """debian/tests: `mailengine demo` on the installed package; the test adds nothing to
    the testbed but the package and what it Suggests for the demo."""
    tests = DEBIAN / "tests"
    stanzas = [dict(re.findall(r"^(\S+):\s*((?:.*)(?:\n[ \t]+.*)*)", block, re.MULTILINE))
               for block in (tests / "control").read_text(encoding="utf-8").split("\n\n")]
    (smoke,) = [s for s in stanzas if s.get("Tests") == "smoke"]
    depends = {d.strip() for d in smoke["Depends"].split(",") if d.strip()}
    assert depends == {"mailengine"} | set(relations("Suggests"))
    assert "needs-root" not in smoke.get("Restrictions", "")
    script = tests / "smoke"
    assert script.stat().st_mode & 0o111
    subprocess.run(["sh", "-n", str(script)], check=True, timeout=10)
    text = script.read_text(encoding="utf-8")
    assert "mailengine demo" in text
    assert not re.search(r"\b(apt-get|apt|pip3?) install\b", text)
    # and .ci/debian-test runs it against the .deb it built
    assert 'autopkgtest "$DEB" "$SRC" -- null' in (ROOT / ".ci" / "debian-test").read_text(
        encoding="utf-8")


# --- config, logs, users -----------------------------------------------------------------


def installed() -> list[tuple[str, str]]:
    """(source in the repo, destination folder) of each line of debian/mailengine.install."""
    lines = (DEBIAN / "mailengine.install").read_text(encoding="utf-8").splitlines()
    pairs = [tuple(line.split()) for line in lines if line.strip()]
    assert all(len(pair) == 2 for pair in pairs), pairs
    return [(source, dest) for source, dest in pairs]


def test_shipped_config_becomes_the_conffile_the_engine_reads() -> None:
    assert [pair for pair in installed() if pair[1].startswith("etc/")] == [
        ("conf/mailengine.yaml", "etc/mailengine/")]
    assert config_mod.DEFAULT_PATH == "/etc/mailengine/mailengine.yaml"


MONITORING_FILES = ("conf/grafana-dashboard.json", "conf/grafana-dashboard-cluster.json",
                    "conf/grafana-alerts.yaml",
                    "conf/statsd-config.js", "conf/statsd-exporter-mapping.yaml")


def test_dashboard_alert_rules_and_statsd_configs_are_installed_under_usr_share() -> None:
    """docs/MONITORING.md points operators at /usr/share/mailengine/monitoring/."""
    monitoring = [source for source, dest in installed()
                  if dest == "usr/share/mailengine/monitoring/"]
    assert sorted(monitoring) == sorted(MONITORING_FILES)
    for source in MONITORING_FILES:
        assert (ROOT / source).is_file(), source
    for source, _dest in installed():
        assert list(ROOT.glob(source)), f"{source} matches no file"
    docs = (ROOT / "docs" / "MONITORING.md").read_text(encoding="utf-8")
    for source in MONITORING_FILES:
        assert f"/usr/share/mailengine/monitoring/{Path(source).name}" in docs, source


def test_logrotate_renames_the_events_log_and_signals_the_supervisor_to_reopen_it() -> None:
    """Regression (issue #15): copytruncate lost the lines written between its copy and
    its truncation. Renamed, then SIGUSR1 to the supervisor alone (the one process that acts
    on it); the renamed file is compressed only
    at the next rotation, the lines written before the signal are in it."""
    text = (DEBIAN / "mailengine.logrotate").read_text(encoding="utf-8")
    assert f"{shipped_config().events_log} {{" in text
    words = {line.strip() for line in text.splitlines() if not line.strip().startswith("#")}
    for directive in ("daily", "rotate 14", "compress", "delaycompress", "missingok",
                      "notifempty", "postrotate", "endscript"):
        assert directive in words
    assert "copytruncate" not in words
    script = text[text.index("postrotate"):text.index("endscript")]
    commands = "\n".join(line for line in script.splitlines()
                         if not line.strip().startswith("#"))
    assert 'kill -USR1 "$pid"' in commands
    assert "systemctl show --property=MainPID --value mailengine.service" in commands
    assert "systemctl kill" not in commands
    subprocess.run(["sh", "-n", "-c", "\n".join(commands.splitlines()[1:])], check=True,
                   timeout=10)


def test_maintainer_scripts_create_and_purge_the_user_spool_and_logs() -> None:
    postinst = (DEBIAN / "mailengine.postinst").read_text(encoding="utf-8")
    assert "adduser --quiet --system --group --no-create-home" in postinst
    assert "/var/spool/mailengine mailengine mailengine 0750" in postinst
    assert "/var/log/mailengine" in postinst
    # CURVE keys: root writes, the engine's group reads, nobody else lists.
    assert "/etc/mailengine/keys root mailengine 0750" in postinst
    assert "/etc/mailengine/keys/clients root mailengine 0750" in postinst
    postrm = (DEBIAN / "mailengine.postrm").read_text(encoding="utf-8")
    purge = postrm[postrm.index('if [ "$1" = "purge" ]'):]
    for path in ("/var/spool/mailengine", "/var/log/mailengine", "/etc/mailengine"):
        assert path in purge
    assert "deluser" in purge
    for script in (postinst, postrm):
        assert "set -e" in script and "#DEBHELPER#" in script


def test_every_log_event_is_documented_for_operators() -> None:
    names = set()
    for path in (ROOT / "engine").rglob("*.py"):
        names.update(re.findall(r"logs\.kv\(\s*\"(\w+)\"", path.read_text(encoding="utf-8")))
    operations = (ROOT / "docs" / "OPERATIONS.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^\| `(\w+)` \|", operations, re.MULTILINE))
    assert names, "no logs.kv calls found"
    assert sorted(names - documented) == [], "add these to docs/OPERATIONS.md, Log lines"


def test_manual_page_names_every_command() -> None:
    page = (DEBIAN / "mailengine.1").read_text(encoding="utf-8")
    subparsers = next(a for a in cli._parser()._actions
                      if isinstance(a, argparse._SubParsersAction))
    assert subparsers.choices
    for command in subparsers.choices:
        assert f".B {command}" in page, f"debian/mailengine.1 does not describe {command}"


def test_ci_script_is_an_executable_valid_bash_script() -> None:
    script = ROOT / ".ci" / "debian-test"
    assert script.stat().st_mode & 0o111
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=10)
