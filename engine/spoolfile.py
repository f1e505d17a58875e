"""The spool's SQLite file: opened, locked, configured and migrated.

`<directory>/spool.db` in WAL mode with `synchronous = FULL` (a commit returns once
the write-ahead log is fsynced), held by one process at a time through an exclusive
lock on `<directory>/spool.lock`. A new file gets the current schema; a file written
by a newer engine is refused rather than misread, and a damaged one (SQLite's "database
disk image is malformed") is refused with SpoolDamaged before anything writes to it.
engine.spool works on what `open_db` returns; engine.salvage recovers a damaged file.
See docs/SPOOL.md.
"""
from __future__ import annotations

import fcntl
import os
import sqlite3
from contextlib import suppress
from urllib.parse import quote

# 2: the outbox and the hand-out marks; 3: TLS-RPT's counts and reports. An older file gains
# what it lacks at open (CREATE ... IF NOT EXISTS); nothing it holds changes.
SCHEMA_VERSION = 3
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
-- Final events written with the outcome they announce, until they are out (engine.outbox).
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY,
    name TEXT NOT NULL,          -- the event's name (its PUB topic)
    line TEXT NOT NULL           -- the event, exactly as published
);
-- Where the events log stood when the outbox was last emptied (one row, id 1).
CREATE TABLE IF NOT EXISTS outbox_mark (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    inode INTEGER NOT NULL,
    offset INTEGER NOT NULL
);
-- Jobs handed to a worker whose results are not all recorded (engine.dispatch): after a
-- crash of the supervisor, what they had out may have been delivered.
CREATE TABLE IF NOT EXISTS handed_out (
    job_id TEXT PRIMARY KEY
) WITHOUT ROWID;
-- A move of the spool's times onto the wall clock's, planned at a stop after a clock step and
-- done at the next open, a chunk of rows per transaction (engine.spool `plan_shift`).
CREATE TABLE IF NOT EXISTS clock_shift (
    tbl TEXT PRIMARY KEY,        -- jobs, rcpts or finished
    seconds REAL NOT NULL,
    done_upto INTEGER NOT NULL,  -- rowids up to this one are moved
    last INTEGER NOT NULL        -- the table's last rowid when the move was planned
);
-- TLS-RPT (RFC 8460, engine.tlsrpt_store): sessions counted per report period (its start,
-- Unix seconds, UTC) and policy domain, until the period's report is made.
CREATE TABLE IF NOT EXISTS tlsrpt_counts (
    period INTEGER NOT NULL,
    domain TEXT NOT NULL,
    policy TEXT NOT NULL,        -- JSON: policy-type, policy-string, mx-host (engine.tlsrpt)
    result TEXT NOT NULL,        -- 'success' or an RFC 8460 result type
    detail TEXT NOT NULL,        -- JSON: the failure's details ('' for a success)
    count INTEGER NOT NULL,
    PRIMARY KEY (period, domain, policy, result, detail)
) WITHOUT ROWID;
-- Where each policy domain wants its reports (its _smtp._tls TXT record, as last seen).
CREATE TABLE IF NOT EXISTS tlsrpt_rua (
    domain TEXT PRIMARY KEY,
    rua TEXT NOT NULL,           -- JSON list of URIs
    seen REAL NOT NULL
) WITHOUT ROWID;
-- Reports made and not yet accepted by every rua.
CREATE TABLE IF NOT EXISTS tlsrpt_reports (
    report_id TEXT PRIMARY KEY,
    domain TEXT NOT NULL,
    period INTEGER NOT NULL,
    made REAL NOT NULL,
    body BLOB NOT NULL,          -- the gzipped JSON report
    pending TEXT NOT NULL,       -- JSON list of the rua URIs that have not accepted it
    tries INTEGER NOT NULL DEFAULT 0,
    next_try REAL NOT NULL,
    error TEXT                   -- the last failure
);
"""
# SQLite's primary result codes for a file that is not a sound database: a malformed page
# (a truncated file, a flipped byte) or no database at all.
_DAMAGE_CODES = (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


class SpoolError(Exception):
    """The spool cannot be opened or written: nothing in the failed call was accepted."""


class SpoolDamaged(SpoolError):
    """The spool's file is damaged: retrying cannot help, `mailengine spool salvage` can.

    `path` is the database file, `reason` what SQLite said."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"spool {path} is damaged ({reason})")
        self.path = path
        self.reason = reason


def is_damage(err: BaseException) -> bool:
    """Whether SQLite's error says the file itself is damaged (not locked, full or gone)."""
    code = getattr(err, "sqlite_errorcode", None)
    return isinstance(err, sqlite3.DatabaseError) and code is not None \
        and code & 0xFF in _DAMAGE_CODES


def readonly_uri(path: str) -> str:
    """The URI that opens `path` read-only: no write, no checkpoint, no lock to take."""
    return f"file:{quote(path)}?mode=ro"


