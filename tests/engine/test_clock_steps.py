"""Issue #14 (7): the whole engine's wall clock steps an hour forward, then back, while mail
waits for its retries: nothing expires early, the retries keep their interval, the steps
are logged, and at the stop the spool's times are moved onto the wall clock; a step back
while the engine is down stalls nothing either.

The engine runs under libfaketime (Debian's `faketime`), its wall clock offset by what the
test writes to FAKETIME_TIMESTAMP_FILE, read at every call; its monotonic clock stays real
(DONT_FAKE_MONOTONIC). Skipped where libfaketime cannot be loaded. The same steps on the
supervisor's parts with hand-moved clocks: tests/conversation/test_clock_steps.py.
"""
from __future__ import annotations

import collections
import itertools
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from engine.spool import Spool
from engine.status import render
from engine.testing.harness import LocalEngine, make_message
from engine.testing.sink import SinkServer
from tests.support.wait import until

LIBFAKETIME = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"
SCHEDULE = 2.0  # seconds between tries
TRIES_DEFERRED = 5


class GreylistingSink(SinkServer):
    """The sink, answering 451 to the first TRIES_DEFERRED RCPTs of each recipient (those
    whose local part starts with "defer": always), and noting when each came (this
    process's monotonic clock: the test's own, never faked)."""

    def __init__(self) -> None:
        super().__init__()
        self.tries: collections.defaultdict[str, list[float]] = collections.defaultdict(list)

    def rcpt_reply(self, address: str) -> str | None:
        self.tries[address].append(time.monotonic())  # the sink's one event-loop thread
        if len(self.tries[address]) <= TRIES_DEFERRED:
            return "451 4.7.1 greylisted, try again later"
        return super().rcpt_reply(address)


class Offset:
    """The engine's wall clock offset, in the file libfaketime reads at every call."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.set(0)

    def set(self, seconds: int) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(f"{seconds:+d}\n")
        os.replace(tmp, self.path)  # whole or not at all: a reader never sees it half written

    def env(self) -> dict[str, str]:
        return {"LD_PRELOAD": LIBFAKETIME, "FAKETIME_TIMESTAMP_FILE": str(self.path),
                "FAKETIME_NO_CACHE": "1", "DONT_FAKE_MONOTONIC": "1"}


@pytest.fixture
def offset(tmp_path: Path) -> Offset:
    clock = Offset(tmp_path / "faketime")
    clock.set(3600)
    probe = subprocess.run([sys.executable, "-c", "import time; print(time.time())"],
                           env={**os.environ, **clock.env()}, capture_output=True, text=True,
                           timeout=30, check=False)
    clock.set(0)
    try:
        ahead = float(probe.stdout) - time.time()
    except ValueError:
        ahead = 0.0
    if probe.returncode != 0 or not 3500 < ahead < 3700:
        pytest.skip(f"libfaketime cannot be loaded here ({LIBFAKETIME}): {probe.stderr[-200:]}")
    return clock


@pytest.fixture
def greylisting() -> Iterator[GreylistingSink]:
    with GreylistingSink() as server:
        yield server


def job(job_id: str, rcpt: str) -> tuple[dict[str, Any], bytes]:
    return ({"id": job_id, "from": "sender@example.test", "to": [rcpt], "expires": 1800},
            make_message(0, 1000, rcpt=rcpt))


@pytest.mark.timeout(90)
def test_an_hour_forward_then_back_neither_expires_mail_nor_stalls_its_retries(
        greylisting: GreylistingSink, offset: Offset,
        local_engine: Callable[..., LocalEngine]) -> None:
    engine = local_engine(greylisting.port, env=offset.env(),
                          extra={"retry": {"schedule": [f"{SCHEDULE:g}s"], "max_age": "1h"}})
    pushed = time.time()
    assert engine.push([job("a", "user@example.test"), job("b", "defer-me@example.test")])
    tries = greylisting.tries["user@example.test"]
    until(lambda: len(tries) >= 1, 20, "the first try")
    offset.set(3600)
    until(lambda: len(tries) >= 3, 20, "two tries after a step forward", engine.log_tail)
    offset.set(-3600)

    events = engine.wait_final(1, timeout=40)

    seen = [(e["event"], e["attempt"]) for e in events if e["id"] == "a" and "attempt" in e]
    assert seen == [*(("deferred", n) for n in range(1, 6)), ("delivered", 6)]
    gaps = [later - earlier for earlier, later in itertools.pairwise(tries)]
    # not an hour; nor early, bar retry.jitter (+-10%: engine.results)
    assert all(SCHEDULE * 0.9 - 0.1 <= gap <= SCHEDULE + 8.0 for gap in gaps), gaps
    assert not [e for e in engine.events() if e["event"] == "expired"]
    steps = re.findall(r"clock_step seconds=(\S+) direction=(\w+)",
                       Path(engine.log_path).read_text())
    assert [(round(float(s)), d) for s, d in steps] == [(3600, "forward"), (-7200, "back")]
    figures = engine.status()
    assert figures["spool"]["clock_apart"] == pytest.approx(-3600, abs=5)
    assert "CLOCK STEPPED: the wall clock is 3600s behind" in render(figures, None, 0.0)

    assert engine.stop() == 0
    planned = re.findall(r"clock_rejoin_planned seconds=(\S+)",
                         Path(engine.log_path).read_text())
    assert [round(float(s)) for s in planned] == [-3600]
    with Spool(engine.config["spool"]) as spool:  # b, still deferred: on the wall clock's time
        assert spool.shifted is not None and round(spool.shifted[0]) == -3600
        assert spool.stats().oldest_queued_ts == pytest.approx(pushed - 3600, abs=5)

    # A step back of an hour while the engine is down: it takes up where the spool left off.
    offset.set(-7200)
    retried = greylisting.tries["defer-me@example.test"]
    before = len(retried)
    engine.start()
    until(lambda: len(retried) > before, 20, "b tried again after a step back while down",
          engine.log_tail)
    steps = re.findall(r"clock_step seconds=(\S+) direction=back",
                       Path(engine.log_path).read_text())
    # The floor is the spool's latest "now": the last result, a little before the stop.
    assert len(steps) == 2 and float(steps[-1]) == pytest.approx(-3600, abs=10)
