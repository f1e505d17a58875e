"""Results: every recipient's outcome recorded in the spool, then published.

Workers push their results (engine.protocol) to one PULL socket. The supervisor
collects them and records them in groups: under load a result waits at most
RESULTS_WINDOW for others to share its spool transaction, unless RESULTS_GROUP of
them are waiting (one commit, an fsync and every page it touched, per ~8 results
was the supervisor's largest cost per message). A result that finds the spool
idle for a window is recorded at once: no added latency at low rates.

The spool is written before any event is published: an event never announces
what a crash could lose; and a final event is written with its outcome, so a crash
cannot lose it either (engine.outbox). What a result means for its recipient (`plan`) is a pure
function of the result, the job's in-flight record and the retry schedule:
delivered and bounced are final; a deferral gets its next attempt, or expires
when that would fall after the job's expiry; a throttle or a shaping wait costs
no attempt.
"""
from __future__ import annotations

import dataclasses
import logging
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

import zmq

from engine import categories, crash, events, logs, protocol, retry, sockets
from engine.categories import Classifier
from engine.clock import STEP_TOLERANCE, EngineClock
from engine.dispatch import Dispatcher, InFlight
from engine.metrics import Metrics
from engine.protocol import Attempt, Status
from engine.spool import RcptUpdate, Spool, SpoolDamaged, SpoolError
from engine.spoolhealth import SpoolHealth

log = logging.getLogger("mailengine.supervisor")

RESULTS_BATCH = 2000  # frames read per collect() at most
RESULTS_WINDOW = 0.02  # seconds a result may wait for others to share its commit
RESULTS_GROUP = 500  # ...unless this many wait
RESULTS_HWM = 10000  # worker frames waiting in the socket
# Results kept in memory while the spool cannot be written; beyond this no more are read
# (the workers' sends wait) and no new work is handed out, rather than a result lost.
UNRECORDED_MAX = 50_000

Publish = Callable[[events.Event], None]
SHAPING_SPREAD = 60.0  # s, the most a wait shaping set is lengthened by the jitter


def plan(attempt: Attempt, flight: InFlight | None, now: float, schedule: Sequence[float],
         classifier: Classifier = categories.SHIPPED, jitter: float = 0.0,
         rand: Callable[[], float] = random.random
         ) -> tuple[RcptUpdate | None, events.Event | None]:
    """The spool update and the event for one result (either may be None), `flight` the
    job's current hand-out when the result answers it (else see `plan_late`). A refusal's
    event gets its category from `classifier` (engine.categories). `jitter` (config
    `retry.jitter`) spreads a deferred recipient's next attempt, using `rand()` in [0, 1)."""
    if flight is None or attempt.rcpt not in flight.attempts:
        return plan_late(attempt, None, classifier)
    number = flight.attempts[attempt.rcpt] + 1
    # Shaping's waits (not attempted) and throttles cost no attempt: they say
    # nothing about the recipient, only about our pace.
    counts = attempt.attempted and not attempt.throttled
    status, next_at = attempt.status, None
    if status is Status.DEFERRED:
        next_at = _next_attempt(attempt, flight, number, now, schedule, jitter, rand)
        if next_at is None:
            status = Status.EXPIRED
    update = RcptUpdate(attempt.job_id, attempt.rcpt, status, next_attempt=next_at,
                        reply=attempt.reply, count_attempt=counts)
    if not attempt.attempted and status is Status.DEFERRED:
        return update, None  # not tried: nothing happened that a subscriber must hear
    event = events.attempt_event(attempt, status, flight.meta, number, flight.queued_ts,
                                 next_at, attempt.rcpt in flight.resent, classifier,
                                 flight.meta_json)
    return update, event


def plan_late(attempt: Attempt, earlier: InFlight | None,
              classifier: Classifier = categories.SHIPPED
              ) -> tuple[RcptUpdate | None, events.Event | None]:
    """A result for a hand-out taken back (its worker was declared dead, it was overdue):
    a final outcome is kept, so the recipient is not sent again, and published, so the
    producer hears it (the event needs the hand-out's record, `earlier`); a deferral
    changes nothing (the recipient is due again already)."""
    if not attempt.status.final:
        return None, None
    update = RcptUpdate(attempt.job_id, attempt.rcpt, attempt.status, reply=attempt.reply)
    if earlier is None or attempt.rcpt not in earlier.attempts:
        return update, None
    return update, events.attempt_event(attempt, attempt.status, earlier.meta,
                                        earlier.attempts[attempt.rcpt] + 1, earlier.queued_ts,
                                        classifier=classifier, meta_json=earlier.meta_json)


