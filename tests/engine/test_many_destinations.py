"""Many destinations through the whole engine (issue #19, item 3; the figures at scale:
bench/many_destinations.py): a burst to a few hundred domains, each with its own MX host and
provider, resolved by a real DNS server on loopback whose answers take a while. The worker
keeps its DNS queries within `dns.max_in_flight` (counted at the server), asks each name once
within its TTL however many messages want it at once, gives back its idle connections and
empty pools after `pool.idle_timeout`, and forgets the providers' shaping state after
`shaping.forget_after` (its status then lists none)."""
from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from engine.testing.harness import LocalEngine, final_outcomes, make_message
from engine.testing.sink import SinkServer
from tests.support.dnsserver import DnsServer, domains_with_own_mx

pytestmark = pytest.mark.timeout(180)

DOMAINS = 150
BOUND = 4


def _worker(engine: LocalEngine) -> dict[str, Any]:
    return dict(next(iter(engine.status()["workers"].values())))


def test_dns_bounded_and_asked_once_pools_reclaimed(
        local_engine: Callable[..., LocalEngine]) -> None:
    sink = SinkServer(host="127.0.0.21")
    try:
        # Each answer held 20 ms: without a bound, a burst has hundreds out at once.
        with DnsServer(domains_with_own_mx(DOMAINS, "127.0.0.21"), ttl=3600, delay=0.02) as dns:
            engine = local_engine(sink.port, route=None, extra={
                "dns": {"nameservers": ["127.0.0.1"], "port": dns.port,
                        "max_in_flight": BOUND},
                "pool": {"idle_timeout": 1},
                "shaping": {"forget_after": 1},
                "tls_policy": {"mta_sts": False},
                "security": {"allowed_destinations": ["127.0.0.0/8"]},
            })
            # Two messages per domain, all pushed at once: both want the MX answer together.
            jobs = [({"id": f"j{n}-{i}", "from": "s@example.test", "to": [f"r{n}@d{i}.test"]},
                     make_message(i, 300)) for n in range(2) for i in range(DOMAINS)]
            assert engine.push(jobs)
            finals = final_outcomes(engine.wait_final(2 * DOMAINS, timeout=150))
            assert {e["event"] for e in finals.values()} == {"delivered"}
            asked = Counter(dns.queries)
            in_flight_peak = dns.peak_in_flight
            worker = _worker(engine)
            # Idle connections closed and empty pools dropped once idle_timeout has passed,
            # then the providers forgotten: status lists none, and counts none left out.
            deadline = time.monotonic() + 30
            while (worker["connections_open"] or worker["destinations"] or worker["shaping"]
                   or worker["shaping_idle"]):
                assert time.monotonic() < deadline, f"not reclaimed: {worker}"
                time.sleep(0.2)
                worker = _worker(engine)
    finally:
        sink.stop()
    assert 1 < in_flight_peak <= BOUND
    assert worker["dns"]["peak_in_flight"] <= BOUND
    assert {name for name, rdtype in asked if rdtype == "MX"} == \
        {f"d{i}.test" for i in range(DOMAINS)}
    assert {name for name, rdtype in asked if rdtype == "A"} == \
        {f"mx.d{i}.test" for i in range(DOMAINS)}
    assert set(asked.values()) == {1}, "a name asked twice within its TTL"
    assert worker["dns"]["joined"] > 0  # some messages waited for a lookup already out
    assert worker["shaping_forgotten"] >= DOMAINS  # one provider per domain
    assert len(sink.messages) == 2 * DOMAINS
