"""The start-up checks (engine.startcheck) next to a running engine: `check-config` (which
`systemctl reload` runs first) passes while the engine holds its own endpoints, and still
refuses an endpoint another process holds; a second `mailengine run` of the same config is
refused with a line per endpoint in use, and the running engine is left alone (before, the
second one removed the first one's ipc paths and bound its own in their place)."""
from __future__ import annotations

import os
import shutil
import signal
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from engine.testing.harness import LocalEngine
from engine.testing.sink import SinkServer
from engine.testing.tlscert import make_ca_and_cert
from tests.support.cli import mailengine
from tests.support.wait import until


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.timeout(90)
def test_check_config_passes_while_the_engine_holds_its_endpoints_and_a_second_run_is_refused(
        sink: SinkServer, local_engine: Callable[..., LocalEngine]) -> None:
    ingest, events = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    engine = local_engine(sink.port, extra={"ingest": ingest, "events": events})
    assert engine.proc is not None
    checked = mailengine("check-config", "-q", "-c", engine.config_path)
    assert (checked.returncode, checked.stderr) == (0, "")

    second = mailengine("run", "-c", engine.config_path, timeout=30)
    assert second.returncode == 2, second.stderr
    said = [line for line in second.stderr.splitlines() if line.startswith("mailengine: ")]
    in_use = ": in use by another process (another engine?)"
    assert said == [f"mailengine: ingest {ingest}{in_use}",
                    f"mailengine: events {events}{in_use}",
                    f"mailengine: control {engine.config['control']}{in_use}",
                    f"mailengine: run_dir ipc://{engine.sockdir}/results.sock{in_use}"]
    assert engine.status()["pid"] == engine.proc.pid  # the first one still answers

    # A port in the file held by another process is refused even while the engine runs:
    # the engine (found by its pid) does not hold it.
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        taken = f"tcp://127.0.0.1:{other.getsockname()[1]}"
        engine.config["events"] = taken
        engine.write_config()
        checked = mailengine("check-config", "-q", "-c", engine.config_path)
    assert checked.returncode == 2
    assert checked.stderr.splitlines() == [f"mailengine: events {taken}{in_use}"]


@pytest.mark.timeout(60)
def test_a_ca_file_removed_after_the_start_is_named_by_the_restarted_worker(
        sink: SinkServer, local_engine: Callable[..., LocalEngine], tmp_path: Path) -> None:
    """The start checked smtp.ca_file; deleted since, a worker started again (after a crash,
    a reload) used to die on a traceback naming no file, again and again. Now its one error
    line names the file, and it exits 2 (restarted with back-off: the file may come back)."""
    bundle = make_ca_and_cert(tmp_path / "certs")
    ca = tmp_path / "ca.pem"
    shutil.copy(bundle.cafile, ca)
    engine = local_engine(sink.port, extra={"smtp": {"ca_file": str(ca)}})
    worker = engine.status()["workers"]["127.0.0.2"]
    ca.unlink()
    os.kill(worker["pid"], signal.SIGKILL)
    wanted = f"event=worker_start_failed ip=127.0.0.2 error=\"smtp.ca_file {ca}: cannot be read"
    until(lambda: wanted in engine.log_tail(2000), 30, "the restarted worker's error line",
          engine.log_tail)
    until(lambda: "event=worker_exited ip=127.0.0.2 code=2" in engine.log_tail(2000), 30,
          "the supervisor's worker_exited line with status 2", engine.log_tail)
    assert "Traceback" not in engine.log_tail(2000)
