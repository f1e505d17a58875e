"""Two engine hosts on loopback for the operator's commands over the cluster (`status
--cluster`, `queue --cluster`): A (127.0.0.2, control on ipc) and B (127.0.0.3, control on tcp
with CURVE, as a host on another machine has it). A's config lists both in `cluster.hosts`;
the operator's key pair is A's control.curve.client_key, B's public key the entry's
curve_server_key. Each host has 3 (A) or 5 (B) jobs of two recipients: one delivered, one
waiting at wait.test (deferred, the next try 10 minutes away)."""
from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from engine import auth
from engine.testing.harness import LocalEngine, make_message
from engine.testing.sink import SinkServer
from tests.support.control import CurveEngine, free_tcp_endpoint

A_IP, B_IP = "127.0.0.2", "127.0.0.3"
JOBS = {"a": 3, "b": 5}


def operator_keys(base: Path) -> dict[str, str]:
    """B's control key pair and the operator's, made in `base` (skips without CURVE)."""
    if not zmq.has("curve"):
        pytest.skip("this libzmq has no CURVE (zmq.has('curve') is False)")
    (base / "operators").mkdir(parents=True)
    auth.keygen("b-control", str(base))
    auth.keygen("operator", str(base / "private"))
    shutil.copy(base / "private" / "operator.key", base / "operators")
    return {"secret": str(base / "b-control.key_secret"), "public": str(base / "b-control.key"),
            "operators": str(base / "operators"),
            "operator": str(base / "private" / "operator.key_secret")}


@contextlib.contextmanager
def two_hosts(keys: dict[str, str], workdir: Path,
              cluster: Callable[[str], dict[str, Any]] = lambda name: {}
              ) -> Iterator[tuple[CurveEngine, CurveEngine]]:
    """A and B running, their jobs tried (each recipient delivered or deferred); `cluster`:
    each host's `cluster` section besides A's `hosts`, by its name (default: none)."""
    slow = {"retry": {"schedule": [600]}}
    with SinkServer(rcpt_rules={"defer": "452 4.2.2 mailbox full"}) as sink:
        b_extra: dict[str, Any] = {**slow, "control": {
            "endpoint": free_tcp_endpoint(), "curve": {
                "enabled": True, "server_secret_key": keys["secret"],
                "allowed_clients": keys["operators"]}}}
        if cluster("mta-b"):
            b_extra["cluster"] = cluster("mta-b")
        b = CurveEngine(str(workdir / "b"), sink.port, ips=(B_IP,), extra=b_extra)
        b.client = auth.CurveClient.from_files(keys["public"], keys["operator"])
        a = CurveEngine(str(workdir / "a"), sink.port, ips=(A_IP,), extra=slow)
        a.config["control"] = {"endpoint": a.config["control"],
                               "curve": {"client_key": keys["operator"]}}
        a.config["cluster"] = {**cluster("mta-a"), "hosts": [
            {"name": "mta-a", "control": a.config["control"]["endpoint"]},
            {"name": "mta-b", "control": b.config["control"]["endpoint"],
             "curve_server_key": keys["public"]}]}
        a.write_config()
        try:
            for engine, count in ((a, JOBS["a"]), (b, JOBS["b"])):
                engine.start()
                assert engine.push(waiting_jobs(engine, count), timeout=30)
                engine.wait_for(lambda evs, n=count: sum(
                    e["event"] in ("delivered", "deferred") for e in evs) >= 2 * n,
                    timeout=30, what="every recipient tried")
            yield a, b
        finally:
            for engine in (a, b):
                engine.stop(timeout=20)
                engine.cleanup()


def waiting_jobs(engine: LocalEngine, count: int) -> list[tuple[dict[str, Any], bytes]]:
    """`count` jobs of two recipients: one delivered, one deferred (at wait.test)."""
    name = Path(engine.workdir).name
    return [({"id": f"{name}-{i}-{time.time_ns()}", "from": "sender@example.test",
              "to": [f"user{i}@example.test", f"defer{i}@wait.test"]},
             make_message(i, 800)) for i in range(count)]
