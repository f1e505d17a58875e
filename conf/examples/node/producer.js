#!/usr/bin/env node
// A producer for mailengine in Node.js: the same as ../producer.py, with the `zeromq`
// package (npm ci, here). It hands messages to the engine and makes sure it has them:
//
//   node producer.js --from news@example.com --to ann@example.net [--to ...] \
//       [--meta '{"campaign": "spring"}'] message.eml [more.eml ...]
//
// Each file is one job: the envelope (a JSON object) and the raw message, two frames of
// one ZeroMQ message sent on a PUSH socket connected to the engine's `ingest`. A job is
// accepted once it is durably in the spool; then, only then, the engine publishes
// `queued` for its id on its `events` socket (PUB; the topic is the event's name), or
// `rejected` with an `error` for a job it refuses. So this producer subscribes to those
// two first, sends each job, sends again (same id) each job still unanswered after
// --resend seconds (the first copy may be lost, or its answer missed while the
// subscription was reaching the engine; the engine queues an id once and answers a copy
// with `queued` again), and stops when every job is answered or after --timeout seconds
// without an answer.
//
// Several engine hosts (docs/SCALING.md): --ingest and --events once per host, in the
// same order. The one Push socket is connected to every host's ingest and deals the jobs
// round those connected (`immediate`), the one Subscriber to every host's events; a job
// is answered when any host answers it, and a copy sent again may reach another host.
//
// One line per job (`queued ID FILE`, `rejected ID FILE: ERROR`, `unanswered ID FILE`);
// exit status 0 when every job was queued, 1 otherwise. A job's id is derived from its
// envelope and message, so running this again on the same files sends nothing twice
// within the engine's memory of ids (24 hours). docs/EXAMPLES.md says more.
"use strict";

const { createHash } = require("node:crypto");
const { readFileSync } = require("node:fs");
const { parseArgs } = require("node:util");
const zmq = require("zeromq");

function options() {
  const { values, positionals } = parseArgs({
    allowPositionals: true,
    options: {
      from: { type: "string" },
      to: { type: "string", multiple: true },
      meta: { type: "string" },
      ingest: { type: "string", multiple: true, default: ["tcp://127.0.0.1:5570"] },
      events: { type: "string", multiple: true, default: ["tcp://127.0.0.1:5571"] },
      resend: { type: "string", default: "3" },
      timeout: { type: "string", default: "60" },
    },
  });
  if (values.from === undefined || !values.to || positionals.length === 0) {
    throw new Error("usage: producer.js --from SENDER --to RCPT [--to ...] FILE...");
  }
  if (values.ingest.length !== values.events.length) {
    throw new Error("give --events once per --ingest, in the same order");
  }
  return {
    ...values,
    meta: values.meta === undefined ? undefined : JSON.parse(values.meta),
    resend: Number(values.resend) * 1000,
    timeout: Number(values.timeout) * 1000,
    files: positionals,
  };
}

// The job's id and its two frames: the envelope as JSON, and the message.
function makeJob(opts, file) {
  const message = readFileSync(file);
  const envelope = { from: opts.from, to: opts.to };
  if (opts.meta !== undefined) envelope.meta = opts.meta;
  const digest = createHash("sha256")
    .update(JSON.stringify(envelope)).update("\0").update(message);
  envelope.id = digest.digest("hex").slice(0, 32);
  return { id: envelope.id, file, frames: [JSON.stringify(envelope), message], sentAt: -Infinity };
}

// Send every job, again and again, until each is answered (or --timeout passes without
// any answer). Returns the answers (`queued` or `rejected` events) by job id.
async function sendUntilAnswered(opts, jobs) {
  const events = new zmq.Subscriber({ receiveTimeout: 100 });
  events.subscribe("queued", "rejected");
  // First: answers to the first copies may come at once.
  for (const endpoint of opts.events) events.connect(endpoint);
  // With several hosts, deal only to those connected: none waits for one that is down.
  const ingest = new zmq.Push({ sendTimeout: 0, immediate: opts.ingest.length > 1 });
  for (const endpoint of opts.ingest) ingest.connect(endpoint);
  const waiting = new Set(jobs.map((job) => job.id));
  const answers = new Map();
  let lastAnswer = Date.now();
  try {
    while (answers.size < jobs.length && Date.now() - lastAnswer < opts.timeout) {
      for (const job of jobs) {
        if (answers.has(job.id) || Date.now() - job.sentAt < opts.resend) continue;
        try {
          await ingest.send(job.frames); // one send at a time: zeromq.js allows no more
        } catch (err) {
          if (err.code === "EAGAIN") break; // no engine connected yet: the next turn
          throw err;
        }
        job.sentAt = Date.now();
      }
      const event = await receive(events);
      if (event && waiting.delete(event.id)) {
        answers.set(event.id, event);
        lastAnswer = Date.now();
      }
    }
  } finally {
    ingest.linger = 0;
    ingest.close();
    events.close();
  }
  return answers;
}

// The next event, or null when none came within the socket's receiveTimeout.
async function receive(events) {
  try {
    const [, body] = await events.receive();
    return JSON.parse(body.toString("utf8"));
  } catch (err) {
    if (err.code === "EAGAIN") return null;
    throw err;
  }
}

async function main() {
  const opts = options();
  const jobs = opts.files.map((file) => makeJob(opts, file));
  const answers = await sendUntilAnswered(opts, jobs);
  let queued = 0;
  for (const job of jobs) {
    const event = answers.get(job.id);
    if (event === undefined) {
      console.log(`unanswered ${job.id} ${job.file}`);
    } else if (event.event === "queued") {
      queued += 1;
      console.log(`queued ${job.id} ${job.file}`);
    } else {
      console.log(`rejected ${job.id} ${job.file}: ${event.error}`);
    }
  }
  return queued === jobs.length ? 0 : 1;
}

main().then(
  (status) => { process.exitCode = status; },
  (err) => { console.error(`producer.js: ${err.message}`); process.exitCode = 2; },
);
