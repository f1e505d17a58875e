"""The start-up checks (engine.startcheck) next to a running engine: `check-config` (which
`systemctl reload` runs first) passes while the engine holds its own endpoints, and still
refuses an endpoint another process holds; a second `mailengine run` of the same config is
refused with a line per endpoint in use, and the running engine is left alone (before, the
second one removed the first one's ipc paths and bound its own in their place)."""
from __future__ import annotations

import socket
from collections.abc import Callable

import pytest

from engine.testing.harness import LocalEngine
from engine.testing.sink import SinkServer
from tests.support.cli import mailengine


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
