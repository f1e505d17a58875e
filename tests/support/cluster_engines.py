"""Whole engines sharing one redis-server, as the engine tier's cluster tests run them: one
`mailengine run` per sending IP (host0 on the first, host1 on the next, ...), each with its own
spool and sockets, a.test's mail routed to PROVIDER; the jobs for them, pushed to every host
as `mailengine push` does, and what every host reported final."""
from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from engine.push import Pusher
from engine.pushreport import Tally
from engine.testing.harness import LocalEngine, final_outcomes, make_message
from tests.support.redis import RedisServer

PROVIDER = "127.0.0.1"  # an IP literal route: its own provider

Job = tuple[dict[str, Any], bytes]


def sharing_engines(local_engine: Callable[..., LocalEngine], smtp_port: int,
                    redis: RedisServer, ips: tuple[str, ...], *,
                    cluster: dict[str, Any] | None = None,
                    provider: dict[str, Any] | None = None,
                    extra: dict[str, Any] | None = None) -> list[LocalEngine]:
    """A started engine per IP (the `local_engine` fixture's), sending to `smtp_port`,
    `cluster.host` host0, host1, ... on `redis`; `cluster`: more of that section;
    `provider`: PROVIDER's shaping; `extra`: more of the config."""
    def config(host: str) -> dict[str, Any]:
        section: dict[str, Any] = {"routes": {"a.test": PROVIDER},
                                   "cluster": {"redis": redis.url, "host": host,
                                               **(cluster or {})}}
        if provider is not None:
            section["shaping"] = {"providers": {PROVIDER: provider}}
        return {**section, **(extra or {})}
    return [local_engine(smtp_port, ips=(ip,), route=None, extra=config(f"host{i}"))
            for i, ip in enumerate(ips)]


def job(job_id: str, index: int, size: int = 1000) -> Job:
    """A job of one recipient at a.test, named after the job."""
    return ({"id": job_id, "from": "sender@example.test", "to": [f"{job_id}@a.test"]},
            make_message(index, size))


def push_to_all(engines: list[LocalEngine], jobs: list[Job]) -> Tally:
    """`mailengine push`'s Pusher to every host (docs/SCALING.md): one PUSH socket to every
    ingest, every host's events followed, a job re-sent (same id) every 2 s until some host
    says `queued`."""
    pusher = Pusher([str(e.config["ingest"]) for e in engines],
                    [str(e.config["events"]) for e in engines], resend=2.0, timeout=60)
    return pusher.push([(env["id"], [json.dumps(env).encode(), msg]) for env, msg in jobs],
                       len(jobs))


def finals(engines: list[LocalEngine]) -> dict[tuple[str, str], dict[str, Any]]:
    """Every host's final outcome of each (job, recipient) so far."""
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for engine in engines:
        found.update(final_outcomes(engine.events()))
    return found
