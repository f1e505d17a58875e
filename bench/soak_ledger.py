"""The fault soak's accounting: what was accepted, what ended how, what the receiver got twice
and why (bench/fault_soak.py).

Everything is keyed by (job id, recipient). Three witnesses are compared: the engine's events
log (its `queued`, final and `ambiguous` events), the receiving sink (each copy it took, and
whether it answered it), and the engine's own log (`duplicate_delivery`, a duplicate the
supervisor counted). A duplicate is a copy the receiver took beyond the first; each one is
explained by the first of:

1. `ambiguous`: the recipient has a deferral flagged ambiguous (the connection died after the
   final dot; here, the sink dropped it), so the engine said it might go out twice;
2. `counted`: the supervisor logged `duplicate_delivery` for it (a late result of a hand-out
   taken back);
3. a worker kill -9: a copy came from the killed worker's IP in the seconds before the kill
   (the worker read the 250, or lost the connection after the dot, and its result died with
   it);
4. a supervisor kill -9: it was among the recipients the sink had answered and the dead
   supervisor's spool still held pending (results read, not recorded);
5. unexplained.
The issue's target is that every duplicate is of kind 1 or 2 (counted by the engine), and
that their number equals the ambiguous flags the engine raised.
"""
from __future__ import annotations

import collections
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.faults import SUPERVISOR, WORKER, Strike, message_keys

FINAL = ("delivered", "bounced", "expired")
WORKER_WINDOW = 5.0  # seconds before a worker's kill whose answered copies it may have lost
Key = tuple[str, str]
_DUPLICATE_LINE = re.compile(r"event=duplicate_delivery id=(\S+) rcpt=(\S+)")

AMBIGUOUS, COUNTED, UNEXPLAINED = "flagged ambiguous", "counted (duplicates metric)", \
    "unexplained"
# A delivery flagged `possible_duplicate`: sent again after its worker died without reporting
# it (counted by the engine in `resent_after_loss`).
RESENT = "flagged possible_duplicate"
ENGINE_COUNTED = (AMBIGUOUS, COUNTED, RESENT)


@dataclass
class Ledger:
    """The soak's figures (see `account`)."""

    pushed_jobs: int = 0
    accepted_jobs: int = 0
    accepted_rcpts: int = 0
    final: dict[str, int] = field(default_factory=dict)  # final event -> recipients
    no_final_event: list[Key] = field(default_factory=list)
    no_final_at_sink: int = 0  # of those, delivered (the receiver has it)
    no_final_refused: int = 0  # of those, refused by the receiver (a bounce)
    final_twice: int = 0  # recipients with two final events
    lost: list[Key] = field(default_factory=list)  # accepted, not at the sink, no final event
    receiver_copies: int = 0
    duplicates: int = 0  # copies beyond the first, at the receiver
    ambiguous_flags: int = 0  # deferred events flagged ambiguous
    ambiguous_without_duplicate: int = 0  # flags whose recipient the receiver has once (or not)
    ambiguous_on_dropped: int = 0  # flags on a copy the sink took and dropped unanswered
    dropped_by_sink: int = 0  # copies the sink took and never answered
    counted_lines: int = 0  # duplicate_delivery lines in the engine's log
    torn_lines: int = 0  # events log lines that were not JSON (a kill -9 mid-write)
    by_cause: dict[str, int] = field(default_factory=dict)  # duplicates per explanation
    unexplained: list[Key] = field(default_factory=list)
    no_final_by_cause: dict[str, int] = field(default_factory=dict)  # missing events per kill
    # Per supervisor kill: recipients pending at the kill whose only copies the sink had
    # dropped, and which never got an ambiguous flag (the deferral died with the supervisor).
    flags_lost: dict[str, int] = field(default_factory=dict)

    @property
    def counted_by_engine(self) -> int:
        return sum(self.by_cause.get(cause, 0) for cause in ENGINE_COUNTED)

    def as_dict(self) -> dict[str, Any]:
        data = dict(vars(self))
        data["no_final_event"] = [list(k) for k in self.no_final_event[:50]]
        data["lost"] = [list(k) for k in self.lost[:50]]
        data["unexplained"] = [list(k) for k in self.unexplained[:50]]
        data["no_final_event_count"] = len(self.no_final_event)
        data["lost_count"] = len(self.lost)
        data["counted_by_engine"] = self.counted_by_engine
        return data


