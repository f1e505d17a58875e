"""Handing due work to the workers: which job goes to which sending IP, and when.

A job with an `ip` goes to that IP's worker; a job with a `pool` (or none: the
`default` pool) goes to the least busy ready worker of the pool's IPs. A worker whose
IP the host does not hold takes no jobs (`WorkerHandle.takes_jobs`): a pool's mail goes
to its other IPs, and a job for that IP alone waits in the spool. Each
worker holds at most `limits.max_in_flight` jobs; a job no worker can take now is
*parked* for PARK_TIME, so it cannot hold back the jobs of other IPs behind it in
the spool's order. A job whose time has run out is expired here instead of sent.

The in-flight table (`InFlight` per job) is what the results are checked against:
a job in it is never handed out again until every recipient sent has a result,
its worker died or refused the task, or its hand-out is overdue (`handout_deadline`:
longer than any delivery the phase timeouts allow); then it is simply due again (the
spool never marks anything in flight). Each hand-out has a number of its own, and a
result counts only for the hand-out it answers (engine.results).

Jobs just accepted are kept in memory until their first dispatch (`offer`), so a
job the workers had no room for is not read back from SQLite, message included,
when it comes due (bounded by UNSENT_MAX_BYTES).

First attempts before retries. A retry (a job with a recipient tried before) may take at
most `limits.retry_share` of a worker's `max_in_flight` slots; the rest is kept for first
attempts. A retry waits in its worker for its provider's turn (up to `shaping.max_wait`),
so without the cap a deferral window ending (thousands of retries due in one second) would
fill every slot, and fresh mail to a healthy destination would wait behind it. And each
turn hands out the jobs held in memory (accepted, never handed out: due since their
acceptance) before asking the spool, whose order is the oldest next attempt first, for at
most as many as the retries have room for. A first attempt read back from the spool (after
a restart, or beyond UNSENT_MAX_BYTES) takes its turn in that order, in the first
attempts' room.
"""
from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Container, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import zmq

from engine import categories, events, logs, sockets
from engine.clock import EngineClock
from engine.config import Config
from engine.metrics import Metrics
from engine.protocol import Attempt, Status, task_header
from engine.reply import Reply
from engine.spool import Pending, RcptUpdate, Spool, SpoolDamaged, SpoolError
from engine.workers import WorkerHandle, Workers

log = logging.getLogger("mailengine.supervisor")

PARK_TIME = 2.0  # seconds a job no worker could take is passed over
REFUSED_PARK = 60.0  # seconds a job whose task a worker could not read is passed over
EARLIER_MAX = 100_000  # hand-outs taken back whose late results are still recognised
UNSENT_MAX_BYTES = 64 * 1024 * 1024  # messages of never-dispatched jobs kept in memory
EXPIRED_REPLY = Reply.local(451, "4.4.7", "message expired: not delivered within its time")

Publish = Callable[[events.Event], None]


@dataclass
class InFlight:
    """A job handed to a worker, until every recipient of the task has a result."""

    ip: str
    meta: Mapping[str, Any]  # the job's, shared (never changed)
    queued_ts: float
    expires_ts: float
    attempts: dict[str, int]  # attempts before this one, per rcpt still out
    handout: int = 0  # this hand-out's number (protocol.Task.handout)
    started: float = field(default_factory=time.monotonic)
    # Recipients a late result of an earlier hand-out made final while this one was out:
    # a delivery this hand-out reports for one of them is a duplicate (engine.results).
    final_meanwhile: set[str] = field(default_factory=set)
    # Recipients sent again because the worker of an earlier hand-out died without reporting
    # them: it may have delivered them, so their events say `possible_duplicate`.
    resent: frozenset[str] = frozenset()
    job_id: str = ""  # whose hand-out (a taken-back one is kept by number, `earlier`)
    retry: bool = False  # a recipient of it was tried before: it holds a retry's slot
    meta_json: str | None = None  # `meta` as JSON text (Job.meta_json): encoded once a job


def handout_deadline(cfg: Config) -> float:
    """Seconds after which a job still in flight is taken back and handed out again.

    Longer than any delivery of one task the phase timeouts allow: its DNS, its wait for
    a turn (and, in a cluster, for a cluster-wide connection slot: `max_wait` again), and
    two MX hosts' whole setup and transaction (a failover), plus the drain.
    A task that outlives it (a worker that lost it, or a result that never came) would
    otherwise be in flight until its worker exits. A worker still at work on it past the
    deadline is the one case where both hand-outs send: the late result is then
    recorded, and the second delivery counted as a duplicate (engine.results)."""
    t = cfg.smtp.timeouts
    waits = 2 if cfg.cluster.redis else 1
    return (cfg.dns.timeout + waits * cfg.shaping.max_wait + 2 * (t.setup + t.transaction)
            + cfg.drain_timeout)