def _next_attempt(attempt: Attempt, flight: InFlight, number: int, now: float,
                  schedule: Sequence[float], jitter: float,
                  rand: Callable[[], float]) -> float | None:
    """When a deferred recipient is tried again: when shaping said (a throttle, a wait),
    else by the retry schedule; None when that is past the job's expiry.

    Both are spread by `jitter`, so that the recipients deferred together (a provider's
    window, a suspension: every recipient waiting for it gets the same `retry_at`) do not
    all come due in the same second: the schedule's wait by up to +-jitter, shaping's only
    lengthened (never tried before shaping said), by up to jitter and at most
    SHAPING_SPREAD: shaping paces what comes back (slow start), and a daily cap's wait of
    hours must not end an hour late.

    Shaping's time is the worker's wall clock, the attempt's `ts` too: only the wait
    between them is taken, from `now` (the engine's time), so that a step of the wall
    clock, which the engine's time does not follow (engine.clock), moves no retry."""
    if attempt.retry_at is not None:
        wait = max(0.0, attempt.retry_at - attempt.ts)
        at = now + wait + min(wait * jitter * rand(), SHAPING_SPREAD)
        return at if at < flight.expires_ts else None
    return retry.next_attempt(schedule, number, now, flight.expires_ts, jitter, rand)


def _on_engine_time(attempts: list[Attempt], apart: float) -> list[Attempt]:
    """The attempts with their times (`ts`, `retry_at`: the worker's wall clock) on the
    engine's, `apart` (the wall clock minus the engine's time) from it: after a step of the
    wall clock (engine.clock), an event's `delay_ms` is the delay, not the step."""
    if abs(apart) <= STEP_TOLERANCE:
        return attempts
    return [dataclasses.replace(a, ts=a.ts - apart,
                                retry_at=None if a.retry_at is None else a.retry_at - apart)
            for a in attempts]


