"""Counting what a rate limit let through, for the tests that check one."""
from __future__ import annotations


def busiest(times: list[float], window: float) -> int:
    """The most events (messages, turns) at `times` in any `window` seconds."""
    times = sorted(times)
    most, first = 0, 0
    for last, at in enumerate(times):
        while at - times[first] > window:
            first += 1
        most = max(most, last - first + 1)
    return most
