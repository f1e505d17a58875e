"""engine.crash: what MAILENGINE_CRASH_AT arms, when a point fires, and that it fires once
under MAILENGINE_CRASH_ONCE. A firing point SIGKILLs its process: those run in a child."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from engine import crash
from tests.support import ROOT

# Passes a point 10 times, one at a time, printing each pass it survives.
PASSES = ("import engine.crash as c\n"
          "for i in range(1, 11):\n"
          "    c.point('after_result_read')\n"
          "    print(i, flush=True)\n")


def run(at: str, once: Path | None = None,
        script: str = PASSES) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILENGINE_CRASH")}
    env.update({crash.AT_ENV: at, "PYTHONPATH": str(ROOT)})
    if once is not None:
        env[crash.ONCE_ENV] = str(once)
    # -u: the child is killed with SIGKILL, so what it printed must not wait in a buffer
    # (with output to a pipe it would, unless PYTHONUNBUFFERED happens to be set).
    return subprocess.run([sys.executable, "-u", "-c", script], env=env, capture_output=True,
                          text=True, timeout=8)


def test_points_and_counts_are_read_from_the_variable() -> None:
    assert crash.parse("") == {}
    assert crash.parse("after_spool_commit, after_final_reply:50") == {
        "after_spool_commit": 1, "after_final_reply": 50}


@pytest.mark.parametrize("text", ["after_commit", "after_final_reply:0", "after_result_read:x"])
def test_a_misspelt_point_or_count_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        crash.parse(text)


def test_unset_nothing_is_armed() -> None:
    assert os.environ.get(crash.AT_ENV) is None  # the test run itself arms nothing
    assert crash._ARMED == frozenset()
    crash.point("after_final_reply", 1000)  # and passing a point does nothing


def test_a_point_kills_its_process_on_the_pass_that_reaches_its_count() -> None:
    done = run("after_result_read:4")
    assert done.returncode == -signal.SIGKILL
    assert done.stdout.split() == ["1", "2", "3"]  # no cleanup, no output after it


def test_passes_of_several_count_at_once() -> None:
    script = "import engine.crash as c\nc.point('after_result_read', 3)\nprint('alive')\n" \
             "c.point('after_result_read', 0)\nprint('still')\nc.point('after_result_read', 2)\n" \
             "print('never')\n"
    done = run("after_result_read:5", script=script)
    assert done.returncode == -signal.SIGKILL
    assert done.stdout.split() == ["alive", "still"]


def test_an_unarmed_point_does_not_fire() -> None:
    done = run("after_spool_commit")
    assert done.returncode == 0 and len(done.stdout.split()) == 10


def test_with_a_once_folder_a_point_fires_in_one_process_only(tmp_path: Path) -> None:
    first = run("after_result_read:2", once=tmp_path)
    assert first.returncode == -signal.SIGKILL
    assert (tmp_path / "after_result_read").exists()
    again = run("after_result_read:2", once=tmp_path)  # a restarted process: disarmed
    assert again.returncode == 0 and len(again.stdout.split()) == 10


def test_a_bad_variable_stops_the_process_that_reads_it() -> None:
    done = run("after_everything")
    assert done.returncode != 0 and "unknown crash point 'after_everything'" in done.stderr
