"""Queues of greenlets waiting for a turn (a pool's connection, a provider's connection slot)."""
from __future__ import annotations

from collections import deque

from gevent.event import AsyncResult


def wake_first(waiters: deque[AsyncResult]) -> None:
    """Wake the longest waiting greenlet still waiting; skip any already answered
    (woken by another queue it also stood in, or failed)."""
    while waiters:
        waiter = waiters.popleft()
        if not waiter.ready():
            waiter.set(None)
            return


def any_waiting(waiters: deque[AsyncResult]) -> bool:
    return any(not waiter.ready() for waiter in waiters)


def count_waiting(waiters: deque[AsyncResult]) -> int:
    """How many callers are still waiting (not answered yet)."""
    return sum(1 for waiter in waiters if not waiter.ready())
