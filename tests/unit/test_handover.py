"""engine.smtp.handover: what a connection handed to the next message still owes the last
one (the reply to its final dot); the hand-over itself, on the wire, is
tests/engine/test_pass_on.py."""
from __future__ import annotations

from engine.smtp.handover import Owed


def test_a_final_reply_nobody_reads_ends_as_an_ambiguous_deferral_not_a_hang() -> None:
    """The safety net of the waiting side: had the next holder never read the reply (a bug),
    the message would be deferred as possibly delivered, not stuck in flight."""
    debt = Owed(["a@example.test"], lambda: [])
    (result,) = debt.wait(0.05)
    assert result.rcpt == "a@example.test" and result.ambiguous
    assert result.reply.code == 451
