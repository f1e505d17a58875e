"""Text from outside (a server's reply, a producer's envelope, an exception) cut short.

What a remote party wrote travels on into events, logs, the spool and error messages; it is
cut short there, so that nobody can make them grow without end. One rule everywhere: at most
`limit` characters of the text, then "..." when something was cut.

(engine.config keeps its own: it imports no other engine module.)
"""
from __future__ import annotations

ELLIPSIS = "..."


def cut(text: str, limit: int) -> str:
    """`text`, or its first `limit` characters and "..." when it is longer."""
    return text if len(text) <= limit else text[:limit] + ELLIPSIS


def quoted(text: str, limit: int) -> str:
    """`text` as `repr()` shows it (quoted, control characters escaped), cut at `limit`
    characters first; the "..." comes after the closing quote, so that it is not read as
    part of the text."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + ELLIPSIS
