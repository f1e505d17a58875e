"""The cluster's figures in `mailengine status` and `status --cluster`, as text.

From the status answer alone (docs/SCALING.md): the supervisor's `cluster` (this host's name
in the cluster, its link to Redis: shared or fallback), each worker's `cluster_mode`, and
each provider's cluster limits in the worker's shaping figures (engine.cluster_limits,
engine.cluster_connections): the whole cluster's limit, and this worker's part of it as it
saw last (its share of the rate and the turns it holds leased, what is left of the hour's
budget and the block it holds, the connection slots it holds and its share of them), with
the workers it saw share it (`seen`). A host without a cluster shows none of it.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any, NamedTuple

from engine.cluster import FALLBACK


class LimitRow(NamedTuple):
    """One cluster limit of one provider at one sending IP."""

    ip: str
    provider: str  # "yahoo", or "yahoo/bulk" for an IP group's
    limit: str  # the whole cluster's
    part: str  # this worker's
    seen: int  # the workers it last saw share the limit


def mode_line(figures: dict[str, Any]) -> list[str]:
    """`cluster: host mta-a; Redis shared (supervisor), workers: 2 shared`; none without a
    cluster."""
    cluster = figures.get("cluster")
    if not cluster:
        return []
    return [f"cluster: host {cluster.get('host')}; Redis {_mode(cluster.get('mode'))}"
            f" (supervisor){_workers_modes(figures.get('workers') or {})}"]


def render(figures: dict[str, Any]) -> list[str]:
    """`mailengine status`'s cluster block: the mode line, then a row per cluster limit of
    each provider shown (per sending IP: the part is the worker's)."""
    rows = list(limit_rows(figures.get("workers") or {}))
    lines = mode_line(figures)
    if not rows:
        return lines
    return [*lines, "cluster limits (the whole cluster's; this worker's part, workers seen):",
            f"{'ip':<18}{'provider':<24}{'limit':<18}{'this worker':<44}{'seen':>5}",
            *(f"{r.ip:<18}{r.provider[:23]:<24}{r.limit:<18}{r.part:<44}{r.seen:>5}"
              for r in rows)]


def hosts_lines(figures_by_host: dict[str, dict[str, Any]]) -> list[str]:
    """`status --cluster`'s cluster block: each host's link to Redis on one line, then per
    provider and limit the hosts' parts (their workers' together)."""
    modes = [f"{host} {_mode(f['cluster'].get('mode'))}"
             f"{_workers_modes(f.get('workers') or {}, short=True)}"
             for host, f in figures_by_host.items() if f.get("cluster")]
    if not modes:
        return []
    parts: dict[tuple[str, str], list[str]] = {}
    for host, figures in figures_by_host.items():
        for (provider, limit), part in _host_parts(figures.get("workers") or {}).items():
            parts.setdefault((provider, limit), []).append(f"{host} {part}")
    return ["redis: " + ", ".join(modes),
            *(f"{provider} {limit}: " + "; ".join(hosts)
              for (provider, limit), hosts in sorted(parts.items()))]


def limit_rows(workers: dict[str, Any]) -> Iterator[LimitRow]:
    """Every cluster limit in the workers' shaping figures, by IP then provider."""
    for ip, worker in sorted(workers.items()):
        for provider, state in sorted((worker.get("shaping") or {}).items()):
            yield from _rows(ip, provider, state)
            for pool, pool_state in sorted((state.get("pools") or {}).items()):
                yield from _rows(ip, f"{provider}/{pool}", pool_state)


def _rows(ip: str, provider: str, st: dict[str, Any]) -> Iterator[LimitRow]:
    alone = ", FALLBACK" if st.get("mode") == FALLBACK else ""
    if "cluster_rate" in st:
        share = f"share {st['share']:.1f}/s, " if "share" in st else ""
        yield LimitRow(ip, provider, f"rate {st['cluster_rate']:g}/s",
                       f"{share}{st.get('leased', 0)} turns leased{alone}",
                       int(st.get("members", 1)))
    if "cluster_hourly" in st:
        held = f", {st['hourly_held']:,} held" if "hourly_held" in st else ""
        yield LimitRow(ip, provider, f"hourly {st['cluster_hourly']:,}",
                       f"{st.get('hourly_left', 0):,} left{held}",
                       int(st.get("hourly_members", 1)))
    if "cluster_connections" in st:
        yield LimitRow(ip, provider, f"connections {st['cluster_connections']}",
                       f"{st.get('slots_held', 0)} held, share {st.get('connection_share', 0)}"
                       f" ({st.get('cluster_open', 0)} open in all){alone}",
                       int(st.get("connection_members", 1)))


def _host_parts(workers: dict[str, Any]) -> dict[tuple[str, str], str]:
    """A host's part of each provider's limits: its workers' shares, leases, slots added."""
    summed: dict[tuple[str, str], dict[str, float]] = {}

    def add(provider: str, limit: str, **figures: float) -> None:
        sums = summed.setdefault((provider, limit), {})
        for name, value in figures.items():
            sums[name] = sums.get(name, 0) + value

    for worker in workers.values():
        for provider, st in (worker.get("shaping") or {}).items():
            if "cluster_rate" in st:
                add(provider, f"rate {st['cluster_rate']:g}/s", share=st.get("share", 0.0),
                    leased=st.get("leased", 0))
            if "cluster_hourly" in st:
                add(provider, f"hourly {st['cluster_hourly']:,}", held=st.get("hourly_held", 0))
            if "cluster_connections" in st:
                add(provider, f"connections {st['cluster_connections']}",
                    slots=st.get("slots_held", 0))
    return {key: _host_part(sums) for key, sums in summed.items()}


def _host_part(n: dict[str, float]) -> str:
    if "share" in n:
        return f"share {n['share']:.1f}/s, {n['leased']:.0f} leased"
    if "slots" in n:
        return f"{n['slots']:.0f} slots held"
    return f"{n['held']:,.0f} held"


def _workers_modes(workers: dict[str, Any], short: bool = False) -> str:
    """`, workers: 2 shared, 1 FALLBACK` (short: ` (1 of 3 workers FALLBACK)`, or nothing
    when all share)."""
    modes = Counter(str(w["cluster_mode"]) for w in workers.values() if w.get("cluster_mode"))
    if not modes:
        return ""
    if short:
        alone = modes.get(FALLBACK, 0)
        return f" ({alone} of {sum(modes.values())} workers FALLBACK)" if alone else ""
    return ", workers: " + ", ".join(f"{n} {_mode(mode)}" for mode, n in sorted(modes.items()))


def _mode(mode: Any) -> str:
    """The link's mode, a fallback in capitals (something is wrong)."""
    return "FALLBACK" if mode == FALLBACK else str(mode)