def account(jobs: Mapping[str, Sequence[str]], events: Iterable[Mapping[str, Any]],
            torn_lines: int, messages: Sequence[Any], refused: Iterable[str],
            engine_log: str, strikes: Sequence[Strike]) -> Ledger:
    """`jobs`: every job pushed (id -> recipients); `events`: the events log, parsed;
    `messages`: the sink's SinkMessages; `refused`: recipients the sink refused;
    `engine_log`: the engine's log text; `strikes`: the faults as they happened."""
    ledger = Ledger(pushed_jobs=len(jobs), torn_lines=torn_lines)
    queued: set[str] = set()
    finals: collections.Counter[Key] = collections.Counter()
    final_kind: dict[Key, str] = {}
    flagged: collections.Counter[Key] = collections.Counter()
    resent: set[Key] = set()
    for event in events:
        name = event["event"]
        if name == "queued":
            queued.add(event["id"])
        elif name in FINAL:
            key = (event["id"], event["rcpt"])
            finals[key] += 1
            final_kind.setdefault(key, name)
            if event.get("possible_duplicate"):
                resent.add(key)
        elif name == "deferred" and event.get("ambiguous"):
            flagged[(event["id"], event["rcpt"])] += 1
    accepted = [(job_id, rcpt) for job_id in jobs if job_id in queued for rcpt in jobs[job_id]]
    ledger.accepted_jobs = sum(1 for job_id in jobs if job_id in queued)
    ledger.accepted_rcpts = len(accepted)
    ledger.final = dict(collections.Counter(final_kind.values()))
    ledger.final_twice = sum(1 for n in finals.values() if n > 1)
    copies, seen_at = _copies(messages)
    ledger.receiver_copies = sum(copies.values())
    dropped = collections.Counter(key for m in messages if m.unanswered
                                  for key in message_keys(m))
    ledger.dropped_by_sink = sum(dropped.values())
    refused_set = set(refused)
    for key in accepted:
        if key in finals:
            continue
        ledger.no_final_event.append(key)
        if copies[key]:
            ledger.no_final_at_sink += 1
        elif key[1] in refused_set:
            ledger.no_final_refused += 1
        else:
            ledger.lost.append(key)
    ledger.ambiguous_flags = sum(flagged.values())
    ledger.ambiguous_without_duplicate = sum(
        max(0, n - max(0, copies[key] - 1)) for key, n in flagged.items())
    # The rest were never read by the sink: pipelined behind a dropped one, on its connection.
    ledger.ambiguous_on_dropped = sum(min(n, dropped[key]) for key, n in flagged.items())
    counted = {(m[1], m[2]) for m in _DUPLICATE_LINE.finditer(engine_log)}
    ledger.counted_lines = len(_DUPLICATE_LINE.findall(engine_log))
    _explain(ledger, copies, seen_at, flagged, counted | resent, strikes, resent)
    return ledger


def _copies(messages: Sequence[Any]) -> tuple[collections.Counter[Key],
                                              dict[Key, list[tuple[float, str]]]]:
    """Copies per recipient at the receiver, and when each came from which client IP."""
    copies: collections.Counter[Key] = collections.Counter()
    seen_at: dict[Key, list[tuple[float, str]]] = collections.defaultdict(list)
    for message in messages:
        for key in message_keys(message):
            copies[key] += 1
            seen_at[key].append((message.received, message.peer[0]))
    return copies, seen_at


def _explain(ledger: Ledger, copies: Mapping[Key, int],
             seen_at: Mapping[Key, list[tuple[float, str]]],
             flagged: Mapping[Key, int], counted: set[Key], strikes: Sequence[Strike],
             resent: set[Key] = frozenset()) -> None:
    windows = _Windows(strikes)
    causes: collections.Counter[str] = collections.Counter()
    for key, n in copies.items():
        extra = n - 1
        if extra <= 0:
            continue
        ledger.duplicates += extra
        # Each flag and each counted line accounts for one extra copy; the rest is the faults'.
        explained = min(extra, flagged.get(key, 0))
        causes[AMBIGUOUS] += explained
        if explained < extra and key in counted:
            causes[RESENT if key in resent else COUNTED] += 1
            explained += 1
        if explained < extra:
            cause = windows.duplicate(key, seen_at.get(key, []))
            causes[cause] += extra - explained
            if cause == UNEXPLAINED:
                ledger.unexplained.append(key)
    ledger.by_cause = dict(causes)
    ledger.flags_lost = {label: len(dropped - flagged.keys())
                         for label, dropped in windows.dropped_pending.items()}
    ledger.no_final_by_cause = dict(collections.Counter(
        windows.missing_event(seen_at.get(key, [])) for key in ledger.no_final_event))


class _Windows:
    """The kills' windows: which one a duplicate, or a missing final event, came from."""

    def __init__(self, strikes: Sequence[Strike]) -> None:
        self.workers: list[tuple[str, str, float]] = []  # (label, ip, killed)
        self.supervisors: list[tuple[str, float, set[Key]]] = []  # (label, killed, pending)
        self.dropped_pending: dict[str, set[Key]] = {}  # per supervisor kill
        ordinals: collections.Counter[str] = collections.Counter()
        for strike in strikes:
            kind, details = strike.fault.kind, strike.details
            ordinals[kind] += 1
            label = f"{kind} #{ordinals[kind]}"
            if "killed" not in details:  # the kill itself failed
                continue
            if kind == WORKER:
                self.workers.append((label, details["ip"], details["killed"]))
            elif kind == SUPERVISOR:
                at_sink = details.get("unrecorded", []) + details.get("pending_dropped", [])
                self.supervisors.append((label, details["killed"],
                                         {(j, r) for j, r in at_sink}))
                self.dropped_pending[label] = {
                    (j, r) for j, r in details.get("pending_dropped", [])}

    def duplicate(self, key: Key, seen: list[tuple[float, str]]) -> str:
        """A worker kill, if a copy but the last came from its IP just before it; a
        supervisor kill, if the dead supervisor's spool held the recipient pending although
        the sink had it."""
        for label, ip, killed in self.workers:
            if any(peer == ip and killed - WORKER_WINDOW <= at <= killed + 0.5
                   for at, peer in sorted(seen)[:-1]):
                return label
        for label, _, pending in self.supervisors:
            if key in pending:
                return label
        return UNEXPLAINED

    def missing_event(self, seen: list[tuple[float, str]]) -> str:
        """A supervisor kill, if the last copy came in the seconds before it (the result
        recorded, its event still in the dead process's buffer)."""
        last = max(seen, default=None)
        if last is not None:
            for label, killed, _ in self.supervisors:
                if killed - WORKER_WINDOW <= last[0] <= killed + 0.5:
                    return label
        return UNEXPLAINED
