"""Turns for one sending IP x provider, given out at the allowed rate of the moment.

A message takes a turn before it may use a connection. Turns are spaced `spacing()` seconds
apart (engine.rate: 1 / the allowed rate, or a probe at a time after a push-back). A message
whose turn is free goes at once; others wait in line, and a timer lets the first of the line
go when its turn comes. The spacing is read again at every turn, and `changed()` re-arms the
timer when it changes: turns follow the current rate, as it rises as well as when it falls
(reserved at an older rate, a rising rate showed up to `shaping.max_wait` late).

A message that would wait longer than `max_wait` is not put in line: the caller sends it back
to the spool until its turn would come (waiting is never an attempt), and a lowered rate sends
back those already in line whose turn has moved out of reach (`shed`).
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

import gevent
from gevent.event import AsyncResult

Clock = Callable[[], float]
BINDING = 1.0  # s: the pace "binds" while a turn had to wait within this long
CATCH_UP = 0.01  # s: turns a late timer may still give out at once (a few at a high rate)
# s: a turn due this soon is given at once, with nobody in line: at thousands of turns a
# second, a wait in line and a timer for each message cost more CPU than a shaping finer
# than the event loop's own is worth.
SLACK = 0.001


class Pacer:
    """The line of messages waiting for a turn to one provider."""

    def __init__(self, spacing: Callable[[], float], time_for: Callable[[int], float],
                 clock: Clock, stamp: Callable[[], int] = lambda: 0) -> None:
        self._spacing = spacing
        self._time_for = time_for  # seconds the next n turns take (engine.rate: it may grow)
        self._clock = clock
        self._stamp = stamp  # what a turn is stamped with when given (engine.shaping: epoch)
        self._last = -1e18  # when the last turn was given
        # Those waiting for a turn, in order. A waiter leaves the line before it is
        # answered, so its length is how many wait (counting the unanswered ones at every
        # turn cost O(line) per message).
        self._line: deque[AsyncResult] = deque()
        self._timer: Any = None
        self._waited_at = -1e18  # when a turn last had to wait

    def wait_for_turn(self, max_wait: float, first: bool = False) -> int | float:
        """Once this message's turn has come (it may have waited up to `max_wait`): the
        stamp (an int) taken at that moment. Else the seconds it would wait (a float), and
        it is not in line. `first`: ahead of those waiting (a message sent again)."""
        wait = self.expected_wait(first)
        if wait > max_wait:
            return wait
        now = self._clock()
        if wait <= 0.0 and (first or not self._line):
            self._last = now
            return self._stamp()
        if wait <= SLACK and not self._line:  # its turn, a moment early: keeps the grid
            self._last += self._spacing()
            self._waited_at = now  # the pace binds all the same
            return self._stamp()
        self._waited_at = now
        waiter = AsyncResult()
        if first:
            self._line.appendleft(waiter)
        else:
            self._line.append(waiter)
        self._arm()
        try:
            answer: int | float = waiter.get()
        except BaseException:
            if waiter in self._line:
                self._line.remove(waiter)
            raise
        return answer

    def expected_wait(self, first: bool = False) -> float:
        """How long a turn asked for now would wait: the next free turn, after the line
        (`first`: ahead of it)."""
        gap = self._spacing()
        if gap <= 0.0 and (first or not self._line):
            return 0.0
        free = max(0.0, self._last + gap - self._clock())
        return free if first else free + self._time_for(len(self._line))

    @property
    def binding(self) -> bool:
        """The pace holds messages back (or did lately): the rate, not the demand, is the
        limit."""
        return bool(self._line) or self._clock() - self._waited_at < BINDING

    @property
    def waiting(self) -> int:
        return len(self._line)

    def changed(self, max_wait: float, restart: bool = False) -> None:
        """The spacing changed: the first in line goes at its new time, and those whose
        turn is now more than `max_wait` away leave the line (their wait is their answer).
        `restart`: the next turn is a whole spacing from now (after a push-back: the
        receiver's bucket is empty this instant, and a message sent at once is refused)."""
        if restart:
            self._last = self._clock()
        self.shed(max_wait)
        if self._timer is not None:
            self._timer.close()
            self._timer = None
        self._arm()

    def shed(self, max_wait: float) -> None:
        """Those in line whose turn is now more than `max_wait` away leave it (the turns
        only grow along the line: the tail leaves), told the first turn past the line."""
        free = max(0.0, self._last + self._spacing() - self._clock())
        # How many keep their place: a binary search, since this runs at every change of
        # the rate (every reply in slow start), and a scan of the line was O(line) a reply.
        keep, beyond = 0, len(self._line)
        while keep < beyond:
            middle = (keep + beyond) // 2
            if free + self._time_for(middle) <= max_wait:
                keep = middle + 1
            else:
                beyond = middle
        wait = float(free + self._time_for(keep))
        gone = [self._line.pop() for _ in range(len(self._line) - keep)]
        for waiter in reversed(gone):
            waiter.set(wait)

    def _arm(self) -> None:
        """A timer for the first in line's turn, unless one runs."""
        if self._timer is not None or not self._line:
            return
        delay = max(0.0, self._last + self._spacing() - self._clock())
        self._timer = gevent.get_hub().loop.timer(delay)
        self._timer.start(self._release)

    def _release(self) -> None:
        """The timer fired: the first in line goes, and with it every turn that is due by
        now (at a high rate several come due between two turns of the event loop: one timer
        per message capped the engine at ~1,300 messages/s, a quarter of what it sends
        unpaced)."""
        self._timer.close()
        self._timer = None
        gap, now = self._spacing(), self._clock()
        released = 0
        while self._line:
            waiter = self._line[0]
            if waiter.ready():
                self._line.popleft()
                continue
            if released == 0:
                # The turn is the one the timer was set for, not when it fired: a timer
                # fires a little late, and counting from then lost 3% of the rate (48.3/s
                # at 50/s). Never more than CATCH_UP behind: a loop that was blocked for
                # a while does not make up for all of it in a burst.
                self._last = max(self._last + gap, now - max(gap, CATCH_UP))
            elif self._last + gap <= now:
                self._last += gap
            else:
                break
            self._line.popleft()
            waiter.set(self._stamp())  # stamped now: it may run only after a push-back
            released += 1
        self._arm()
