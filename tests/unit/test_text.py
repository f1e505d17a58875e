"""engine.text: text from outside cut short (no sockets)."""
from __future__ import annotations

import pytest

from engine.text import cut, quoted


@pytest.mark.parametrize(("text", "limit", "expected"), [
    ("", 3, ""),
    ("abc", 3, "abc"),
    ("abcd", 3, "abc..."),
])
def test_cut(text: str, limit: int, expected: str) -> None:
    assert cut(text, limit) == expected


@pytest.mark.parametrize(("text", "limit", "expected"), [
    ("a\r\nb", 10, "'a\\r\\nb'"),
    ("abcd", 3, "'abc'..."),  # the ellipsis outside the quotes: not part of the text
])
def test_quoted(text: str, limit: int, expected: str) -> None:
    assert quoted(text, limit) == expected
