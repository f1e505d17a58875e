"""TLS-RPT (RFC 8460), the supervisor's half: the workers' session counts kept in the spool,
a report per policy domain at the end of each period, sent to the domain's rua URIs.

- **Counted.** Each worker sends its counts once a second (engine.tlsrpt, a `tlsrpt`
  frame); they are added up in memory under the period they arrived in (`tlsrpt.period`,
  a UTC day by default: the period starts at a multiple of it since the epoch) and written
  to the spool's `tlsrpt_counts` table at most once a second (`tick`), with each domain's
  rua URIs (`tlsrpt_rua`). A kill -9 loses at most that second, a worker's death the
  second it had not sent.
- **Made.** Once a period is over, each of its domains gets a report
  (engine.tlsrpt_report): the JSON, gzipped, stored in `tlsrpt_reports` with the rua URIs
  that must still accept it, in the transaction that deletes the period's counts.
- **Sent.** A `mailto:` rua gets a message (RFC 8460 5.3) as a job of the engine's own,
  from `tlsrpt.sender`, accepted into the spool like a producer's (`queued` is published;
  its meta names the report): once spooled it is the engine's to deliver, and that rua has
  accepted the report. An `https:` rua gets a POST (RFC 8460 5.4) from a thread of the
  supervisor's (`Poster`: the rua's host looked up through the config's resolver, its
  addresses checked by the destination policy like an MX host's, a certificate valid for
  the host: smtp.ca_file or the system's CAs, `tlsrpt.https_timeout`); a 2xx accepts it.
  A rua that fails is tried again every `tlsrpt.retry`; a report not accepted by every rua
  after `tlsrpt.give_up` is dropped, with a log line (`tlsrpt_report_given_up`).

The supervisor's loop never waits on the network here: the thread does the lookups and
the POSTs, the loop reads what it finished (`tick`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import queue
import secrets
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

import dns.exception
import dns.resolver

from engine import logs, tlsrpt, tlsrpt_report
from engine.config import Config, names
from engine.destinations import DestinationPolicy
from engine.metrics import Metrics
from engine.spool import Spool, SpoolDamaged, SpoolError

log = logging.getLogger("mailengine.tlsrpt")

FLUSH_EVERY = 1.0  # seconds between writes of the counts to the spool, at most
SEND_EVERY = 1.0  # seconds between looks for reports due
STOP_WAIT = 1.0  # seconds the supervisor's stop waits for a POST in progress
MAX_POLICY = 16 * 1024  # characters of a policy as a worker sends it
MAX_DETAIL = 2048
_RESULTS = frozenset((tlsrpt.SUCCESS, *tlsrpt.RESULT_TYPES))
# The counter of sessions of each result (engine.metrics: tlsrpt_success, ...).
_SESSION_METRICS = {result: "tlsrpt_" + result.replace("-", "_") for result in _RESULTS}

# Jobs as multipart frames -> the ids of those the spool now holds (engine.intake.accept).
Submit = Callable[[list[list[bytes]]], set[str]]
CountKey = tuple[int, str, str, str, str]  # period, domain, policy, result, detail


class TlsRptStore:
    """See the module's docstring. `submit` accepts the engine's own jobs."""

    def __init__(self, cfg: Config, spool: Spool, submit: Submit, metrics: Metrics,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = cfg.tlsrpt
        self.submitter = cfg.hostname
        self.organization = self.settings.organization or cfg.hostname
        self.sender = self.settings.sender or f"tlsrpt-noreply@{cfg.hostname}"
        self.contact = self.settings.contact or self.sender
        self._spool = spool
        self._submit = submit
        self._metrics = metrics
        self._clock = clock
        self._counts: dict[CountKey, int] = {}
        self._rua: dict[str, list[str]] = {}
        self._flushed = 0.0
        self._next_send = 0.0
        self._next_close = 0.0
        self._poster = Poster(cfg)
        self._posting: set[tuple[str, str]] = set()  # (report id, url) with the thread

    def period_of(self, now: float) -> int:
        """The start of the period `now` falls in."""
        period = self.settings.period
        return int(now // period * period)

    # -- counted ---------------------------------------------------------------------

    def counted(self, msg: dict[str, Any]) -> None:
        """A worker's `tlsrpt` frame: its counts, added up under the current period."""
        period = self.period_of(self._clock())
        for row in msg.get("counts") or ():
            try:
                domain, policy, result, detail, count = row
            except (TypeError, ValueError):
                continue
            if not _valid_row(domain, policy, result, detail, count):
                log.warning(logs.kv("tlsrpt_bad_count", ip=msg.get("ip"), row=row))
                continue
            key = (period, domain, policy, result, detail)
            self._counts[key] = self._counts.get(key, 0) + count
            self._metrics.incr(_SESSION_METRICS[result], "all", count)
        rua = msg.get("rua")
        for domain, uris in (rua.items() if isinstance(rua, dict) else ()):
            if names.is_hostname(domain) and isinstance(uris, list):
                kept = [u for u in uris if isinstance(u, str) and tlsrpt.valid_uri(u)]
                if kept:
                    self._rua[domain] = kept[:tlsrpt.MAX_RUA]

    def tick(self) -> None:
        """Called every housekeeping turn of the supervisor's loop: write the counts (at
        most once a second), make the reports of periods that ended, send what is due. A
        spool that cannot be written leaves it all for a later turn."""
        try:
            self._tick(self._clock())
        except SpoolDamaged:
            raise
        except SpoolError as err:
            log.warning(logs.kv("tlsrpt_store_failed", error=err))

    def _tick(self, now: float) -> None:
        if (self._counts or self._rua) and now - self._flushed >= FLUSH_EVERY:
            self._flush(now)
        if now >= self._next_close and not self._counts:
            self._make_reports(now)
        self._posted(now)
        if now >= self._next_send:
            self._next_send = now + SEND_EVERY
            self._send_due(now)

    def close(self) -> None:
        """At the supervisor's stop: the counts written, the thread stopped."""
        if self._counts or self._rua:
            self._flush(self._clock())
        self._poster.stop()

    def _flush(self, now: float) -> None:
        counts, rua = self._counts, self._rua
        try:
            with self._spool.transaction() as conn:
                conn.executemany(
                    "INSERT INTO tlsrpt_counts VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT"
                    " (period, domain, policy, result, detail) DO UPDATE SET"
                    " count = count + excluded.count",
                    [(*key, count) for key, count in counts.items()])
                conn.executemany("INSERT OR REPLACE INTO tlsrpt_rua VALUES (?, ?, ?)",
                                 [(d, json.dumps(u), now) for d, u in rua.items()])
        except SpoolDamaged:
            raise
        except SpoolError as err:  # kept in memory, written at a later turn
            log.warning(logs.kv("tlsrpt_store_failed", error=err))
            self._flushed = now
            return
        self._counts, self._rua = {}, {}
        self._flushed = now

    # -- made ------------------------------------------------------------------------

    def _make_reports(self, now: float) -> None:
        current = self.period_of(now)
        self._next_close = current + self.settings.period
        ended = self._spool.query("SELECT DISTINCT period, domain FROM tlsrpt_counts"
                                  " WHERE period < ?", (current,))
        with self._spool.transaction() as conn:  # domains no longer counted: forgotten
            conn.execute("DELETE FROM tlsrpt_rua WHERE seen < ?",
                         (current - 2 * self.settings.period,))
        for period, domain in ended:
            try:
                self._make_report(int(period), str(domain), now)
            except SpoolDamaged:
                raise
            except SpoolError as err:
                log.warning(logs.kv("tlsrpt_store_failed", error=err))
                self._next_close = now + FLUSH_EVERY  # try again soon
                return

    def _make_report(self, period: int, domain: str, now: float) -> None:
        rows = self._spool.query("SELECT policy, result, detail, count FROM tlsrpt_counts"
                                 " WHERE period = ? AND domain = ?", (period, domain))
        found = self._spool.query("SELECT rua FROM tlsrpt_rua WHERE domain = ?", (domain,))
        rua = json.loads(found[0][0]) if found else []
        unique = secrets.token_hex(8)
        report_id = f"{period}.{unique}@{self.submitter}"
        end = period + int(self.settings.period)
        with self._spool.transaction() as conn:
            conn.execute("DELETE FROM tlsrpt_counts WHERE period = ? AND domain = ?",
                         (period, domain))
            if not rua:
                return
            report = tlsrpt_report.report_json(self.organization, self.contact, report_id,
                                               period, end, domain, rows)
            body = tlsrpt_report.gzipped(report)
            conn.execute("INSERT INTO tlsrpt_reports (report_id, domain, period, made, body,"
                         " pending, tries, next_try) VALUES (?, ?, ?, ?, ?, ?, 0, ?)",
                         (report_id, domain, period, now, body, json.dumps(rua), now))
        self._metrics.incr("tlsrpt_reports_made", "all")
        log.info(logs.kv("tlsrpt_report_made", domain=domain, report_id=report_id,
                         start=tlsrpt_report.iso(period), sessions=sum(r[3] for r in rows),
                         rua=",".join(rua), bytes=len(body)))

    # -- sent ------------------------------------------------------------------------

    def _send_due(self, now: float) -> None:
        due = self._spool.query("SELECT report_id, domain, period, made, body, pending, tries"
                                " FROM tlsrpt_reports WHERE next_try <= ?", (now,))
        for report_id, domain, period, made, body, pending, tries in due:
            if now - made >= self.settings.give_up:
                self._give_up(report_id, domain, json.loads(pending))
                continue
            left = []
            for uri in json.loads(pending):
                if uri.startswith("mailto:"):
                    if not self._mail(report_id, domain, int(period), bytes(body), uri):
                        left.append(uri)
                else:
                    left.append(uri)
                    if (report_id, uri) not in self._posting:
                        self._posting.add((report_id, uri))
                        self._poster.submit(report_id, uri, bytes(body))
            self._update(report_id, domain, left, tries, now + self.settings.retry)

    def _mail(self, report_id: str, domain: str, period: int, body: bytes, uri: str) -> bool:
        """A mailto: rua's report, as a job of the engine's own: True once spooled."""
        to = uri[len("mailto:"):]
        unique = report_id.split("@")[0].rpartition(".")[2]
        # The same id for the same report and rua: spooled twice (a crash between the two
        # writes), it is one job (engine.intake: a duplicate is acknowledged, not spooled).
        job_id = f"tlsrpt-{unique}-{hashlib.sha256(uri.encode()).hexdigest()[:12]}"
        end = period + int(self.settings.period)
        message = tlsrpt_report.mail(self.sender, to, self.submitter, domain, report_id,
                                     period, end, unique, body)
        envelope = {"id": job_id, "from": self.sender, "to": [to],
                    "meta": {"tlsrpt": report_id, "policy_domain": domain}}
        accepted = job_id in self._submit([[json.dumps(envelope).encode(), message]])
        self._sent(report_id, domain, uri, accepted, None if accepted else
                   "the spool did not accept the report's message")
        return accepted

    def _posted(self, now: float) -> None:
        """What the thread finished: each POST's outcome."""
        for report_id, uri, error in self._poster.finished():
            self._posting.discard((report_id, uri))
            found = self._spool.query("SELECT domain, pending, tries FROM tlsrpt_reports"
                                      " WHERE report_id = ?", (report_id,))
            if not found:
                continue
            domain, pending, tries = found[0]
            self._sent(report_id, domain, uri, error is None, error)
            left = [u for u in json.loads(pending) if error is not None or u != uri]
            self._update(report_id, domain, left, tries, None)

    def _sent(self, report_id: str, domain: str, uri: str, ok: bool,
              error: str | None) -> None:
        if ok:
            self._metrics.incr("tlsrpt_reports_sent", "all")
            log.info(logs.kv("tlsrpt_report_sent", domain=domain, report_id=report_id,
                             rua=uri))
        else:
            self._metrics.incr("tlsrpt_reports_failed", "all")
            log.warning(logs.kv("tlsrpt_report_failed", domain=domain, report_id=report_id,
                                rua=uri, error=error))
            with self._spool.transaction() as conn:  # for the operator (OPERATIONS.md)
                conn.execute("UPDATE tlsrpt_reports SET error = ? WHERE report_id = ?",
                             (f"{uri}: {error}"[:500], report_id))

    def _update(self, report_id: str, domain: str, left: list[str], tries: int,
                next_try: float | None) -> None:
        """The rua URIs still to accept the report (none: it is done, deleted)."""
        with self._spool.transaction() as conn:
            if not left:
                conn.execute("DELETE FROM tlsrpt_reports WHERE report_id = ?", (report_id,))
            elif next_try is None:
                conn.execute("UPDATE tlsrpt_reports SET pending = ? WHERE report_id = ?",
                             (json.dumps(left), report_id))
            else:
                conn.execute("UPDATE tlsrpt_reports SET pending = ?, tries = ?, next_try = ?"
                             " WHERE report_id = ?",
                             (json.dumps(left), tries + 1, next_try, report_id))
        if not left:
            log.info(logs.kv("tlsrpt_report_done", domain=domain, report_id=report_id))

    def _give_up(self, report_id: str, domain: str, pending: list[str]) -> None:
        with self._spool.transaction() as conn:
            conn.execute("DELETE FROM tlsrpt_reports WHERE report_id = ?", (report_id,))
        self._metrics.incr("tlsrpt_reports_given_up", "all")
        log.warning(logs.kv("tlsrpt_report_given_up", domain=domain, report_id=report_id,
                            rua=",".join(pending)))


