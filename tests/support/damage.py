"""Damaging a spool file as a disk does, page by page and deterministically: the pages of a
table or index are found through SQLite's dbstat table, then a byte is flipped or the file
cut short."""
from __future__ import annotations

import os
import sqlite3
from contextlib import closing

import pytest


def checkpoint(path: str) -> None:
    """Everything committed into the main file, and no -wal left: a page of the file is
    then the only copy of what it holds."""
    with closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0
    assert not os.path.exists(path + "-wal") or os.path.getsize(path + "-wal") == 0


def pages(path: str, name: str) -> list[tuple[int, str]]:
    """(page number, page type) of each page of table or index `name`, in file order."""
    with closing(sqlite3.connect(path)) as conn:
        try:
            rows = conn.execute("SELECT pageno, pagetype FROM dbstat WHERE name = ?"
                                " ORDER BY pageno", (name,)).fetchall()
        except sqlite3.OperationalError:
            pytest.skip("this SQLite has no dbstat table to find a table's pages")
    return [(int(n), str(t)) for n, t in rows]


def page_size(path: str) -> int:
    with closing(sqlite3.connect(path)) as conn:
        return int(conn.execute("PRAGMA page_size").fetchone()[0])


def flip_page_type(path: str, pageno: int) -> None:
    """Flip every bit of the page's first byte, its b-tree page type: SQLite finds no valid
    page there ("database disk image is malformed") and the rest of the file intact."""
    size = page_size(path)
    with open(path, "r+b") as f:
        f.seek((pageno - 1) * size)
        byte = f.read(1)[0]
        f.seek((pageno - 1) * size)
        f.write(bytes([byte ^ 0xFF]))


def cut_last_page(path: str) -> None:
    os.truncate(path, os.path.getsize(path) - page_size(path))


def leaf_rowids(path: str, pageno: int) -> list[int]:
    """The rowids of the rows on a table's leaf page, read from the page itself."""
    size = page_size(path)
    with open(path, "rb") as f:
        f.seek((pageno - 1) * size)
        page = f.read(size)
    assert page[0] == 0x0D, "not a table leaf page"
    cells = int.from_bytes(page[3:5], "big")
    rowids = []
    for i in range(cells):
        offset = int.from_bytes(page[8 + 2 * i:10 + 2 * i], "big")
        _, offset = _varint(page, offset)  # the payload's size
        rowids.append(_varint(page, offset)[0])
    return sorted(rowids)


def _varint(data: bytes, offset: int) -> tuple[int, int]:
    """SQLite's variable-length integer at `offset`, and the offset after it."""
    value = 0
    for i in range(9):
        byte = data[offset + i]
        if i == 8:
            return (value << 8) | byte, offset + 9
        value = (value << 7) | (byte & 0x7F)
        if byte < 0x80:
            return value, offset + i + 1
    raise AssertionError("not reached")
