"""The supervisor's parts in a test process: a config whose sockets are ipc endpoints in a
short temporary folder (the `sockdir` fixture), two sending IPs in one pool, and a worker's
Attempt for one recipient."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from engine import config as config_mod
from engine.config import Config
from engine.protocol import Attempt, Status
from engine.reply import Reply

IP2, IP3 = "127.0.0.2", "127.0.0.3"
RCPT = "r@example.test"
NOW = 1_800_000_000.0
SCHEDULE = (60.0, 300.0)


def attempt(status: Status, **fields: Any) -> Attempt:
    code = {Status.DELIVERED: 250, Status.BOUNCED: 550}.get(status, 451)
    return Attempt(**{"job_id": "j", "rcpt": RCPT, "status": status,
                      "reply": Reply(code, None, "text"), "ip": IP2, "ts": NOW, **fields})


def ipc_config(tmp: Path, sockdir: str) -> Config:
    return config_mod.from_dict({
        "ingest": f"ipc://{sockdir}/ingest", "events": f"ipc://{sockdir}/events",
        "control": f"ipc://{sockdir}/control", "run_dir": sockdir,
        "events_log": str(tmp / "events.jsonl"), "spool": str(tmp / "spool"),
        "ips": [{"address": IP2}, {"address": IP3}], "ip_pools": {"default": [IP2, IP3]},
        "statsd": {"enabled": False},
    })
