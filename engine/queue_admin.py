"""The operator's queue commands, the supervisor's side (`mailengine queue`, engine.queuecli).

Over the control socket (engine.control), each a request answered in the supervisor's
loop (the summary's read of the spool in a thread beside it: engine.control.OffLoop):

- `queue`: what waits, per sending IP x provider x domain: recipients, jobs, the oldest,
  the last reply; and the suspensions in force. The spool knows the domain of a recipient,
  not the IP and provider its mail goes through (a pool's job may leave by any of its
  IPs, and the provider comes from the MX): those come from `Routes`, what the results
  since the start said for each domain (`-` for a domain not tried since).
- `queue_show`: one job as the spool holds it (its message left out).
- `queue_retry`: recipients due now, by job, domain or provider (the attempt counts
  stay); a provider's suspension still applies (`queue_resume` lifts it).
- `queue_bounce`, `queue_delete`: recipients ended by the operator, by job or domain:
  each gets its final event, `bounced` (550 5.0.0) or `expired` (451 4.0.0) with a reply
  that says the operator did it, stored with the outcome in the spool's outbox
  (engine.outbox) and then published, as `Dispatcher._expire` does. A job a worker may be
  delivering now (in flight, or a hand-out taken back whose results may still come) is left
  alone: refused by id, skipped by domain and counted in the answer (`in_flight`), to be
  run again once its results are in. (Ending it under the worker's feet could give one
  recipient two final events: the operator's and a late `delivered`.)
- `queue_suspend`, `queue_resume`: a provider at one sending IP (or, without `ip`, at
  every one), told to that IP's worker (engine.protocol.Hold, over its task channel),
  whose shaper holds it (engine.shaping.ProviderShaper.hold). Remembered here, and told
  again to a restarted worker until it ends. A resume also retries that IP x provider's
  domains; with `lift` (`mailengine queue --cluster resume`, run on every host) the
  workers also delete the provider's suspension from the cluster's Redis
  (engine.cluster_suspend), so that no worker follows it again.

Only over an ipc control socket (mode 0660: root and the engine's group) or a CURVE one
(`control.curve`: the listed operators' keys) do the commands that change something run;
a plain tcp one (no authentication, reachable by every local user) answers `queue` and
`queue_show` only.

The cost: the summary reads at most SUMMARY_SCAN recipients (the oldest rows; the answer
says when there were more); a command by domain scans the recipients not final (no index
holds the domain) and ends or retries at most MATCH_MAX of them per request (`more` in
the answer: the CLI asks again). docs/OPERATIONS.md, "The queue", is the runbook.
"""
from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import zmq

from engine import events, logs, protocol, sockets
from engine.clock import EngineClock
from engine.control import BadRequest, Handler, OffLoop
from engine.dispatch import Dispatcher, Publish
from engine.protocol import Attempt, Hold, Status
from engine.reply import Reply
from engine.spool import DomainQueue, RcptUpdate, Spool, Waiting
from engine.workers import Workers

log = logging.getLogger("mailengine.supervisor")

SUMMARY_SCAN = 100_000  # recipients the summary reads at most
SUMMARY_ROWS = 100  # rows the summary answers by default
MATCH_MAX = 10_000  # recipients one retry, bounce or delete request changes at most
ROUTES_MAX = 100_000  # domains whose route is remembered
DEFAULT_HOLD = 3600.0  # seconds of a suspension without --for: a forgotten one ends
BOUNCE_REPLY = Reply.local(550, "5.0.0", "bounced by the operator: not delivered")
DELETE_REPLY = Reply.local(451, "4.0.0", "deleted from the queue by the operator:"
                                         " not delivered")
_NAME = re.compile(r"[A-Za-z0-9_.\-\[\]:]{1,253}")  # a domain or a provider's name
_ID_MAX = 255


@dataclass(frozen=True)
class Route:
    """How a domain's mail went last: through which IP and provider, what was said."""

    ip: str
    provider: str
    reply: Reply
    ts: float  # the engine's time of that reply


