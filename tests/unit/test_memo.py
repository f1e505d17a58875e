"""engine.memo: bounded, emptied when full."""
from __future__ import annotations

from engine.memo import Memo


def test_a_memo_keeps_values_until_full_then_starts_over() -> None:
    memo: Memo[str, int] = Memo(3)
    assert [memo.keep(k, v) for k, v in (("a", 1), ("b", 2), ("c", 3))] == [1, 2, 3]
    assert dict(memo) == {"a": 1, "b": 2, "c": 3}
    assert memo.keep("d", 4) == 4  # full: forgotten, then "d" kept
    assert dict(memo) == {"d": 4}
    assert memo.get("a") is None


def test_a_memo_never_holds_fewer_than_one_entry() -> None:
    memo: Memo[str, int] = Memo(0)
    memo.keep("a", 1)
    assert memo["a"] == 1
