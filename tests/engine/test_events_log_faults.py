"""An events log that cannot be written (issue #14: a full disk under /var/log): the engine
neither stops nor stops delivering; the final events the log missed come back into it from the
spool's outbox once it can be written again. /dev/full, which answers every write with ENOSPC,
stands in for the full disk: the log's path is pointed at it and the engine told to reopen it
(SIGUSR1, as logrotate does)."""
from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from engine.testing.harness import LocalEngine, make_message
from engine.testing.sink import SinkServer
from tests.support.wait import until

Engine = Callable[..., LocalEngine]


def jobs(prefix: str, count: int) -> list[tuple[dict[str, Any], bytes]]:
    return [({"id": f"{prefix}-{i}", "from": "sender@example.org",
              "to": [f"rcpt{i}@example.test"]},
             make_message(i, 2000, "sender@example.org", f"rcpt{i}@example.test"))
            for i in range(count)]


def logged(engine: LocalEngine, text: str) -> bool:
    with open(engine.log_path, encoding="utf-8", errors="replace") as f:
        return text in f.read()


@pytest.mark.timeout(90)
@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_full_events_log_stops_nothing_and_gets_its_final_events_back(
        local_engine: Engine, plain_sink: SinkServer) -> None:
    engine = local_engine(plain_sink.port)
    assert engine.proc is not None
    log_path = Path(engine.events_log)
    os.rename(log_path, str(log_path) + ".1")
    log_path.symlink_to("/dev/full")
    engine.proc.send_signal(signal.SIGUSR1)
    until(lambda: logged(engine, "event=events_log_reopened"), 20, "the reopen",
          engine.log_tail)

    assert engine.push(jobs("full", 20))  # acknowledged over PUB: the log is not needed
    until(lambda: len(plain_sink.messages) == 20, 30, "20 deliveries", engine.log_tail)
    until(lambda: engine.status()["spool"]["jobs"] == 0, 30, "every result recorded",
          engine.log_tail)
    figures = engine.status()
    assert figures["spool"]["events_log_writable"] is False
    assert figures["events"]["delivered"] == 20  # published: the subscribers had them
    assert logged(engine, "event=events_log_unwritable")

    log_path.unlink()  # space again (the path is free: a new file)
    until(lambda: logged(engine, "event=events_log_writable"), 30,
          "the log written again (a housekeeping turn)", engine.log_tail)
    assert logged(engine, "restored=20")
    lines = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert sorted(e["id"] for e in lines if e["event"] == "delivered") == sorted(
        f"full-{i}" for i in range(20))
    assert engine.status()["spool"]["events_log_writable"] is True
    assert engine.stop() == 0
    assert not logged(engine, "Traceback")
