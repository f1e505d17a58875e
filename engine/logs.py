"""Structured log lines: `ts level proc event=name key=value ...`, one fixed vocabulary.

Values are quoted when they contain spaces and cut short at 200 characters;
callers pass envelope data (ids, addresses, replies), never message bodies.
Every line starts with `event=<name>`; the names in use are listed in
docs/OPERATIONS.md.
"""
from __future__ import annotations

import logging
import sys
from typing import Any

from engine.text import cut

MAX_VALUE = 200


def setup(level: str = "info", process: str = "mailengine") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(
        f"%(asctime)s %(levelname)s {process}[%(process)d] %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def kv(event: str, **fields: Any) -> str:
    """`event=name key=value ...` with values made safe for one log line."""
    parts = [f"event={event}"]
    parts.extend(f"{key}={_value(val)}" for key, val in fields.items())
    return " ".join(parts)


def _value(val: Any) -> str:
    text = "" if val is None else str(val)
    text = text.replace("\r", "\\r").replace("\n", "\\n")
    text = cut(text, MAX_VALUE)
    if not text or any(c in text for c in ' "='):
        text = '"' + text.replace('"', '\\"') + '"'
    return text
