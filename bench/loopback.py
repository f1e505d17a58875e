"""Throughput on loopback, 5 KB messages, against Postfix's `smtp-sink`, in one run.

Rows, each with the same number of SMTP sessions to the same `smtp-sink` process:

- `smtp-source -d` (connections reused, as the engine does) and `smtp-source`
  without -d (a new connection per message): Postfix's C load generator, the limit;
  each client runs 2 (quick) or 3 times per row, interleaved; a cell is the median;
- one worker alone (`bench/worker_alone.py`: the engine's real Worker and Deliverer
  under gevent, no spool, no events);
- the whole engine (`mailengine run` through LocalEngine: supervisor, durable spool,
  one worker, events log), messages pushed by a producer at once; messages per
  second from the first push to the last final outcome;
- for scale, a bare sequential `smtplib` loop on one reused connection (one session,
  whatever the row's count).

smtp-sink offers PIPELINING but not CHUNKING, so the engine sends MAIL, RCPT and
DATA in one write and the message after the 354; under load the connection goes to the
next message once the dot is sent (one round trip per message per session).
"""
from __future__ import annotations

import os
import resource
import smtplib
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from bench.common import (
    SENDER,
    SMTP_SOURCE,
    PostfixSink,
    Producer,
    cpu_seconds,
    engine_config,
    engine_pids,
    job,
    log,
    run_child,
    running_engine,
)
from engine.testing.harness import LocalEngine, make_message

SIZE = 5000
SOURCE_PAYLOAD = 4850  # smtp-source adds ~150 bytes of headers to -l: ~5 KB on the wire


def smtp_source(port: int, sessions: int, count: int, reuse: bool) -> dict[str, Any]:
    cmd = [SMTP_SOURCE, *(["-d"] if reuse else []), "-s", str(sessions), "-m", str(count),
           "-l", str(SOURCE_PAYLOAD), "-f", "bench@mailengine.test", "-t",
           "user@example.test", f"127.0.0.1:{port}"]
    cpu_before = _children_cpu()
    started = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, timeout=120)
    seconds = time.perf_counter() - started
    cpu = _children_cpu() - cpu_before
    return {"messages": count, "seconds": seconds, "per_second": count / seconds,
            "cpu_us_per_message": cpu * 1e6 / count,
            "command": " ".join(["smtp-source", *cmd[1:]])}


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def worker_alone(port: int, sessions: int, count: int) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.worker_alone", "--port", str(port), "--sessions",
           str(sessions), "--count", str(count), "--size", str(SIZE)]
    result = run_child(cmd, timeout=180)
    result["command"] = " ".join(["python", *cmd[1:]])
    return result


def smtplib_loop(port: int, count: int) -> dict[str, Any]:
    message = make_message(0, SIZE, "bench@mailengine.test", "user@example.test")
    client = smtplib.SMTP("127.0.0.1", port)
    client.ehlo()
    cpu_before = _self_cpu()
    started = time.perf_counter()
    for i in range(count):
        client.sendmail("bench@mailengine.test", [f"user{i}@example.test"], message)
    seconds = time.perf_counter() - started
    cpu = _self_cpu() - cpu_before
    client.quit()
    return {"messages": count, "seconds": seconds, "per_second": count / seconds,
            "cpu_us_per_message": cpu * 1e6 / count}