class Results:
    """Collects the workers' frames; records results in groups (`flush`)."""

    def __init__(self, sock: zmq.Socket, spool: Spool, dispatcher: Dispatcher,
                 publish: Publish, on_stats: Callable[[dict[str, Any]], None],
                 schedule: Sequence[float], metrics: Metrics | None = None,
                 health: SpoolHealth | None = None, window: float = RESULTS_WINDOW,
                 group: int = RESULTS_GROUP, clock: EngineClock | None = None,
                 classifier: Classifier = categories.SHIPPED, jitter: float = 0.0) -> None:
        self.sock = sock
        self.classifier = classifier  # the config's `categories` (a reload replaces it)
        self._clock = clock or EngineClock()  # the time the spool is written in
        self.schedule = schedule  # the retry schedule (config `retry.schedule`)
        self.jitter = jitter  # its spread (config `retry.jitter`)
        self.window = window
        self.group = group
        self._spool = spool
        self._dispatcher = dispatcher
        self._publish = publish
        self._on_stats = on_stats
        self._metrics = metrics or Metrics(None, "supervisor")
        self._health = health or SpoolHealth(self._metrics)
        self._held: list[Attempt] = []
        self._held_since = 0.0  # when the first result held now came (monotonic)
        self._flushed = 0.0  # when results were last recorded (monotonic)
        # Told of every batch of results once recorded (engine.queue_admin learns from them
        # which sending IP and provider each domain's mail goes through).
        self.observe: Callable[[list[Attempt]], None] | None = None
        # TLS-RPT's session counts from the workers (engine.tlsrpt_store), if it is on.
        self.on_tlsrpt: Callable[[dict[str, Any]], None] = lambda msg: None

    @property
    def held(self) -> int:
        """Results collected and not recorded yet."""
        return len(self._held)

    @property
    def full(self) -> bool:
        """So many results wait for an unwritable spool that no more are read, and no
        new work is handed out."""
        return len(self._held) >= UNRECORDED_MAX

    def wait_left(self) -> float:
        """Seconds until the results held now are due (0 when they are); while the
        spool cannot be written, until it is tried again."""
        if not self._health.writable:
            return self._health.wait_left("results")
        return max(0.0, self._held_since + self.window - time.monotonic())

    def collect(self) -> None:
        """Read the frames waiting (up to a batch): results are held for `flush`, stats
        go to `on_stats`. A frame that is not a worker's message is logged and dropped.
        Nothing is read while `full`."""
        if self.full:
            return
        if not self._held:
            self._held_since = time.monotonic()
        for _ in range(RESULTS_BATCH):
            try:
                frame = self.sock.recv(sockets.NOBLOCK)
            except zmq.Again:
                break
            try:
                self._take(protocol.decode(frame))
            except (ValueError, KeyError, TypeError) as exc:
                log.error(logs.kv("bad_result", error=exc))

    def _take(self, msg: dict[str, Any]) -> None:
        if msg["type"] == "result":
            self._held.extend(map(protocol.attempt_from_row, msg["attempts"]))
        elif msg["type"] == "stats":
            self._on_stats(msg)
        elif msg["type"] == "refused":
            self._dispatcher.refused(map(int, msg["handouts"]))
        elif msg["type"] == "tlsrpt":
            self.on_tlsrpt(msg)

    def due(self) -> bool:
        """Whether to record the results held now: enough of them, the window is over,
        or the spool recorded nothing for a window (low rates wait for nothing); while
        the spool cannot be written, once it may be tried again."""
        if not self._health.writable:
            return self._health.may_write("results")
        now = time.monotonic()
        return (len(self._held) >= self.group
                or now - self._held_since >= self.window
                or now - self._flushed >= self.window)

    def flush(self) -> None:
        """Record the results held, then hand out what their room allows. When the spool
        cannot be written they stay held, in order, for the next try (nothing of them is
        published or settled before it is recorded).

        Must run before anything that forgets a job in flight (a worker's death): a
        final result held here for a job handed out again would send it twice."""
        if not self._held or not self._health.may_write("results"):
            return
        attempts, self._held = self._held, []
        crash.point("after_result_read", len(attempts))
        try:
            self._record(attempts)
        except SpoolDamaged:
            self._held = attempts + self._held
            raise  # not a passing failure: the supervisor stops (engine.supervisor)
        except SpoolError as err:
            self._held = attempts + self._held
            self._health.failed("results", err)
            return
        self._health.succeeded()
        self._flushed = time.monotonic()
        self._dispatcher.refill()

    def _record(self, attempts: list[Attempt]) -> None:
        """Spool first, then events: an event never announces what could be lost. Nothing
        changes before the spool has the batch (SpoolError: the batch can be tried again)."""
        now = self._clock.now()
        attempts = _on_engine_time(attempts, self._clock.apart())
        finals: set[tuple[str, str]] = set()  # recipients this batch makes final
        planned = [self._plan(a, now, finals) for a in attempts]
        # The final events go into the spool with their outcomes (engine.outbox): a crash
        # after the commit and before they are out leaves them there, published at the start.
        self._spool.record([update for update, _, _ in planned if update is not None], now,
                           [event for _, event, _ in planned
                            if event is not None and event[0] in events.FINAL_NAMES])
        crash.point("after_results_recorded", len(attempts))
        for attempt, (update, event, kind) in zip(attempts, planned, strict=True):
            if event is not None:
                self._publish(event)
            self._account(attempt, update, kind)
        if self.observe is not None:
            self.observe(attempts)

    def _plan(self, attempt: Attempt, now: float, finals: set[tuple[str, str]]
              ) -> tuple[RcptUpdate | None, events.Event | None, str]:
        """`plan` for the hand-out the result answers, and what kind of result it is for
        `_account`. A result of a hand-out taken back is "late" (`plan_late`), and may
        make final a recipient the job's current hand-out is sending too: the second
        final result of a recipient, when it comes, is a "duplicate"."""
        key = (attempt.job_id, attempt.rcpt)
        answered = self._dispatcher.answered(attempt.job_id, attempt.handout)
        if (answered is not None and attempt.rcpt in answered.final_meanwhile) \
                or (attempt.status.final and key in finals):
            return None, None, "duplicate"  # final already, its event published
        current = self._dispatcher.in_flight.get(attempt.job_id)
        if answered is not None and answered is current:
            update, event = plan(attempt, answered, now, self.schedule, self.classifier,
                                 self.jitter)
            kind = "current"
        else:
            update, event = plan_late(attempt, answered, self.classifier)
            kind = "late"
        if update is not None and update.status.final:
            finals.add(key)
        return update, event, kind

    def _account(self, attempt: Attempt, update: RcptUpdate | None, kind: str) -> None:
        """The in-flight table after a recorded result (see `_plan` for the kinds)."""
        dispatcher = self._dispatcher
        if kind == "late":
            answered = dispatcher.earlier.get(attempt.handout)
            if answered is not None:
                answered.attempts.pop(attempt.rcpt, None)
                if not answered.attempts:
                    del dispatcher.earlier[attempt.handout]
            current = dispatcher.in_flight.get(attempt.job_id)
            if update is not None and current is not None and attempt.rcpt in current.attempts:
                current.final_meanwhile.add(attempt.rcpt)
            return
        if kind == "duplicate":
            self._count_duplicate(attempt)
        if kind == "current" and not attempt.attempted:
            flight = dispatcher.in_flight.get(attempt.job_id)
            if flight is not None and attempt.rcpt in flight.resent:
                dispatcher.untried(attempt.job_id, attempt.rcpt)
        if not attempt.retried:  # a throttled try the worker sends again: still out
            dispatcher.settle(attempt.job_id, attempt.rcpt, attempt.handout)

    def _count_duplicate(self, attempt: Attempt) -> None:
        if attempt.status is Status.DELIVERED:
            self._metrics.incr("duplicates", "all")
            log.warning(logs.kv("duplicate_delivery", id=attempt.job_id, rcpt=attempt.rcpt,
                                ip=attempt.ip, handout=attempt.handout))