def _valid_row(domain: Any, policy: Any, result: Any, detail: Any, count: Any) -> bool:
    return (isinstance(domain, str) and names.is_hostname(domain)
            and isinstance(policy, str) and 0 < len(policy) <= MAX_POLICY
            and result in _RESULTS and isinstance(detail, str) and len(detail) <= MAX_DETAIL
            and type(count) is int and count > 0)


class Poster:
    """The thread that POSTs reports to https rua URIs, one at a time (see the module's
    docstring); started at the first POST."""

    def __init__(self, cfg: Config) -> None:
        self._cfg = cfg
        self._todo: queue.Queue[tuple[str, str, bytes] | None] = queue.Queue()
        self._done: queue.Queue[tuple[str, str, str | None]] = queue.Queue()
        self._thread: threading.Thread | None = None

    def submit(self, report_id: str, url: str, body: bytes) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="tlsrpt-post", daemon=True)
            self._thread.start()
        self._todo.put((report_id, url, body))

    def finished(self) -> list[tuple[str, str, str | None]]:
        """(report id, url, error or None) of the POSTs done since the last call."""
        out = []
        while True:
            try:
                out.append(self._done.get_nowait())
            except queue.Empty:
                return out

    def stop(self) -> None:
        """Ask the thread to end, waiting a moment at most: a POST still on is not waited
        for (its report is sent again after the restart; the report-id lets the receiver
        see it twice)."""
        if self._thread is not None:
            self._todo.put(None)
            self._thread.join(STOP_WAIT)

    def _run(self) -> None:
        cfg = self._cfg
        resolver = dns.resolver.Resolver(configure=not cfg.dns.nameservers)
        resolver.port = cfg.dns.port  # before the nameservers (as engine.mx)
        if cfg.dns.nameservers:
            resolver.nameservers = list(cfg.dns.nameservers)
        resolver.lifetime = cfg.dns.timeout
        destinations = DestinationPolicy.from_config(cfg.security)
        context = ssl.create_default_context(cafile=cfg.smtp.ca_file)

        def addresses(host: str) -> list[str]:
            try:
                found = [rd.to_text() for rd in resolver.resolve(host, "A")]
            except dns.exception.DNSException as exc:
                raise tlsrpt_report.PostError(f"{host}: no address ({exc})") from exc
            return [a for a in found if destinations.refusal(a) is None]

        while (item := self._todo.get()) is not None:
            report_id, url, body = item
            try:
                tlsrpt_report.post(url, body, context, addresses, cfg.tlsrpt.https_timeout)
                error = None
            except tlsrpt_report.PostError as exc:
                error = str(exc)
            except Exception as exc:  # a bug of ours must not end the thread
                error = f"{type(exc).__name__}: {exc}"
            self._done.put((report_id, url, error))
