"""One worker's delivery stack in this process, as engine.worker builds it: Deliverer ->
Pools -> Connector -> Connection, for the conversation tests against servers on loopback.

The test process is not gevent-patched: the Deliverer's greenlets run blocking sockets, which
is fine with one delivery at a time. `Stack.close()` closes what the stack opened (its idle
connections, without a QUIT: the test's server may be done talking; the StatsD socket), so
no socket is left for the garbage collector to find inside a later test.
"""
from __future__ import annotations

import ipaddress
import time
from collections.abc import Sequence
from dataclasses import dataclass

from engine.config import PoolConfig, Timeouts
from engine.connector import Connector, Identity
from engine.delivery import Deliverer
from engine.metrics import Metrics
from engine.mx import DestinationPolicy, Resolver
from engine.pools import Pools
from engine.protocol import Attempt, Task
from engine.sendingip import SendingIp
from engine.smtp import Keepalive, ReplyLimits
from engine.tls import TlsPolicy
from engine.tlspolicy import TlsPolicies
from tests.support.playbook import CLIENT_IP, FAST, HELO, MESSAGE, SENDER

# The test servers are MX hosts on loopback, a prohibited destination unless allowed.
LOOPBACK_ALLOWED = DestinationPolicy(allowed=(ipaddress.ip_network("127.0.0.0/8"),))
POOL = PoolConfig(max_connections=2, max_messages=100, idle_timeout=60.0, connect_backoff=30.0)


@dataclass
class Stack:
    """The parts of one worker's delivery, each reachable by the test."""

    deliverer: Deliverer
    connector: Connector
    pools: Pools
    tls: TlsPolicy
    metrics: Metrics

    def deliver(self, rcpts: Sequence[str], message: bytes = MESSAGE, job_id: str = "job-1",
                smtputf8: bool = False, requiretls: bool = False) -> list[Attempt]:
        """One task from SENDER to `rcpts`; the attempts it reported."""
        attempts: list[Attempt] = []
        task = Task(job_id, SENDER, tuple(rcpts), message, time.time(), smtputf8=smtputf8,
                    requiretls=requiretls)
        self.deliverer.deliver(task, attempts.extend)
        return attempts

    def close(self) -> None:
        """Close the idle pooled connections (no QUIT) and the StatsD socket."""
        for pool in self.pools:
            for conn in pool.idle_connections:
                conn.close()
        self.metrics.close()


def build(resolver: Resolver, *, ip: str = CLIENT_IP, tls: str = "none",
          timeouts: Timeouts = FAST, pool: PoolConfig = POOL,
          policy: DestinationPolicy | None = None, metrics: Metrics | None = None,
          sending_ip: SendingIp | None = None, policies: TlsPolicies | None = None,
          ca_file: str | None = None) -> Stack:
    """A stack sending from `ip`, its MX hosts found by `resolver`. `policy` None: the
    default destination policy (loopback prohibited, routes exempt); `metrics` None: none;
    `sending_ip` None: the host's addresses as they are (bind tests of `ip`); `policies`
    None: `tls` for every domain (engine.tlspolicy); `ca_file`: the CAs that verify."""
    metrics = metrics or Metrics(None, ip)
    tls_policy = TlsPolicy(tls, ca_file)
    keepalive = Keepalive.of(pool.keepalive_idle, pool.keepalive_interval, pool.keepalive_count)
    connector = Connector(Identity(ip, HELO), resolver, tls_policy, timeouts, ReplyLimits(),
                          metrics, policy, keepalive, sending_ip)
    pools = Pools(pool)
    deliverer = Deliverer(ip, tls, resolver, connector, pools, metrics, policies=policies)
    return Stack(deliverer, connector, pools, tls_policy, metrics)
