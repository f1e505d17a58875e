"""The spool: every accepted job and each recipient's progress, on disk.

One SQLite file, `<directory>/spool.db` (engine.spoolfile opens it), in WAL mode
with `synchronous=FULL`:
a commit returns only once the write-ahead log is fsynced, so whatever a
method has committed survives kill -9 of any process and a power cut. Each
public write method is one transaction over a whole batch (group commit), so
one fsync covers a hundred jobs instead of one.

The supervisor is the only writer, enforced by an exclusive lock on
`<directory>/spool.lock`. Nothing on disk marks a job "in flight": after a
crash every recipient that is not final is simply due again, and a recipient
whose final result was recorded is never handed out again. A damaged file (SQLite's
"database disk image is malformed") raises SpoolDamaged, at open or at run time; see
engine/salvage.py. See docs/SPOOL.md.
"""
from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Callable, Container, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii
from typing import Any, Self

from engine import events
from engine.events import Event
from engine.job import Job, envelope_json, job_from_stored
from engine.protocol import Status
from engine.reply import Reply
from engine.spoolfile import (
    SpoolDamaged,
    SpoolError,
    is_damage,
    open_db,
    open_reader,
    rollback,
)

PENDING = "pending"  # a recipient not final yet (never tried, or deferred)
_IN_CHUNK = 500  # ids per `IN (...)` query, far below SQLite's variable limit
_REASON_MAX = 300


@dataclass(frozen=True)
class Pending:
    """A job with recipients due now."""

    job: Job  # job.rcpts = ALL original recipients
    queued_ts: float  # Unix time accepted
    expires_ts: float
    rcpts: tuple[str, ...]  # recipients not final yet whose next_attempt <= now
    attempts: Mapping[str, int]  # attempts made so far, per rcpt in `rcpts`


@dataclass(frozen=True)
class RcptUpdate:
    """One recipient's new state, for `Spool.record`."""

    job_id: str
    rcpt: str
    status: Status
    next_attempt: float | None = None  # required for DEFERRED
    reply: Reply | None = None
    count_attempt: bool = True  # False: a throttled/suspended wait, no attempt burned

    def __post_init__(self) -> None:
        if self.status is Status.DEFERRED and self.next_attempt is None:
            raise ValueError(f"DEFERRED update for {self.job_id}/{self.rcpt} needs next_attempt")


@dataclass(frozen=True)
class SpoolStats:
    jobs: int
    rcpts_pending: int
    rcpts_deferred: int  # pending with attempts > 0
    oldest_queued_ts: float | None


@dataclass(frozen=True)
class SetAside:
    """A job that could not be decoded, moved to the `corrupt` table: what could still be
    read of it, so its recipients get a final event (engine.supervisor)."""

    job_id: str
    reason: str
    pending: tuple[tuple[str, int], ...]  # (rcpt, attempts) of the recipients not final
    meta: Mapping[str, Any]  # the envelope's, when it could be read; else empty
    queued_ts: float


@dataclass(frozen=True)
class Waiting:
    """A recipient not final yet, as the operator's queue commands find it
    (engine.queue_admin): enough to record its end and write its final event."""

    job_id: str
    rcpt: str
    attempts: int
    queued_ts: float
    meta: Mapping[str, Any]


@dataclass
class DomainQueue:
    """The recipients waiting for one domain (`Spool.by_domain`)."""

    domain: str
    rcpts: int = 0
    jobs: int = 0
    oldest_ts: float = 0.0  # the oldest job's acceptance
    next_attempt: float = 0.0  # the earliest next try
    reply: Reply | None = None  # the reply stored for the recipient tried most


class _Corrupt(Exception):
    """A stored job that cannot be decoded."""


