"""engine.startcheck through the real commands: what this host lacks for a config (a CA file
that does not load, a folder the engine cannot write, an endpoint another process listens
on) makes `mailengine check-config` and `mailengine run` say one line naming it and exit 2,
before anything starts. (The sending IPs: tests/unit/test_hostcheck.py; check-config while
the engine itself holds its endpoints: tests/engine/test_startcheck.py.)"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
import zmq

from tests.support.cli import cli_env, mailengine

pytestmark = pytest.mark.timeout(40)  # several subprocesses, each a fresh interpreter


@pytest.fixture
def folder() -> Iterator[Path]:
    """A short path (an ipc path may have 107 bytes at most; pytest's tmp_path is long)."""
    path = Path(tempfile.mkdtemp(prefix="sc-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def write_config(folder: Path, **changes: object) -> str:
    values: dict[str, object] = {
        "hostname": "mta.example.test", "ips": ["127.0.0.2"],
        "spool": str(folder / "spool"), "run_dir": str(folder / "run"),
        "events_log": str(folder / "log" / "events.jsonl"),
        "control": f"ipc://{folder}/run/control.sock",
        "ingest": f"tcp://127.0.0.1:{free_port()}", "events": f"tcp://127.0.0.1:{free_port()}",
        "statsd": {"enabled": False}, **changes}
    path = folder / "mailengine.yaml"
    path.write_text(yaml.safe_dump(values), encoding="utf-8")
    return str(path)


def refused(config: str, line: str) -> None:
    """check-config says `line` alone and exits 2; so does run (after its log line), at once."""
    checked = mailengine("check-config", "-q", "-c", config, timeout=30)
    assert (checked.returncode, checked.stdout) == (2, ""), checked.stderr
    assert checked.stderr.splitlines() == [f"mailengine: {line}"]
    ran = mailengine("run", "-c", config, timeout=30)
    assert ran.returncode == 2, ran.stderr
    assert f"mailengine: {line}" in ran.stderr.splitlines()
    assert "event=start_failed" in ran.stderr and "Traceback" not in ran.stderr
    skipped = mailengine("check-config", "-q", "--no-host-check", "-c", config, timeout=30)
    assert (skipped.returncode, skipped.stderr) == (0, "")


def test_a_good_config_on_a_host_that_has_everything_passes(folder: Path) -> None:
    done = mailengine("check-config", "-q", "-c", write_config(folder), timeout=30)
    assert (done.returncode, done.stderr) == (0, "")
    assert not (folder / "spool").exists()  # nothing created by a check


def test_a_ca_file_that_does_not_exist_is_named(folder: Path) -> None:
    missing = folder / "ca.pem"
    refused(write_config(folder, smtp={"ca_file": str(missing)}),
            f"smtp.ca_file {missing}: cannot be read: No such file or directory")


def test_a_ca_file_that_holds_no_certificate_is_named(folder: Path) -> None:
    junk = folder / "ca.pem"
    junk.write_text("not a certificate\n")
    refused(write_config(folder, smtp={"ca_file": str(junk)}),
            f"smtp.ca_file {junk}: not a file of PEM CA certificates"
            f" (NO_CERTIFICATE_OR_CRL_FOUND)")


@pytest.mark.skipif(not zmq.has("curve"), reason="this libzmq has no CURVE")
def test_a_curve_secret_key_that_does_not_exist_is_named(folder: Path) -> None:
    """check-config loaded the config and passed; only `run` found the key missing."""
    missing = folder / "keys" / "server.key_secret"
    (folder / "keys" / "clients").mkdir(parents=True)
    config = write_config(folder, security={"curve": {
        "enabled": True, "server_secret_key": str(missing),
        "allowed_clients": str(folder / "keys" / "clients")}})
    checked = mailengine("check-config", "-q", "-c", config, timeout=30)
    assert checked.returncode == 2 and "Traceback" not in checked.stderr
    [line] = checked.stderr.splitlines()
    assert line.startswith("mailengine: security.curve.server_secret_key: ")
    assert str(missing) in line


def test_keygen_into_a_folder_it_cannot_use_says_so_in_one_line_and_exits_2(
        folder: Path) -> None:
    blocker = folder / "not-a-folder"
    blocker.write_text("")
    done = mailengine("keygen", "server", "--dir", str(blocker / "keys"), timeout=30)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert len(done.stderr.splitlines()) == 1 and done.stderr.startswith("mailengine keygen: ")


def test_a_spool_that_cannot_be_created_is_named(folder: Path) -> None:
    (folder / "plain").write_text("a file, not a folder\n")
    spool = folder / "plain" / "spool"
    refused(write_config(folder, spool=str(spool)),
            f"spool {spool}: cannot be created: {folder / 'plain'} is not a folder")


def _read_only_run(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`mailengine ARGS` with `folder` read-only: a read-only bind mount in a mount
    namespace of its own as root (root writes through any mode bits), mode 0500 otherwise."""
    command = [sys.executable, "-m", "engine.cli", *args]
    if os.geteuid() != 0:
        folder.chmod(0o500)
        try:
            return subprocess.run(command, env=cli_env(), capture_output=True, text=True,
                                  timeout=30)
        finally:
            folder.chmod(0o700)
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1) to make a read-only mount")
    script = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"'
    done = subprocess.run(["unshare", "-m", "sh", "-c", script, str(folder), *command],
                          env=cli_env(), capture_output=True, text=True, timeout=30)
    if "mount:" in done.stderr or "unshare:" in done.stderr:
        pytest.skip(f"cannot make a read-only mount here: {done.stderr.strip()}")
    return done


@pytest.mark.parametrize("key", ["spool", "run_dir", "events_log"])
def test_a_folder_the_engine_cannot_write_is_named(folder: Path, key: str) -> None:
    target = folder / key
    target.mkdir()
    value = str(target / "events.jsonl") if key == "events_log" else str(target)
    config = write_config(folder, **{key: value},
                          control=f"ipc://{folder}/control.sock")  # not in run_dir
    user = "user root" if os.geteuid() == 0 else f"user {os.environ.get('USER', '')}"
    line = f"mailengine: {key} {target}: not writable by {user}"
    for command in (("check-config", "-q", "-c", config), ("run", "-c", config)):
        done = _read_only_run(target, *command)
        assert done.returncode == 2, done.stderr
        assert line in done.stderr.splitlines()
        assert "Traceback" not in done.stderr


def test_a_tcp_port_another_process_listens_on_is_named(folder: Path) -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        endpoint = f"tcp://127.0.0.1:{other.getsockname()[1]}"
        refused(write_config(folder, events=endpoint),
                f"events {endpoint}: in use by another process (another engine?)")


def test_an_ipc_path_a_process_answers_on_is_named_and_one_left_behind_is_not(
        folder: Path) -> None:
    (folder / "run").mkdir()
    path = folder / "run" / "control.sock"
    config = write_config(folder)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as other:
        other.bind(str(path))
        other.listen()
        refused(config, f"control ipc://{path}: in use by another process (another engine?)")
    assert path.exists()  # closed, not removed: left by a process that died
    done = mailengine("check-config", "-q", "-c", config, timeout=30)
    assert (done.returncode, done.stderr) == (0, "")


def test_an_endpoint_that_cannot_be_bound_is_named(folder: Path) -> None:
    refused(write_config(folder, ingest="tcp://127.0.0.1"),
            "ingest tcp://127.0.0.1: not tcp://HOST:PORT")
    long = "ipc:///tmp/" + "x" * 120
    refused(write_config(folder, control=long),
            f"control {long}: the path is longer than the 107 bytes a Unix socket may have")


@pytest.mark.skipif(not zmq.has("curve"), reason="this libzmq has no CURVE")
@pytest.mark.parametrize("problem", ["secret readable by others", "no operators folder"])
def test_a_control_curve_key_it_cannot_use_is_named(folder: Path, problem: str) -> None:
    """control.curve's files are checked as security.curve's: a secret key others may read
    (ssh's rule), a clients' folder that is not there."""
    from engine import auth
    keys = folder / "keys"
    (keys / "operators").mkdir(parents=True)
    _, secret = auth.keygen("control", str(keys))
    operators = keys / "operators"
    if problem == "secret readable by others":
        os.chmod(secret, 0o644)
        auth.keygen("operator", str(operators))
        line = (f"control.curve.server_secret_key: {secret}: mode 0644 lets others read or"
                f" change the secret key; chmod 600 {secret} (or 640 for a group that must"
                " read it)")
    else:
        operators = keys / "nowhere"
        line = f"control.curve.allowed_clients: {operators}: no such folder"
    refused(write_config(folder, control={
        "endpoint": f"tcp://127.0.0.1:{free_port()}",
        "curve": {"enabled": True, "server_secret_key": secret,
                  "allowed_clients": str(operators)}}), line)


def test_check_config_prints_the_redis_url_without_its_password(folder: Path) -> None:
    """The config printed in full goes to terminals, tickets and CI logs: a cluster's Redis
    password stays out of it (the engine's log lines leave it out too: engine.cluster)."""
    path = write_config(folder, cluster={"redis": "redis://ops:s3cret-pw@127.0.0.1:6390/2"})
    done = mailengine("check-config", "--no-host-check", "-c", path, timeout=30)
    assert done.returncode == 0, done.stderr
    assert "s3cret-pw" not in done.stdout + done.stderr
    assert '"redis": "redis://ops:***@127.0.0.1:6390/2"' in done.stdout
