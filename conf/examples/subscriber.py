#!/usr/bin/env python3
"""A subscriber: follows mailengine's events as they happen.

    python3 subscriber.py [--events tcp://127.0.0.1:5571] [--json] [EVENT ...]

The engine publishes every event on its `events` socket (ZeroMQ PUB): two frames, the
topic (the event's name: queued, rejected, delivered, deferred, bounced, expired) and
the event as a JSON object. A SUB socket receives the topics it subscribed to; give event
names to follow only those (ZeroMQ matches a topic by its start: `de` would take both
`delivered` and `deferred`), none to follow all. Every event has `event`, `id` (the
producer's job id), `ts` and `meta` (the job's, echoed); docs/EVENTS.md lists the rest.

It prints one line per event, a summary of its main fields (--json: the event itself, one
JSON object a line, for jq or a script). It runs until interrupted (Ctrl-C, SIGTERM).

PUB/SUB is for watching: the engine never waits for a subscriber, so one that is not
connected yet, or too slow to keep up, misses events. Processing that must see every
event (bounces, say) reads the events log (`events_log`: the same objects, one a line)
instead. Needs pyzmq (Debian: python3-zmq) and nothing else. docs/EXAMPLES.md says more.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from typing import Any

import zmq

# The fields shown after each event's name and job id, in this order.
SHOWN = ("rcpt_count", "error", "rcpt", "ip", "mx", "provider", "code", "enhanced", "tls",
         "conn_reused", "attempt", "delay_ms", "next_attempt", "reply", "meta")


def main() -> int:
    args = options()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    ctx = zmq.Context()
    events = ctx.socket(zmq.SUB)
    for topic in args.topics or [""]:
        events.setsockopt_string(zmq.SUBSCRIBE, topic)
    events.connect(args.events)
    try:
        while True:
            topic, body = events.recv_multipart()
            if args.topics and topic.decode() not in args.topics:
                continue  # a longer topic that starts with one asked for
            print(body.decode() if args.json else summary(json.loads(body)), flush=True)
    except KeyboardInterrupt:
        return 0
    finally:
        ctx.destroy(linger=0)


def summary(event: dict[str, Any]) -> str:
    """`HH:MM:SS event id key=value ...`: the fields of SHOWN that the event has."""
    when = time.strftime("%H:%M:%S", time.localtime(event.get("ts", 0)))
    fields = [f"{key}={json.dumps(event[key], ensure_ascii=False)}" for key in SHOWN
              if event.get(key) not in (None, {}, "")]
    return " ".join([when, event.get("event", "?"), str(event.get("id")), *fields])


def options() -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Print mailengine's events as they happen.")
    p.add_argument("topics", nargs="*", metavar="EVENT",
                   help="event names to follow (default: every event)")
    p.add_argument("--events", default="tcp://127.0.0.1:5571", help="the engine's events")
    p.add_argument("--json", action="store_true", help="print each event as one JSON line")
    return p.parse_args()


if __name__ == "__main__":
    sys.exit(main())
