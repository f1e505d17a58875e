"""The events log rotated the way debian/mailengine.logrotate does it: the file renamed, then
SIGUSR1 to the supervisor, which goes on in a new file at the configured path. Every event is
in one file or the other, whole, and none twice, also while deliveries are going on.
(copytruncate, the package's old way, lost the lines written between its copy and its
truncation.)"""
from __future__ import annotations

import json
import os
import signal
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine.testing.harness import FINAL, LocalEngine, make_message
from engine.testing.sink import SinkServer
from tests.support.wait import until

Engine = Callable[..., LocalEngine]
BATCH = 100


def jobs(prefix: str, count: int) -> list[tuple[dict[str, Any], bytes]]:
    return [({"id": f"{prefix}-{i}", "from": "sender@example.org",
              "to": [f"rcpt{i}@example.test"]},
             make_message(i, 2000, "sender@example.org", f"rcpt{i}@example.test"))
            for i in range(count)]


def read(path: Path) -> list[dict[str, Any]]:
    """Every line of a log, each a whole JSON object (json.loads fails on a torn one)."""
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    assert text == "" or text.endswith("\n"), f"{path.name} ends in a torn line"
    return [json.loads(line) for line in text.split("\n") if line]


def logged(engine: LocalEngine, event: str) -> int:
    with open(engine.log_path, encoding="utf-8", errors="replace") as f:
        return f.read().count(f"event={event} ")


def finals(events: list[dict[str, Any]]) -> int:
    return sum(1 for e in events if e["event"] in FINAL)


def rotate(engine: LocalEngine, to: Path) -> None:
    """What logrotate does: rename, then SIGUSR1 to the supervisor (the main process)."""
    os.rename(engine.events_log, to)
    reopen(engine)


def reopen(engine: LocalEngine) -> None:
    """SIGUSR1 to the supervisor; back once it logged the reopen."""
    assert engine.proc is not None
    reopened = logged(engine, "events_log_reopened")
    engine.proc.send_signal(signal.SIGUSR1)
    until(lambda: logged(engine, "events_log_reopened") > reopened, 20,
          "event=events_log_reopened in the engine's log", engine.log_tail)


def test_rename_and_sigusr1_move_the_log_to_a_new_file_and_lose_no_event(
        local_engine: Engine, plain_sink: SinkServer) -> None:
    engine = local_engine(plain_sink.port)
    current, rotated = Path(engine.events_log), Path(engine.events_log + ".1")
    assert engine.push(jobs("before", BATCH))
    # Deliveries of the first batch go on while the file is renamed and reopened.
    rotate(engine, rotated)
    assert current.exists()  # the new file, at the configured path, before any new event
    assert engine.push(jobs("after", BATCH))
    until(lambda: finals(read(rotated) + read(current)) >= 2 * BATCH, 60,
          "a final outcome of every job in the two files", engine.log_tail)
    assert engine.stop() == 0

    old, new = read(rotated), read(current)
    every = Counter((e["event"], e["id"]) for e in old + new)
    assert sorted({n for n in every.values()}) == [1]  # none twice
    for prefix in ("before", "after"):
        for i in range(BATCH):
            assert every[("queued", f"{prefix}-{i}")] == 1
            assert every[("delivered", f"{prefix}-{i}")] == 1
    # The rename is the cut: what came before it is in the renamed file, what was
    # pushed after the reopen only in the new one.
    assert {e["id"] for e in old if e["event"] == "queued"} == {f"before-{i}"
                                                                for i in range(BATCH)}
    assert all(e["id"].startswith("before-") for e in old)
    assert {e["id"] for e in new if e["id"].startswith("after-")} == {f"after-{i}"
                                                                       for i in range(BATCH)}
    assert len(plain_sink.messages) == 2 * BATCH


def test_a_new_file_that_cannot_be_opened_leaves_the_events_in_the_renamed_one(
        local_engine: Engine, plain_sink: SinkServer) -> None:
    """A folder where the new file should be (refused even to root): the engine logs
    events_log_reopen_failed and goes on writing to the renamed file; the next signal,
    once the path is free, opens the new one."""
    engine = local_engine(plain_sink.port)
    current, rotated = Path(engine.events_log), Path(engine.events_log + ".1")
    assert engine.proc is not None
    os.rename(current, rotated)
    current.mkdir()
    engine.proc.send_signal(signal.SIGUSR1)
    until(lambda: logged(engine, "events_log_reopen_failed"), 20,
          "event=events_log_reopen_failed", engine.log_tail)
    assert engine.push(jobs("meanwhile", 5))
    until(lambda: finals(read(rotated)) >= 5, 30, "the deliveries in the renamed file",
          engine.log_tail)
    current.rmdir()
    reopen(engine)
    assert engine.push(jobs("then", 5))
    until(lambda: finals(read(current)) >= 5, 30, "the deliveries in the new file",
          engine.log_tail)
    assert engine.stop() == 0
    assert {e["id"] for e in read(current)} == {f"then-{i}" for i in range(5)}


def test_a_sigusr1_that_reaches_the_workers_too_leaves_them_running(
        local_engine: Engine, plain_sink: SinkServer) -> None:
    """`systemctl kill -s USR1` signals every process of the service: the workers ignore it
    (its default action would end them, cutting their transactions short)."""
    engine = local_engine(plain_sink.port)
    worker = engine.status()["workers"]["127.0.0.2"]
    os.kill(worker["pid"], signal.SIGUSR1)
    reopen(engine)  # the supervisor's own SIGUSR1, sent after the worker's, acted on
    assert engine.push(jobs("after", 5))
    until(lambda: finals(read(Path(engine.events_log))) >= 5, 30, "the deliveries",
          engine.log_tail)
    now = engine.status()["workers"]["127.0.0.2"]
    assert (now["pid"], now["restarts"]) == (worker["pid"], 0)
    assert logged(engine, "worker_exited") == 0
