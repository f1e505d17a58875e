"""The supervisor: the loop that wires intake, the spool, the workers and the events.

One thread, one ZeroMQ poll loop (no gevent here: the work is small batches of
SQLite writes and socket shuffling). Each turn it

1. collects the workers' results and records them in the spool, in groups, before
   publishing their events (engine.results): a result still in a socket is a
   delivered message nobody has recorded, which a crash would send again, so
   results come before intake;
2. reads a batch from the ingest socket: jobs become durable in the spool, then
   `queued` is published (engine.intake: a small batch after a pause, larger ones
   while a burst lasts), and what the workers have room for is handed out
   at once (engine.dispatch);
3. answers the control socket (engine.control; a long read, the queue summary's, in a
   thread beside the loop, its answer sent from the loop);
4. every TICK: sees dead workers and restarts them with back-off
   (engine.workers), hands out what is due, and every few seconds prunes the
   spool and reports its depth and the memory in use.

A spool that cannot be written (a full disk, an I/O error) is no reason to exit:
intake pauses, delivery goes on, results wait in memory, and everything resumes by
itself when a write succeeds again (engine.spoolhealth).

SIGTERM drains: intake stops, in-flight transactions finish (up to
`drain_timeout`), workers exit, the rest stays spooled. SIGHUP reloads the
config: workers are replaced gracefully, IPs added or removed.
docs/ARCHITECTURE.md follows one job through these parts.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import sys
import time
from typing import Any

import zmq

from engine import (
    categories,
    control,
    dkim,
    events,
    gctune,
    logs,
    sdnotify,
    sockets,
    startcheck,
)
from engine import config as config_mod
from engine.clock import STEP_TOLERANCE, EngineClock
from engine.config import Config
from engine.curve import Curve
from engine.dispatch import Dispatcher
from engine.intake import INGEST_HWM, Intake
from engine.job import MAX_ENVELOPE_SIZE
from engine.metrics import Metrics
from engine.outbox import Outbox
from engine.protocol import Status
from engine.queue_admin import QueueAdmin
from engine.results import RESULTS_HWM, Results
from engine.salvage import recovery_advice
from engine.spool import SetAside, Spool, SpoolDamaged, SpoolError
from engine.spoolhealth import SpoolHealth
from engine.tlsrpt_store import TlsRptStore
from engine.workers import Workers

log = logging.getLogger("mailengine.supervisor")

TICK = 0.2  # seconds between housekeeping turns
HOUSEKEEPING = 10.0  # seconds between spool pruning and the spool and memory gauges
CONTROL_LOOK = 0.01  # seconds between looks at an answer read off the loop (engine.control)
QUIET_AFTER_DRAIN = 2.0  # seconds to read late results once the workers have exited
EVENTS_HWM = 10000  # events queued for one slow subscriber; the log still has them all
# Changing these needs a restart: a reload only warns.
RESTART_KEYS = ("ingest", "events", "control", "spool", "run_dir", "events_log", "tlsrpt",
                "cluster")
# Held (blocked) from the start of `mailengine run` until `run` handles them (engine.cli).
HELD_AT_START = frozenset({signal.SIGHUP, signal.SIGUSR1})
_EXPIRED = Status.EXPIRED.value  # an enum's .value is a Python-level property
# Refusals counted per category (engine.categories), by event.
_CATEGORY_METRICS = {"bounced": "bounced_category", "deferred": "deferred_category",
                     "expired": "expired_category"}


class Supervisor:
    def __init__(self, cfg: Config, config_path: str | None) -> None:
        self.cfg = cfg
        self.config_path = config_path
        # Keys first: a missing key is a config error, found before anything is touched.
        self.curve = Curve(cfg)  # security.curve and control.curve, when on
        self.zctx = zmq.Context()
        self.spool = Spool(cfg.spool, on_corrupt=self._set_aside)
        if self.spool.shifted is not None:  # planned at the last stop, after a clock step
            seconds, rows = self.spool.shifted
            log.info(logs.kv("clock_rejoined", seconds=round(seconds, 1), rows=rows))
        # Every time the spool holds is the engine's (engine.clock), never below its latest.
        self.clock = EngineClock(floor=self.spool.latest_now())
        self.metrics = Metrics.create(cfg.statsd.host, cfg.statsd.port, cfg.statsd.prefix,
                                      "supervisor", cfg.statsd.enabled)
        self._gc = gctune.PauseWatch(lambda ms: self.metrics.timing("gc_pause", "all", ms))
        self.metrics.batched()  # packed into few packets, sent at the end of each loop pass
        self.health = SpoolHealth(self.metrics)
        os.makedirs(cfg.run_dir, exist_ok=True)
        try:
            ingest, pub, control_sock = self._bind_public(cfg)
        except BaseException:
            self._close_public()
            raise
        events.end_torn_line(cfg.events_log)
        self.events = events.EventPublisher(pub, cfg.events_log)
        self.outbox = Outbox(self.spool, self.events, self.metrics)
        self.workers = Workers(self.zctx, cfg, config_path)
        self.dispatcher = Dispatcher(cfg, self.spool, self.workers, self._publish,
                                     self.metrics, self.clock)
        self.intake = Intake(ingest, cfg, self.spool, self._publish, self.metrics, self.health,
                             self.clock)
        results_sock = sockets.bind(self.zctx, zmq.PULL, self.workers.results_endpoint,
                                    {zmq.RCVHWM: RESULTS_HWM})
        self.results = Results(results_sock, self.spool, self.dispatcher, self._publish,
                               self._on_stats, cfg.retry.schedule, self.metrics, self.health,
                               clock=self.clock, classifier=self.dispatcher.classifier,
                               jitter=cfg.retry.jitter)
        self.queue = QueueAdmin(self.spool, self.dispatcher, self.workers, self._publish,
                                self.clock, cfg.control,  # the operator's `mailengine queue`
                                authenticated=self.curve.control is not None)
        self.results.observe = self.queue.routes.saw
        # TLS-RPT: the workers' session counts kept, reports made and sent (its own jobs).
        self.tlsrpt = (TlsRptStore(cfg, self.spool, self._own_jobs, self.metrics)
                       if cfg.tlsrpt.enabled else None)
        if self.tlsrpt is not None:
            self.results.on_tlsrpt = self.tlsrpt.counted
        self.control = control.Control(control_sock, self.status, self.queue.commands())
        self._stopping = False
        self._reload = False
        self._last_housekeeping = 0.0
        # Jobs of dead workers (-> whether results may be lost), taken back once results allow.
        self._orphans: dict[str, bool] = {}

    def _bind_public(self, cfg: Config) -> tuple[zmq.Socket, zmq.Socket, zmq.Socket]:
        """The sockets producers and subscribers reach: bounded, and CURVE when configured.

        The ZAP handler starts before the first bind: a CURVE handshake that found none
        would be let in unchecked. A frame larger than any valid job (ZMQ_MAXMSGSIZE) makes
        ZeroMQ drop that producer's connection instead of buffering it.
        """
        self.curve.start(self.zctx)
        secure = self.curve.secure_public()
        max_frame = cfg.limits.max_message_size + MAX_ENVELOPE_SIZE
        ingest = sockets.bind(self.zctx, zmq.PULL, cfg.ingest,
                              {zmq.RCVHWM: INGEST_HWM, zmq.MAXMSGSIZE: max_frame}, secure)
        pub = sockets.bind(self.zctx, zmq.PUB, cfg.events, {zmq.SNDHWM: EVENTS_HWM}, secure)
        control_sock = sockets.bind(self.zctx, zmq.REP, cfg.control,
                                    {zmq.RCVHWM: 100,
                                     zmq.MAXMSGSIZE: control.CONTROL_MAX_REQUEST},
                                    self.curve.secure_control())
        control.restrict(cfg.control)  # mode 0660: root, the engine's user and group
        return ingest, pub, control_sock

    def _close_public(self) -> None:
        self.curve.stop()
        self.zctx.destroy(linger=0)

    # -- the loop ----------------------------------------------------------------

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGINT, self._on_term)
        signal.signal(signal.SIGHUP, self._on_hup)
        self._reopen = False  # SIGUSR1: logrotate renamed the events log
        signal.signal(signal.SIGUSR1, self._on_usr1)
        # `mailengine run` held these since its first line (engine.cli): one that came
        # during the start is handled now, instead of killing the engine (default action).
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD_AT_START)
        # systemd (Type=notify): taken from the environment before the workers inherit it.
        self.notifier = sdnotify.Notifier.from_env(
            status=lambda: sdnotify.status_line(self.status()))
        for ip in self.cfg.ips:
            self.workers.add(ip.address)
        log.info(logs.kv("started", pid=os.getpid(), ips=len(self.cfg.ips),
                         spooled_jobs=self.spool.stats().jobs, ingest=self.cfg.ingest))
        self._replay_events()
        self.notifier.ready()  # sockets bound, workers started: jobs are taken
        # While results are held for the group commit, the results socket is not watched:
        # what arrives meanwhile is read once, when the window closes, instead of waking the
        # loop for every frame (a wakeup per frame was a context switch per few messages).
        # While the spool cannot be written, neither is the ingest socket; while an answer
        # is read off the loop (engine.control.OffLoop), the control socket is not.
        pollers = {(results, ingest, control): _poller(
            *([self.control.sock] if control else []),
            *([self.results.sock] if results else []),
            *([self.intake.sock] if ingest else []))
            for results in (False, True) for ingest in (False, True) for control in (False, True)}
        # The supervisor's objects are long-lived (jobs in memory, in flight) or die young
        # without cycles: the default thresholds made the collector rescan the first kind
        # over and over, a few per cent of the CPU at high rates.
        gctune.settle_for_a_long_run()
        self._gc.start()
        last_tick = 0.0
        try:
            while not self._stopping:
                poller = pollers[not self.results.held, self.intake.open, not self.control.busy]
                wait = min(self.results.wait_left(), TICK) if self.results.held else TICK
                if self.control.busy:
                    wait = min(wait, CONTROL_LOOK)
                self._turn(_poll(poller, wait))
                if time.monotonic() - last_tick >= TICK:
                    last_tick = time.monotonic()
                    self.tick()
                self.events.flush()
                self.metrics.flush()
                self.notifier.tick()  # the watchdog's ping: only while the loop turns
        except SpoolDamaged as err:
            self.notifier.stopping(f"stopping: spool damaged ({err.reason})")
            return self._stop_damaged(err)
        finally:
            self._gc.stop()
        self.notifier.stopping(f"draining: {len(self.dispatcher.in_flight)} jobs in flight")
        return self._shutdown()

    def _replay_events(self) -> None:
        """The final events a crash left in the outbox go out first (engine.outbox)."""
        try:
            self.outbox.replay()
        except SpoolDamaged:
            raise
        except SpoolError as err:  # published again, once the spool can be written
            self.health.failed("outbox", err)

    def _stop_damaged(self, err: SpoolDamaged) -> int:
        """The spool's file went bad under the running engine: stop, and exit 2 (systemd
        does not restart it; a restart would refuse the file anyway) with the commands that
        recover it. The workers finish what they have open; their results cannot be
        recorded, so those recipients are sent again after the salvage (counted in the
        log line)."""
        advice = recovery_advice(config_mod.file_of(self.config_path))
        log.error(logs.kv("spool_damaged", path=err.path, error=err.reason,
                          in_flight=len(self.dispatcher.in_flight),
                          results_unrecorded=self.results.held, advice=advice))
        print(f"mailengine: {err}: {advice}", file=sys.stderr)
        self.intake.sock.close(linger=0)
        self.workers.terminate()
        deadline = time.monotonic() + self.cfg.drain_timeout
        while time.monotonic() < deadline and self.workers.any_alive():
            time.sleep(0.1)
        self.workers.kill()
        self.events.flush()
        self.events.close()
        self.metrics.flush()
        with contextlib.suppress(SpoolError):
            self.spool.close()
        self.curve.stop()
        self.zctx.destroy(linger=1000)
        return 2

    def _turn(self, ready: dict[zmq.Socket, int]) -> None:
        """One pass over the sockets that have something (see the module's docstring)."""
        if self.results.sock in ready:
            self.results.collect()
        if self.results.held and self.results.due():
            self.results.collect()  # what came during the window
            self.results.flush()
        if self.intake.sock in ready and self.intake.open:
            self.dispatcher.offer(self.intake.take(self.dispatcher.free_room()))
        if self.control.busy:
            self.control.finish()
        elif self.control.sock in ready:
            self.control.answer()
        if self._reload:
            self._reload = False
            self.notifier.reloading()  # systemd: "reloading" until READY=1 again
            self._reload_config()
            self.notifier.ready()
        if self._reopen:
            self._reopen = False
            self.events.reopen()

    def tick(self) -> None:
        """One housekeeping turn (the loop runs one every TICK): record the results
        that came, see dead workers and restart them, hand out what is due."""
        # Every result already here is recorded before a death is seen (Results.flush),
        # those still in the socket (unwatched while results are held) included.
        self._notice_clock_step()
        self._gc.report()
        self.results.collect()
        self.results.flush()
        # A dead worker's jobs go out again only once every result already here is
        # recorded: while the spool cannot be written, one of them may be its delivery.
        self._orphans.update(self.workers.check(time.monotonic()))
        if self._orphans and not self.results.held:
            self.dispatcher.forget(self._orphans)
            self._orphans.clear()
        self.dispatcher.held_back = self.results.full
        self.dispatcher.dispatch_due()
        if self.tlsrpt is not None and self.health.writable:
            self.tlsrpt.tick()
        now = time.monotonic()
        if now - self._last_housekeeping >= HOUSEKEEPING or not self.health.writable:
            self._housekeeping(now)

    def _housekeeping(self, now: float) -> None:
        """Every HOUSEKEEPING (every tick while the spool cannot be written, for its
        gauges): overdue hand-outs, old finished ids, the gauges."""
        self._last_housekeeping = now
        self.dispatcher.take_back_overdue(now)
        if self.health.writable:
            try:
                self.outbox.confirm()
                self.spool.prune_finished(self.clock.now())
            except SpoolDamaged:
                raise
            except SpoolError as err:
                self.health.failed("prune", err)
        else:
            self.spool.checkpoint()  # the WAL's space back, if the file can take its pages
        self.metrics.gauge("spool_unwritable", "all", int(not self.health.writable))
        self.metrics.gauge("events_log_unwritable", "all", int(self.events.failing))
        self.metrics.gauge("results_unrecorded", "all",
                           self.results.held if not self.health.writable else 0)
        stats = self.spool.stats()
        self.metrics.gauge("spool_depth", "all", stats.rcpts_pending)
        oldest = stats.oldest_queued_ts  # a negative gauge would be a StatsD delta: >= 0
        self.metrics.gauge("oldest_queued_age", "all",
                           0 if oldest is None else round(max(0.0, self.clock.now() - oldest), 1))
        self.metrics.incr("worker_restarts", "all", self.workers.take_restarts())
        self.metrics.memory()

    def _notice_clock_step(self) -> None:
        """A step of the wall clock is logged and counted, never followed (engine.clock)."""
        step = self.clock.step()
        if step is not None:
            self.metrics.incr("clock_steps", "all")
            log.warning(logs.kv("clock_step", seconds=round(step, 1),
                                direction="forward" if step > 0 else "back",
                                apart=round(self.clock.apart(), 1)))

    def _on_stats(self, stats: dict[str, Any]) -> None:
        if self.workers.on_stats(stats):  # a (re)started worker: its jobs may go now
            self.queue.worker_ready(str(stats.get("ip")))  # the operator's holds, again
            self.dispatcher.worker_ready()

    def _own_jobs(self, batch: list[list[bytes]]) -> set[str]:
        """Jobs of the engine's own (TLS-RPT's mailed reports), accepted as a producer's
        are and handed out; the ids the spool now holds."""
        pending, held = self.intake.accept(batch)
        self.dispatcher.offer(pending)
        return held

    def _set_aside(self, job: SetAside, finals: list[events.Event]) -> None:
        """A spooled job that cannot be decoded was set aside: each recipient it had left
        ends with a `bounced` event saying why (events.set_aside, spooled with it), so the
        producer's ledger closes."""
        log.error(logs.kv("spool_corrupt", id=job.job_id, reason=job.reason,
                          rcpts=len(job.pending)))
        self.metrics.incr("set_aside", "all")
        for event in finals:
            self._publish(event)

    def _publish(self, event: events.Event) -> None:
        name = event[0]
        if name in _CATEGORY_METRICS:
            if name == _EXPIRED:
                self.metrics.incr("expired", "all")
            category = events.category_of(event)
            if category is not None:
                self.metrics.incr(_CATEGORY_METRICS[name], category)
        self.events.publish(event)

    def status(self) -> dict[str, Any]:
        return control.status(self.spool, len(self.dispatcher.in_flight), self.events.counts,
                              self.workers, self.health.state() | {
                                  "results_unrecorded": self.results.held
                                  if not self.health.writable else 0,
                                  "intake_paused": not self.health.writable,
                                  "events_log_writable": not self.events.failing,
                                  "clock_apart": round(self.clock.apart(), 1)},
                              self.intake.cluster)

    def _on_term(self, signum: int, frame: object) -> None:
        self._stopping = True

    def _on_hup(self, signum: int, frame: object) -> None:
        self._reload = True

    def _on_usr1(self, signum: int, frame: object) -> None:
        self._reopen = True

    # -- reload and stop ---------------------------------------------------------------

    def _reload_config(self) -> None:
        try:
            new = config_mod.load(self.config_path)
        except config_mod.ConfigError as err:
            log.error(logs.kv("reload_refused", error=err))
            return
        unusable = dkim.problems(new.dkim)  # the fresh workers would fail on these keys
        if unusable:
            log.error(logs.kv("reload_refused", error="; ".join(unusable)))
            return
        for key in RESTART_KEYS:
            if getattr(new, key) != getattr(self.cfg, key):
                log.warning(logs.kv("reload_needs_restart", key=key))
        _warn_about(new)
        self.curve.reload(self.cfg, new)  # the lists of keys; a new key pair warns
        self.cfg = self.intake.cfg = self.dispatcher.cfg = new
        self.results.schedule = new.retry.schedule
        self.results.jitter = new.retry.jitter
        self.results.classifier = self.dispatcher.classifier = \
            categories.classifier(new.categories)
        added, removed = self.workers.reconfigure(new)
        log.info(logs.kv("reloaded", ips=len(new.ips), added=len(added), removed=len(removed)))

    def _shutdown(self) -> int:
        """Drain: no more intake or dispatch; let in-flight finish; stop workers."""
        log.info(logs.kv("draining", in_flight=len(self.dispatcher.in_flight)))
        self.intake.sock.close(linger=0)
        deadline = time.monotonic() + self.cfg.drain_timeout
        self.workers.terminate()
        self.results.flush()
        while time.monotonic() < deadline and self.workers.any_alive():
            self._record_results_within(0.1)
        # Regression (a result sent just before its worker exited was not recorded,
        # so that message went out again after the restart): a worker's last results
        # can still be on their way through the socket when its exit is seen. Read
        # until the socket stays quiet (a bounded wait).
        quiet_by = time.monotonic() + QUIET_AFTER_DRAIN
        while time.monotonic() < quiet_by and self._record_results_within(0.2):
            pass
        self.workers.kill()
        if self.tlsrpt is not None:
            with contextlib.suppress(SpoolError):  # the last second's counts are lost
                self.tlsrpt.close()
        with contextlib.suppress(SpoolError):  # else published again at the next start
            self.outbox.confirm()
            self.dispatcher.unmark_answered()  # what is marked still may have been sent
        self.events.close()
        self.metrics.flush()
        self._rejoin_wall_clock()
        left = self.spool.stats()
        self.spool.close()
        log.info(logs.kv("stopped", jobs_spooled=left.jobs, rcpts_pending=left.rcpts_pending))
        self.curve.stop()
        self.zctx.destroy(linger=1000)
        return 0

    def _rejoin_wall_clock(self) -> None:
        """After a step, the spool's times are to move onto the wall clock's, where the next
        run (anchored to it) expects them: planned here, done when the spool is next opened
        (Spool.plan_shift: a stop is not held up by a big spool). If the plan cannot be
        written, the next run finds them as they are (a step back: its floor; a step
        forward: queued mail older by the step)."""
        apart = self.clock.apart()
        if abs(apart) <= STEP_TOLERANCE:
            return
        try:
            self.spool.plan_shift(apart)
        except SpoolError as err:
            log.warning(logs.kv("clock_not_rejoined", seconds=round(apart, 1), error=err))
            return
        log.info(logs.kv("clock_rejoin_planned", seconds=round(apart, 1)))

    def _record_results_within(self, seconds: float) -> bool:
        """Record the results that arrive within `seconds`; False if none came."""
        if not self.results.sock.poll(int(seconds * 1000)):
            return False
        self.results.collect()
        self.results.flush()
        return True


def _poller(*socks: zmq.Socket) -> zmq.Poller:
    poller = zmq.Poller()
    for sock in socks:
        poller.register(sock, zmq.POLLIN)
    return poller


def _poll(poller: zmq.Poller, wait: float) -> dict[zmq.Socket, int]:
    """The sockets ready within `wait` seconds. A poller with none to watch (results held,
    intake paused, an answer read off the loop) would return at once: it sleeps instead."""
    if not poller.sockets:
        time.sleep(wait)
        return {}
    return dict(poller.poll(math.ceil(wait * 1000)))


def _warn_about(cfg: Config) -> None:
    """What the config file should change although it loads (an old key name...)."""
    for warning in cfg.warnings:
        log.warning(logs.kv("config_warning", warning=warning))


def main(config_path: str | None) -> int:
    try:
        cfg = config_mod.load(config_path)
    except config_mod.ConfigError as err:
        print(f"mailengine: {err}", file=sys.stderr)
        return 2
    logs.setup(cfg.log_level, "supervisor")
    _warn_about(cfg)
    # What the host lacks (a sending IP, the CA file, a writable spool, a free endpoint)
    # a restart would not bring: refused like a config error, one line each.
    lacking = startcheck.problems(cfg)
    for problem in lacking:
        log.error(logs.kv("start_failed", error=problem))
        print(f"mailengine: {problem}", file=sys.stderr)
    if lacking:
        return 2
    try:
        supervisor = Supervisor(cfg, config_path)
    except config_mod.ConfigError as err:  # a key file or the clients' folder
        log.error(logs.kv("start_failed", error=err))
        print(f"mailengine: {err}", file=sys.stderr)
        return 2
    except SpoolDamaged as err:  # a restart would find it damaged again: 2, never restarted
        log.error(logs.kv("spool_damaged", path=err.path, error=err.reason))
        print(f"mailengine: {err}: {recovery_advice(config_mod.file_of(config_path))}",
              file=sys.stderr)
        return 2
    except (OSError, zmq.ZMQError, SpoolError) as err:
        log.error(logs.kv("start_failed", error=err))
        print(f"mailengine: cannot start: {err}", file=sys.stderr)
        return 1
    return supervisor.run()
