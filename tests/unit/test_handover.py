"""engine.smtp.handover: what a connection handed to the next message still owes the last
one (the reply to its final dot); the hand-over itself, on the wire, is
tests/engine/test_pass_on.py."""
from __future__ import annotations

from engine.smtp.handover import Handover, Owed


def test_a_final_reply_nobody_reads_ends_as_an_ambiguous_deferral_not_a_hang() -> None:
    """The safety net of the waiting side: had the next holder never read the reply (a bug),
    the message would be deferred as possibly delivered, not stuck in flight."""
    debt = Owed(["a@example.test"], lambda: [])
    (result,) = debt.wait(0.05)
    assert result.rcpt == "a@example.test" and result.ambiguous
    assert result.reply.code == 451


def test_a_handed_on_message_lost_before_anyone_wrote_it_is_no_possible_duplicate() -> None:
    """The connection closed with the message still waiting in the hand-over: the server
    cannot have it, so the deferral is not ambiguous; once the next holder took it to
    write, it is (a failed write may have handed all of it to the socket)."""
    unsent, taken = Owed(["a@example.test"], lambda: []), Owed(["b@example.test"], lambda: [])
    handover = Handover()
    handover.hand_on(taken, b"message\r\n.\r\n")
    assert handover.take_unsent() == b"message\r\n.\r\n" and handover.unsent == b""
    handover.hand_on(unsent, b"another\r\n.\r\n")
    handover.drop()
    (lost,), (maybe,) = unsent.results.get(timeout=0), taken.results.get(timeout=0)
    assert (lost.reply.code, lost.ambiguous) == (451, False)
    assert (maybe.reply.code, maybe.ambiguous) == (451, True)
