"""engine.spoolfile.read_ahead: the spool read in order before quick_check (a cold start
checked several times faster), but only a file that fits in half the memory available."""
from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from engine import spoolfile
from engine.spool import SpoolDamaged

pytestmark = pytest.mark.timeout(30)


def meminfo(tmp_path: Path, available_kib: int) -> str:
    path = tmp_path / "meminfo"
    path.write_text(f"MemTotal:       {4 * available_kib} kB\n"
                    f"MemFree:        {available_kib // 2} kB\n"
                    f"MemAvailable:   {available_kib} kB\n", encoding="ascii")
    return str(path)


def spool_file(tmp_path: Path, rows: int = 200) -> str:
    path = str(tmp_path / "spool.db")
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE t (x BLOB)")
        conn.executemany("INSERT INTO t VALUES (?)", [(b"x" * 1000,)] * rows)
    return path


def test_a_file_that_fits_is_read_ahead(tmp_path: Path) -> None:
    path = spool_file(tmp_path)
    assert spoolfile.read_ahead(path, meminfo(tmp_path, 1024 * 1024))


def test_a_file_over_half_the_memory_available_is_not(tmp_path: Path) -> None:
    path = spool_file(tmp_path)  # ~200 KB
    assert not spoolfile.read_ahead(path, meminfo(tmp_path, 300))  # half: 150 KiB


def test_without_meminfo_nothing_is_read_ahead(tmp_path: Path) -> None:
    path = spool_file(tmp_path)
    assert spoolfile.memory_available(str(tmp_path / "none")) is None
    assert not spoolfile.read_ahead(path, str(tmp_path / "none"))


def test_memory_available_is_in_bytes(tmp_path: Path) -> None:
    assert spoolfile.memory_available(meminfo(tmp_path, 2048)) == 2048 * 1024


def test_a_damaged_file_read_ahead_is_still_refused(tmp_path: Path) -> None:
    """The read-ahead changes when pages are read, not what the check finds."""
    path = spool_file(tmp_path, rows=2000)
    with open(path, "r+b") as f:  # garble pages in the middle of the table
        f.seek(40 * 4096)
        f.write(b"\xff" * 4096 * 4)
    assert spoolfile.read_ahead(path)
    with pytest.raises(SpoolDamaged):
        spoolfile.check_sound(path)
