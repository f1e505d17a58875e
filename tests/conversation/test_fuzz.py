"""The fuzzers of tests/support/fuzz.py in the suite: a few thousand job frames and server
replies each, and Hypothesis on top; each session runs a real Connection over a socketpair
(`python -m tests.support.fuzz --count 100000` is the long campaign, docs/SECURITY.md)."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support.fuzz import check_session, fuzz_jobs, fuzz_replies, run_session

SUITE_COUNT = 5000


def test_fuzz_job_parsing_accepts_only_wire_safe_jobs() -> None:
    tally = fuzz_jobs(SUITE_COUNT, seed=1)
    assert tally.failures == []
    assert tally.accepted > SUITE_COUNT // 10 and tally.rejected > SUITE_COUNT // 3  # both paths
    assert tally.sessions == tally.accepted


def test_fuzz_reply_parsing_never_crashes_injects_or_claims_a_delivery() -> None:
    tally = fuzz_replies(SUITE_COUNT, seed=2)
    assert tally.failures == []
    assert tally.accepted > 100 and tally.rejected > 100  # both paths


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000))
def test_arbitrary_server_bytes_end_in_an_outcome_without_injection(stream: bytes) -> None:
    rcpts = ["a@example.test"]
    session = run_session(b"220 mx\r\n250-mx\r\n250 PIPELINING\r\n" + stream, "s@example.test",
                          rcpts, b"Subject: x\r\n\r\nhi\r\n")
    check_session(session, "s@example.test", rcpts, b"Subject: x\r\n\r\nhi\r\n")
