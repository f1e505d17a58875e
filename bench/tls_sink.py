"""One aiosmtpd sink with STARTTLS in a process of its own (for many concurrent sessions).

`python -m bench.tls_sink` prints `LISTENING <port>` and serves until SIGTERM; then prints
a JSON line: connections accepted, most open at once, messages received.
"""
from __future__ import annotations

import json
import signal
import sys
import threading

from engine.testing.sink import SinkServer


def main() -> int:
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    with SinkServer(tls=True, idle_timeout=600.0) as sink:
        print(f"LISTENING {sink.port}", flush=True)
        done.wait()
        figures = {"connections": sink.connections, "max_concurrent": sink.max_concurrent,
                   "messages": len(sink.messages)}
    print(json.dumps(figures), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