class Spool:
    """The durable queue. Not thread-safe: one owner, the supervisor."""

    def __init__(self, directory: str, dedupe_window: float = 86400.0,
                 on_corrupt: Callable[[SetAside, list[Event]], None] | None = None) -> None:
        self.directory = directory
        self.path = os.path.join(directory, "spool.db")
        self.dedupe_window = dedupe_window
        self._on_corrupt = on_corrupt  # told of each job set aside, with its final events
        self._conn, self._lock_fd = open_db(directory, self.path)
        self._closed = False
        with self._reading():
            (last,) = self._conn.execute("SELECT MAX(seq) FROM outbox").fetchone()
        self.last_event_seq = int(last or 0)  # the newest event stored in the outbox
        # [jobs, pending recipients, deferred ones]: what `stats` reports, counted here once
        # and then kept as the spool changes (`_keep_counts`).
        self._counts = [0, 0, 0]
        try:
            self._keep_counts()
        except BaseException:
            self.close()
            raise
        # A move of its times planned at the last stop (`plan_shift`), done now, before the
        # spool is used: (seconds, rows moved), or None.
        try:
            self.shifted = self._finish_shift()
        except BaseException:
            self.close()  # the lock too: the next try may take it
            raise

    def _keep_counts(self) -> None:
        """Count the spool once; from then on the counts are kept by the methods that change
        them, in memory: `accept` (what it inserted), `record` (a recipient final, or tried
        for the first time: `_record_counts`), `_settle` (jobs finished) and `_set_aside`.
        These are the only writes to `jobs` and `rcpts` (`transaction` is for other
        modules' tables), and a transaction that fails puts the counts back (`_write`).
        After a kill -9, a salvage or an operator's edit of the file, the next open counts
        again: a full read, 0.2 s at a million recipients, once per start."""
        conn = self._conn
        with self._reading():
            (jobs,) = conn.execute("SELECT COUNT(*) FROM jobs").fetchone()
            (pending, deferred) = conn.execute(
                "SELECT COUNT(*), COALESCE(SUM(attempts > 0), 0) FROM rcpts"
                " WHERE status = 'pending'").fetchone()
        self._counts = [int(jobs), int(pending), int(deferred)]

    def _counted(self, jobs: int, pending: int, deferred: int) -> None:
        counts = self._counts
        counts[0] += jobs
        counts[1] += pending
        counts[2] += deferred

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._conn.close()
        finally:
            os.close(self._lock_fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _reading(self) -> Iterator[None]:
        """SpoolDamaged for a read that finds the file damaged: no caller may take that
        for an empty spool, and retrying cannot help."""
        try:
            yield
        except sqlite3.DatabaseError as e:
            if is_damage(e):
                raise SpoolDamaged(self.path, str(e)) from e
            raise

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One transaction, durable when the block exits; SpoolError if it could not commit."""
        conn = self._conn
        seq = self.last_event_seq
        counts = list(self._counts)
        try:
            conn.execute("BEGIN IMMEDIATE")
            yield conn
            conn.execute("COMMIT")
        except sqlite3.Error as e:
            rollback(conn)
            self.last_event_seq = seq  # the events the block stored are not there
            self._counts = counts  # nor the changes it counted
            if is_damage(e):
                raise SpoolDamaged(self.path, str(e)) from e
            raise SpoolError(f"spool write failed: {e}") from e
        except BaseException:
            rollback(conn)
            self.last_event_seq = seq
            self._counts = counts
            raise

    @contextmanager
    def _write_unsynced(self) -> Iterator[sqlite3.Connection]:
        """`_write` without the fsync: what it commits survives the death of this process
        (the page cache keeps it) and is made durable by the next `_write`'s fsync, but a
        power cut before that may lose it. For marks that only make counts more exact."""
        conn = self._conn
        conn.execute("PRAGMA synchronous = OFF")  # not inside a transaction: SQLite's rule
        try:
            with self._write() as written:
                yield written
        finally:
            conn.execute("PRAGMA synchronous = FULL")

    # -- the tables of other modules (engine.tlsrpt_store) -----------------

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction for another module's tables in the spool's file: durable
        when the block exits, SpoolError (or SpoolDamaged) if it could not commit."""
        with self._write() as conn:
            yield conn

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """The rows of a read of another module's tables."""
        with self._reading():
            return self._conn.execute(sql, params).fetchall()

    def _store_events(self, conn: sqlite3.Connection, stored: Sequence[Event]) -> None:
        """Put events in the outbox, in the transaction of the outcome they announce."""
        if not stored:
            return
        first = self.last_event_seq + 1
        conn.executemany("INSERT INTO outbox (seq, name, line) VALUES (?, ?, ?)",
                         [(seq, name, line) for seq, (name, line) in enumerate(stored, first)])
        self.last_event_seq = first + len(stored) - 1

    # -- accepting -------------------------------------------------------

    def accept(self, jobs: Sequence[Job], now: float, max_age: float) -> list[Job]:
        """Spool the new jobs of a batch in one transaction; durable on return.

        A job whose id is held, finished within the dedupe window, or repeated
        within the batch is dropped. Returns the jobs newly accepted, in order.
        """
        for job in jobs:
            if not job.rcpts:
                raise ValueError(f"job {job.id} has no recipients")
        with self._write() as conn:
            fresh = self._new_jobs(conn, jobs, now)
            conn.executemany(
                "INSERT INTO jobs (id, queued_ts, expires_ts, next_attempt, envelope, message)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                [_job_row(job, now, max_age) for job in fresh])
            added = conn.executemany(
                "INSERT OR IGNORE INTO rcpts (job_id, rcpt, status, next_attempt)"
                " VALUES (?, ?, 'pending', ?)",
                [(job.id, rcpt, now) for job in fresh for rcpt in job.rcpts]).rowcount
            # Never tried: none deferred. (A trigger counting rows cost up to half again
            # as much CPU as the writes it counted: counted here instead.)
            self._counted(len(fresh), max(added, 0), 0)
        return fresh

    def _new_jobs(self, conn: sqlite3.Connection, jobs: Sequence[Job], now: float) -> list[Job]:
        """The jobs of the batch that are not duplicates."""
        ids = list({job.id: None for job in jobs})
        seen = _existing(conn, "SELECT id FROM jobs WHERE id IN ({})", (), ids)
        seen |= _existing(conn, "SELECT id FROM finished WHERE ts >= ? AND id IN ({})",
                          (now - self.dedupe_window,), ids)
        fresh = []
        for job in jobs:
            if job.id not in seen:
                seen.add(job.id)
                fresh.append(job)
        return fresh

    # -- handing out -----------------------------------------------------

    def due(self, now: float, limit: int, skip: Container[str] = frozenset(),
            known: Mapping[str, Pending] | None = None) -> list[Pending]:
        """Jobs with recipients due at `now`, oldest next_attempt first, at most `limit`.

        Ids in `skip` (in flight) are left out. A job that cannot be decoded is
        moved to the `corrupt` table, reported to `on_corrupt` and skipped. `known`:
        jobs the caller holds exactly as stored (accepted, never handed out), taken
        from there instead of being read back (message included) from the file.
        """
        with self._reading():
            return self._due(now, limit, skip, known)

    def _due(self, now: float, limit: int, skip: Container[str],
             known: Mapping[str, Pending] | None) -> list[Pending]:
        out: list[Pending] = []
        taken: set[str] = set()
        while len(out) < limit:
            ids = self._due_ids(now, limit - len(out), lambda i: i in skip or i in taken)
            if not ids:
                break
            bad: list[tuple[str, str]] = []
            stale: list[str] = []
            for job_id in ids:
                taken.add(job_id)
                cached = known.get(job_id) if known is not None else None
                if cached is not None:
                    out.append(cached)
                    continue
                try:
                    pending = self._load(job_id, now)
                except _Corrupt as e:
                    bad.append((job_id, str(e)[:_REASON_MAX]))
                    continue
                if pending.rcpts:
                    out.append(pending)
                else:
                    stale.append(job_id)
            self._repair(bad, stale, now)
            if not bad and not stale:
                break
        return out

    def _due_ids(self, now: float, limit: int, skipped: Callable[[str], bool]) -> list[str]:
        cur = self._conn.execute(
            "SELECT id FROM jobs WHERE next_attempt <= ? ORDER BY next_attempt, id", (now,))
        ids: list[str] = []
        try:
            for (job_id,) in cur:
                if not skipped(job_id):
                    ids.append(job_id)
                    if len(ids) >= limit:
                        break
        finally:
            cur.close()
        return ids

    def _load(self, job_id: str, now: float) -> Pending:
        """Decode one job; _Corrupt if any part of it is unreadable."""
        try:
            row = self._conn.execute(
                "SELECT queued_ts, expires_ts, CAST(envelope AS BLOB), CAST(message AS BLOB)"
                " FROM jobs WHERE id = ?", (job_id,)).fetchone()
            rows = self._conn.execute(
                "SELECT rcpt, attempts FROM rcpts WHERE job_id = ? AND status = 'pending'"
                " AND next_attempt <= ? ORDER BY rowid", (job_id, now)).fetchall()
        except sqlite3.Error as e:  # e.g. text that is not UTF-8
            if is_damage(e):  # the file, not this row: setting it aside would fail too
                raise
            raise _Corrupt(f"unreadable row: {e}") from e
        if row is None:
            raise _Corrupt("job row vanished")
        queued_ts, expires_ts, envelope, message = row
        job = _decode(envelope, message)
        try:
            attempts = {str(rcpt): int(n) for rcpt, n in rows}
            return Pending(job, float(queued_ts), float(expires_ts), tuple(attempts), attempts)
        except (TypeError, ValueError) as e:
            raise _Corrupt(f"bad spool row: {e}") from e

    def _repair(self, bad: list[tuple[str, str]], stale: list[str], now: float) -> None:
        """Set corrupt jobs aside, each with the final events of what it had left (in the
        outbox, in the same transaction); re-derive the due time of jobs with nothing due."""
        if not bad and not stale:
            return
        with self._write() as conn:
            aside = []
            for job_id, reason in bad:
                (pending, deferred) = conn.execute(
                    "SELECT COUNT(*), COALESCE(SUM(attempts > 0), 0) FROM rcpts"
                    " WHERE job_id = ? AND status = 'pending'", (job_id,)).fetchone()
                (held,) = conn.execute("SELECT COUNT(*) FROM jobs WHERE id = ?",
                                       (job_id,)).fetchone()
                aside.append(_set_aside(conn, job_id, reason, now))
                self._counted(-int(held), -int(pending), -int(deferred))
            finals = [events.set_aside(job.job_id, job.pending, job.meta, job.queued_ts,
                                       job.reason, now) for job in aside]
            for stored in finals:
                self._store_events(conn, stored)
            self._settle(conn, stale, now)
        for job, stored in zip(aside, finals, strict=True):
            if self._on_corrupt is not None:
                self._on_corrupt(job, stored)

    # -- recording -------------------------------------------------------

    def record(self, updates: Sequence[RcptUpdate], now: float | None = None,
               finals: Sequence[Event] = ()) -> list[str]:
        """Record recipients' results in one transaction; durable on return.

        Updates for unknown or already-final recipients are ignored: a final
        status is never overwritten. Returns the ids of jobs that became fully
        final; they are deleted and remembered in `finished` (at `now`,
        default the wall clock) for duplicate detection. `finals`: the events that
        announce the final outcomes, stored in the outbox with them (engine.outbox).
        """
        now = time.time() if now is None else now
        with self._write() as conn:
            self._store_events(conn, finals)
            self._record_counts(conn, updates)
            conn.executemany(
                "UPDATE rcpts SET status = ?, next_attempt = ?, attempts = attempts + ?,"
                " code = COALESCE(?, code), enhanced = COALESCE(?, enhanced),"
                " reply = COALESCE(?, reply)"
                " WHERE job_id = ? AND rcpt = ? AND status = 'pending'",
                [_update_row(u) for u in updates])
            return self._settle(conn, list({u.job_id: None for u in updates}), now)

    def _record_counts(self, conn: sqlite3.Connection, updates: Sequence[RcptUpdate]) -> None:
        """Count what `record`'s updates will change, from the recipients' rows as they are
        before it, in its transaction: the updates applied in order as its UPDATE does (only
        to a pending recipient; a final one leaves `pending`, an attempt counted makes one
        never tried `deferred`)."""
        ids = list({u.job_id: None for u in updates if u.status is not Status.DEFERRED
                    or u.count_attempt})
        if not ids:
            return
        tried: dict[tuple[str, str], int] = {}
        for i in range(0, len(ids), _IN_CHUNK):
            chunk = ids[i:i + _IN_CHUNK]
            tried.update(((job_id, rcpt), attempts) for job_id, rcpt, attempts in conn.execute(
                "SELECT job_id, rcpt, attempts FROM rcpts WHERE status = 'pending'"
                f" AND job_id IN ({','.join('?' * len(chunk))})", chunk))
        pending = deferred = 0
        for u in updates:
            key = (u.job_id, u.rcpt)
            attempts = tried.get(key)
            if attempts is None:
                continue  # unknown or final already: the UPDATE skips it too
            if u.status is not Status.DEFERRED:
                del tried[key]
                pending -= 1
                deferred -= attempts > 0
            elif u.count_attempt:
                tried[key] = attempts + 1
                deferred += attempts == 0
        self._counted(0, pending, deferred)

    def _settle(self, conn: sqlite3.Connection, job_ids: Iterable[str], now: float) -> list[str]:
        """Refresh each job's next_attempt; delete those with nothing pending. Returns those.

        Set-based, a few statements for the whole batch rather than several per job.
        """
        ids = list(dict.fromkeys(job_ids))
        if not ids:
            return []
        finished = _existing(
            conn, "SELECT id FROM jobs WHERE id IN ({}) AND NOT EXISTS (SELECT 1 FROM rcpts"
            " WHERE rcpts.job_id = jobs.id AND rcpts.status = 'pending')", (), ids)
        done = [job_id for job_id in ids if job_id in finished]
        rest = [job_id for job_id in ids if job_id not in finished]
        if done:
            _each_chunk(conn, "DELETE FROM jobs WHERE id IN ({})", done)
            self._counted(-len(done), 0, 0)  # nothing pending: no recipient count changes
            _each_chunk(conn, "DELETE FROM rcpts WHERE job_id IN ({})", done)
            _each_chunk(conn, "DELETE FROM handed_out WHERE job_id IN ({})", done)
            conn.executemany("INSERT OR REPLACE INTO finished (id, ts) VALUES (?, ?)",
                             [(job_id, now) for job_id in done])
        if rest:  # still pending: due again at the earliest of its recipients' times
            _each_chunk(conn, "UPDATE jobs SET next_attempt = (SELECT MIN(next_attempt)"
                        " FROM rcpts WHERE rcpts.job_id = jobs.id AND rcpts.status = 'pending')"
                        " WHERE id IN ({})", rest)
        return done

    # -- hand-outs -----------------------------------------------------------

    def mark_handed_out(self, job_ids: Sequence[str], done: Sequence[str] = ()) -> None:
        """Mark jobs handed to a worker, and unmark `done` ones (their hand-out's results are
        all recorded): one transaction without fsync (`_write_unsynced`), before the tasks
        leave. After a kill -9 of the supervisor, the marked jobs' pending recipients
        (`handed_out`) may have been delivered: engine.dispatch counts their re-sends."""
        if not job_ids and not done:
            return
        with self._write_unsynced() as conn:
            if done:
                _each_chunk(conn, "DELETE FROM handed_out WHERE job_id IN ({})", list(done))
            conn.executemany("INSERT OR IGNORE INTO handed_out (job_id) VALUES (?)",
                             [(job_id,) for job_id in job_ids])

    def handed_out(self) -> dict[str, frozenset[str]]:
        """The pending recipients of every job marked handed out, by job id."""
        with self._reading():
            rows = self._conn.execute(
                "SELECT rcpts.job_id, rcpts.rcpt FROM handed_out JOIN rcpts"
                " ON rcpts.job_id = handed_out.job_id WHERE rcpts.status = 'pending'"
            ).fetchall()
        found: dict[str, set[str]] = {}
        for job_id, rcpt in rows:
            found.setdefault(job_id, set()).add(rcpt)
        return {job_id: frozenset(rcpts) for job_id, rcpts in found.items()}

    # -- the outbox ------------------------------------------------------------

    def unpublished(self) -> list[Event]:
        """The events in the outbox, oldest first (engine.outbox)."""
        with self._reading():
            rows = self._conn.execute("SELECT name, line FROM outbox ORDER BY seq").fetchall()
        return [(str(name), str(line)) for name, line in rows]

    def forget_published(self, upto: int, log_at: tuple[int, int] | None) -> None:
        """Empty the outbox up to event `upto` (each of them published, and in the synced
        events log), and remember where that log stood: `log_at`, (inode, size)."""
        with self._write() as conn:
            conn.execute("DELETE FROM outbox WHERE seq <= ?", (upto,))
            if log_at is not None:
                conn.execute("INSERT OR REPLACE INTO outbox_mark (id, inode, offset)"
                             " VALUES (1, ?, ?)", log_at)

    def log_mark(self) -> tuple[int, int] | None:
        """Where the events log stood when the outbox was last emptied: (inode, size)."""
        with self._reading():
            row = self._conn.execute("SELECT inode, offset FROM outbox_mark").fetchone()
        return None if row is None else (int(row[0]), int(row[1]))

    # -- looking -----------------------------------------------------------

    def next_due(self) -> float | None:
        """The earliest next_attempt of any pending recipient (in flight included)."""
        with self._reading():
            (first,) = self._conn.execute("SELECT MIN(next_attempt) FROM jobs").fetchone()
        return None if first is None else float(first)

    def stats(self) -> SpoolStats:
        """The spool's counts, kept as it changes (`_keep_counts`), not counted: the same
        cost at a million recipients as at none; the oldest job from its index."""
        with self._reading():
            (oldest,) = self._conn.execute("SELECT MIN(queued_ts) FROM jobs").fetchone()
        jobs, pending, deferred = self._counts
        return SpoolStats(jobs, pending, deferred, None if oldest is None else float(oldest))

    # -- the operator's queue commands (engine.queue_admin): reads only ------------------

    def by_domain(self, scan_max: int, apart: bool = False) -> tuple[list[DomainQueue], int]:
        """The recipients not final yet, counted per domain: at most the first `scan_max`
        of them (the oldest rows), so a huge spool costs a bounded read. Returns the
        domains and how many recipients were read. `apart`: read on a connection of its
        own, opened and closed here, so that another thread than the supervisor's loop
        may call it (engine.control.OffLoop: ~0.4 s for 100,000 recipients).

        The replies (the longest columns) are read after the scan, only for the recipient
        tried most of each domain: about a quarter less than reading them with every row
        (docs/PERFORMANCE.md, "Cost as the queue grows"). The rest is the scan and the
        join for the jobs' acceptance times."""
        with self._connection(apart) as conn:
            return self._by_domain(conn, scan_max)

    @contextmanager
    def _connection(self, apart: bool) -> Iterator[sqlite3.Connection]:
        """The spool's own connection, or (`apart`) one for reading only, of this thread."""
        if not apart:
            yield self._conn
            return
        with self._reading():
            conn = open_reader(self.path)
        try:
            yield conn
        finally:
            conn.close()

    def _by_domain(self, conn: sqlite3.Connection, scan_max: int
                   ) -> tuple[list[DomainQueue], int]:
        # Counted by SQLite, a row per domain back: the same counts in Python, a row per
        # recipient, held the GIL for ~0.2 s at 100,000 (the loop's thread waited on it).
        with self._reading():
            rows = conn.execute(_BY_DOMAIN, (scan_max,)).fetchall()
        found = [DomainQueue(str(domain), int(rcpts), int(jobs), float(oldest),
                             float(next_attempt))
                 for domain, rcpts, jobs, oldest, next_attempt, _ in rows]
        tried_most = {queue.domain: _tried_most_rowid(int(most))
                      for queue, (*_, most) in zip(found, rows, strict=True) if most is not None}
        replies = self._replies(conn, list(tried_most.values()))
        for queue in found:
            rowid = tried_most.get(queue.domain)
            queue.reply = replies.get(rowid) if rowid is not None else None
        return found, sum(queue.rcpts for queue in found)

    def _replies(self, conn: sqlite3.Connection, rowids: list[int]) -> dict[int, Reply]:
        """The reply stored for each of these recipients' rows (by rowid)."""
        out: dict[int, Reply] = {}
        with self._reading():
            for i in range(0, len(rowids), _IN_CHUNK):
                chunk = rowids[i:i + _IN_CHUNK]
                for rowid, code, enhanced, text in conn.execute(
                        "SELECT rowid, code, enhanced, reply FROM rcpts WHERE rowid IN"
                        f" ({','.join('?' * len(chunk))})", chunk):
                    if code is not None:
                        out[rowid] = Reply(int(code), enhanced, str(text or ""))
        return out

    def waiting(self, job_id: str | None = None, domain: str | None = None,
                skip: Container[str] = frozenset(), limit: int = 10_000,
                due_after: float | None = None) -> tuple[list[Waiting], bool]:
        """The recipients not final yet of job `job_id`, or at `domain` (any case), but
        not of the jobs in `skip` (in flight), and (`due_after`) only those whose next try
        is later than that; at most `limit`; and whether more match. A domain is found by
        a scan of the recipients not final (no index holds it)."""
        where, params = _waiting_filter(job_id, domain)
        if due_after is not None:
            where, params = f"{where} AND r.next_attempt > ?", (*params, due_after)
        found: list[Waiting] = []
        metas: dict[str, Mapping[str, Any]] = {}
        with self._reading():
            cur = self._conn.execute(
                "SELECT r.job_id, r.rcpt, r.attempts, j.queued_ts, CAST(j.envelope AS BLOB)"
                " FROM rcpts AS r JOIN jobs AS j ON j.id = r.job_id"
                f" WHERE r.status = 'pending' AND {where} ORDER BY r.rowid", params)
            try:
                for jid, rcpt, attempts, queued_ts, envelope in cur:
                    if jid in skip:
                        continue
                    if len(found) >= limit:
                        return found, True
                    meta = metas.get(jid)
                    if meta is None:
                        meta = metas[jid] = _meta_of(envelope)
                    found.append(Waiting(str(jid), str(rcpt), int(attempts),
                                         float(queued_ts), meta))
            finally:
                cur.close()
        return found, False

    def count_waiting(self, job_id: str | None = None,
                      domain: str | None = None) -> tuple[int, int]:
        """(jobs, recipients) not final yet of job `job_id` or at `domain`."""
        where, params = _waiting_filter(job_id, domain)
        with self._reading():
            jobs, rcpts = self._conn.execute(
                "SELECT COUNT(DISTINCT r.job_id), COUNT(*) FROM rcpts AS r"
                f" WHERE r.status = 'pending' AND {where}", params).fetchone()
        return int(jobs), int(rcpts)

    def last_replies(self, job_id: str) -> dict[str, Reply]:
        """The last reply recorded for each pending recipient of `job_id` that has one (an
        expiry keeps it: engine.dispatch). Read only when a job expires, not with every due
        job; an unreadable row gives none (the expiry says why itself)."""
        try:
            with self._reading():
                rows = self._conn.execute(
                    "SELECT rcpt, code, enhanced, reply FROM rcpts WHERE job_id = ?"
                    " AND status = 'pending' AND code IS NOT NULL", (job_id,)).fetchall()
            return {str(rcpt): Reply(int(code), enhanced, str(text or ""))
                    for rcpt, code, enhanced, text in rows}
        except SpoolDamaged:
            raise
        except (sqlite3.Error, TypeError, ValueError):
            return {}

    def job_record(self, job_id: str) -> dict[str, Any] | None:
        """What the spool holds of one job, its message left out: None if it holds none."""
        with self._reading():
            row = self._conn.execute(
                "SELECT queued_ts, expires_ts, next_attempt, CAST(envelope AS BLOB),"
                " length(message) FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return None
            rcpts = self._conn.execute(
                "SELECT rcpt, status, attempts, next_attempt, code, enhanced, reply"
                " FROM rcpts WHERE job_id = ? ORDER BY rowid", (job_id,)).fetchall()
        queued_ts, expires_ts, next_attempt, envelope, size = row
        try:
            data = json.loads(bytes(envelope).decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            data = {}
        data = data if isinstance(data, dict) else {}
        return {"id": job_id, "from": data.get("from"), "meta": data.get("meta") or {},
                "ip": data.get("ip"), "pool": data.get("pool"), "size": size,
                "queued_ts": queued_ts, "expires_ts": expires_ts,
                "next_attempt": next_attempt,
                "rcpts": [{"rcpt": rcpt, "status": status, "attempts": attempts,
                           "next_attempt": at, "code": code, "enhanced": enhanced,
                           "reply": reply}
                          for rcpt, status, attempts, at, code, enhanced, reply in rcpts]}

    def checkpoint(self) -> None:
        """Copy the write-ahead log into the file and truncate it, giving its space back:
        tried while the filesystem is full (a partial checkpoint is harmless)."""
        try:
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        except sqlite3.Error:
            pass

    def latest_now(self) -> float:
        """The latest "now" the spool holds (a job's acceptance, a job's end), 0.0 if none:
        the engine's clock never starts below it (engine.clock)."""
        with self._reading():
            (queued,) = self._conn.execute("SELECT MAX(queued_ts) FROM jobs").fetchone()
            (finished,) = self._conn.execute("SELECT MAX(ts) FROM finished").fetchone()
        return max(float(queued or 0.0), float(finished or 0.0))

    def shift(self, seconds: float) -> None:
        """Move every time the spool holds by `seconds`: `plan_shift`, then done at once."""
        self.plan_shift(seconds)
        self._finish_shift()

    def plan_shift(self, seconds: float) -> None:
        """Plan a move of every time the spool holds by `seconds`: the spool's times
        re-expressed on a clock `seconds` ahead of the one that wrote them (engine.clock: the
        wall clock, at a stop after a step). One small transaction: the rows are moved at
        the next open (`__init__`), SHIFT_CHUNK rows per transaction, so a stop is not held
        up by a big spool, and a crash in the middle of the move resumes where it was."""
        self._finish_shift()  # none is pending after an open; one planned since: done first
        with self._write() as conn:
            for table in _SHIFTED:
                (last,) = conn.execute(f"SELECT COALESCE(MAX(rowid), 0) FROM {table}").fetchone()
                conn.execute("INSERT INTO clock_shift (tbl, seconds, done_upto, last)"
                             " VALUES (?, ?, 0, ?)", (table, seconds, last))

    def _finish_shift(self) -> tuple[float, int] | None:
        """Do the planned move (see `plan_shift`); (seconds, rows moved), or None."""
        with self._reading():
            plans = self._conn.execute(
                "SELECT tbl, seconds, done_upto, last FROM clock_shift").fetchall()
        if not plans:
            return None
        moved = 0
        for table, seconds, done, last in plans:
            while done < last:
                upto = min(done + SHIFT_CHUNK, last)
                with self._write() as conn:
                    moved += conn.execute(_SHIFTED[table] + " AND rowid > ? AND rowid <= ?",
                                          (seconds, done, upto)).rowcount
                    conn.execute("UPDATE clock_shift SET done_upto = ? WHERE tbl = ?",
                                 (upto, table))
                done = upto
            with self._write() as conn:
                conn.execute("DELETE FROM clock_shift WHERE tbl = ?", (table,))
        return float(plans[0][1]), moved

    def prune_finished(self, now: float) -> int:
        """Forget finished ids older than the dedupe window; returns how many."""
        with self._write() as conn:
            return conn.execute("DELETE FROM finished WHERE ts < ?",
                                (now - self.dedupe_window,)).rowcount


# `Spool.by_domain`'s count: the first `?` recipients not final, per domain (after the
# last "@", as str.rpartition; lowercased again for rows from before addresses were), with
# their jobs, the oldest job's acceptance, the earliest next try, and the recipient tried
# most that has a reply: the largest attempts * 2**40 - rowid (the first row of the most
# attempts; a rowid is below 2**40), undone by `_tried_most_rowid`.
_ROWID_SPAN = 1 << 40
_BY_DOMAIN = (
    "SELECT lower(substr(r.rcpt, length(rtrim(r.rcpt, replace(r.rcpt, '@', ''))) + 1)) AS d,"
    " count(*), count(DISTINCT r.job_id), min(j.queued_ts), min(coalesce(r.next_attempt, 0)),"
    f" max(CASE WHEN r.code IS NOT NULL THEN r.attempts * {_ROWID_SPAN} - r.rowid END)"
    " FROM (SELECT rowid, job_id, rcpt, attempts, next_attempt, code FROM rcpts"
    " WHERE status = 'pending' LIMIT ?) AS r JOIN jobs AS j ON j.id = r.job_id GROUP BY d")


def _tried_most_rowid(most: int) -> int:
    """The rowid in `_BY_DOMAIN`'s last column (attempts * 2**40 - rowid)."""
    attempts = most // _ROWID_SPAN + 1
    return attempts * _ROWID_SPAN - most


# -- helpers ---------------------------------------------------------------

def _existing(conn: sqlite3.Connection, sql: str, params: tuple[Any, ...],
              ids: list[str]) -> set[str]:
    """The ids among `ids` that `sql` (with an `IN ({})` slot) finds."""
    found: set[str] = set()
    for i in range(0, len(ids), _IN_CHUNK):
        chunk = ids[i:i + _IN_CHUNK]
        query = sql.format(",".join("?" * len(chunk)))
        found.update(row[0] for row in conn.execute(query, (*params, *chunk)))
    return found


def _each_chunk(conn: sqlite3.Connection, sql: str, ids: list[str]) -> None:
    """Run `sql` (with an `IN ({})` slot) over `ids`, a chunk at a time."""
    for i in range(0, len(ids), _IN_CHUNK):
        chunk = ids[i:i + _IN_CHUNK]
        conn.execute(sql.format(",".join("?" * len(chunk))), chunk)


# How `plan_shift` moves each table's times (rows of a rowid range: appended by the caller).
_SHIFTED = {
    "jobs": "UPDATE jobs SET queued_ts = queued_ts + ?1, expires_ts = expires_ts + ?1,"
            " next_attempt = next_attempt + ?1 WHERE 1",
    "rcpts": "UPDATE rcpts SET next_attempt = next_attempt + ?1 WHERE status = 'pending'",
    "finished": "UPDATE finished SET ts = ts + ?1 WHERE 1",
}
SHIFT_CHUNK = 20_000  # rows moved per transaction

_ENCODE = json.JSONEncoder(separators=(",", ":")).encode
_quote = encode_basestring_ascii


def _envelope_text(job: Job) -> str:
    """json of envelope_json(job), compact, ASCII; the usual envelope (no optional field,
    a meta whose text is ASCII) formatted directly, the same text at a fraction of the
    cost, the meta's text reused (Job.meta_json, made once at intake)."""
    if (job.ip is not None or job.pool is not None or job.expires is not None
            or job.requiretls or job.dkim_domain is not None):
        return _ENCODE(envelope_json(job))
    meta = job.meta_json
    # The same text as _ENCODE writes only when ASCII, without DEL (which it escapes).
    if not meta.isascii() or "\x7f" in meta:
        return _ENCODE(envelope_json(job))
    return (f'{{"id":{_quote(job.id)},"from":{_quote(job.sender)},'
            f'"to":[{",".join(map(_quote, job.rcpts))}],"meta":{meta}}}')


def _job_row(job: Job, now: float, max_age: float) -> tuple[Any, ...]:
    ttl = job.expires if job.expires is not None else max_age
    envelope = _envelope_text(job)
    return (job.id, now, now + ttl, now, envelope, job.message)


def _update_row(u: RcptUpdate) -> tuple[Any, ...]:
    status = PENDING if u.status is Status.DEFERRED else u.status.value
    next_attempt = u.next_attempt if u.status is Status.DEFERRED else None
    code, enhanced, text = (u.reply.code, u.reply.enhanced, u.reply.text) if u.reply else (
        None, None, None)
    return (status, next_attempt, int(u.count_attempt), code, enhanced, text, u.job_id, u.rcpt)


def _decode(envelope: Any, message: Any) -> Job:
    """Rebuild the Job from its stored form; _Corrupt on any failure."""
    if not isinstance(envelope, bytes) or not isinstance(message, bytes):
        raise _Corrupt("envelope or message missing")
    try:
        data = json.loads(envelope.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise _Corrupt(f"bad envelope JSON: {e}") from e
    if not isinstance(data, dict):
        raise _Corrupt(f"envelope is a JSON {type(data).__name__}, not an object")
    try:
        return job_from_stored(data, message)
    except Exception as e:  # whatever the decoder raises, this row is unusable
        raise _Corrupt(f"bad envelope: {type(e).__name__}: {e}") from e


def _set_aside(conn: sqlite3.Connection, job_id: str, reason: str, now: float) -> SetAside:
    """Move a job and its recipients' progress to `corrupt`, out of the queue; what could
    be read of it first."""
    found = _readable_remains(conn, job_id, reason, now)
    conn.execute(
        "INSERT INTO corrupt (id, reason, envelope, message, rcpts, ts)"
        " SELECT id, ?, CAST(envelope AS BLOB), CAST(message AS BLOB),"
        # || cannot fail on any stored value, where json_object refuses blobs
        " (SELECT group_concat(rcpt || ' ' || status || ' ' || attempts, char(10))"
        "  FROM rcpts WHERE job_id = ?), ?"
        " FROM jobs WHERE id = ?", (reason, job_id, now, job_id))
    conn.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
    conn.execute("DELETE FROM rcpts WHERE job_id = ?", (job_id,))
    conn.execute("DELETE FROM handed_out WHERE job_id = ?", (job_id,))
    return found


def _readable_remains(conn: sqlite3.Connection, job_id: str, reason: str,
                      now: float) -> SetAside:
    """The pending recipients, the meta and the queue time of a job that cannot be decoded,
    as far as they can be read (bytes, decoded leniently: nothing here may raise)."""
    rows = conn.execute("SELECT CAST(rcpt AS BLOB), attempts FROM rcpts"
                        " WHERE job_id = ? AND status = 'pending' ORDER BY rowid",
                        (job_id,)).fetchall()
    pending = tuple((bytes(r or b"").decode("utf-8", "replace"), _int(n)) for r, n in rows)
    head = conn.execute("SELECT CAST(envelope AS BLOB), queued_ts FROM jobs WHERE id = ?",
                        (job_id,)).fetchone()
    envelope, queued_ts = head if head is not None else (None, None)
    try:
        data = json.loads(bytes(envelope or b"").decode("utf-8"))
        meta = data.get("meta") if isinstance(data, dict) else None
    except (UnicodeDecodeError, ValueError):
        meta = None
    queued = float(queued_ts) if isinstance(queued_ts, (int, float)) else now
    return SetAside(job_id, reason, pending, meta if isinstance(meta, dict) else {}, queued)


def _waiting_filter(job_id: str | None, domain: str | None) -> tuple[str, tuple[Any, ...]]:
    """The WHERE clause (on `rcpts AS r`) of one job's recipients or one domain's."""
    if (job_id is None) == (domain is None):
        raise ValueError("give a job id or a domain")
    if job_id is not None:
        return "r.job_id = ?", (job_id,)
    assert domain is not None
    pattern = "%@" + domain.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return "r.rcpt LIKE ? ESCAPE '\\'", (pattern,)  # LIKE: any case, for ASCII


def _meta_of(envelope: Any) -> Mapping[str, Any]:
    """The producer's meta from a stored envelope; empty when it cannot be read."""
    try:
        data = json.loads(bytes(envelope or b"").decode("utf-8"))
    except (UnicodeDecodeError, ValueError, TypeError):
        return {}
    meta = data.get("meta") if isinstance(data, dict) else None
    return meta if isinstance(meta, dict) else {}


def _int(value: Any) -> int:
    return value if isinstance(value, int) else 0