class Routes:
    """The route of each domain, as the results since the start say (deferrals only: they
    are what stays in the queue); the least recently seen forgotten past ROUTES_MAX."""

    def __init__(self, limit: int = ROUTES_MAX) -> None:
        self._by_domain: dict[str, Route] = {}
        self._limit = limit

    def saw(self, attempts: Iterable[Attempt]) -> None:
        deferred = Status.DEFERRED
        known = self._by_domain
        for a in attempts:
            if a.status is not deferred or not a.provider:
                continue
            domain = a.rcpt.rpartition("@")[2].lower()
            known.pop(domain, None)  # re-inserted last: the order is the age
            known[domain] = Route(a.ip, a.provider, a.reply, a.ts)
        while len(known) > self._limit:
            del known[next(iter(known))]

    def of(self, domain: str) -> Route | None:
        return self._by_domain.get(domain)

    def domains(self, provider: str, ip: str | None = None) -> list[str]:
        return [d for d, r in self._by_domain.items()
                if r.provider == provider and (ip is None or r.ip == ip)]


class QueueAdmin:
    """The queue commands' handlers (`commands`), over the supervisor's parts."""

    def __init__(self, spool: Spool, dispatcher: Dispatcher, workers: Workers,
                 publish: Publish, clock: EngineClock, control: str = "ipc://",
                 authenticated: bool = False) -> None:
        # Over tcp without CURVE (`authenticated`: control.curve) the control socket has no
        # authentication (not even the ipc file's mode): every local user reaches it, so it
        # only shows the queue (`_changing`).
        self._tcp = control.startswith("tcp://") and not authenticated
        self._spool = spool
        self._dispatcher = dispatcher
        self._workers = workers
        self._publish = publish
        self._clock = clock
        self.routes = Routes()
        self._holds: dict[tuple[str, str], float] = {}  # (ip, provider) -> until (monotonic)

    def commands(self) -> Mapping[str, Handler]:
        changing = {"queue_retry": self.retry, "queue_bounce": self.bounce,
                    "queue_delete": self.delete, "queue_suspend": self.suspend,
                    "queue_resume": self.resume}
        return {"queue": self.summary, "queue_show": self.show,
                **{name: self._changing(run) for name, run in changing.items()}}

    def _changing(self, run: Handler) -> Handler:
        """`run`, or a refusal over a tcp control socket (see `__init__`)."""
        if not self._tcp:
            return run

        def refused(_: dict[str, Any]) -> dict[str, Any]:
            raise BadRequest("the control socket is tcp without CURVE, which any user of this"
                             " machine can reach: it shows the queue but changes nothing; set"
                             " `control` to an ipc:// path, or enable control.curve"
                             " (docs/OPERATIONS.md, The queue)")
        return refused

    # -- looking -----------------------------------------------------------------------

    def summary(self, request: dict[str, Any]) -> OffLoop:
        """The `queue` answer: the spool read off the supervisor's loop (~0.4 s for
        SUMMARY_SCAN recipients, which would stop intake and results as long), the rows
        made in it (the routes, holds and in-flight table are the loop's)."""
        limit = _count(request, "limit", SUMMARY_ROWS)
        return OffLoop(read=lambda: self._spool.by_domain(SUMMARY_SCAN, apart=True),
                       answer=lambda found: self._summary(found, limit))

    def _summary(self, found: tuple[list[DomainQueue], int], limit: int) -> dict[str, Any]:
        domains, scanned = found
        now = self._clock.now()
        rows = []
        for queue in sorted(domains, key=lambda q: (-q.rcpts, q.domain))[:limit]:
            route = self.routes.of(queue.domain)
            reply, reply_ts = (route.reply, route.ts) if route else (queue.reply, None)
            rows.append({"ip": route.ip if route else None,
                         "provider": route.provider if route else None,
                         "domain": queue.domain, "rcpts": queue.rcpts, "jobs": queue.jobs,
                         "oldest_age": round(max(0.0, now - queue.oldest_ts), 1),
                         "next_in": round(max(0.0, queue.next_attempt - now), 1),
                         "last_reply": _reply(reply),
                         "last_reply_age": None if reply_ts is None
                         else round(max(0.0, now - reply_ts), 1)})
        return {"rows": rows, "domains": len(domains), "scanned": scanned,
                "complete": scanned < SUMMARY_SCAN, "in_flight": len(self._dispatcher.in_flight),
                "suspended": self.suspensions()}

    def suspensions(self) -> list[dict[str, Any]]:
        """Every sending IP x provider suspended now, as its worker said last."""
        return [{"ip": handle.ip, "provider": provider, "for": state.get("suspended_for"),
                 "by": "operator" if state.get("held") else "shaping"}
                for handle in self._workers
                for provider, state in sorted((handle.stats.get("shaping") or {}).items())
                if state.get("suspended_for")]

    def show(self, request: dict[str, Any]) -> dict[str, Any]:
        job_id = _job_id(request)
        record = self._spool.job_record(job_id)
        if record is None:
            raise BadRequest(f"no job {job_id!r} in the queue (ended, or never accepted)")
        flight = self._dispatcher.in_flight.get(job_id)
        now = self._clock.now()
        record["in_flight_at"] = flight.ip if flight is not None else None
        record["age"] = round(max(0.0, now - record["queued_ts"]), 1)
        record["expires_in"] = round(record["expires_ts"] - now, 1)
        for rcpt in record["rcpts"]:
            at = rcpt.pop("next_attempt")
            rcpt["next_in"] = None if at is None else round(max(0.0, at - now), 1)
        return record

    # -- changing ----------------------------------------------------------------------

    def retry(self, request: dict[str, Any]) -> dict[str, Any]:
        """Recipients due now: of a job, a domain, or the domains routed to a provider
        (at one IP, with `ip`)."""
        if "provider" in request:
            ip = self._ip(request) if "ip" in request else None
            return self._retry_domains(self.routes.domains(_name(request, "provider"), ip))
        job_id, domain = _target(request)
        if job_id is not None and job_id in self._out():
            raise BadRequest(f"job {job_id} is in flight (a worker is delivering it now)")
        found, more, skipped = self._waiting(job_id, domain, due_after=self._clock.now())
        self._retry(found)
        return _changed(found, more, skipped)

    def _retry_domains(self, domains: list[str]) -> dict[str, Any]:
        found: list[Waiting] = []
        more, skipped = False, 0
        for domain in domains:
            some, more, passed = self._waiting(None, domain, MATCH_MAX - len(found),
                                               due_after=self._clock.now())
            found += some
            skipped += passed
            if more:
                break
        self._retry(found)
        return {**_changed(found, more, skipped), "domains": len(domains)}

    def _retry(self, found: list[Waiting]) -> None:
        if not found:
            return
        now = self._clock.now()
        self._spool.record([RcptUpdate(w.job_id, w.rcpt, Status.DEFERRED, next_attempt=now,
                                       count_attempt=False) for w in found], now)
        self._dispatcher.changed_by_operator({w.job_id for w in found})
        log.warning(logs.kv("queue_retried", jobs=len({w.job_id for w in found}),
                            rcpts=len(found)))

    def bounce(self, request: dict[str, Any]) -> dict[str, Any]:
        return self._end(request, Status.BOUNCED, BOUNCE_REPLY, "queue_bounced")

    def delete(self, request: dict[str, Any]) -> dict[str, Any]:
        return self._end(request, Status.EXPIRED, DELETE_REPLY, "queue_deleted")

    def _end(self, request: dict[str, Any], status: Status, reply: Reply,
             logged: str) -> dict[str, Any]:
        """Recipients ended by the operator, each with its final event (see the module)."""
        job_id, domain = _target(request)
        if job_id is not None and job_id in self._out():
            raise BadRequest(f"job {job_id} is in flight (a worker is delivering it now);"
                             " try again in a moment")
        if request.get("dry_run") is True:
            jobs, rcpts = self._spool.count_waiting(job_id, domain)
            return {"jobs": jobs, "rcpts": rcpts, "dry_run": True}
        found, more, skipped = self._waiting(job_id, domain)
        if found:
            now = self._clock.now()
            finals = [events.attempt_event(
                Attempt(job_id=w.job_id, rcpt=w.rcpt, status=status, reply=reply, ip="",
                        ts=now), status, w.meta, w.attempts, w.queued_ts) for w in found]
            self._spool.record([RcptUpdate(w.job_id, w.rcpt, status, reply=reply)
                                for w in found], now, finals)  # the events with the outcome
            self._dispatcher.changed_by_operator({w.job_id for w in found})
            for event in finals:
                self._publish(event)
            log.warning(logs.kv(logged, jobs=len({w.job_id for w in found}), rcpts=len(found),
                                **({"id": job_id} if job_id else {"domain": domain})))
        return _changed(found, more, skipped)

    def _out(self) -> set[str]:
        """The jobs a worker may be delivering now: in flight, or with a hand-out taken
        back (overdue, its worker declared dead) whose results may still come."""
        dispatcher = self._dispatcher
        return {*dispatcher.in_flight, *(f.job_id for f in dispatcher.earlier.values())}

    def _waiting(self, job_id: str | None, domain: str | None, limit: int = MATCH_MAX,
                 due_after: float | None = None) -> tuple[list[Waiting], bool, int]:
        """The recipients of a job or a domain not out (`_out`), at most `limit` (and, for a
        retry, only those not due yet: what one request retried is not found again by the
        next); whether more match; how many jobs were skipped, out."""
        out = self._out()
        skipped: set[str] = set()

        class _Skip:
            def __contains__(self, job: object) -> bool:
                if job in out:
                    skipped.add(str(job))
                    return True
                return False

        found, more = self._spool.waiting(job_id, domain, _Skip(), limit, due_after)
        return found, more, len(skipped)

    # -- suspending --------------------------------------------------------------------

    def suspend(self, request: dict[str, Any]) -> dict[str, Any]:
        """A provider suspended at one sending IP (`ip`), or at every one (no `ip`)."""
        ips, provider = self._ips(request), _name(request, "provider")
        seconds = request.get("seconds", DEFAULT_HOLD)
        if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) \
                or not 0 < seconds <= protocol.HOLD_MAX:
            raise BadRequest(f"seconds: more than 0 and at most {protocol.HOLD_MAX:.0f}"
                             f" (got {seconds!r})")
        for ip in ips:  # remembered first: a worker not ready now is told when it is
            self._holds[(ip, provider)] = time.monotonic() + seconds
        told = self._tell_all(ips, Hold(provider, float(seconds)), "ip" in request)
        for ip in ips:
            log.warning(logs.kv("queue_suspended", ip=ip, provider=provider, seconds=seconds))
        return {"ip": request.get("ip"), "ips": ips, "provider": provider,
                "seconds": seconds, **told}

    def resume(self, request: dict[str, Any]) -> dict[str, Any]:
        """A provider resumed at one sending IP (`ip`), or at every one (no `ip`); `lift`
        (`queue --cluster resume`): its suspension in the cluster's Redis lifted too."""
        ips, provider = self._ips(request), _name(request, "provider")
        lift = request.get("lift") is True
        for ip in ips:
            self._holds.pop((ip, provider), None)
        told = self._tell_all(ips, Hold(provider, 0.0, lift), "ip" in request)
        retried = self._retry_domains([d for ip in ips
                                       for d in self.routes.domains(provider, ip)])
        for ip in ips:
            log.warning(logs.kv("queue_resumed", ip=ip, provider=provider, lift=lift,
                                rcpts=retried["rcpts"]))
        return {"ip": request.get("ip"), "ips": ips, "provider": provider, **told, **retried}

    def _ips(self, request: dict[str, Any]) -> list[str]:
        """The sending IP asked for, or every one of this engine's without `ip`."""
        if "ip" in request:
            return [self._ip(request)]
        return sorted(handle.ip for handle in self._workers)

    def _tell_all(self, ips: list[str], hold: Hold, named: bool) -> dict[str, Any]:
        """`hold` told to the worker of each IP: an error for one IP asked by name; with
        every IP, `not_running` lists those whose worker is not (a suspension is told to
        them when they are ready)."""
        if named:
            self._tell(ips[0], hold)
            return {"not_running": []}
        missed = []
        for ip in ips:
            try:
                self._tell(ip, hold)
            except BadRequest:
                missed.append(ip)
        return {"not_running": missed}

    def worker_ready(self, ip: str) -> None:
        """A (re)started worker: the suspensions the operator asked for it, told again."""
        now = time.monotonic()
        for (held_ip, provider), until in list(self._holds.items()):
            if until <= now:
                del self._holds[(held_ip, provider)]
            elif held_ip == ip:
                try:
                    self._tell(ip, Hold(provider, until - now))
                except BadRequest as err:
                    log.warning(logs.kv("queue_hold_not_told", ip=ip, provider=provider,
                                        error=err))

    def _tell(self, ip: str, hold: Hold) -> None:
        """Send `hold` to the worker of `ip`, over its task channel."""
        handle = self._workers.get(ip)
        if handle is None or not handle.ready or handle.tasks is None:
            raise BadRequest(f"the worker of {ip} is not running now (restarting?);"
                             " try again in a moment")
        try:
            handle.tasks.send(protocol.hold_frame(hold), sockets.NOBLOCK)
        except zmq.Again:
            raise BadRequest(f"the worker of {ip} has a full task queue;"
                             " try again in a moment") from None

    def _ip(self, request: dict[str, Any]) -> str:
        ip = request.get("ip")
        if not isinstance(ip, str) or self._workers.get(ip) is None:
            ips = ", ".join(sorted(handle.ip for handle in self._workers))
            raise BadRequest(f"ip {ip!r} is not one of this engine's sending IPs ({ips})")
        return ip


