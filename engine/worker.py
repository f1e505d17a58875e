"""A delivery worker: one gevent process per sending IP.

The supervisor pushes tasks (a job's pending recipients and its message) to the
worker over ZeroMQ; the worker delivers each in its own greenlet over pooled
connections bound to its IP, and pushes every recipient's result back. The
worker holds no durable state: whatever it has not reported when it dies is
still pending in the supervisor's spool and is tried again.

`bin/mailengine-worker` is the process entry point; it monkey-patches first and
then calls `main` here. Nothing in this module patches.
"""
from __future__ import annotations

import argparse
import ctypes
import functools
import logging
import os
import signal
import sys
import time
from typing import Any

import gevent
import gevent.event
import gevent.pool
import zmq.green as zmq

from engine import config as config_mod
from engine import crash, gctune, logs, protocol, tlsrpt
from engine.config import Config, IpConfig
from engine.connector import Connector, Identity
from engine.dane import Dane
from engine.delivery import Deliverer
from engine.dkim import DkimKeyError, Signer, WireSigner
from engine.metrics import Metrics
from engine.mtasts import FetchSettings, MtaSts, https_context
from engine.mtasts import create as mta_sts_for
from engine.mx import DestinationPolicy, Resolver
from engine.pools import Pools
from engine.protocol import Attempt, Status, Task
from engine.provider import DEFAULT_PROVIDERS
from engine.quiet_gauges import QuietGauges
from engine.sendingip import SendingIp
from engine.shaping import PROVIDER_GAUGES, Shaping, plan_for
from engine.smtp import Keepalive, ReplyLimits, Stopping
from engine.tls import CaFileError, TlsPolicy
from engine.tlspolicy import TlsPolicies

log = logging.getLogger("mailengine.worker")

STATS_INTERVAL = 1.0
MEMORY_INTERVAL = 10.0
TASK_BATCH = 100  # tasks taken off the socket per poll() at most, before polling again
RESULTS_PER_FRAME = 500  # attempts per result frame at most (a frame stays small)
RESEND_AFTER = (0.1, 0.5, 1.0, 5.0)  # seconds before sending a result frame again


