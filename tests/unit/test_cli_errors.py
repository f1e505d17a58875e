"""Every bad endpoint, file or option of `mailengine` is one line naming it and exit status 2,
never a traceback: each through the real command (a subprocess). Also what `--help` lists,
and durations written as the config writes them."""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from tests.support.cli import mailengine
from tests.support.standin_engine import StandinEngine

pytestmark = pytest.mark.timeout(40)  # each command runs as a subprocess, a fresh interpreter


def one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    """The single line a refused command says; fails on anything more (a traceback, usage)."""
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


@pytest.fixture
def message(tmp_path: Path) -> Path:
    path = tmp_path / "m.eml"
    path.write_text("From: <s@example.test>\r\nTo: <r@example.test>\r\nSubject: x\r\n\r\nx\r\n")
    return path


@pytest.mark.parametrize(("args", "line"), [
    (("status", "--control", "foo"),
     "mailengine status: --control foo: not an endpoint to connect to (Invalid argument;"
     " give tcp://HOST:PORT or ipc:///PATH)"),
    (("status", "--control", "tcp://127.0.0.1:99999"),
     "mailengine status: --control tcp://127.0.0.1:99999: not tcp://HOST:PORT"),
    (("status", "--control", "ipc:///tmp/x", "--timeout", "soon"),
     "mailengine status: argument --timeout: not a duration: 'soon' (use seconds, or a number"
     " with a unit ms, s, m, h or d, e.g. \"30s\") (see mailengine status --help)"),
], ids=["status-control", "status-port", "status-timeout"])
def test_status_refuses_in_one_line(args: tuple[str, ...], line: str) -> None:
    assert one_line_error(mailengine(*args, timeout=20)) == line


@pytest.mark.parametrize(("args", "line"), [
    (("--ingest", "foo"), "mailengine push: --ingest foo: not an endpoint to connect to"
                          " (give tcp://HOST:PORT or ipc:///PATH)"),
    (("--ingest", "tcp://127.0.0.1:8", "--ingest", "tcp://127.0.0.1:9", "--events",
      "tcp://127.0.0.1:7"),
     "mailengine push: 2 ingest and 1 events endpoints: with several hosts, give --ingest"
     " and --events once per host, in the same order"),
    (("--ingest", "tcp://127.0.0.1:9", "--ingest", "tcp://127.0.0.1:9", "--events",
      "tcp://127.0.0.1:7", "--events", "tcp://127.0.0.1:6"),
     "mailengine push: --ingest tcp://127.0.0.1:9: given twice"),
    (("--ingest", "tcp://127.0.0.1:8", "--ingest", "tcp://127.0.0.1:9", "--events",
      "tcp://127.0.0.1:7", "--events", "inproc://x"),
     "mailengine push: --events inproc://x: not an endpoint to connect to"
     " (give tcp://HOST:PORT or ipc:///PATH)"),
    (("--ingest", "tcp://127.0.0.1:8", "--ingest", "tcp://127.0.0.1:9", "--events",
      "tcp://127.0.0.1:7", "--events", "tcp://127.0.0.1:6", "--curve-client-key", "c.key_secret",
      *("--curve-server-key", "k.key") * 3),
     "mailengine push: 3 --curve-server-key for 2 hosts: give one for all, or one per --ingest"
     " in its order"),
    (("--events", "tcp://nohost"), "mailengine push: --events tcp://nohost: not tcp://HOST:PORT"),
    (("--meta", "{bad"), "mailengine push: --meta: not JSON (Expecting property name enclosed"
                         " in double quotes: line 1 column 2 (char 1))"),
    (("--meta", "[1]"), "mailengine push: --meta: must be a JSON object, like"
                        " '{\"campaign\": \"spring\"}'"),
    (("--expires", "0"), "mailengine push: argument --expires: must be more than 0 seconds"
                         " (got '0') (see mailengine push --help)"),
    (("--timeout", "5 minutes"), "mailengine push: argument --timeout: not a duration:"
                                 " '5 minutes' (use seconds, or a number with a unit ms, s, m,"
                                 " h or d, e.g. \"30s\") (see mailengine push --help)"),
    (("--bogus",), "mailengine: unrecognized arguments: --bogus (see mailengine --help)"),
], ids=["ingest", "hosts-events", "hosts-twice", "hosts-scheme", "hosts-keys", "events",
        "meta-json", "meta-object", "expires", "timeout", "unknown"])
def test_push_refuses_a_bad_option_in_one_line(args: tuple[str, ...], line: str,
                                               message: Path) -> None:
    first = () if args[0] == "--ingest" else ("--ingest", "tcp://127.0.0.1:9")
    done = mailengine("push", *first, *args, str(message), timeout=20)
    assert one_line_error(done) == line


