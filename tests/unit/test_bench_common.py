"""bench/common.py `write_section`: a benchmark rewriting its section of docs/PERFORMANCE.md
changes that section alone, the separators around it included; `Rows`: a benchmark's runs kept
one per label and drawn into that section, a run recorded (measured, stamped, saved,
printed); `shown_command`: a row's command without the options that only say where its
figures go; `cpu_seconds`: a process's CPU time, every thread, finer than clock ticks."""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bench.common import Rows, cpu_seconds, shown_command, write_section

DOC = """\
# Performance

## One

one's text

---

## Two

two's old text

---

<a id="three"></a>

## Three

three's text
"""


def test_rewriting_a_section_keeps_the_rule_and_anchor_before_the_next(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text(DOC, encoding="utf-8")
    write_section(str(doc), "## Two", "## Two\n\ntwo's new text\n")
    assert doc.read_text(encoding="utf-8") == DOC.replace("two's old text", "two's new text")


def test_rewriting_twice_changes_nothing_more(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text(DOC, encoding="utf-8")
    for _ in range(2):
        write_section(str(doc), "## One", "## One\n\none's new text\n")
    assert doc.read_text(encoding="utf-8") == DOC.replace("one's text", "one's new text")


def test_a_section_that_brings_its_own_rule_gets_no_second_one(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text(DOC, encoding="utf-8")
    write_section(str(doc), "## One", "## One\n\nnew\n\n---\n")
    assert doc.read_text(encoding="utf-8").count("---") == 2


def test_the_last_section_and_a_new_one(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text(DOC, encoding="utf-8")
    write_section(str(doc), "## Three", "## Three\n\nthree's new text\n")
    write_section(str(doc), "## Four", "## Four\n\nfour\n")
    assert doc.read_text(encoding="utf-8") == DOC.replace(
        "three's text", "three's new text") + "\n---\n\n## Four\n\nfour\n"


@pytest.mark.timeout(10)
@pytest.mark.parametrize("label", ["after", "run 4", "it's", "--x"])
def test_a_rows_command_is_shown_without_its_label_and_docs(label: str) -> None:
    command = f"python -m bench.burst --bursts 5 --label {shlex.quote(label)} --docs --count 3"
    assert shown_command(command) == "python -m bench.burst --bursts 5 --count 3"
    assert shown_command("python -m bench.x --label=a --docs") == "python -m bench.x"


@pytest.mark.timeout(10)
def test_options_that_only_look_alike_stay_in_the_command() -> None:
    assert shown_command("python -m bench.x --docsx 1 --labels 2") == (
        "python -m bench.x --docsx 1 --labels 2")


def _rows(tmp_path: Path) -> Rows:
    doc = tmp_path / "PERF.md"
    doc.write_text(DOC, encoding="utf-8")

    def render(results: dict[str, Any]) -> str:
        lines = [f"| {label} | {r['figure']} | `{shown_command(r['command'])}` |"
                 for label, r in results.items()]
        return "## Two\n\n" + "\n".join(lines) + "\n\n"  # the extra blank line is dropped

    return Rows("python -m bench.x", str(tmp_path / "results" / "x.json"), str(doc),
                "## Two", render)


@pytest.mark.timeout(10)
def test_rows_are_kept_per_label_and_drawn_into_their_section(tmp_path: Path) -> None:
    rows = _rows(tmp_path)
    parser = argparse.ArgumentParser()
    rows.add_options(parser)
    args = parser.parse_args(["--label", "before"])
    assert (args.label, args.docs, args.render_only) == ("before", False, False)
    first = {"figure": 1, **rows.stamp(["--label", "before"])}
    assert first["command"] == "python -m bench.x --label before"
    rows.save({"before": first}, docs=False)
    assert Path(rows.doc).read_text(encoding="utf-8") == DOC  # not asked to write the docs
    rows.save({"after": {"figure": 2, "command": "python -m bench.x --docs"}}, docs=True)
    rows.save({"before": {"figure": 3, "command": "python -m bench.x"}}, docs=True)
    saved = json.loads(Path(rows.results).read_text(encoding="utf-8"))
    assert {label: r["figure"] for label, r in saved.items()} == {"before": 3, "after": 2}
    text = Path(rows.doc).read_text(encoding="utf-8")
    table = "| before | 3 | `python -m bench.x` |\n| after | 2 | `python -m bench.x` |\n"
    assert table + "\n---" in text
    assert "two's old text" not in text and "## Three" in text and "one's text" in text
    rows.write_doc()  # --render-only: the same section from the saved rows
    assert Path(rows.doc).read_text(encoding="utf-8") == text


@pytest.mark.timeout(10)
def test_a_run_recorded_is_measured_stamped_saved_drawn_and_printed(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = _rows(tmp_path)
    parser = argparse.ArgumentParser()
    rows.add_options(parser)
    argv = ["--label", "new", "--docs"]
    row = rows.record(parser.parse_args(argv), argv, lambda: {"figure": 7})
    assert row["figure"] == 7 and 0.0 <= row["other_load"] <= 1.0
    assert row["command"] == "python -m bench.x --label new --docs"
    assert {"engine", "date"} <= row.keys()
    assert json.loads(Path(rows.results).read_text(encoding="utf-8")) == {"new": row}
    assert "| new | 7 | `python -m bench.x` |" in Path(rows.doc).read_text(encoding="utf-8")
    assert json.loads(capsys.readouterr().out) == row  # one line of JSON on stdout


@pytest.mark.timeout(10)
def test_a_benchmarks_main_records_a_run_or_only_draws_the_section(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = _rows(tmp_path)
    runs: list[int] = []

    def run(args: argparse.Namespace) -> Callable[[], dict[str, Any]]:
        return lambda: runs.append(args.n) or {"figure": args.n}

    def parser() -> argparse.ArgumentParser:
        made = argparse.ArgumentParser()
        made.add_argument("--n", type=int, default=5)
        return made

    assert rows.main(parser(), ["--label", "a", "--n", "8"], run) == 0
    assert runs == [8] and json.loads(capsys.readouterr().out)["figure"] == 8
    assert Path(rows.doc).read_text(encoding="utf-8") == DOC  # no --docs: not drawn
    assert rows.main(parser(), ["--render-only"], run) == 0
    assert runs == [8]  # nothing run
    assert "| a | 8 | `python -m bench.x --n 8` |" in Path(rows.doc).read_text(encoding="utf-8")


def _spin(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


@pytest.mark.timeout(30)
def test_cpu_seconds_counts_every_thread_finer_than_a_tick() -> None:
    spun, done = threading.Event(), threading.Event()

    def other_thread() -> None:  # alive until measured, as ZeroMQ's I/O threads are
        _spin(0.05)
        spun.set()
        done.wait(20)

    before = cpu_seconds(os.getpid())
    worker = threading.Thread(target=other_thread)
    worker.start()
    assert spun.wait(20)
    _spin(0.004)  # less than a clock tick (10 ms)
    spent = cpu_seconds(os.getpid()) - before
    done.set()
    worker.join(20)
    assert 0.054 <= spent < 1.0


@pytest.mark.timeout(30)
def test_cpu_seconds_of_a_process_gone_is_zero() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(20)
    assert cpu_seconds(child.pid) == 0.0
