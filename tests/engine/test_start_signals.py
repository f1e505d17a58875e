"""A SIGUSR1 (logrotate's "reopen the events log") or a SIGHUP that comes while `mailengine
run` is still starting must not end it: their default action terminates a process, and
the supervisor's handlers exist only once its loop starts. `run` holds (blocks) both from
its first line until the handlers are in place, then takes the one that came.

The test makes "a signal during the start" exact, without a race: the engine is started
under a wrapper that sends itself SIGUSR1 while it is blocked, then execs the engine,
which starts with the signal pending (a blocked signal stays pending across exec). The
engine must come up, reopen its events log once its loop runs, and leave neither signal
blocked in itself or its workers.
"""
from __future__ import annotations

import signal
import sys
from collections.abc import Callable

from engine.testing.harness import LocalEngine
from engine.testing.sink import SinkServer
from tests.support.wait import until

WRAPPER = ("import os, signal, sys;"
           " signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1});"
           " os.kill(os.getpid(), signal.SIGUSR1);"
           " os.execv(sys.argv[1], sys.argv[1:])")


def blocked(pid: int) -> set[int]:
    """The signals blocked in process `pid` (its SigBlk mask in /proc)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        mask = next(int(line.split()[1], 16) for line in status if line.startswith("SigBlk:"))
    return {n for n in range(1, 65) if mask >> (n - 1) & 1}


def test_a_sigusr1_during_the_start_is_handled_once_running_not_fatal(
        sink: SinkServer, local_engine: Callable[..., LocalEngine]) -> None:
    engine = local_engine(sink.port, start=False, wrapper=[sys.executable, "-c", WRAPPER])
    engine.start()
    until(lambda: "event=events_log_reopened" in engine.log_tail(100), 20,
          "the events log reopened for the SIGUSR1 of the start")
    assert engine.proc is not None and engine.proc.poll() is None
    figures = engine.status()
    for pid in (engine.proc.pid, *(w["pid"] for w in figures["workers"].values())):
        assert not {signal.SIGUSR1, signal.SIGHUP} & blocked(pid), pid
