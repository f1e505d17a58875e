"""What is readable in a damaged spool, and a new spool made of it.

A spool file can be damaged under the engine (a disk that lost a write, a bad sector, a
copy cut short): SQLite then answers "database disk image is malformed" for the pages it
cannot read, and the engine refuses to start (engine.spoolfile.check_sound). The mail on
the other pages is still good.

`check` reads the spool read-only, which a running engine allows, and says what is
readable. `salvage` (the engine stopped: it takes the spool's lock) copies every readable
job with its recipients' progress, the `finished` ids (duplicate detection) and the
`corrupt` rows into a new spool built by the engine's own open code, then swaps it in; the
damaged file is kept beside it, never deleted.

Each table is read through its own b-tree by rowid ranges, no index trusted: a range that
fails is split until every readable row is found, so one damaged page costs the rows on
it, not the table. A job is saved whole or counted lost, never written with a part
missing: its row (envelope and message are read together) must be readable and decode as
the engine decodes it, and at least one of its pending recipients must be readable. The
ids of lost jobs come from the jobs' indexes and the recipients' rows. Supervisor side:
no gevent, no smtplib. docs/SPOOL.md, "A damaged spool".
"""
from __future__ import annotations

import json
import os
import sqlite3
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import closing, suppress
from dataclasses import dataclass, field
from typing import Any

from engine import spoolfile
from engine.job import Job, job_from_stored
from engine.spoolfile import SpoolError

Row = tuple[Any, ...]

PENDING = "pending"
FINAL = ("delivered", "bounced", "expired")
SPOOL_FILE = "spool.db"
_LAST_ROWID = 2**63 - 1
_JOB_COLUMNS = ("id, queued_ts, expires_ts, next_attempt, CAST(envelope AS BLOB),"
                " CAST(message AS BLOB)")
_RCPT_COLUMNS = "job_id, rcpt, status, attempts, next_attempt, code, enhanced, reply"
_CORRUPT_COLUMNS = "id, reason, envelope, message, rcpts, ts"
_JOB_ID_INDEXES = ("sqlite_autoindex_jobs_1", "jobs_due")  # the indexes that hold jobs.id


@dataclass(frozen=True)
class RowidRange:
    """Rowids of a table that could not be read; `last` None: to the table's end."""

    first: int
    last: int | None

    @property
    def count(self) -> int | None:
        return None if self.last is None else self.last - self.first + 1

    def __str__(self) -> str:
        if self.last is None:
            return f"{self.first} onwards"
        return str(self.first) if self.first == self.last else f"{self.first}-{self.last}"


@dataclass
class Findings:
    """What reading a spool found; for a salvage, what it copied to the new one."""

    jobs_saved: int = 0
    rcpts_pending: int = 0  # of the saved jobs
    rcpts_final: int = 0
    finished: int = 0  # ids of finished jobs, for duplicate detection
    corrupt: int = 0  # rows of the `corrupt` table
    events_unpublished: int = 0  # final events of the outbox (engine.outbox)
    jobs_lost: list[str] = field(default_factory=list)
    rcpts_lost: list[tuple[str, str]] = field(default_factory=list)  # (job id, rcpt)
    unreadable: dict[str, list[RowidRange]] = field(default_factory=dict)  # by table
    problems: list[str] = field(default_factory=list)  # integrity_check's, for `check`
    damaged_copy: str | None = None  # where salvage kept the damaged file

    @property
    def lost_anything(self) -> bool:
        return bool(self.jobs_lost or self.rcpts_lost or self.unreadable)

    @property
    def healthy(self) -> bool:
        return not self.problems and not self.lost_anything


# -- the commands -------------------------------------------------------------------------

def check(directory: str) -> Findings:
    """What is readable in the spool at `directory`, and SQLite's integrity check of it.

    Read-only and without the lock, in one read transaction: a running engine is not
    disturbed, and the figures are one moment's."""
    with closing(_open_readonly(spool_file(directory))) as src:
        src.execute("BEGIN")
        found = _Salvager(src, None).run()
        found.problems = _integrity_problems(src)
    return found


def salvage(directory: str, dry_run: bool = False, now: float | None = None) -> Findings:
    """Copy what is readable into a new spool and put it in place of the damaged one.

    SpoolError when there is no spool, an engine holds it, or the new spool cannot be
    written (then nothing changed). `dry_run`: only say what would be saved."""
    path = spool_file(directory)
    lock_fd = spoolfile.lock(directory)
    try:
        if dry_run:
            with closing(_open_readonly(path)) as src:
                return _Salvager(src, None).run()
        return _salvage_locked(directory, path, time.time() if now is None else now)
    finally:
        os.close(lock_fd)


