"""The `mailengine` command as a test runs it: `python -m engine.cli` of this tree (its root
first on PYTHONPATH, so a worktree's engine is the one that runs)."""
from __future__ import annotations

import os
import pty
import subprocess
import sys

from tests.support import ROOT


def mailengine(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run `mailengine ARGS` to its end; its output captured as text."""
    return subprocess.run([sys.executable, "-m", "engine.cli", *args], env=cli_env(),
                          capture_output=True, text=True, timeout=timeout)


def mailengine_bg(*args: str) -> subprocess.Popen[str]:
    """Start `mailengine ARGS` in the background; its output piped as text."""
    return subprocess.Popen([sys.executable, "-m", "engine.cli", *args], env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def mailengine_on_terminal(answer: bytes, *args: str,
                           timeout: float = 30) -> tuple[int, str]:
    """`mailengine ARGS` on a terminal (a pty) that answers its question with `answer`:
    (exit status, what it said on standard error)."""
    main, terminal = pty.openpty()
    try:
        done = subprocess.Popen([sys.executable, "-m", "engine.cli", *args], stdin=terminal,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env())
        os.write(main, answer)
        _, stderr = done.communicate(timeout=timeout)
    finally:
        os.close(main)
        os.close(terminal)
    return done.returncode, stderr.decode()


def cli_env() -> dict[str, str]:
    """This process's environment with the tree's root first on PYTHONPATH."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env