def test_push_refuses_a_missing_file_and_a_bad_line_before_sending_anything(
        tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.eml"
    assert one_line_error(mailengine("push", str(missing), timeout=20)) == (
        f"mailengine push: {missing}: No such file or directory")

    jobs = tmp_path / "jobs.jsonl"
    good = {"from": "s@example.test", "to": ["r@example.test"], "message": "x"}
    jobs.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n{not json\n")
    with StandinEngine() as engine:
        done = mailengine("push", "--ingest", engine.ingest, "--events", engine.events,
                          str(jobs), timeout=20)
        assert one_line_error(done).startswith(
            f"mailengine push: {jobs}:3: not a job (Expecting property name")
        assert engine.received == 0  # the two good lines were not sent either


def test_check_config_names_a_missing_config_in_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "none.yaml"
    line = one_line_error(mailengine("check-config", "-c", str(missing), timeout=20))
    assert line.startswith("mailengine: ") and str(missing) in line


def test_durations_are_written_as_in_the_config(message: Path) -> None:
    with StandinEngine() as engine:
        done = mailengine("push", "--ingest", engine.ingest, "--events", engine.events,
                          "--expires", "5m", "--resend", "500ms", "--timeout", "1m", "-q",
                          str(message), timeout=30)
        assert done.returncode == 0, done.stderr
        assert engine.envelopes[0]["expires"] == 300.0


def test_help_describes_every_command_and_hides_the_internal_one() -> None:
    listed = mailengine("--help", timeout=20)
    assert listed.returncode == 0
    commands = [line.split()[0] for line in listed.stdout.splitlines()
                if line.startswith("    ") and not line.startswith("      ")]
    assert commands == ["run", "check-config", "push", "spool", "status", "queue", "keygen",
                        "dkim",
                        "demo"]
    assert not re.search(r"\bworker\b", listed.stdout) and "SUPPRESS" not in listed.stdout
    for command in commands:
        own = mailengine(command, "--help", timeout=20)
        assert own.returncode == 0
        _, _, rest = own.stdout.partition("\n\n")
        description = rest.partition("\n\n")[0]
        assert not description.startswith(("positional arguments", "options")), \
            f"`mailengine {command}` has no description"
    # Hidden, not gone: bin/mailengine-worker's way in still answers.
    worker = mailengine("worker", "--help", timeout=20)
    assert worker.returncode == 0 and "mailengine worker" in worker.stdout


def test_the_cluster_views_refuse_in_one_line(tmp_path: Path) -> None:
    alone = tmp_path / "alone.yaml"
    alone.write_text("ips: [{address: 127.0.0.2}]\n")
    listed = tmp_path / "listed.yaml"
    listed.write_text("ips: [{address: 127.0.0.2}]\ncluster:\n  hosts:\n"
                      "    - {name: mta-b, control: 'tcp://127.0.0.1:5572',"
                      " curve_server_key: /nowhere/mta-b.key}\n")
    for args, line in (
            (("status", "--cluster", "-c", str(alone)),
             "mailengine status: --cluster: the config lists no cluster.hosts (each host's"
             " name and control endpoint; docs/SCALING.md)"),
            (("status", "--cluster", "-c", str(listed), "--control", "ipc:///x"),
             "mailengine status: --cluster asks the hosts of cluster.hosts; --control names"
             " one engine: give one of them"),
            (("status", "--cluster", "-c", str(listed), "--curve-server-key", "k.key"),
             "mailengine status: --cluster takes each host's key from its curve_server_key in"
             " cluster.hosts, not --curve-server-key"),
            (("queue", "--cluster", "-c", str(listed)),
             "mailengine queue: cluster.hosts mta-b speaks CURVE: give --curve-client-key"
             " NAME.key_secret, or set control.curve.client_key"),
            (("queue", "--cluster", "-c", str(alone), "retry", "--domain", "x.test"),
             "mailengine queue: --cluster: the config lists no cluster.hosts (each host's"
             " name and control endpoint; docs/SCALING.md)"),
            (("queue", "--cluster", "-c", str(listed), "show", "some-job"),
             "mailengine queue: --cluster goes with the summary and the commands that change"
             " the queue; `show` asks the job's own host (its -c or --control)"),
            (("queue", "-c", str(listed), "retry", "--cluster", "--provider", "yahoo",
              "--ip", "127.0.0.2"),
             "mailengine queue: --ip names one host's sending IP: run the command on that"
             " host, without --cluster"),
            (("queue", "--cluster", "-c", str(listed), "suspend", "127.0.0.2", "yahoo"),
             "mailengine queue: --cluster suspends or resumes PROVIDER at every sending IP of"
             " every host: give the provider alone (an IP is one host's: run the command on"
             " that host)")):
        assert one_line_error(mailengine(*args, timeout=20)) == line