def spool_file(directory: str) -> str:
    """The spool's database file in `directory`; SpoolError if there is none."""
    path = os.path.join(directory, SPOOL_FILE)
    if not os.path.isfile(path):
        raise SpoolError(f"no spool in {directory} (no {SPOOL_FILE})")
    return path


def recovery_advice(config_path: str) -> str:
    """What an operator runs on a damaged spool, for the engine's start-up error."""
    return (f"run 'mailengine spool check -c {config_path}' to see what is readable and"
            f" 'mailengine spool salvage -c {config_path}' to recover it")


def check_report(found: Findings, directory: str) -> list[str]:
    """`mailengine spool check`'s report, a line each."""
    lines = [f"spool {os.path.join(directory, SPOOL_FILE)}: "
             f"{'ok' if found.healthy else 'damaged'}"]
    if found.problems:
        more = len(found.problems) - 1
        lines.append(f"integrity check: {found.problems[0]}"
                     + (f" (and {more} more problems)" if more else ""))
    return [*lines, f"readable: {_contents(found)}", *_losses(found)]


def salvage_report(found: Findings, directory: str, dry_run: bool) -> list[str]:
    """`mailengine spool salvage`'s report, a line each."""
    done = "dry run, nothing written; would save" if dry_run else "saved"
    lines = [f"spool {os.path.join(directory, SPOOL_FILE)}: {done} {_contents(found)}",
             *_losses(found)]
    if found.damaged_copy is not None:
        lines.append(f"the damaged file is kept as {found.damaged_copy}")
    return lines


def _contents(found: Findings) -> str:
    return (f"{found.jobs_saved} jobs, with {found.rcpts_pending} recipients pending and"
            f" {found.rcpts_final} final; {found.finished} finished job ids (duplicate"
            f" detection); {found.corrupt} corrupt rows; {found.events_unpublished} final"
            f" events not yet published")


def _losses(found: Findings) -> list[str]:
    """The summary of what is lost, then each lost job and recipient on a line of its own,
    for an operator to re-send."""
    if not found.lost_anything:
        return ["lost: nothing"]
    lines = [f"lost: {len(found.jobs_lost)} jobs, {len(found.rcpts_lost)} recipients"
             " (pending, or in an unknown state)"]
    for table, ranges in found.unreadable.items():
        counts = [r.count for r in ranges]
        rows = "rows" if None in counts else f"{sum(c or 0 for c in counts)} rows"
        lines.append(f"unreadable {rows} of {table}: rowids {', '.join(map(str, ranges))}")
    lines += [f"lost job: {job_id}" for job_id in found.jobs_lost]
    lines += [f"lost recipient: {job_id} {rcpt}" for job_id, rcpt in found.rcpts_lost]
    return lines


def _open_readonly(path: str) -> sqlite3.Connection:
    try:
        conn = sqlite3.connect(spoolfile.readonly_uri(path), uri=True, isolation_level=None)
    except sqlite3.Error as e:
        raise SpoolError(f"cannot open {path}: {e}") from e
    conn.execute("PRAGMA busy_timeout = 5000")  # a running engine's checkpoint
    # SQLite refuses the whole of a file shorter than its header says (one cut short);
    # with writable_schema it reads the pages that are there. Nothing is written: read-only.
    conn.execute("PRAGMA writable_schema = ON")
    return conn


def _integrity_problems(conn: sqlite3.Connection) -> list[str]:
    """SQLite's integrity check, which also compares each index with its table."""
    try:
        rows = [row[0] for row in conn.execute("PRAGMA integrity_check")]
    except sqlite3.DatabaseError as e:
        return [str(e)]
    lines = [line for text in rows for line in str(text).splitlines()
             if line and not line.startswith("*** in database")]
    return [] if lines == ["ok"] else lines


# -- building the new spool and swapping it in --------------------------------------------

def _salvage_locked(directory: str, path: str, now: float) -> Findings:
    new_path = f"{path}.salvage-new"
    _remove_database(new_path)  # what an interrupted salvage left
    try:
        found = _copy_into(directory, path, new_path)
        _same_owner(new_path, path)
        spoolfile.fsync_path(new_path)
    except (SpoolError, sqlite3.Error, OSError) as e:
        _remove_database(new_path)
        raise SpoolError(f"cannot write the new spool {new_path}: {e}") from e
    found.damaged_copy = _swap(directory, path, new_path,
                               time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now)))
    return found


