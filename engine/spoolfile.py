"""The spool's SQLite file: opened, locked, configured and migrated.

`<directory>/spool.db` in WAL mode with `synchronous = FULL` (a commit returns once
the write-ahead log is fsynced), held by one process at a time through an exclusive
lock on `<directory>/spool.lock`. A new file gets the current schema; a file written
by a newer engine is refused rather than misread. engine.spool works on what `open_db`
returns. See docs/SPOOL.md.
"""
from __future__ import annotations

import fcntl
import os
import sqlite3
from contextlib import suppress

SCHEMA_VERSION = 1
CACHE_KIB = 32 * 1024  # SQLite's page cache, at most
# A new spool's page size. With SQLite's 4 KiB default a 5 KB message spills into an overflow
# page, and a commit writes each page as a WAL frame of its own: 16 KiB pages hold a few
# messages each, and accepting and recording a 5 KB job costs about a fifth less CPU.
PAGE_BYTES = 16 * 1024
WAL_CHECKPOINT_BYTES = 16 * 1024 * 1024  # WAL written between automatic checkpoints

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    queued_ts REAL NOT NULL,
    expires_ts REAL NOT NULL,
    next_attempt REAL,           -- earliest next_attempt of its pending rcpts
    envelope TEXT NOT NULL,      -- engine.job.envelope_json, as JSON
    message BLOB NOT NULL        -- last, so reading the other columns skips it
);
-- Covering: `due` walks it in order without touching the rows (or the blobs).
CREATE INDEX IF NOT EXISTS jobs_due ON jobs (next_attempt, id);
CREATE INDEX IF NOT EXISTS jobs_queued ON jobs (queued_ts);
CREATE TABLE IF NOT EXISTS rcpts (
    job_id TEXT NOT NULL,
    rcpt TEXT NOT NULL,
    status TEXT NOT NULL,        -- 'pending' or a final engine.protocol.Status
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL,           -- NULL once final
    code INTEGER,                -- the last reply
    enhanced TEXT,
    reply TEXT,
    PRIMARY KEY (job_id, rcpt)
);
CREATE INDEX IF NOT EXISTS rcpts_pending ON rcpts (job_id, next_attempt)
    WHERE status = 'pending';
CREATE TABLE IF NOT EXISTS finished (
    id TEXT PRIMARY KEY,
    ts REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS finished_ts ON finished (ts);
CREATE TABLE IF NOT EXISTS corrupt (
    id TEXT,
    reason TEXT NOT NULL,
    envelope BLOB,
    message BLOB,
    rcpts TEXT,                  -- a line per recipient: "rcpt status attempts"
    ts REAL NOT NULL
);
"""



class SpoolError(Exception):
    """The spool cannot be opened or written: nothing in the failed call was accepted."""


def open_db(directory: str, path: str) -> tuple[sqlite3.Connection, int]:
    """The spool's database at `path`, and the descriptor of the lock that keeps it
    ours (close both when done); SpoolError when either cannot be had."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    lock_fd = _lock(os.path.join(directory, "spool.lock"))
    try:
        return _connect(directory, path), lock_fd
    except BaseException:
        os.close(lock_fd)
        raise


def _connect(directory: str, path: str) -> sqlite3.Connection:
    fresh = not os.path.exists(path)
    if fresh:  # created 0600 by us, so the WAL and shm files inherit it
        os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
    try:
        conn = sqlite3.connect(path, isolation_level=None)
    except sqlite3.Error as e:
        raise SpoolError(f"cannot open {path}: {e}") from e
    try:
        _configure(conn, path)
        _migrate(conn, path)
    except BaseException:
        conn.close()
        raise
    if fresh:
        _fsync_dir(directory)
    return conn


def _lock(path: str) -> int:
    """Hold `path` exclusively for this process's life: one supervisor per spool."""
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SpoolError(f"spool {os.path.dirname(path)} is in use by another process") from None
    return fd


def _configure(conn: sqlite3.Connection, path: str) -> None:
    try:
        conn.execute("PRAGMA busy_timeout = 5000")  # an operator's sqlite3 shell reading
        # Before WAL mode, which writes the header: takes effect only on a new (empty)
        # file; an existing spool keeps the page size it was created with.
        conn.execute(f"PRAGMA page_size = {PAGE_BYTES}")
        (mode,) = conn.execute("PRAGMA journal_mode = WAL").fetchone()
        conn.execute("PRAGMA synchronous = FULL")  # fsync the WAL at every commit
        # A page cache big enough for a burst's pages to be found again when its jobs
        # finish (the 2 MB default read most of them back from the file), and a checkpoint
        # every 16 MB of WAL rather than 4: the pages a burst rewrites over and over
        # (indexes, leaves, freed and reused pages) are copied to the database once per
        # checkpoint. Neither changes what a commit makes durable.
        conn.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
        (page_bytes,) = conn.execute("PRAGMA page_size").fetchone()
        conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_CHECKPOINT_BYTES // page_bytes}")
        conn.execute("PRAGMA journal_size_limit = 67108864")  # shrink the WAL after a burst
    except sqlite3.Error as e:
        raise SpoolError(f"cannot open {path}: {e}") from e
    if mode != "wal":
        raise SpoolError(f"cannot put {path} in WAL mode (got {mode!r})")


def _migrate(conn: sqlite3.Connection, path: str) -> None:
    """Create the schema, or refuse a spool written by a newer engine."""
    try:
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        if version > SCHEMA_VERSION:
            raise SpoolError(
                f"{path} has schema version {version}, newer than this engine's "
                f"{SCHEMA_VERSION}: run the mailengine version that wrote it")
        if version < SCHEMA_VERSION:
            # One script, one transaction (executescript would commit an open one first).
            conn.executescript(f"BEGIN IMMEDIATE;\n{_SCHEMA}\n"
                               f"PRAGMA user_version = {SCHEMA_VERSION};\nCOMMIT;")
    except sqlite3.Error as e:
        rollback(conn)
        raise SpoolError(f"cannot open {path}: {e}") from e


def rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        with suppress(sqlite3.Error):  # the connection is gone too; the transaction dies with it
            conn.execute("ROLLBACK")


def _fsync_dir(directory: str) -> None:
    """Make the new file's directory entry durable too."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
