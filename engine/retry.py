"""When to try a deferred recipient again.

A retry schedule is a list of waits in seconds: the wait before attempt n+1 is
`schedule[n-1]`, and the last wait repeats for as long as the job may live. A
little jitter spreads out recipients that failed together (one busy provider
defers thousands at once) so that they do not all come back in the same second.
"""
from __future__ import annotations

import random
from collections.abc import Callable, Sequence


def next_attempt(schedule: Sequence[float], attempts: int, now: float, expires_ts: float,
                 jitter: float = 0.0, rand: Callable[[], float] = random.random) -> float | None:
    """The time of the next attempt, or None when it would fall after `expires_ts`.

    `attempts` is the number of attempts made so far (1 after the first try; 0,
    after a wait that burned no attempt, counts as 1). `jitter` is a fraction:
    0.1 moves the wait by up to +-10%, using `rand()` in [0, 1).
    """
    if not schedule:
        raise ValueError("retry schedule is empty")
    if attempts < 0:
        raise ValueError(f"attempts must be >= 0, not {attempts}")
    if not 0.0 <= jitter < 1.0:
        raise ValueError(f"jitter must be in [0, 1), not {jitter}")
    wait = schedule[min(max(attempts - 1, 0), len(schedule) - 1)]
    at = now + wait * (1.0 + jitter * (2.0 * rand() - 1.0))
    return None if at > expires_ts else at
