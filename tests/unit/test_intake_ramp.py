"""intake.Ramp: how many jobs the next read of the ingest socket takes (issue #19, item 5).
Intake's batches on real sockets: tests/conversation/test_intake_burst.py."""
from __future__ import annotations

from engine.intake import Ramp


def test_reads_double_while_a_burst_fills_them_and_start_small_after_it() -> None:
    ramp = Ramp(first=4, with_room=8, most=20)
    sizes = []
    for _ in range(5):
        sizes.append(ramp.size(room=0))
        ramp.read(sizes[-1], sizes[-1])  # every read got all it asked for
    assert sizes == [4, 8, 16, 20, 20]
    ramp.read(3, 20)  # fewer than asked: the socket is empty
    assert ramp.size(room=0) == 4


def test_reads_stay_small_while_the_workers_have_room() -> None:
    ramp = Ramp(first=4, with_room=8, most=20)
    sizes = []
    for _ in range(4):
        sizes.append(ramp.size(room=100))
        ramp.read(sizes[-1], sizes[-1])
    assert sizes == [4, 8, 8, 8]
    assert ramp.size(room=0) == 20  # the burst lasted: once the workers are full, large