def _copy_into(directory: str, path: str, new_path: str) -> Findings:
    with closing(_open_readonly(path)) as src, \
            closing(spoolfile.connect(directory, new_path)) as out:
        out.execute("BEGIN IMMEDIATE")
        found = _Salvager(src, out).run()
        out.execute("COMMIT")
        # Out of WAL mode: the new file holds everything itself, with no -wal to carry
        # along; the engine puts it back in WAL mode when it opens it.
        (mode,) = out.execute("PRAGMA journal_mode = DELETE").fetchone()
        if mode != "delete":
            raise SpoolError(f"cannot checkpoint the new spool {new_path} (got {mode!r})")
    return found


def _swap(directory: str, path: str, new_path: str, stamp: str) -> str:
    """Put `new_path` in place of `path`; the damaged file is kept, with its -wal and -shm,
    as `<path>.damaged-<stamp>` (SQLite reads it there with its WAL). Returns that name.

    The damaged files get their new name as a second link first, so there is never a
    moment without a spool.db (an engine would start on an empty spool). Its WAL goes
    before the new file takes the name: SQLite would read it as the new file's log. A
    crash in between leaves the damaged file alone as spool.db, its WAL kept only under
    the new name."""
    kept = f"{path}.damaged-{stamp}"
    try:
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(path + suffix):
                os.link(path + suffix, kept + suffix)
        spoolfile.fsync_path(directory)
        for suffix in ("-wal", "-shm"):
            with suppress(FileNotFoundError):
                os.unlink(path + suffix)
        os.replace(new_path, path)
        spoolfile.fsync_path(directory)
    except OSError as e:
        raise SpoolError(f"cannot swap in the new spool {new_path}: {e}") from e
    return kept


def _remove_database(path: str) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        with suppress(FileNotFoundError):
            os.unlink(path + suffix)


def _same_owner(new_path: str, path: str) -> None:
    """Run as root, the new file still belongs to the engine's user, as the old one did."""
    if os.geteuid() == 0:
        st = os.stat(path)
        os.chown(new_path, st.st_uid, st.st_gid)


# -- reading, row by row ------------------------------------------------------------------

