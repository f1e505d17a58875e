"""The fault soak's timeline and accounting (bench/faults.py `plan`, bench/soak_ledger.py): the
figures the issue's targets are read from must be right before a 10-minute run is."""
from __future__ import annotations

import collections
import itertools
from typing import Any

from bench.faults import DISK, DNS, RECOVERY, SCRIPT, SUPERVISOR, WORKER, Fault, Strike, plan
from bench.soak_ledger import AMBIGUOUS, COUNTED, UNEXPLAINED, account
from engine.testing.sink_session import SinkMessage

KILLED = 1000.0  # Unix time of the kills below


def copy(job_id: str, rcpt: str, at: float, ip: str = "127.0.0.2",
         unanswered: bool = False) -> SinkMessage:
    content = f"Subject: x\r\nMessage-ID: <{job_id}@soak.test>\r\n\r\nbody\r\n".encode()
    return SinkMessage(mail_from="s@x.test", rcpt_tos=(rcpt,), content=content, peer=(ip, 1),
                       tls=None, conn_id=1, seq=1, helo="h", via="BDAT", received=at,
                       unanswered=unanswered)


def event(name: str, job_id: str, rcpt: str | None = None, **fields: Any) -> dict[str, Any]:
    return {"event": name, "id": job_id, "ts": 0.0, **({"rcpt": rcpt} if rcpt else {}),
            **fields}


def strike(kind: str, **details: Any) -> Strike:
    return Strike(Fault(0.0, kind, 0.0), KILLED, KILLED + 1, details)


def test_the_plan_strikes_every_fault_of_the_script_once_in_its_own_slot() -> None:
    faults = plan(seed=3, window=480)
    assert collections.Counter(f.kind for f in faults) == {
        kind: count for kind, count, _ in SCRIPT}
    assert [f.kind for f in faults] != [f.kind for f in plan(seed=4, window=480)]
    assert faults == plan(seed=3, window=480)
    for before, after in itertools.pairwise(faults):
        assert before.at + before.seconds + RECOVERY <= after.at
    assert faults[0].at > 0 and faults[-1].at + faults[-1].seconds + RECOVERY <= 480
    assert {f.seconds for f in faults if f.kind in (DISK, DNS)} == {10.0, 5.0}


def test_a_clean_run_has_nothing_lost_nothing_twice_every_final_event() -> None:
    jobs = {"a": ["r@d.test"], "b": ["r@d.test", "reject-s@d.test"]}
    events = [event("queued", "a"), event("queued", "b"),
              event("delivered", "a", "r@d.test"), event("delivered", "b", "r@d.test"),
              event("bounced", "b", "reject-s@d.test")]
    ledger = account(jobs, events, 0, [copy("a", "r@d.test", 1), copy("b", "r@d.test", 2)],
                     ["reject-s@d.test"], "", [])
    assert (ledger.accepted_jobs, ledger.accepted_rcpts) == (2, 3)
    assert ledger.final == {"delivered": 2, "bounced": 1}
    assert (ledger.lost, ledger.no_final_event, ledger.duplicates) == ([], [], 0)


def test_an_accepted_recipient_nowhere_is_lost_and_one_at_the_receiver_is_not() -> None:
    jobs = {"gone": ["r@d.test"], "there": ["r@d.test"], "bounce": ["reject-x@d.test"],
            "never-queued": ["r@d.test"]}
    events = [event("queued", "gone"), event("queued", "there"), event("queued", "bounce")]
    ledger = account(jobs, events, 1, [copy("there", "r@d.test", 5)], ["reject-x@d.test"],
                     "", [])
    assert ledger.pushed_jobs == 4 and ledger.accepted_jobs == 3
    assert ledger.lost == [("gone", "r@d.test")]
    assert len(ledger.no_final_event) == 3
    assert (ledger.no_final_at_sink, ledger.no_final_refused, ledger.torn_lines) == (1, 1, 1)


def test_each_duplicate_is_explained_by_a_flag_a_count_or_the_kill_that_made_it() -> None:
    rcpt = "r@d.test"
    jobs = {name: [rcpt] for name in ("flag", "counted", "worker", "worker-drop", "super",
                                      "super-drop", "odd", "flag-only")}
    events = [event("queued", j) for j in jobs] + [event("delivered", j, rcpt) for j in jobs]
    events += [event("deferred", "flag", rcpt, ambiguous=True),
               event("deferred", "flag-only", rcpt, ambiguous=True)]
    messages = [
        copy("flag", rcpt, 10, unanswered=True), copy("flag", rcpt, 12),
        copy("counted", rcpt, 10), copy("counted", rcpt, 11),
        # a copy from the killed worker's IP, a second before its kill: answered, or dropped
        # (its ambiguous deferral died with the worker)
        copy("worker", rcpt, KILLED - 1, ip="127.0.0.3"), copy("worker", rcpt, KILLED + 9),
        copy("worker-drop", rcpt, KILLED - 1, ip="127.0.0.3", unanswered=True),
        copy("worker-drop", rcpt, KILLED + 9),
        copy("super", rcpt, KILLED - 1), copy("super", rcpt, KILLED + 9),
        # dropped just before the supervisor's kill, its ambiguous deferral never recorded
        copy("super-drop", rcpt, KILLED + 4, unanswered=True), copy("super-drop", rcpt, 1020),
        copy("odd", rcpt, 10), copy("odd", rcpt, 20),
        copy("flag-only", rcpt, 10),  # flagged, but the sink never had it twice
    ]
    log = "2026 WARNING mailengine[1] event=duplicate_delivery id=counted rcpt=r@d.test ip=x\n"
    strikes = [strike(WORKER, ip="127.0.0.3", killed=KILLED),
               strike(SUPERVISOR, killed=KILLED + 5, unrecorded=[["super", rcpt]],
                      pending_dropped=[["super-drop", rcpt], ["flag", rcpt]])]
    ledger = account(jobs, events, 0, messages, [], log, strikes)
    assert ledger.duplicates == 7
    assert ledger.by_cause == {AMBIGUOUS: 1, COUNTED: 1, f"{WORKER} #1": 2,
                               f"{SUPERVISOR} #1": 2, UNEXPLAINED: 1}
    assert ledger.flags_lost == {f"{SUPERVISOR} #1": 1}  # "flag" has its flag: not lost
    assert ledger.counted_by_engine == 2
    assert ledger.unexplained == [("odd", rcpt)]
    assert (ledger.ambiguous_flags, ledger.ambiguous_without_duplicate) == (2, 1)
    assert ledger.ambiguous_on_dropped == 1  # the other flag's message never reached the sink
    assert ledger.dropped_by_sink == 3 and ledger.counted_lines == 1


def test_a_final_event_missing_after_a_supervisor_kill_is_put_to_that_kill() -> None:
    rcpt = "r@d.test"
    jobs = {"late": [rcpt], "early": [rcpt]}
    events = [event("queued", "late"), event("queued", "early")]
    messages = [copy("late", rcpt, KILLED - 0.2), copy("early", rcpt, KILLED - 60)]
    ledger = account(jobs, events, 0, messages, [], "",
                     [strike(SUPERVISOR, killed=KILLED, unrecorded=[])])
    assert ledger.lost == [] and ledger.no_final_at_sink == 2
    assert ledger.no_final_by_cause == {f"{SUPERVISOR} #1": 1, UNEXPLAINED: 1}
