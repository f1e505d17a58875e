"""What the tests share: servers on loopback, fixtures and helpers; no test module imports
another test module (tests/unit/test_layout.py holds that rule).

- smtpserver.py: the playbook server (`ScriptedServer` and its steps S, C, DATA, ...);
- dnsserver.py: a DNS server answering from a dict zone;
- statsd_catcher.py: a StatsD listener recording every metric line;
- rawserver.py: raw socket servers playing hostile SMTP behaviours;
- playbook.py: the client side of a playbook (EHLO name, greetings, `open_connection`);
- stack.py: the worker's delivery stack in this process, closed when done;
- fuzz.py: the fuzzers of job frames and server replies (and their campaign, `python -m`);
- mime.py: 8-bit MIME messages for the downgrade tests;
- shaping.py: a shaper on a fake clock, a model of sending against receivers that push
  back, and the throttling sink's constants the other tiers use;
- wait.py: waiting on a condition, with a deadline;
- fixtures.py: the pytest fixtures (servers, certificates, a whole engine), a plugin of
  tests/conftest.py.

The SMTP sink itself and the whole-engine harness live in engine/testing/: the demo and the
benchmarks use them too.
"""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository
