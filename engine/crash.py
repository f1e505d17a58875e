"""Crash points, for the tests of what a crash costs: a process stops dead at a named point.

`MAILENGINE_CRASH_AT=<point>[:<n>][,<point>[:<n>]...]`, read once when this module is first
imported, arms points; `point(name)` in the code then kills its own process with SIGKILL when
the armed point is reached: no cleanup, no flush, no log line, exactly what a power cut of
that one process leaves. Each point counts what passes it (a job, a delivery, a result) and
fires on the pass that brings its count to `n` (default 1), so a test can strike mid-run.

`MAILENGINE_CRASH_ONCE=<directory>` makes each point fire once for every process that has it:
the first to fire creates `<directory>/<point>` (atomically) before it dies, and a point whose
file is there is disarmed. Without it, a worker the supervisor restarts (it inherits the
environment) would die at the same point again, and again.

Unset, the module costs a call and a lookup in an empty frozenset per call site. It imports
nothing of the engine: both sides use it (tests/unit/test_layering.py). docs/SPOOL.md, "Crash
points", lists the points and what each window costs.
"""
from __future__ import annotations

import os
import signal

AT_ENV = "MAILENGINE_CRASH_AT"
ONCE_ENV = "MAILENGINE_CRASH_ONCE"
POINTS = (
    "after_spool_commit",  # supervisor: jobs durable in the spool, `queued` not yet published
    "after_final_reply",  # worker: a 2xx to the final dot read, its result not yet sent
    "after_result_read",  # supervisor: results read from the workers, not yet recorded
    "after_results_recorded",  # supervisor: results and their final events spooled, not out
)


def parse(text: str) -> dict[str, int]:
    """`a,b:50` -> {"a": 1, "b": 50}; ValueError for an unknown point or a bad count (a
    typo must not leave a test testing nothing)."""
    armed: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, count = item.partition(":")
        if name not in POINTS:
            raise ValueError(f"{AT_ENV}: unknown crash point {name!r} (known: {', '.join(POINTS)})")
        armed[name] = int(count) if count else 1
        if armed[name] < 1:
            raise ValueError(f"{AT_ENV}: {item!r}: the count must be 1 or more")
    return armed


def _fired(name: str) -> bool:
    """Whether `name` already fired in some process sharing MAILENGINE_CRASH_ONCE."""
    once = os.environ.get(ONCE_ENV, "")
    return bool(once) and os.path.exists(os.path.join(once, name))


_COUNTS = {name: n for name, n in parse(os.environ.get(AT_ENV, "")).items() if not _fired(name)}
_ARMED = frozenset(_COUNTS)
_passed: dict[str, int] = {}


def point(name: str, passes: int = 1) -> None:
    """Stop the process dead here if `name` is armed and these `passes` reach its count."""
    if name in _ARMED:
        _pass(name, passes)


def _pass(name: str, passes: int) -> None:
    before = _passed.get(name, 0)
    _passed[name] = before + passes
    if before < _COUNTS[name] <= before + passes and _claim(name):
        os.kill(os.getpid(), signal.SIGKILL)


def _claim(name: str) -> bool:
    """Under MAILENGINE_CRASH_ONCE, mark `name` fired; False if another process did first."""
    once = os.environ.get(ONCE_ENV, "")
    if not once:
        return True
    try:
        os.close(os.open(os.path.join(once, name), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        return False
    return True
