"""A bounded memo: values derived from a key, kept until the memo is full, then all forgotten.

For derivations on the hot path that repeat message after message (an MX host's provider,
a one-line reply's parse, a metric's name) but whose keys have no fixed bound (domains,
reply texts carrying queue ids): one dict lookup per use, and never more than `size`
entries. Emptied rather than evicted one at a time: what is still in use comes back at its
next lookup, and no order is kept per hit (an LRU would cost on every hit).

    provider = memo.get(host)
    if provider is None:
        provider = memo.keep(host, provider_of(host))
"""
from __future__ import annotations

from collections.abc import Hashable
from typing import TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Memo(dict[K, V]):
    """A dict that forgets everything when it holds `size` entries and one more is kept."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = max(1, size)

    def keep(self, key: K, value: V) -> V:
        """Remember `value` for `key` (emptying the memo first if it is full); returns it."""
        if len(self) >= self.size:
            self.clear()
        self[key] = value
        return value
