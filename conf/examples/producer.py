#!/usr/bin/env python3
"""A producer for mailengine: hands messages to the engine and makes sure it has them.

    python3 producer.py --from news@example.com --to ann@example.net --to bob@example.org \\
        [--meta '{"campaign": "spring"}'] message.eml [more.eml ...]

Each file is one job: the envelope (a JSON object) and the raw message, two frames of one
ZeroMQ message sent on a PUSH socket connected to the engine's `ingest`. The engine says
what became of each job on its `events` socket (PUB; the topic is the event's name): a job
is accepted once it is durably in the spool, and then, only then, the engine publishes
`queued` for its id. A job it refuses gets `rejected`, with an `error` in words.

So this producer:
1. subscribes to `queued` and `rejected` before it sends anything;
2. sends each job with an id of its own;
3. sends again, with the same id, each job still unanswered after --resend seconds. The
   first copy may be lost (the engine was restarting), or its answer missed (a SUB socket
   gets only what is published once its subscription has reached the engine). The engine
   queues an id once: a copy of a job it holds is answered `queued` again (with
   `duplicate: true`) and delivered once;
4. stops when every job is answered, or after --timeout seconds without any answer.

Several engine hosts (docs/SCALING.md): give --ingest and --events once per host, in the
same order. The one PUSH socket is connected to every host's ingest and deals the jobs
round them (only to those connected: ZMQ_IMMEDIATE), the one SUB socket to every host's
events; a job is answered when any host answers it, and a job sent again may reach
another host (which, with the cluster's shared ids, answers it as a duplicate).

It prints one line per job (`queued ID FILE`, `rejected ID FILE: ERROR` or `unanswered ID
FILE`) and exits 0 when every job was queued, 1 otherwise. A job's id is derived from its
envelope and message, so running this again on the same files within the engine's memory
of ids (24 hours) sends nothing twice. Needs pyzmq (Debian: python3-zmq) and nothing else.
`mailengine push` does the same with more kinds of sources, bounded memory and a summary.
docs/EXAMPLES.md says more; docs/EVENTS.md is the contract.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time

import zmq


def main() -> int:
    args = options()
    jobs = {}  # id -> (file, frames)
    for path in args.messages:
        with open(path, "rb") as f:
            job_id, frames = job(args, f.read())
        jobs[job_id] = (path, frames)
    ctx = zmq.Context()
    try:
        answers = send_until_answered(ctx, args, {i: frames for i, (_, frames) in jobs.items()})
    finally:
        ctx.destroy(linger=0)
    for job_id, (path, _) in jobs.items():
        event = answers.get(job_id)
        if event is None:
            print(f"unanswered {job_id} {path}")
        elif event["event"] == "queued":
            print(f"queued {job_id} {path}")
        else:
            print(f"rejected {job_id} {path}: {event.get('error')}")
    queued = sum(1 for event in answers.values() if event["event"] == "queued")
    return 0 if queued == len(jobs) else 1


def job(args: argparse.Namespace, message: bytes) -> tuple[str, list[bytes]]:
    """The job's id and its two frames: the envelope as JSON, and the message."""
    envelope = {"from": args.sender, "to": args.to}
    if args.meta is not None:
        envelope["meta"] = args.meta
    digest = hashlib.sha256(json.dumps(envelope, sort_keys=True).encode() + b"\0" + message)
    envelope["id"] = digest.hexdigest()[:32]
    return envelope["id"], [json.dumps(envelope).encode(), message]


def send_until_answered(ctx: zmq.Context, args: argparse.Namespace,
                        jobs: dict[str, list[bytes]]) -> dict[str, dict]:
    """Send every job, again and again, until each is answered (or --timeout passes
    without any answer); the answers (`queued` or `rejected` events) by job id."""
    events = ctx.socket(zmq.SUB)
    for topic in (b"queued", b"rejected"):
        events.setsockopt(zmq.SUBSCRIBE, topic)
    for endpoint in args.events:  # first: answers to the first copies may come at once
        events.connect(endpoint)
    ingest = ctx.socket(zmq.PUSH)
    if len(args.ingest) > 1:  # deal only to hosts connected: none waits for one that is down
        ingest.setsockopt(zmq.IMMEDIATE, 1)
    for endpoint in args.ingest:
        ingest.connect(endpoint)
    sent_at = {job_id: -args.resend for job_id in jobs}
    answers: dict[str, dict] = {}
    last_answer = time.monotonic()
    while len(answers) < len(jobs) and time.monotonic() - last_answer < args.timeout:
        for job_id, frames in jobs.items():
            if job_id not in answers and time.monotonic() - sent_at[job_id] >= args.resend:
                try:
                    ingest.send_multipart(frames, zmq.NOBLOCK)
                except zmq.Again:  # no engine connected yet: the next turn tries again
                    break
                sent_at[job_id] = time.monotonic()
        while events.poll(100):
            _topic, body = events.recv_multipart()
            event = json.loads(body)
            if event.get("id") in jobs and event["id"] not in answers:
                answers[event["id"]] = event
                last_answer = time.monotonic()
    return answers


def options() -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Send messages to mailengine and wait until it"
                                            " has queued each one.")
    p.add_argument("messages", nargs="+", metavar="FILE", help="a raw RFC 5322 message (.eml)")
    p.add_argument("--from", dest="sender", required=True, help="the reverse-path")
    p.add_argument("--to", action="append", required=True, help="a recipient (repeatable)")
    p.add_argument("--meta", type=json.loads,
                   help="a JSON object, echoed on every event of the job")
    p.add_argument("--ingest", action="append",
                   help="the engine's ingest (tcp://127.0.0.1:5570); once per host")
    p.add_argument("--events", action="append",
                   help="the engine's events (tcp://127.0.0.1:5571); once per host, in the"
                        " order of --ingest")
    p.add_argument("--resend", type=float, default=3.0,
                   help="seconds before a job not yet answered is sent again (3)")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="give up after this many seconds without an answer (60)")
    args = p.parse_args()
    args.ingest = args.ingest or ["tcp://127.0.0.1:5570"]
    args.events = args.events or ["tcp://127.0.0.1:5571"]
    if len(args.ingest) != len(args.events):
        p.error("give --events once per --ingest, in the same order")
    return args


if __name__ == "__main__":
    sys.exit(main())