class Worker:
    def __init__(self, cfg: Config, ip: IpConfig, tasks_endpoint: str,
                 results_endpoint: str, drain_timeout: float | None = None) -> None:
        # A greenlet per task: by default gevent records where each greenlet was spawned
        # (a stack walk, a weak reference, a dict), a debugging aid that cost ~4% of the
        # worker's CPU. Process-wide, and a worker process is one Worker.
        gevent.config.track_greenlet_tree = False
        self.cfg = cfg
        self.ip = ip
        # The worker's own drain ends a second before the supervisor's deadline
        # (cfg.drain_timeout, when it kills what is left), so its results get out.
        self.drain_timeout = (max(cfg.drain_timeout - 1.0, cfg.drain_timeout / 2)
                              if drain_timeout is None else drain_timeout)
        self.metrics = Metrics.create(cfg.statsd.host, cfg.statsd.port, cfg.statsd.prefix,
                                      ip.address, cfg.statsd.enabled)
        self._gc = gctune.PauseWatch(lambda ms: self.metrics.timing("gc_pause", "all", ms))
        # A message's stats (timers, counters) go out packed, at the end of the loop turn.
        self.metrics.batched(gevent.get_hub().loop.run_callback)
        self.pools = Pools(cfg.pool)
        # Whether the host holds ip.address: told to the supervisor, which hands the worker
        # no work while it does not (engine.sendingip).
        self.sending_ip = SendingIp(ip.address)
        self.sending_ip.on_change = self._sending_ip_changed
        # Warm-up counts survive a restart in the spool folder (writable under systemd).
        state = os.path.join(cfg.spool, f"shaping-{ip.address}.json")
        self.shaping = Shaping(plan_for(cfg, ip.address), state, metrics=self.metrics)
        # Each provider's gauges, sent when they change and refreshed once a minute: sent
        # every second, 10,000 providers held idle were 20,000 StatsD lines a second.
        self.provider_gauges = QuietGauges(self.metrics, PROVIDER_GAUGES)
        # TLS-RPT's session counts (engine.tlsrpt), sent to the supervisor every second.
        self.tlsrpt = tlsrpt.Sessions(ip.address) if cfg.tlsrpt.enabled else None
        self._tlsrpt_failed: set[str] = set()  # domains whose rua lookup failed last time
        self.deliverer = self._deliverer()
        self.in_flight = gevent.pool.Group()
        self.delivered = 0
        self._stopping = False
        # Results (as rows, their hand-out added) wait here for the flusher greenlet, which
        # sends all of them in one frame per loop turn (see _report); `_results_ready` wakes it.
        self._outbox: list[list[Any]] = []
        self._results_ready = gevent.event.Event()
        self._flushing = True
        self._zctx = zmq.Context()
        self.tasks = self._zctx.socket(zmq.PULL)
        self.tasks.connect(tasks_endpoint)
        self.results = self._zctx.socket(zmq.PUSH)
        self.results.setsockopt(zmq.LINGER, 5000)  # results still queued at exit get out
        self.results.connect(results_endpoint)

    def _deliverer(self) -> Deliverer:
        cfg = self.cfg
        resolver = Resolver(cfg.dns.nameservers, cfg.dns.port, cfg.dns.timeout, cfg.routes,
                            cfg.smtp.port, cfg.dns.cache_size, trusted_ad=cfg.dns.trusted_ad,
                            max_in_flight=cfg.dns.max_in_flight)
        self.dns_stats = resolver.stats
        tls = TlsPolicy(cfg.smtp.tls, cfg.smtp.ca_file, cfg.smtp.tls_broken_ttl,
                        unverified_ttl=cfg.smtp.tls_unverified_ttl)
        limits = ReplyLimits(cfg.smtp.max_line_length, cfg.smtp.max_reply_lines,
                             frozenset(cfg.smtp.discard_ehlo_keywords))
        keepalive = Keepalive.of(cfg.pool.keepalive_idle, cfg.pool.keepalive_interval,
                                 cfg.pool.keepalive_count)
        identity = Identity(self.ip.address, self.ip.helo)
        destinations = DestinationPolicy.from_config(cfg.security)
        forced = {*cfg.tls_policy.domains.values(), *cfg.tls_policy.providers.values()}
        dane = Dane(resolver, identity.family) if cfg.tls_policy.dane or "dane" in forced \
            else None
        connector = Connector(identity, resolver, tls, cfg.smtp.timeouts, limits, self.metrics,
                              destinations, keepalive, self.sending_ip, dane)
        mta_sts = self._mta_sts(resolver, destinations, identity)
        policies = TlsPolicies(cfg.smtp.tls, cfg.tls_policy.domains, cfg.tls_policy.providers,
                               mta_sts, cfg.tls_policy.mta_sts, dane, cfg.tls_policy.dane)
        signer = Signer.create(cfg.dkim)  # the keys, read once (engine.startcheck checked them)
        deliverer = Deliverer(self.ip.address, cfg.smtp.tls, resolver, connector, self.pools,
                              self.metrics, self.shaping, {**DEFAULT_PROVIDERS, **cfg.providers},
                              policies,
                              None if signer is None else WireSigner(signer, self.metrics))
        sessions = self.tlsrpt
        if sessions is not None:
            connector.tlsrpt = deliverer.tlsrpt = sessions
            mta_sts.on_failure = lambda domain, kind, why: sessions.failure(
                domain, tlsrpt.policy_of(tlsrpt.STS), kind, None, None, why)
        return deliverer

    def _mta_sts(self, resolver: Resolver, destinations: DestinationPolicy,
                 identity: Identity) -> MtaSts:
        """MTA-STS policies, fetched from the sending IP (docs/SECURITY.md), kept across
        restarts next to the shaping state."""
        cfg = self.cfg
        settings = FetchSettings(https_context(cfg.smtp.ca_file),
                                 port=cfg.tls_policy.mta_sts_https_port,
                                 timeout=cfg.tls_policy.mta_sts_fetch_timeout)
        state = os.path.join(cfg.spool, f"mta-sts-{self.ip.address}.db")
        return mta_sts_for(resolver, destinations, identity.address, identity.family,
                           settings, state, self.metrics)

    def run(self) -> int:
        log.info(logs.kv("worker_started", ip=self.ip.address, pid=os.getpid()))
        housekeeping = [gevent.spawn(self._report_stats), gevent.spawn(self._reap_idle)]
        if self.tlsrpt is not None:
            housekeeping.append(gevent.spawn(self._report_sessions))
        flusher = gevent.spawn(self._flush_results)
        # A thousand tasks in flight, each with its greenlet, and a few hundred objects
        # per message: with the default thresholds the collector rescanned the first kind
        # over and over (the whole engine's loopback throughput gained ~10-20% without).
        gctune.settle_for_a_long_run()
        self._gc.start()
        self.sending_ip.check()  # a restart while the IP is gone says so in its hello
        self._send(protocol.stats_frame(self.ip.address, self._figures()))
        while not self._stopping:
            if self.tasks.poll(500):
                self._take_tasks()
        self._drain()
        gevent.killall(housekeeping)
        self._gc.stop()
        # Every result reported before the drain ended goes out before the socket closes:
        # the flusher sends what is buffered, then returns (no kill: a kill could drop a
        # batch it had taken but not yet sent).
        self._flushing = False
        self._results_ready.set()
        flusher.join()
        self.metrics.flush()
        self._send(protocol.stats_frame(self.ip.address, self._figures()))
        if self.tlsrpt is not None:
            with gevent.Timeout(5, False):  # the rua lookups: the counts, or a second's worth
                self._send_sessions()
        self.results.close()
        self.tasks.close(linger=0)
        # Regression (results lost at a graceful stop): pyzmq does not terminate a
        # context at interpreter exit, so results still queued in it were dropped
        # despite LINGER. term() waits for them (up to the linger time).
        self._zctx.term()
        log.info(logs.kv("worker_stopped", ip=self.ip.address))
        return 0

    def stop(self) -> None:
        """Take no more tasks; let the transactions in progress finish (SIGTERM); tasks
        still waiting for a connection end without a result and stay spooled."""
        self._stopping = True
        self.pools.drain()  # tasks still waiting for a connection stay spooled

    def _take_tasks(self) -> None:
        """After a poll() said a task is there: take every task waiting (up to a batch)
        without polling again for each, one greenlet per task."""
        for _ in range(TASK_BATCH):
            try:
                frames = self.tasks.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) == 1:  # not a task: the operator's hold (a task has two frames)
                self._hold(frames[0])
                continue
            try:
                task = protocol.task_from_frames(frames)
            except (ValueError, KeyError, IndexError, TypeError) as exc:
                self._refuse(frames, exc)
                continue
            self.in_flight.spawn(self._deliver, task)

    def _hold(self, frame: bytes) -> None:
        """Suspend or resume a provider at this IP, as the operator asked (engine.protocol
        Hold); the next stats frame shows it."""
        try:
            hold = protocol.hold_from_frame(frame)
        except (ValueError, KeyError, TypeError) as exc:
            log.error(logs.kv("bad_task", ip=self.ip.address, handout=None, error=exc))
            return
        self.shaping.hold(hold.provider, hold.seconds, hold.lift)
        if hold.seconds > 0:
            log.warning(logs.kv("provider_held", ip=self.ip.address, provider=hold.provider,
                                seconds=round(hold.seconds, 1)))
        else:
            log.warning(logs.kv("provider_released", ip=self.ip.address,
                                provider=hold.provider, lift=hold.lift))
        self._send(protocol.stats_frame(self.ip.address, self._figures()))

    def _refuse(self, frames: list[bytes], exc: Exception) -> None:
        """A task that cannot be read: the supervisor takes its job back at once (it would
        otherwise stay in flight until its deadline). Without even a hand-out number, only
        the deadline can."""
        handout = protocol.handout_of(frames)
        log.error(logs.kv("bad_task", ip=self.ip.address, handout=handout, error=exc))
        if handout is not None:
            self._send(protocol.refused_frame([handout]))

    def _deliver(self, task: Task) -> None:
        self.deliverer.deliver(task, functools.partial(self._report, task.handout))

    def _report(self, handout: int, attempts: list[Attempt]) -> None:
        """Buffer a domain's results for the flusher; the first one wakes it.

        One frame per result cost a ZeroMQ send and a supervisor read per recipient
        domain; buffered, every result reported within one turn of the event loop
        goes in one frame. No timer: the flusher runs as soon as the greenlets that
        were ready in this turn have yielded, so a result waits less than a turn (a
        worker killed meanwhile repeats little more than the transactions it had open).
        """
        delivered = sum(1 for a in attempts if a.status is Status.DELIVERED)
        self.delivered += delivered
        crash.point("after_final_reply", delivered)
        self._outbox.extend(protocol.attempt_to_row(a, handout) for a in attempts)
        self._results_ready.set()

    def _flush_results(self) -> None:
        """The flusher greenlet: send what is buffered whenever woken; after the last
        wake at a graceful stop (`_flushing` False), send what is left and return."""
        while True:
            self._results_ready.wait()
            self._results_ready.clear()
            while self._outbox:
                # Take the batch first: results reported while a send blocks (high-water
                # mark) go into a fresh list and the next frame.
                batch = self._outbox[:RESULTS_PER_FRAME]
                del self._outbox[:RESULTS_PER_FRAME]
                self._send_results(protocol.rows_frame(batch), len(batch))
            if not self._flushing:
                return

    def _send_results(self, frame: bytes, count: int) -> None:
        """Send a result frame, again after a pause while the socket refuses it: a result
        dropped here is a message delivered that the spool still holds as pending, sent
        again after the next restart. Given up only at a stop, after the last pause."""
        tries = 0
        while True:
            try:
                self._send(frame)
                return
            except zmq.ZMQError as exc:
                if not self._flushing and tries >= len(RESEND_AFTER):
                    log.error(logs.kv("results_lost", ip=self.ip.address, attempts=count,
                                      error=exc))
                    return
                pause = RESEND_AFTER[min(tries, len(RESEND_AFTER) - 1)]
                tries += 1
                log.warning(logs.kv("results_send_failed", ip=self.ip.address,
                                    attempts=count, error=exc, again_in=pause))
                gevent.sleep(pause)

    def _send(self, frame: bytes) -> None:
        self.results.send(frame)

    def _drain(self) -> None:
        """Wait up to the drain deadline for the transactions in progress, above all the
        replies owed to final dots already sent; then end what is left with `Stopping`.
        A transaction stopped after its end of message was written reports an ambiguous
        deferral (engine.smtp.Stopping): the server may have the message, and the retry
        after the restart is counted and flagged, not a silent duplicate. The others
        report nothing and stay pending. Results go out before the worker exits (`run`)."""
        if len(self.in_flight):
            log.info(logs.kv("worker_draining", ip=self.ip.address,
                             in_flight=len(self.in_flight)))
        self.in_flight.join(timeout=self.drain_timeout)
        if len(self.in_flight):
            log.info(logs.kv("worker_drain_deadline", ip=self.ip.address,
                             in_flight=len(self.in_flight)))
        self.in_flight.kill(Stopping, block=True, timeout=5)
        self.pools.close_all()
        self.shaping.save()
        gevent.sleep(0.1)  # let the QUITs go out

    def _figures(self) -> dict[str, object]:
        """The stats frame's figures. Shaping: the providers with something to show, the
        number of the others (engine.shaping_idle: ten thousand providers' state every
        second was megabytes), and of those forgotten so far. In a cluster, the mode of
        the worker's link to Redis (engine.cluster)."""
        shaping = self.shaping.state()
        cluster = self.shaping.cluster
        return {**({"cluster_mode": cluster.mode} if cluster is not None else {}),
                "in_flight": len(self.in_flight),
                "connections_open": self.pools.open_connections,
                "destinations": len(self.pools), "pid": os.getpid(),
                "dns": self.dns_stats.figures(),
                "shaping": shaping, "shaping_idle": self.shaping.providers - len(shaping),
                "shaping_forgotten": self.shaping.forgotten, **self.sending_ip.figures()}

    def _sending_ip_changed(self, sending_ip: SendingIp) -> None:
        """The IP went down or came back: the supervisor hears it now, not at the next
        second's stats, so that no more work comes meanwhile (down) or none waits (up).
        Down, the idle connections go: the kernel keeps them, but they lead nowhere."""
        if sending_ip.down:
            self.pools.drop_idle()
        self._send(protocol.stats_frame(self.ip.address, self._figures()))

    def _report_stats(self) -> None:
        """Every STATS_INTERVAL: the figures to the supervisor, the process's gauges, and
        the providers' gauges that changed or are due a refresh (engine.quiet_gauges)."""
        self.metrics.memory()  # the first one at start-up, then every MEMORY_INTERVAL
        last_memory = time.monotonic()
        while True:
            gevent.sleep(STATS_INTERVAL)
            self.sending_ip.check_due()
            self._gc.report()
            figures = self._figures()
            self._send(protocol.stats_frame(self.ip.address, figures))
            self.metrics.gauge("ip_down", "all", int(self.sending_ip.down))
            self.metrics.gauge("in_flight", "all", len(self.in_flight))
            self.metrics.gauge("connections_open", "all", self.pools.open_connections)
            self.metrics.gauge("shaping_providers", "all", self.shaping.providers)
            self.provider_gauges.report(self.shaping.active_gauges(), self.shaping.gauges_of)
            if time.monotonic() - last_memory >= MEMORY_INTERVAL:
                self.metrics.memory()
                self.shaping.save()
                last_memory = time.monotonic()

    def _report_sessions(self) -> None:
        """Every STATS_INTERVAL: TLS-RPT's counts to the supervisor (engine.tlsrpt)."""
        while True:
            gevent.sleep(STATS_INTERVAL)
            self._send_sessions()

    def _send_sessions(self) -> None:
        """The counts of the domains that want reports, with their rua URIs (their
        `_smtp._tls` TXT records, looked up through the resolver's cache); counts whose
        lookup failed wait for the next turn."""
        sessions = self.tlsrpt
        assert sessions is not None
        counts = sessions.take()
        if sessions.dropped:
            log.warning(logs.kv("tlsrpt_counts_dropped", ip=self.ip.address,
                                sessions=sessions.dropped, limit=tlsrpt.MAX_KEYS))
            sessions.dropped = 0
        if not counts:
            return
        resolver = self.deliverer.resolver
        rows, rua, later = tlsrpt.rows(
            counts, lambda domain: tlsrpt.parse_txt(resolver.txt(f"_smtp._tls.{domain}")))
        # A lookup that failed (SERVFAIL, a timeout) is tried once more at the next take;
        # failing again, that domain's counts are dropped (not asked every second for ever).
        retry = {key[0] for key in later} - self._tlsrpt_failed
        for key, count in later.items():
            if key[0] in retry:
                sessions.add(key, count)
        self._tlsrpt_failed = retry
        if rows:
            self._send(protocol.tlsrpt_frame(self.ip.address, rows, rua))

    def _reap_idle(self) -> None:
        """Idle connections and empty pools closed, then the providers idle long enough
        forgotten (engine.shaping_idle: a pool left holds its provider's gate)."""
        while True:
            gevent.sleep(max(0.5, min(5.0, self.cfg.pool.idle_timeout / 2)))
            self.pools.reap()
            forgotten = self.shaping.forget_idle()
            self.provider_gauges.forget(forgotten)  # none sent; made anew, sent at once
            if forgotten:
                self.metrics.incr("providers_forgotten", "all", len(forgotten))


def die_with_parent() -> None:
    """Ask Linux to kill us when the supervisor dies, so no orphan keeps sending
    mail whose results nobody records (PR_SET_PDEATHSIG)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mailengine worker",
                                     description="one delivery worker (normally started by"
                                                 " `mailengine run`)")
    parser.add_argument("-c", "--config", default=None)
    parser.add_argument("--ip", required=True, help="the sending IP, one of the config's ips")
    parser.add_argument("--tasks", required=True, help="ZeroMQ endpoint to pull tasks from")
    parser.add_argument("--results", required=True, help="ZeroMQ endpoint to push results to")
    parser.add_argument("--parent-pid", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        cfg = config_mod.load(args.config)
    except config_mod.ConfigError as err:
        print(f"mailengine worker: {err}", file=sys.stderr)
        return 2
    logs.setup(cfg.log_level, f"worker/{args.ip}")
    ip = next((i for i in cfg.ips if i.address == args.ip), None)
    if ip is None:
        print(f"mailengine worker: {args.ip} is not in the config's ips", file=sys.stderr)
        return 2
    # SIGUSR1 asks the supervisor to reopen the events log; a `systemctl kill -s USR1` reaches
    # the workers too, whose default action for it is to exit.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    die_with_parent()
    if args.parent_pid and os.getppid() != args.parent_pid:
        return 1  # the supervisor died before prctl took effect
    try:
        worker = Worker(cfg, ip, args.tasks, args.results)
    except (CaFileError, DkimKeyError) as err:  # broken since the start's check: named
        log.error(logs.kv("worker_start_failed", ip=args.ip, error=err))
        return 2
    gevent.signal_handler(signal.SIGTERM, worker.stop)
    gevent.signal_handler(signal.SIGINT, worker.stop)
    return worker.run()
