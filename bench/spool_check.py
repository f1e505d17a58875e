"""The spool's check at start, out of the page cache: with and without the read-ahead
(issue #19: the first delivery after a restart within 10 s, at 1M recipients waiting).

`python -m bench.spool_check [--rcpts 1000000] [--rounds 3] [--dir /var/tmp]`

Fills a spool with `rcpts` waiting recipients as bench/queue_scale.py does (1 KB jobs, one
recipient each, deferred once), then, `rounds` times, drops the spool's files from the page
cache (POSIX_FADV_DONTNEED, as after a reboot) and times `engine.spoolfile.check_sound`, the
check `mailengine run` makes before it opens the spool: first without the read-ahead (SQLite's
quick_check alone, as before it), then as the engine does it now. Both in each round, so the
disk's and the machine's other load weigh on both alike. Prints one line per check and the
medians. Bounded: about a minute to fill 1M, then ~15 s a round.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

from bench.queue_scale import evict, fill
from engine import spoolfile


def timed_check(spool_dir: str, read_ahead: bool) -> float:
    """Seconds `check_sound` took on the cold file; `read_ahead` False: quick_check alone."""
    evict(spool_dir)
    saved = spoolfile.read_ahead
    if not read_ahead:
        spoolfile.read_ahead = lambda path, meminfo="": False  # type: ignore[assignment]
    try:
        began = time.perf_counter()
        spoolfile.check_sound(os.path.join(spool_dir, "spool.db"))
        return time.perf_counter() - began
    finally:
        spoolfile.read_ahead = saved


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.spool_check", description=__doc__)
    parser.add_argument("--rcpts", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default="/var/tmp", help="where the spool is made")
    args = parser.parse_args(argv)
    spool_dir = tempfile.mkdtemp(prefix="mailengine-spoolcheck-", dir=args.dir)
    try:
        filled = fill(spool_dir, 0, args.rcpts, args.rcpts, time.time())
        size = sum(os.path.getsize(os.path.join(spool_dir, name))
                   for name in os.listdir(spool_dir) if name.startswith("spool.db"))
        print(f"{args.rcpts} recipients waiting: {size / 2**20:.0f} MB, filled in"
              f" {filled:.0f} s", flush=True)
        took: dict[bool, list[float]] = {False: [], True: []}
        for n in range(args.rounds):
            for read_ahead in (False, True):
                took[read_ahead].append(timed_check(spool_dir, read_ahead))
                print(f"round {n + 1}: {'read ahead' if read_ahead else 'quick_check alone'}"
                      f" {took[read_ahead][-1]:.2f} s", flush=True)
        print(f"median: quick_check alone {statistics.median(took[False]):.2f} s,"
              f" read ahead {statistics.median(took[True]):.2f} s")
    finally:
        shutil.rmtree(spool_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