def open_db(directory: str, path: str) -> tuple[sqlite3.Connection, int]:
    """The spool's database at `path`, and the descriptor of the lock that keeps it
    ours (close both when done); SpoolError when either cannot be had."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    lock_fd = lock(directory)
    try:
        check_sound(path)
        return connect(directory, path), lock_fd
    except BaseException:
        os.close(lock_fd)
        raise


def connect(directory: str, path: str) -> sqlite3.Connection:
    """The database at `path`, configured, with the current schema; the caller holds the
    lock. engine.salvage builds a new spool with it too."""
    fresh = not os.path.exists(path)
    if fresh:  # created 0600 by us, so the WAL and shm files inherit it
        os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
    try:
        conn = sqlite3.connect(path, isolation_level=None)
    except sqlite3.Error as e:
        raise _open_error(path, e) from e
    try:
        _configure(conn, path)
        _migrate(conn, path)
    except BaseException:
        conn.close()
        raise
    if fresh:
        fsync_path(directory)  # the new file's directory entry durable too
    return conn


def open_reader(path: str) -> sqlite3.Connection:
    """Another connection to the spool's database, for reading only (a long read off the
    supervisor's loop, in a thread of its own: a connection belongs to the thread that
    opened it). In WAL mode it reads a snapshot while the loop's connection writes."""
    try:
        conn = sqlite3.connect(readonly_uri(path), uri=True, isolation_level=None)
    except sqlite3.Error as e:
        raise _open_error(path, e) from e
    conn.execute("PRAGMA query_only = ON")
    return conn


def lock(directory: str) -> int:
    """Hold `<directory>/spool.lock` exclusively for this process's life: one supervisor
    per spool. Returns the descriptor that holds it."""
    fd = os.open(os.path.join(directory, "spool.lock"), os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SpoolError(f"spool {directory} is in use by another process") from None
    return fd


def check_sound(path: str) -> None:
    """SpoolDamaged unless SQLite's quick_check finds `path` sound (a missing file, a new
    spool, is).

    quick_check reads every page, so its cost grows with the file: on a spool of 100,000
    jobs of 500 bytes (96 MB) it took 72 ms with the file in the page cache and 390 ms
    without; 100,000 jobs of 5 KB (577 MB), 240 ms and 2.2 to 2.9 s. Paid once per start,
    it is worth it: a cheaper check (the header, the schema, the first and last page of
    each table) misses a damaged page in the middle, which `due` then finds at run time,
    the engine exits, systemd starts it again, the cheap check passes again: the crash
    loop this check is here to end. Read-only, so a damaged file is left as it was found.

    Out of the page cache (after a reboot), quick_check follows the b-trees, one random
    page read at a time: the file is read in order first (`read_ahead`), which the disk
    does several times faster (a 1.35 GB spool of 1M recipients, this check: 7.7-9.2 s
    cold, 2.2-4.0 s read ahead first).
    """
    if not os.path.exists(path):
        return
    read_ahead(path)
    try:
        conn = sqlite3.connect(readonly_uri(path), uri=True)
    except sqlite3.Error as e:
        raise _open_error(path, e) from e
    try:
        problems = [row[0] for row in conn.execute("PRAGMA quick_check")]
    except sqlite3.Error as e:
        raise _open_error(path, e) from e
    finally:
        conn.close()
    if problems != ["ok"]:
        raise SpoolDamaged(path, first_problem(problems))


READ_AHEAD_CHUNK = 4 * 1024 * 1024
READ_AHEAD_SHARE = 0.5  # of the memory available: a larger file is not read ahead


def read_ahead(path: str, meminfo: str = "/proc/meminfo") -> bool:
    """Read `path` and its WAL in order into the page cache, if they fit in half the
    memory available (else the read would evict its own beginning, and others' pages, for
    nothing). Whether it did."""
    files = [name for name in (path, path + "-wal") if os.path.exists(name)]
    size = sum(os.path.getsize(name) for name in files)
    available = memory_available(meminfo)
    if available is None or size > available * READ_AHEAD_SHARE:
        return False
    buf = bytearray(READ_AHEAD_CHUNK)
    for name in files:
        with suppress(OSError), open(name, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    return True


def memory_available(meminfo: str = "/proc/meminfo") -> int | None:
    """The kernel's estimate of the memory available without swapping (bytes), None where
    there is no /proc/meminfo to ask."""
    try:
        with open(meminfo, encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def first_problem(problems: list[str]) -> str:
    """The first line of an integrity check's report that names a problem."""
    lines = [line for text in problems for line in text.splitlines()
             if line and not line.startswith("*** in database")]
    return lines[0] if lines else "integrity check failed"


def _open_error(path: str, err: sqlite3.Error) -> SpoolError:
    return SpoolDamaged(path, str(err)) if is_damage(err) else SpoolError(
        f"cannot open {path}: {err}")


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
        raise _open_error(path, e) from e
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
        raise _open_error(path, e) from e


def rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        with suppress(sqlite3.Error):  # the connection is gone too; the transaction dies with it
            conn.execute("ROLLBACK")


def fsync_path(path: str) -> None:
    """fsync a file or a directory (a directory: the names it holds) by its path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