class _Salvager:
    """Reads a spool's tables row by row, keeps the score in `found`, and writes what is
    sound into `out`, a new spool in a transaction (None: only count)."""

    def __init__(self, src: sqlite3.Connection, out: sqlite3.Connection | None) -> None:
        self.src = src
        self.out = out
        self.found = Findings()
        self.rcpts: defaultdict[str, list[Row]] = defaultdict(list)  # readable, by job id
        self.saved: set[str] = set()
        self.lost: set[str] = set()

    def run(self) -> Findings:
        self._table("rcpts", _RCPT_COLUMNS, self._take_rcpt)  # first: a job needs them
        self._table("jobs", _JOB_COLUMNS, self._take_job)
        self._count_lost_jobs(self._known_job_ids())
        self._table("finished", "id, ts", self._take_finished)
        self._table("corrupt", _CORRUPT_COLUMNS, self._take_corrupt)
        if _has_table(self.src, "outbox"):  # a spool of schema 2 on (engine.outbox)
            self._table("outbox", "name, line", self._take_event)
        if _has_table(self.src, "handed_out"):  # no rowid: read as far as it reads
            for (job_id,) in _readable_prefix(self.src, "SELECT job_id FROM handed_out"):
                if job_id in self.saved and self.out is not None:
                    self.out.execute("INSERT OR IGNORE INTO handed_out (job_id) VALUES (?)",
                                     (job_id,))
        return self.found

    def _table(self, table: str, columns: str, take: Callable[[Row], None]) -> None:
        missed = read_rows(self.src, table, columns, take)
        if missed:
            self.found.unreadable.setdefault(table, []).extend(missed)

    def _take_rcpt(self, row: Row) -> None:
        job_id, rcpt, status, attempts, next_attempt = row[1:6]
        sound = isinstance(job_id, str) and isinstance(rcpt, str) and isinstance(attempts, int)
        if sound and (status in FINAL or (status == PENDING and _number(next_attempt))):
            self.rcpts[job_id].append(row[1:])

    def _take_job(self, row: Row) -> None:
        rowid, job_id = row[0], row[1]
        job = _decoded(row)
        pending = [r for r in self.rcpts.get(job_id, ()) if r[2] == PENDING]
        if job is None or not pending:
            if isinstance(job_id, str):
                self._lose(job_id, job)
            else:  # not even its id is readable
                self.found.unreadable.setdefault("jobs", []).append(RowidRange(rowid, rowid))
            return
        kept = [r for r in self.rcpts[job_id] if r[1] in job.rcpts]
        self._write_job(row, kept, min(r[4] for r in pending))
        self.saved.add(job_id)
        self.found.jobs_saved += 1
        self.found.rcpts_pending += sum(r[2] == PENDING for r in kept)
        self.found.rcpts_final += sum(r[2] != PENDING for r in kept)
        have = {r[1] for r in kept}
        self.found.rcpts_lost += [(job_id, rcpt) for rcpt in job.rcpts if rcpt not in have]

    def _lose(self, job_id: str, job: Job | None) -> None:
        """A job that cannot be saved: its pending recipients (or all the envelope names,
        when none of its recipients' rows is readable) are lost with it."""
        if job_id in self.saved or job_id in self.lost:
            return
        self.lost.add(job_id)
        self.found.jobs_lost.append(job_id)
        rows = self.rcpts.get(job_id, [])
        final = {r[1] for r in rows if r[2] != PENDING}
        names = [r[1] for r in rows] if rows or job is None else list(job.rcpts)
        self.found.rcpts_lost += [(job_id, rcpt) for rcpt in names if rcpt not in final]

    def _known_job_ids(self) -> set[str]:
        """Every job id the jobs' indexes or the recipients' rows name."""
        ids = set(self.rcpts)
        for index in _JOB_ID_INDEXES:
            ids.update(job_id for (job_id,) in _readable_prefix(
                self.src, f"SELECT id FROM jobs INDEXED BY {index}") if isinstance(job_id, str))
        return ids

    def _count_lost_jobs(self, known: set[str]) -> None:
        for job_id in sorted(known - self.saved):
            self._lose(job_id, None)
        self.found.jobs_lost.sort()

    def _take_finished(self, row: Row) -> None:
        if isinstance(row[1], str) and _number(row[2]):
            self.found.finished += 1
            if self.out is not None:
                self.out.execute("INSERT OR IGNORE INTO finished (id, ts) VALUES (?, ?)", row[1:])

    def _take_corrupt(self, row: Row) -> None:
        self.found.corrupt += 1
        if self.out is not None:
            self.out.execute(f"INSERT INTO corrupt ({_CORRUPT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
                             row[1:])

    def _take_event(self, row: Row) -> None:
        """A final event the engine had not confirmed out: the next start publishes it."""
        if isinstance(row[1], str) and isinstance(row[2], str):
            self.found.events_unpublished += 1
            if self.out is not None:
                self.out.execute("INSERT INTO outbox (name, line) VALUES (?, ?)", row[1:])
        else:
            self.found.unreadable.setdefault("outbox", []).append(RowidRange(row[0], row[0]))

    def _write_job(self, row: Row, rcpts: list[Row], next_attempt: float) -> None:
        if self.out is None:
            return
        job_id, queued_ts, expires_ts, _, envelope, message = row[1:]
        self.out.execute(
            "INSERT INTO jobs (id, queued_ts, expires_ts, next_attempt, envelope, message)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (job_id, queued_ts, expires_ts, next_attempt, envelope.decode("utf-8"), message))
        self.out.executemany(f"INSERT INTO rcpts ({_RCPT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                             rcpts)


def _decoded(row: Row) -> Job | None:
    """The job a jobs row holds, decoded as the engine decodes it; None if it does not."""
    _, job_id, queued_ts, expires_ts, _, envelope, message = row
    if not (_number(queued_ts) and _number(expires_ts) and isinstance(envelope, bytes)
            and isinstance(message, bytes)):
        return None
    try:
        data = json.loads(envelope.decode("utf-8"))
        job = job_from_stored(data, message) if isinstance(data, dict) else None
    except Exception:  # whatever the decoder refuses, the row cannot be sent
        return None
    return job if job is not None and job.id == job_id else None


def _number(value: object) -> bool:
    return isinstance(value, int | float)


def _has_table(conn: sqlite3.Connection, name: str) -> bool:
    rows = _readable_prefix(conn, "SELECT 1 FROM sqlite_master WHERE type = 'table'"
                                  " AND name = ?", name)
    return bool(rows)


def _readable_prefix(conn: sqlite3.Connection, sql: str, *params: object) -> list[Row]:
    """The rows `sql` returns up to the first that cannot be read."""
    rows: list[Row] = []
    with suppress(sqlite3.DatabaseError):
        for row in conn.execute(sql, params):
            rows.append(row)
    return rows


def read_rows(conn: sqlite3.Connection, table: str, columns: str,
              take: Callable[[Row], None]) -> list[RowidRange]:
    """Pass each readable row of `table` (its rowid first, then `columns`) to `take`, in
    rowid order; return the rowid ranges that could not be read.

    A range that fails is split in two, down to single rowids: each probe descends the
    table's b-tree to one leaf, so only the rows on damaged pages are missed. The cost
    is a probe per rowid in the damaged pages' span (deleted rows' rowids included)."""
    select = f"SELECT rowid, {columns} FROM {table} WHERE rowid"
    first, last = _rowid_bounds(conn, table)
    if last is None:  # the end is unknown: read on until the first failure
        stop = _stream(conn, select, first, _LAST_ROWID, take)
        return [] if stop is None else [RowidRange(stop + 1, None)]
    missed: list[int] = []
    _read_range(conn, select, first, last, take, missed)
    return _ranges(missed)


def _read_range(conn: sqlite3.Connection, select: str, lo: int, hi: int,
                take: Callable[[Row], None], missed: list[int]) -> None:
    while lo < hi:
        stop = _stream(conn, select, lo, hi, take)
        if stop is None:
            return
        if stop >= lo:  # read up to `stop`: go on after it
            lo = stop + 1
        else:
            mid = (lo + hi) // 2
            _read_range(conn, select, lo, mid, take, missed)
            lo = mid + 1
    if lo == hi:
        _probe(conn, select, lo, take, missed)


def _probe(conn: sqlite3.Connection, select: str, rowid: int, take: Callable[[Row], None],
           missed: list[int]) -> None:
    """Read one rowid by an exact seek: a range of one would step on to the next entry,
    maybe on the damaged page, and lose a sound row."""
    try:
        row = conn.execute(f"{select} = ?", (rowid,)).fetchone()
    except sqlite3.DatabaseError:
        missed.append(rowid)
        return
    if row is not None:
        take(row)


def _stream(conn: sqlite3.Connection, select: str, lo: int, hi: int,
            take: Callable[[Row], None]) -> int | None:
    """Read rowids lo..hi in order; None when all were read, else the last rowid read
    (lo - 1 if none) before a row could not be. `take`'s own errors (writing the new
    spool) are not read errors and propagate."""
    last = lo - 1
    try:
        cursor = conn.execute(f"{select} BETWEEN ? AND ? ORDER BY rowid", (lo, hi))
    except sqlite3.DatabaseError:
        return last
    while True:
        try:
            row = cursor.fetchone()
        except sqlite3.DatabaseError:
            return last
        if row is None:
            return None
        take(row)
        last = row[0]


def _rowid_bounds(conn: sqlite3.Connection, table: str) -> tuple[int, int | None]:
    """The lowest and highest rowid in use, by the table's b-tree or any of its indexes
    (each holds the rowids): its edge pages may be the damaged ones. (1, 0): empty."""
    lows: list[int] = []
    highs: list[int] = []
    answered = False
    for source in [table, *(f"{table} INDEXED BY {index}" for index in _indexes(conn, table))]:
        for function, into in (("min", lows), ("max", highs)):
            try:
                (value,) = conn.execute(f"SELECT {function}(rowid) FROM {source}").fetchone()
            except sqlite3.DatabaseError:
                continue
            answered = True
            if isinstance(value, int):
                into.append(value)
    if answered and not lows and not highs:
        return 1, 0
    return min(lows, default=1), max(highs, default=None)


def _indexes(conn: sqlite3.Connection, table: str) -> list[str]:
    rows = _readable_prefix(
        conn, "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = ?", table)
    return [f'"{name}"' for (name,) in rows if isinstance(name, str)]


def _ranges(rowids: list[int]) -> list[RowidRange]:
    """Sorted rowids as runs of consecutive ones."""
    out: list[RowidRange] = []
    for rowid in sorted(rowids):
        if out and out[-1].last == rowid - 1:
            out[-1] = RowidRange(out[-1].first, rowid)
        else:
            out.append(RowidRange(rowid, rowid))
    return out