def _target(request: dict[str, Any]) -> tuple[str | None, str | None]:
    """(job id, None) or (None, domain): exactly one of them asked for."""
    if ("id" in request) == ("domain" in request):
        raise BadRequest("give a job id or a domain (one of them)")
    if "id" in request:
        return _job_id(request), None
    return None, _name(request, "domain")


def _job_id(request: dict[str, Any]) -> str:
    job_id = request.get("id")
    if not isinstance(job_id, str) or not 0 < len(job_id) <= _ID_MAX:
        raise BadRequest(f"id: a job id of 1 to {_ID_MAX} characters (got {job_id!r})")
    return job_id


def _name(request: dict[str, Any], key: str) -> str:
    """A domain or a provider's name, lower case, without a final dot."""
    value = request.get(key)
    name = value.lower().rstrip(".") if isinstance(value, str) else ""
    if not _NAME.fullmatch(name):
        raise BadRequest(f"{key}: not a {key} name (got {value!r})")
    return name


def _count(request: dict[str, Any], key: str, default: int) -> int:
    value = request.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= 100_000:
        raise BadRequest(f"{key}: a whole number from 1 to 100000 (got {value!r})")
    return value


def _reply(reply: Reply | None) -> dict[str, Any] | None:
    if reply is None:
        return None
    return {"code": reply.code, "enhanced": reply.enhanced, "text": reply.text}


def _changed(found: list[Waiting], more: bool, skipped: int) -> dict[str, Any]:
    return {"jobs": len({w.job_id for w in found}), "rcpts": len(found), "more": more,
            "in_flight": skipped}