class Dispatcher:
    """Due jobs to the workers with room; the table of what is in flight."""

    def __init__(self, cfg: Config, spool: Spool, workers: Workers, publish: Publish,
                 metrics: Metrics | None = None, clock: EngineClock | None = None) -> None:
        self.cfg = cfg
        # The category of a refusal (engine.categories): the config's; a reload replaces it.
        self.classifier = categories.classifier(cfg.categories)
        self._clock = clock or EngineClock()  # the time the spool is written in
        self._metrics = metrics or Metrics(None, "supervisor")
        self._spool = spool
        self._workers = workers
        self._publish = publish
        self.in_flight: dict[str, InFlight] = {}
        self._parked: dict[str, float] = {}  # job id -> until (monotonic)
        self._unsent: dict[str, Pending] = {}
        self.unsent_bytes = 0
        self._handouts = itertools.count(1)
        # The retries in flight, by worker IP (each at most its share, `_room`).
        self._retries: dict[str, set[str]] = {}
        # Set by the supervisor while results wait for an unwritable spool and there is no
        # more room to hold them: nothing new goes out whose result could not be kept.
        self.held_back = False
        # Hand-outs taken back before their results came (a dead worker's, an overdue one),
        # by number: a late result is recorded against the hand-out it answers.
        self.earlier: dict[int, InFlight] = {}
        # Recipients a worker died without reporting (killed, crashed), by job, until the
        # job is handed out again: that hand-out may deliver a second copy (`forget`). At
        # start, those of the jobs the spool has marked handed out (`Spool.handed_out`):
        # the supervisor before this one died with them out.
        self._unreported: dict[str, frozenset[str]] = spool.handed_out()
        # Of those sent again, the recipients that went back untried (`untried`).
        self._untried: dict[str, frozenset[str]] = {}
        if self._unreported:
            log.warning(logs.kv("handed_out_at_start", jobs=len(self._unreported),
                                rcpts=sum(map(len, self._unreported.values())),
                                effect="their re-sends are flagged possible_duplicate"))
        # Jobs whose hand-out has every result recorded, to be unmarked in the spool.
        self._answered_in_full: list[str] = []

    # -- what the supervisor calls ---------------------------------------------------

    def offer(self, accepted: Iterable[Pending]) -> None:
        """Jobs just accepted: remembered, and handed out while the workers have room
        (once they are full, the rest is not even tried: it waits for `dispatch_due`)."""
        accepted = list(accepted)
        for pending in accepted:
            self._remember_unsent(pending)  # first: a job handed out is forgotten
        self._hand_out(accepted, self.free_room())

    def dispatch_due(self) -> None:
        """Hand out what is due, as far as the workers' room goes: the jobs never handed
        out held in memory first, then what the spool says is due, at most as many as the
        retries have room for (see the module's docstring)."""
        room = self.free_room()
        if room <= 0:
            return
        now = time.monotonic()
        self._parked = {j: t for j, t in self._parked.items() if t > now}
        if self._unsent:
            fresh = list(itertools.islice(
                (p for job_id, p in self._unsent.items() if job_id not in self._parked), room))
            for pending in self._hand_out(fresh, room):
                self._parked[pending.job.id] = now + PARK_TIME
        skip = _Either(self.in_flight, self._parked)
        while (room := min(self.free_room(), self.retry_room())) > 0:
            try:
                due = self._spool.due(self._clock.now(), room, skip, self._unsent)
            except SpoolDamaged:
                raise  # not a passing failure: the supervisor stops (engine.supervisor)
            except SpoolError as err:  # setting a damaged row aside needs a write: next turn
                log.warning(logs.kv("dispatch_skipped", error=err))
                return
            before = self.free_room()
            left = self._hand_out(due, room)
            for pending in left:
                # Its IP is down or full: look past it next turn, so it cannot
                # hold back the jobs of other IPs behind it.
                self._parked[pending.job.id] = now + PARK_TIME
            if len(due) < room or left or self.free_room() >= before:
                return
            # A whole page went out, first attempts read back from the spool among it
            # (they do not take the retries' room): the next page, while there is room.

    def refill(self) -> None:
        """Results freed room: refill now rather than at the next tick, once a good share
        of the room is free (each `dispatch_due` costs a spool query)."""
        ready = sum(1 for handle in self._workers if handle.takes_jobs)
        if self.free_room() * 4 >= ready * self.cfg.limits.max_in_flight:
            self.dispatch_due()

    def worker_ready(self) -> None:
        """A (re)started worker: what waited for it is dispatchable now."""
        self._parked.clear()
        self.dispatch_due()

    def settle(self, job_id: str, rcpt: str, handout: int) -> None:
        """`rcpt` of the job's hand-out `handout` has its result recorded."""
        flight = self.in_flight.get(job_id)
        if flight is None or flight.handout != handout:
            return
        flight.attempts.pop(rcpt, None)
        if not flight.attempts:
            self._take_back(job_id)
            self._answered_in_full.append(job_id)

    def forget(self, lost: Mapping[str, bool]) -> None:
        """Jobs whose worker died: no longer in flight, so due again at once. `lost[id]`:
        the worker did not exit cleanly, so it may have delivered recipients of the job
        whose results died with it (a kill -9 after the server's 2xx). Nobody can know
        which: each of them, when sent again, is counted (`resent_after_loss`) and its
        events say `possible_duplicate`."""
        for job_id, results_lost in lost.items():
            flight = self.in_flight.get(job_id)
            if flight is None:
                continue
            if results_lost and flight.attempts:
                if len(self._unreported) >= EARLIER_MAX:
                    del self._unreported[next(iter(self._unreported))]  # the oldest
                self._unreported[job_id] = frozenset(flight.attempts)
            self._take_back(job_id, counted=True)

    def changed_by_operator(self, job_ids: Iterable[str]) -> None:
        """Jobs the operator changed in the spool (engine.queue_admin: retried, bounced,
        deleted): the copy kept of one never handed out is dropped (the spool's record is
        read again), and one passed over is due at once."""
        for job_id in job_ids:
            self._forget_unsent(job_id)
            self._parked.pop(job_id, None)

    def answered(self, job_id: str, handout: int) -> InFlight | None:
        """The hand-out a result answers: the job's current one, or one taken back."""
        flight = self.in_flight.get(job_id)
        if flight is not None and flight.handout == handout:
            return flight
        return self.earlier.get(handout)

    def refused(self, handouts: Iterable[int]) -> None:
        """Tasks a worker could not read: their jobs are taken back, and passed over for
        REFUSED_PARK (a task that cannot be read may not be readable the next time)."""
        wanted = set(handouts)
        for job_id, flight in list(self.in_flight.items()):
            if flight.handout in wanted:
                log.warning(logs.kv("task_refused", id=job_id, ip=flight.ip,
                                    handout=flight.handout))
                self._take_back(job_id, counted=True)
                self._parked[job_id] = time.monotonic() + REFUSED_PARK

    def take_back_overdue(self, now: float) -> list[str]:
        """Jobs in flight for longer than the hand-out deadline: taken back, so due again.
        Returns their ids."""
        limit = handout_deadline(self.cfg)
        overdue = [job_id for job_id, flight in self.in_flight.items()
                   if now - flight.started > limit]
        for job_id in overdue:
            flight = self.in_flight[job_id]
            log.warning(logs.kv("handout_overdue", id=job_id, ip=flight.ip,
                                handout=flight.handout, seconds=round(now - flight.started),
                                rcpts=len(flight.attempts)))
            self._take_back(job_id, counted=True)
        return overdue

    def _take_back(self, job_id: str, counted: bool = False) -> None:
        """No longer in flight (`counted`: taken back before its results came, the
        `taken_back` metric). A hand-out with results still owed is remembered, so that
        they count for it if they come after all."""
        if counted:
            self._metrics.incr("taken_back", "all")
        flight = self.in_flight.pop(job_id)
        handle = self._workers.get(flight.ip)
        if handle is not None:
            handle.jobs.discard(job_id)
        if flight.retry:
            self._retries.get(flight.ip, set()).discard(job_id)
        if flight.attempts:
            if len(self.earlier) >= EARLIER_MAX:
                del self.earlier[next(iter(self.earlier))]  # the oldest
            self.earlier[flight.handout] = flight

    def free_room(self) -> int:
        """Jobs the ready workers can take now, together (none while `held_back`)."""
        if self.held_back:
            return 0
        return sum(self._room(h) for h in self._workers if h.takes_jobs)

    def retry_room(self) -> int:
        """Retries the ready workers can take now, together (`limits.retry_share`)."""
        if self.held_back:
            return 0
        return sum(self._room(h, retry=True) for h in self._workers if h.takes_jobs)

    def retries_in_flight(self) -> int:
        """Jobs in flight that are retries."""
        return sum(map(len, self._retries.values()))

    # -- handing out ------------------------------------------------------------------

    def _hand_out(self, jobs: Iterable[Pending], room: int) -> list[Pending]:
        """Hand out up to `room` of `jobs`; returns those left spooled for a later turn.

        Each job's worker is chosen first, then the chosen jobs are marked handed out in
        the spool (`Spool.mark_handed_out`, with the hand-outs answered in full since the
        last time: unmarked), and only then do their tasks leave: a crash of the supervisor
        at any point leaves a mark on every job a worker may have sent."""
        chosen: list[tuple[Pending, WorkerHandle, bool]] = []
        left: list[Pending] = []
        for pending in jobs:
            handle = None
            retry = False
            if len(chosen) < room:
                if self._clock.now() >= pending.expires_ts:
                    self._expire(pending)
                    continue
                retry = any(pending.attempts.values())  # tried before: a retry
                handle = self._choose_worker(pending.job.ip, pending.job.pool, retry)
            if handle is None:
                left.append(pending)
                continue
            # Its room taken while the others are chosen.
            handle.jobs.add(pending.job.id)
            if retry:
                self._retries.setdefault(handle.ip, set()).add(pending.job.id)
            chosen.append((pending, handle, retry))
        self._mark([pending.job.id for pending, _, _ in chosen])
        for pending, handle, retry in chosen:
            if not self._send(pending, handle, retry):
                handle.jobs.discard(pending.job.id)
                if retry:
                    self._retries[handle.ip].discard(pending.job.id)
                self._answered_in_full.append(pending.job.id)  # never out: unmarked
                left.append(pending)
        return left

    def _mark(self, job_ids: list[str]) -> None:
        """The spool's hand-out marks (`_hand_out`). A spool that cannot be written does not
        stop delivery: the marks are then missing, and a crash of the supervisor meanwhile
        may re-send a delivered recipient without counting it."""
        done, self._answered_in_full = self._answered_in_full, []
        try:
            self._spool.mark_handed_out(job_ids, done)
        except SpoolDamaged:
            raise
        except SpoolError as err:
            self._answered_in_full = done + self._answered_in_full
            self._metrics.incr("handouts_unmarked", "all", len(job_ids))
            log.debug(logs.kv("handouts_unmarked", jobs=len(job_ids), error=err))

    def unmark_answered(self) -> None:
        """Unmark the hand-outs answered in full (at the stop: no hand-out comes next)."""
        self._mark([])

    def _send(self, pending: Pending, handle: WorkerHandle, retry: bool = False) -> bool:
        """Send `pending`'s task to `handle`'s worker; False if its socket is full."""
        job = pending.job
        handout = next(self._handouts)
        # The worker times the delivery on its wall clock (engine.clock: after a step,
        # the engine's time is not the wall clock's).
        queued_on_wall = pending.queued_ts + self._clock.apart()
        tried = [r for r in pending.rcpts if pending.attempts.get(r)]  # refused before
        header = task_header(job.id, job.sender, pending.rcpts, queued_on_wall,
                             job.smtputf8, job.eightbit, handout,
                             job.requiretls, tried, job.dkim_domain)
        sock = handle.tasks
        assert sock is not None
        try:  # a multipart message is queued whole or not at all: the first part decides
            sock.send(header, sockets.MORE_NOBLOCK)
        except zmq.Again:
            return False
        sock.send(job.message, sockets.NOBLOCK)
        self._forget_unsent(job.id)  # from now on, the spool has its progress
        # The job's meta is never changed (events copy it), so it is shared, not copied.
        self.in_flight[job.id] = flight = InFlight(handle.ip, job.meta, pending.queued_ts,
                                                   pending.expires_ts, dict(pending.attempts),
                                                   handout, job_id=job.id, retry=retry,
                                                   meta_json=job.meta_json)
        if self._unreported or self._untried:
            flight.resent = self._resent(job.id, pending.rcpts)
        return True

    def _resent(self, job_id: str, rcpts: Iterable[str]) -> frozenset[str]:
        """The recipients of this hand-out a dead worker may have delivered already
        (`forget`), counted: each may be a second copy at the receiver; and those whose
        earlier hand-out after the loss went back untried (`untried`), counted then."""
        resent = self._unreported.pop(job_id, frozenset()).intersection(rcpts)
        if resent:
            self._metrics.incr("resent_after_loss", "all", len(resent))
        return resent | self._untried.pop(job_id, frozenset()).intersection(rcpts)

    def untried(self, job_id: str, rcpt: str) -> None:
        """`rcpt`, sent again after a loss (`InFlight.resent`), went back to the spool
        untried (shaping's "not now": no event): its next hand-out is still the first that
        may make a second copy, and its events must say so (`possible_duplicate`)."""
        if job_id not in self._untried and len(self._untried) >= EARLIER_MAX:
            del self._untried[next(iter(self._untried))]  # the oldest
        self._untried[job_id] = self._untried.get(job_id, frozenset()) | {rcpt}

    def _choose_worker(self, ip: str | None, pool: str | None,
                       retry: bool = False) -> WorkerHandle | None:
        if ip is not None:
            handle = self._workers.get(ip)
            if handle is not None and handle.takes_jobs and self._room(handle, retry) > 0:
                return handle
            return None
        best: WorkerHandle | None = None
        for member in self.cfg.ip_pools.get(pool or "default", ()):
            handle = self._workers.get(member)
            if (handle is not None and handle.takes_jobs and self._room(handle, retry) > 0
                    and (best is None or len(handle.jobs) < len(best.jobs))):
                best = handle  # the least busy: spread the load
        return best

    def _room(self, handle: WorkerHandle, retry: bool = False) -> int:
        """Jobs `handle`'s worker can take now; with `retry`, retries (their share)."""
        limits = self.cfg.limits
        room = limits.max_in_flight - len(handle.jobs)
        if retry:
            cap = max(1, int(limits.max_in_flight * limits.retry_share))
            room = min(room, cap - len(self._retries.get(handle.ip, ())))
        return room

    def _expire(self, pending: Pending) -> None:
        """Record the job's pending recipients as expired, then publish it; if the spool
        cannot be written, the job stays as it is (due, so tried again next turn)."""
        now = self._clock.now()
        # A recipient refused before keeps its last refusal (and so its category), as one
        # expired by a result does (engine.results.plan); one never refused says why here.
        last = self._spool.last_replies(pending.job.id)
        replies = {r: last.get(r, EXPIRED_REPLY) for r in pending.rcpts}
        expired = [events.attempt_event(
            Attempt(job_id=pending.job.id, rcpt=rcpt, status=Status.EXPIRED,
                    reply=reply, ip="", ts=now),
            Status.EXPIRED, pending.job.meta, pending.attempts.get(rcpt, 0), pending.queued_ts,
            classifier=self.classifier)
            for rcpt, reply in replies.items()]
        try:  # the events with the outcome (engine.outbox)
            self._spool.record([RcptUpdate(pending.job.id, r, Status.EXPIRED, reply=reply)
                                for r, reply in replies.items()], now, expired)
        except SpoolDamaged:
            raise
        except SpoolError as err:
            log.warning(logs.kv("expiry_not_recorded", id=pending.job.id, error=err))
            return
        self._forget_unsent(pending.job.id)
        for event in expired:
            self._publish(event)

    # -- the jobs never handed out yet ------------------------------------------------

    def _remember_unsent(self, pending: Pending) -> None:
        """Keep a just-accepted job in memory until it is handed out (or expires).

        A job the worker had no room for at intake used to be read back from SQLite,
        message included, when it came due. Until its first dispatch the spool's
        record of it is exactly what was accepted (every recipient pending since
        `accepted_at`, no attempt), so `Spool.due` takes it from here instead. The
        spool stays the record: it still decides what is due and in what order, and
        after a restart everything is read from it. Bounded by UNSENT_MAX_BYTES; a job
        beyond that is simply read back as before.
        """
        size = len(pending.job.message)
        if self.unsent_bytes + size > UNSENT_MAX_BYTES:
            return
        self._unsent[pending.job.id] = pending
        self.unsent_bytes += size

    def _forget_unsent(self, job_id: str) -> None:
        pending = self._unsent.pop(job_id, None)
        if pending is not None:
            self.unsent_bytes -= len(pending.job.message)

    @property
    def unsent(self) -> int:
        """Jobs accepted and never handed out, held in memory."""
        return len(self._unsent)


class _Either:
    """`x in _Either(a, b)`: in a or in b, without building a union."""

    def __init__(self, first: Container[str], second: Container[str]) -> None:
        self._first = first
        self._second = second

    def __contains__(self, item: object) -> bool:
        return item in self._first or item in self._second
