"""What the cluster's Redis costs on the hot paths (issue #18; docs/SCALING.md "Cost").

- **Intake**: the supervisor claims each intake batch's ids (engine.cluster_dedup: one
  script call before the spool, one after). Measured: CPU time of this process per job, and
  wall time per batch of 1,000 (Redis's own work included), against a real redis-server on
  loopback.
- **Leases**: three workers' leases of one provider's cluster-wide rate
  (engine.cluster_rate), busy (50 messages each waiting): round trips per message and the
  lease's time, at 60/s and at 300/s.
- **Connection slots**: three workers sharing a provider's `cluster_connections` of 10
  (engine.cluster_connections, through each worker's gate), 20 callers each opening
  connections of 20 ms one after another (far more demand than slots): round trips per
  connection opened, and the script's time.
- **Hourly blocks**: three workers' blocks of one provider's cluster-wide hourly budget
  (engine.cluster_hourly), each offered 100 messages/s: round trips per message and the
  lease's time.

    python3 -m bench.cluster_cost        # ~15 s; needs redis-server and redis-py
"""
from __future__ import annotations

import statistics
import time

import gevent
from gevent.event import AsyncResult

from engine.cluster import Cluster
from engine.cluster_connections import ClusterConnections
from engine.cluster_dedup import SharedIds
from engine.cluster_hourly import ClusterHourly
from engine.cluster_rate import ClusterRate
from engine.config import ClusterConfig
from engine.gate import ConnectionGate
from engine.metrics import Metrics
from tests.support.redis import RedisServer

BATCHES = 30
BATCH = 1000


class Timings(Metrics):
    """Keeps the lease timer's samples (ms), and the connection slots' round trips'."""

    def __init__(self) -> None:
        super().__init__(None, "127.0.0.2")
        self.leases: list[float] = []
        self.calls: list[float] = []

    def _send(self, method: str, name: str, value: float) -> None:
        if method == "timing" and name.endswith(".cluster_lease"):
            self.leases.append(value)
        elif method == "timing" and name.endswith(".cluster_connections_call"):
            self.calls.append(value)


def intake(server: RedisServer) -> None:
    ids = SharedIds(Cluster(ClusterConfig(redis=server.url), "host0"), Metrics(None, "x"))
    ids.claim(["warm-up"])
    cpu, wall = [], []
    for b in range(BATCHES):
        batch = [f"job-{b}-{i}" for i in range(BATCH)]
        started, started_cpu = time.perf_counter(), time.process_time()
        ids.claim(batch)
        ids.confirm(batch)
        cpu.append((time.process_time() - started_cpu) / BATCH * 1e6)
        wall.append((time.perf_counter() - started) * 1000)
    print(f"intake: claim + confirm, {BATCH} ids a batch: {statistics.median(cpu):.1f} µs of"
          f" CPU per job in the supervisor, {statistics.median(wall):.1f} ms a batch (wall)")


def leases(server: RedisServer, rate: float, seconds: float = 5.0) -> None:
    timings = Timings()
    rates = [ClusterRate(Cluster(ClusterConfig(redis=server.url), f"host{i}"), "bench", rate,
                         f"host{i}/127.0.0.{i + 2}", timings) for i in range(3)]
    stop = time.monotonic() + seconds
    taken = [0]

    def busy(limit: ClusterRate) -> None:
        while time.monotonic() < stop:
            if limit.take(10.0) == 0.0:
                taken[0] += 1

    gevent.joinall([gevent.spawn(busy, r) for r in rates for _ in range(50)])
    samples = sorted(timings.leases)
    print(f"leases at {rate:.0f}/s, 3 workers: {taken[0]} messages, {len(samples)} leases"
          f" ({len(samples) / taken[0]:.3f} round trips a message), a lease"
          f" {statistics.median(samples):.2f} ms median,"
          f" {samples[int(len(samples) * 0.95)]:.2f} ms p95")


def connection_slots(server: RedisServer, seconds: float = 5.0) -> None:
    timings = Timings()
    gates = []
    for i in range(3):
        gate = ConnectionGate(50, 0.0)
        gate.limit_cluster(ClusterConnections(
            Cluster(ClusterConfig(redis=server.url), f"host{i}"), "bench", 10,
            f"host{i}/127.0.0.{i + 2}", timings), 10.0)
        gates.append(gate)
    stop = time.monotonic() + seconds
    opened, most, now = [0], [0], [0]

    def caller(gate: ConnectionGate) -> None:
        while time.monotonic() < stop:
            if not gate.try_enter():  # waits at the gate, as engine.pool does
                waiter: AsyncResult[None] = AsyncResult()
                gate.add_waiter(waiter)
                waiter.wait(1.0)
                gate.remove_waiter(waiter)
                continue
            opened[0] += 1
            now[0] += 1
            most[0] = max(most[0], now[0])
            gevent.sleep(0.02)
            now[0] -= 1
            gate.leave()

    gevent.joinall([gevent.spawn(caller, g) for g in gates for _ in range(20)])
    gevent.sleep(0.2)
    for gate in gates:
        assert gate.cluster is not None
        gate.cluster.close()
    samples = sorted(timings.calls)
    print(f"connection slots, 10 for 3 workers x 20 callers: {opened[0]} connections"
          f" ({opened[0] / seconds:.0f}/s, at most {most[0]} at once), {len(samples)} round"
          f" trips ({len(samples) / opened[0]:.2f} a connection, asks refused included),"
          f" {statistics.median(samples):.2f} ms median,"
          f" {samples[int(len(samples) * 0.95)]:.2f} ms p95")


def hourly_blocks(server: RedisServer, budget: int = 500_000, seconds: float = 5.0) -> None:
    timings = Timings()
    budgets = [ClusterHourly(Cluster(ClusterConfig(redis=server.url), f"host{i}"), "bench",
                             budget, f"host{i}/127.0.0.{i + 2}", timings) for i in range(3)]
    stop = time.monotonic() + seconds
    taken = [0]

    def offered(limit: ClusterHourly) -> None:
        while time.monotonic() < stop:
            if limit.take() == 0.0:
                taken[0] += 1
            gevent.sleep(0.01)

    gevent.joinall([gevent.spawn(offered, b) for b in budgets])
    for limit in budgets:
        limit.close()
    samples = sorted(timings.leases)
    print(f"hourly blocks, 3 workers at 100/s each: {taken[0]} messages, {len(samples)}"
          f" leases ({len(samples) / taken[0]:.3f} round trips a message), a lease"
          f" {statistics.median(samples):.2f} ms median")


def main() -> None:
    with RedisServer() as server:
        intake(server)
    with RedisServer() as server:
        connection_slots(server)
    for rate in (60.0, 300.0):
        with RedisServer() as server:
            leases(server, rate)
    with RedisServer() as server:
        hourly_blocks(server)


if __name__ == "__main__":
    main()
