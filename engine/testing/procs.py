"""Stopping the helper servers the tests and benchmarks start as subprocesses."""
from __future__ import annotations

import subprocess
from typing import Any


def stop(proc: subprocess.Popen[Any], grace: float = 10.0) -> None:
    """SIGTERM `proc` if it still runs; SIGKILL it if it has not exited after `grace`
    seconds. Returns once it is gone."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
