"""How a receiving server limits senders: the sink's policies, for tests and the shaping
simulator (bench/shaping_sim.py).

Real receivers push back in different ways, and the engine must be a good citizen with each:
a token bucket per client IP (Gmail, Microsoft), a fixed number of messages per window, a cap
on concurrent connections, greylisting of a first contact, a limit that changes while mail
flows, a block of the sending IP. A `Policy` is asked at each step of a session (the banner,
MAIL FROM, RCPT TO) and answers None (go on) or the reply that refuses it; a reply starting
with 421 or 554 at the banner, or 421 at MAIL, also closes the connection, as real servers
do. Policies are called from the sink's event-loop thread, one at a time (the sink holds its
lock), with the time (Unix seconds).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol


class Policy(Protocol):
    """What a receiver allows; each method answers None (accepted) or the refusing reply."""

    def on_connect(self, client_ip: str, open_connections: int, now: float) -> str | None: ...

    def on_mail(self, client_ip: str, now: float) -> str | None: ...

    def on_rcpt(self, client_ip: str, sender: str, rcpt: str, now: float) -> str | None: ...

    def limit(self, now: float) -> float | None:
        """The messages per second it allows at `now` (for plots), None if it has no rate."""


class Open:
    """Accepts everything: the base the others build on."""

    def on_connect(self, client_ip: str, open_connections: int, now: float) -> str | None:
        return None

    def on_mail(self, client_ip: str, now: float) -> str | None:
        return None

    def on_rcpt(self, client_ip: str, sender: str, rcpt: str, now: float) -> str | None:
        return None

    def limit(self, now: float) -> float | None:
        return None


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up; a MAIL FROM takes one.

    Only accepted transactions take a token: a sender that keeps knocking while throttled
    is not punished further, so the accepted rate converges on ``rate`` and never exceeds
    ``rate`` (plus the initial ``burst``) over any window.
    """

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic
                 ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("a token bucket needs rate > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = burst
        self._at = clock()

    def take(self) -> bool:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


class RateLimit(Open):
    """A token bucket per client IP (``per_ip=False``: one for every client), checked at MAIL
    FROM. ``schedule`` changes the rate while mail flows: ``[(after_seconds, rate), ...]``,
    counted from the first MAIL FROM (e.g. halve it after 20 s, double it back after 40 s)."""

    def __init__(self, rate: float, burst: float | None = None, per_ip: bool = True,
                 reply: str = "421 4.7.0 Rate limited, slow down",
                 schedule: Sequence[tuple[float, float]] = ()) -> None:
        self.rate = rate
        self.burst = burst if burst is not None else max(1.0, rate)
        self.per_ip = per_ip
        self.reply = reply
        self.schedule = sorted(schedule)
        self._buckets: dict[str, TokenBucket] = {}
        self._start: float | None = None

    def on_mail(self, client_ip: str, now: float) -> str | None:
        if self._start is None:
            self._start = now
        rate = self.limit(now) or self.rate
        key = client_ip if self.per_ip else "*"
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(rate, self.burst)
        bucket.rate = rate
        return None if bucket.take() else self.reply

    def limit(self, now: float) -> float | None:
        rate = self.rate
        if self._start is not None:
            for after, changed in self.schedule:
                if now - self._start >= after:
                    rate = changed
        return rate

    def reset(self) -> None:
        self._buckets.clear()
        self._start = None


class FixedWindow(Open):
    """At most ``count`` MAIL FROMs per client IP in each window of ``window`` seconds (the
    windows start at the first MAIL FROM); the rest of the window is refused with ``reply``,
    worded so that no shipped throttle rule knows it."""

    def __init__(self, count: int, window: float,
                 reply: str = "450 4.7.1 Sender over quota for this period, try again later"
                 ) -> None:
        self.count = count
        self.window = window
        self.reply = reply
        self._start: float | None = None
        self._used: dict[tuple[str, int], int] = {}

    def on_mail(self, client_ip: str, now: float) -> str | None:
        if self._start is None:
            self._start = now
        key = (client_ip, int((now - self._start) // self.window))
        used = self._used.get(key, 0)
        if used >= self.count:
            return self.reply
        self._used[key] = used + 1
        return None

    def limit(self, now: float) -> float | None:
        return self.count / self.window


class ConnectionCap(Open):
    """At most ``most`` connections open at once per client IP: one more is answered 421 at
    the banner and closed."""

    def __init__(self, most: int,
                 reply: str = "421 4.7.0 Too many concurrent connections from your IP") -> None:
        self.most = most
        self.reply = reply

    def on_connect(self, client_ip: str, open_connections: int, now: float) -> str | None:
        return self.reply if open_connections > self.most else None


class Greylist(Open):
    """A first contact of (client IP, sender, recipient) is deferred at RCPT; a retry after
    ``delay`` seconds is accepted, as postgrey does."""

    def __init__(self, delay: float,
                 reply: str = "450 4.2.0 Recipient address rejected: Greylisted, see "
                              "http://postgrey.schweikert.ch/help/example.test.html") -> None:
        self.delay = delay
        self.reply = reply
        self._first: dict[tuple[str, str, str], float] = {}

    def on_rcpt(self, client_ip: str, sender: str, rcpt: str, now: float) -> str | None:
        first = self._first.setdefault((client_ip, sender.lower(), rcpt.lower()), now)
        return None if now - first >= self.delay else self.reply


class Block(Open):
    """After ``after`` accepted transactions, the client IP is blocked: every connection is
    answered ``reply`` at the banner and closed (a block list hit)."""

    def __init__(self, after: int = 0,
                 reply: str = "554 5.7.1 Service unavailable; Client host [{ip}] blocked using "
                              "zen.spamhaus.org") -> None:
        self.after = after
        self.reply = reply
        self.accepted: dict[str, int] = {}

    def on_connect(self, client_ip: str, open_connections: int, now: float) -> str | None:
        return self._refusal(client_ip)

    def on_mail(self, client_ip: str, now: float) -> str | None:
        refusal = self._refusal(client_ip)
        if refusal is None:
            self.accepted[client_ip] = self.accepted.get(client_ip, 0) + 1
        return refusal

    def _refusal(self, client_ip: str) -> str | None:
        if self.accepted.get(client_ip, 0) < self.after:
            return None
        return self.reply.format(ip=client_ip)


class Both(Open):
    """Two policies at once (e.g. a connection cap and a rate): the first refusal wins."""

    def __init__(self, *policies: Any) -> None:
        self.policies = policies

    def on_connect(self, client_ip: str, open_connections: int, now: float) -> str | None:
        return _first(p.on_connect(client_ip, open_connections, now) for p in self.policies)

    def on_mail(self, client_ip: str, now: float) -> str | None:
        return _first(p.on_mail(client_ip, now) for p in self.policies)

    def on_rcpt(self, client_ip: str, sender: str, rcpt: str, now: float) -> str | None:
        return _first(p.on_rcpt(client_ip, sender, rcpt, now) for p in self.policies)

    def limit(self, now: float) -> float | None:
        limits = [rate for p in self.policies if (rate := p.limit(now)) is not None]
        return min(limits) if limits else None


def _first(replies: Any) -> str | None:
    for reply in replies:
        if reply is not None:
            return reply
    return None
