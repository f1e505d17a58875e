"""The garbage collector's settings for the engine's long-running loops.

Both processes hold many long-lived objects (config, sockets, jobs or pools,
greenlets) and make many short-lived ones per message, nearly all freed by
reference counting. With the default thresholds (700, 10, 10) the cyclic
collector ran every few hundred allocations and rescanned the long-lived ones
again and again.
"""
from __future__ import annotations

import gc

# Allocations (net of frees) before a young collection, then young and middle collections
# before an older one: a young collection every few hundred messages.
THRESHOLDS = (50_000, 50, 100)


def settle_for_a_long_run() -> None:
    """Call once set up, before the loop: what exists now is never collected (it lives as
    long as the process) and is no longer scanned; young objects are collected less often
    (those in cycles, such as a greenlet and its exception's traceback, still are)."""
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)
