"""engine.job.parse_job under Hypothesis: on arbitrary frames and envelopes it only accepts
jobs that are safe on the wire, or rejects them (tests/support/fuzz.py's `check_job`)."""
from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support.fuzz import check_job


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=300), min_size=0, max_size=4))
def test_parse_job_on_arbitrary_frames_only_rejects(frames: list[bytes]) -> None:
    check_job(frames)


def json_containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Lists and objects of `inner` values.

    Regression (failed in some test orders): a function, not a lambda. Hypothesis names a
    lambda by parsing this file (ast.parse) when a draw first exceeds `max_leaves`. When the
    garbage collector ran inside that parse and finalized a socket an earlier test had left
    open, pytest's hook formatted the ResourceWarning's traceback, which parses source too;
    CPython 3.11.7 does not survive an ast.parse inside an ast.parse ("SystemError: AST
    constructor recursion depth mismatch")."""
    return st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["id", "from", "to", "ip", "pool", "meta", "expires",
                                        "x"]),
                       st.recursive(st.none() | st.booleans() | st.integers() | st.text(),
                                    json_containers, max_leaves=8)),
       st.binary(max_size=200))
def test_parse_job_on_arbitrary_envelopes_accepts_only_wire_safe_jobs(
        envelope: dict[str, Any], message: bytes) -> None:
    check_job([json.dumps(envelope).encode("utf-8", "surrogatepass"), message])
