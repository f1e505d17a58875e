"""engine.events.EventPublisher.reopen: after logrotate renamed the events log, the events
go on in a new file at the configured path; none lost, none twice (no sockets: the log
alone). The whole engine on SIGUSR1: tests/engine/test_events_log_reopen.py."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from engine.events import EventPublisher, rejected


def lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def ids(path: Path) -> list[str]:
    return [line.split('"id":"')[1].split('"')[0] for line in lines(path)]


def publish(publisher: EventPublisher, *job_ids: str) -> None:
    for job_id in job_ids:
        publisher.publish(rejected(job_id, None, "test"))


def test_after_a_rename_the_next_events_go_to_a_new_file_at_the_path(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "events.jsonl"
    publisher = EventPublisher(None, str(path))
    caplog.set_level(logging.INFO, "mailengine.events")
    try:
        publish(publisher, "a", "b")
        os.rename(path, tmp_path / "events.jsonl.1")
        publish(publisher, "c")  # between the rename and the signal: the renamed file
        publisher.reopen()
        assert path.exists()
        publish(publisher, "d", "e")
        publisher.flush()
    finally:
        publisher.close()
    assert ids(tmp_path / "events.jsonl.1") == ["a", "b", "c"]
    assert ids(path) == ["d", "e"]
    assert [r.getMessage() for r in caplog.records] == [
        f"event=events_log_reopened path={path}"]


def test_a_path_that_cannot_be_opened_keeps_the_old_file(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Regression guard: closing the old file first would lose every event until the next
    signal. (A folder where the file should be: refused even to root.)"""
    path = tmp_path / "events.jsonl"
    publisher = EventPublisher(None, str(path))
    caplog.set_level(logging.INFO, "mailengine.events")
    try:
        publish(publisher, "a")
        os.rename(path, tmp_path / "events.jsonl.1")
        path.mkdir()
        publisher.reopen()
        publish(publisher, "b")
        path.rmdir()
        publisher.reopen()
        publish(publisher, "c")
    finally:
        publisher.close()
    assert ids(tmp_path / "events.jsonl.1") == ["a", "b"]
    assert ids(path) == ["c"]
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0].startswith(f"event=events_log_reopen_failed path={path} error=")
    assert "Is a directory" in messages[0]
    assert messages[1] == f"event=events_log_reopened path={path}"
    assert caplog.records[0].levelno == logging.ERROR


def test_a_signal_without_a_rename_goes_on_in_the_same_file(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    publisher = EventPublisher(None, str(path))
    try:
        publish(publisher, "a")
        publisher.reopen()
        publish(publisher, "b")
    finally:
        publisher.close()
    assert ids(path) == ["a", "b"]


def test_without_a_log_there_is_nothing_to_reopen(caplog: pytest.LogCaptureFixture) -> None:
    publisher = EventPublisher(None, "")
    caplog.set_level(logging.INFO, "mailengine.events")
    publisher.reopen()
    publish(publisher, "a")
    assert caplog.records == []
