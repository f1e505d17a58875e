"""How long one pooled connection serves: its term, and the rule that staggers retirements.

A connection retires after `pool.max_messages` messages or `pool.max_age` seconds, whichever
comes first. Connections a busy pool opened together carry messages at the same pace: with
one limit for all, they would reach it together and be replaced together, and meanwhile
the destination would have none to send on (the tail of issue #19: at 50 ms RTT, every
100 messages, a handful of messages waiting ~400 ms for a whole connection setup).

So each connection draws its own term when it opens, at random between a tenth and a
twentieth below the configured limits (`Term.messages` from 0.9 x `max_messages` to 0.95 x,
`Term.until` from 0.9 x `max_age` after its opening to 0.95 x). Limits under 10 messages
are kept exact (1 is a connection per message, on purpose). The configured limits are
never exceeded.

And the pool never retires two at once: a connection that reaches its own term while a
retirement or a connect of the same destination is under way carries on until that is over
(`Term.due` SOON), up to the configured limits themselves (`Term.due` NOW). The twentieth
left between the two is that room (50 messages and 15 s with the defaults; a connect takes
well under a second): only a limit under 10 messages, or a connect slower than that room,
lets two retire at once. engine.pool applies this; it keeps one `Term` per open connection.
"""
from __future__ import annotations

import math
import random

from engine.config import PoolConfig

# How far below the configured limits a connection's own term ends: a tenth at most, a
# twentieth at least (the room left to put a retirement off while another one is under way).
SPREAD = 0.1
ROOM = 0.05
NOT_YET, SOON, NOW = 0, 1, 2  # `Term.due`


class Term:
    """One connection's term of service, drawn when it opens (the pool's clock)."""

    __slots__ = ("hard_until", "messages", "opened", "until")

    def __init__(self, settings: PoolConfig, opened: float, rng: random.Random) -> None:
        most = settings.max_messages
        if most >= 10:
            spread, room = int(most * SPREAD), max(1, math.ceil(most * ROOM))
            self.messages = most - spread + rng.randrange(spread - room + 1)
        else:
            self.messages = most
        self.opened = opened
        age = settings.max_age
        if age > 0:
            self.hard_until = opened + age
            self.until = opened + age * (1.0 - SPREAD + (SPREAD - ROOM) * rng.random())
        else:  # no age limit
            self.hard_until = self.until = float("inf")

    def due(self, messages_sent: int, now: float, settings: PoolConfig) -> int:
        """NOW: a configured limit is reached, the connection retires whatever else goes on;
        SOON: its own term is over, it retires unless another retirement is under way;
        NOT_YET: it serves on."""
        if messages_sent >= settings.max_messages or now >= self.hard_until:
            return NOW
        if messages_sent >= self.messages or now >= self.until:
            return SOON
        return NOT_YET

    def messages_left(self, messages_sent: int) -> int:
        return self.messages - messages_sent

    def seconds_left(self, now: float) -> float:
        return self.until - now