def whole_engine(workdir: str, port: int, sessions: int, count: int,
                 while_running: Callable[[LocalEngine], None] | None = None,
                 sink_pid: int | None = None,
                 dkim: dict[str, Any] | None = None) -> dict[str, Any]:
    extra = engine_config(port, {"max_connections": sessions})
    if dkim is not None:
        extra["dkim"] = dkim
    jobs = [job(i, "loop", SIZE) for i in range(count)]
    with running_engine(workdir, port, extra) as engine:
        producer = Producer(engine)
        time.sleep(0.3)
        pids = engine_pids(engine)
        if sink_pid is not None:
            pids["smtp-sink"] = sink_pid
        pids["bench (producer)"] = os.getpid()
        cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        started = time.time()
        for envelope, message in jobs:
            producer.send(envelope, message)
        if while_running is not None:
            while_running(engine)
        producer.wait_queued(timeout=180)
        producer.wait_final(timeout=180, poll=0.05)
        busy = time.time() - started
        spent = {name: cpu_seconds(pid) - cpu_before[name] for name, pid in pids.items()}
        cpu = {name: value / busy for name, value in spent.items()}
        engine_cpu = sum(v for name, v in spent.items() if name == "supervisor"
                         or name.startswith("worker"))
        producer.close()
    finals = list(producer.final.values())
    last = max(e["ts"] for e in finals)
    queued = [e["ts"] for e in producer.queued.values()]
    return {"messages": count, "seconds": last - started, "per_second": count / (last - started),
            "delivered": sum(1 for e in finals if e["event"] == "delivered"),
            "intake_per_second": count / max(1e-9, max(queued) - started),
            "cpu_share": cpu, "cpu_us_per_message": engine_cpu * 1e6 / count,
            "cpu_us_per_message_by_process": {
                name: v * 1e6 / count for name, v in spent.items()},
            "delay_ms_p50": sorted(e["delay_ms"] for e in finals)[len(finals) // 2]}


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _combine(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median rate, plus every rate seen."""
    ordered = sorted(runs, key=lambda r: r["per_second"])
    chosen = dict(ordered[len(ordered) // 2])
    chosen["per_second"] = _median([r["per_second"] for r in runs])
    chosen["runs"] = [round(r["per_second"], 1) for r in runs]
    return chosen


def throughput(workdir: str, quick: bool) -> dict[str, Any]:
    """Each client `repeats` times per row, interleaved (so drift of the machine hits all of
    them alike); each cell is the median."""
    sessions_list = (4,) if quick else (1, 4, 10)
    repeats = 2 if quick else 3
    source_count = 20000 if quick else 30000
    worker_count = 5000 if quick else 8000
    engine_count = 3000 if quick else 5000
    rows = []
    with PostfixSink() as sink:
        log(f"loopback: smtp-sink on port {sink.port}: {sink.cmd}")
        loop = _combine([smtplib_loop(sink.port, 2000 if quick else 4000)
                         for _ in range(repeats)])
        log(f"  smtplib loop: {loop['per_second']:.0f}/s {loop['runs']}")
        for sessions in sessions_list:
            runs: dict[str, list[dict[str, Any]]] = {
                "smtp_source_reuse": [], "smtp_source_connect": [], "worker": [], "engine": []}
            for k in range(repeats):
                runs["smtp_source_reuse"].append(smtp_source(sink.port, sessions, source_count,
                                                             True))
                runs["smtp_source_connect"].append(smtp_source(sink.port, sessions,
                                                               source_count // 2, False))
                runs["worker"].append(worker_alone(sink.port, sessions, worker_count))
                runs["engine"].append(whole_engine(
                    os.path.join(workdir, f"loop-{sessions}-{k}"), sink.port, sessions,
                    engine_count, sink_pid=sink.proc.pid))
            row: dict[str, Any] = {"sessions": sessions, "repeats": repeats}
            row.update({name: _combine(values) for name, values in runs.items()})
            log(f"  {sessions} sessions: smtp-source -d {row['smtp_source_reuse']['runs']},"
                f" smtp-source {row['smtp_source_connect']['runs']},"
                f" worker {row['worker']['runs']}, engine {row['engine']['runs']}")
            rows.append(row)
    return {"sink_command": "smtp-sink -u nobody 127.0.0.1:PORT 1000", "size": SIZE,
            "source_payload": SOURCE_PAYLOAD, "smtplib_loop": loop, "rows": rows,
            "repeats": repeats}


# --- DKIM signing's cost --------------------------------------------------------------

DKIM_SESSIONS = 4


def dkim_cost(workdir: str, quick: bool) -> dict[str, Any]:
    """The whole engine (as in `throughput`, 4 sessions, 5 KB messages) with DKIM signing off,
    with a 2048-bit RSA key, and dual-signing (RSA and Ed25519), interleaved run by run; and
    the signing alone, per message, in this process (engine.dkim, and dkimpy's for
    comparison when it is installed)."""
    from engine import dkim
    keys = os.path.join(workdir, "dkim-keys")
    os.makedirs(keys, exist_ok=True)
    rsa_key, ed_key = os.path.join(keys, "rsa.pem"), os.path.join(keys, "ed.pem")
    dkim.write_key(dkim.generate("rsa", 2048), rsa_key)
    dkim.write_key(dkim.generate("ed25519"), ed_key)
    domain = SENDER.rpartition("@")[2]
    rsa_only = [{"selector": "rsa", "key_file": rsa_key}]
    variants: dict[str, dict[str, Any] | None] = {
        "off": None,
        "rsa": {"domains": {domain: {"keys": rsa_only}}},
        "rsa+ed25519": {"domains": {domain: {"keys": [
            *rsa_only, {"selector": "ed", "key_file": ed_key}]}}},
    }
    repeats = 3 if quick else 5
    count = 3000 if quick else 5000
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    with PostfixSink() as sink:
        log(f"dkim: smtp-sink on port {sink.port}; {repeats} runs of {count} per variant")
        for k in range(repeats):
            for name, section in variants.items():
                runs[name].append(whole_engine(
                    os.path.join(workdir, f"dkim-{name}-{k}"), sink.port, DKIM_SESSIONS,
                    count, sink_pid=sink.proc.pid, dkim=section))
            log("  " + ", ".join(f"{n} {runs[n][-1]['per_second']:.0f}/s" for n in variants))
    combined = {name: _combine(values) for name, values in runs.items()}
    off = combined["off"]["per_second"]
    return {"sessions": DKIM_SESSIONS, "size": SIZE, "count": count, "repeats": repeats,
            "variants": combined,
            "ratio": {n: combined[n]["per_second"] / off for n in variants if n != "off"},
            "ratio_by_run": {n: [on["per_second"] / o["per_second"]
                                 for on, o in zip(runs[n], runs["off"], strict=True)]
                             for n in variants if n != "off"},
            "sign_us": _sign_alone(rsa_key, ed_key, domain)}


def _sign_alone(rsa_key: str, ed_key: str, domain: str) -> dict[str, float]:
    """CPU µs per 5 KB message to make its signatures (the best of 3 passes)."""
    from engine import dkim
    from engine.config import DkimConfig, DkimDomainConfig, DkimKeyConfig
    messages = [make_message(i, SIZE, SENDER, "user@example.test") for i in range(1000)]
    result = {}
    for name, keys in (("rsa", (DkimKeyConfig("rsa", rsa_key),)),
                       ("rsa+ed25519", (DkimKeyConfig("rsa", rsa_key),
                                        DkimKeyConfig("ed", ed_key)))):
        signer = dkim.Signer.create(DkimConfig(domains={domain: DkimDomainConfig(keys)}))
        assert signer is not None
        result[name] = _best_us(lambda m, s=signer: s.sign(m), messages)
    try:
        import dkim as dkimpy  # the reference implementation, pure-Python RSA
    except ImportError:
        return result
    with open(rsa_key, "rb") as f:
        pem = f.read()
    result["dkimpy rsa"] = _best_us(
        lambda m: dkimpy.sign(m, b"rsa", domain.encode(), pem,
                              canonicalize=(b"relaxed", b"relaxed")), messages[:200])
    return result


def _best_us(sign: Callable[[bytes], object], messages: list[bytes]) -> float:
    best = float("inf")
    for _ in range(3):
        started = time.process_time()
        for message in messages:
            sign(message)
        best = min(best, (time.process_time() - started) * 1e6 / len(messages))
    return best
