"""Fuzzing what strangers control: the producer's job frames and the SMTP server's replies.

Two fuzzers, both seeded and deterministic, built to run as a long campaign once
(`python -m tests.support.fuzz --count 100000`, results recorded in docs/SECURITY.md) and
as a shorter run in the suite:

- **jobs**: frames for `engine.job.parse_job`, from valid jobs mutated field by field,
  byte by byte, and with addresses built to smuggle commands (CR, LF, NUL, angle
  brackets, bidi controls...). Only `JobRejected` may come out; every job accepted is
  then sent by a real `Connection` over a socketpair to a cooperative server, and the
  client's bytes are parsed strictly: nothing but the expected commands, one terminator,
  the message intact.
- **replies**: byte streams a server might send (wrong codes, endless or overlong lines,
  garbage, NUL, bare CR, truncation), fed to a real `Connection` (banner, EHLO, one
  transaction, QUIT). Only `DeliveryError` may come out of the banner and EHLO; the
  transaction always ends in per-recipient results; and the client never writes a byte
  it should not, and never reports a recipient delivered unless the whole message went
  out.

An input that breaks a rule is printed (repr) with its seed, so it can be replayed. In the
suite: tests/unit/test_fuzz_jobs.py (parse_job under Hypothesis) and
tests/conversation/test_fuzz.py (a few thousand of each, and Hypothesis on top).
"""
from __future__ import annotations

import argparse
import json
import random
import re
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from hypothesis import strategies as st

from engine.config import Timeouts
from engine.job import Job, JobRejected, normalise_message, parse_job
from engine.reply import DeliveryError
from engine.smtp import Connection, RcptResult, ReplyLimits, dot_stuff, send_mail

HELO = "client.test"
MAX_SIZE = 4096
MAX_RCPTS = 8
FUZZ_TIMEOUTS = Timeouts(**{f.name: 1.0 for f in fields(Timeouts)})
FUZZ_LIMITS = ReplyLimits(max_line_length=600, max_reply_lines=12)


class RuleBroken(AssertionError):
    """An input made the engine break one of the rules this module checks."""


# ---------------------------------------------------------------------------------------
# Inputs: jobs


NASTY_CHARS = ["\r", "\n", "\r\n", "\0", "<", ">", " ", "\t", "\x7f", "\x1b", "\u202e",
               "\u2028", "\u0085", "\ud800", "\ufeff", "\u00a0", "\"", "\\", "@", ".", "..",
               "ß", "é", "\U0001f600", "%", ":", "[", "]", ";", ","]
LOCALS = ["a", "bob", "first.last", "x+tag", "\"quoted\"", "\"a b\"", "\"a\\\"b\"", "o'neil",
          "jos\u00e9", "user", "", ".lead", "trail.", "a..b", "\"unclosed", "\"\"",
          "a" * 64, "a" * 65]
DOMAINS = ["example.com", "example.test", "EXAMPLE.ORG", "xn--bcher-kva.example", "bücher.de",
           "[127.0.0.1]", "[IPv6:::1]", "[IPv6:2001:db8::1]", "[1.2.3]", "[::1]",
           "[IPv6:fe80::1%eth0]", "localhost", "192.168.0.1", "a.b", "-bad.com", "a_b.com",
           "x" * 64 + ".com", ("abc." * 64) + "com", "", "example.com.", "ex ample.com"]
INJECTIONS = ["a@b.c>\r\nRCPT TO:<evil@x.y", "a@b.c\r\nDATA\r\n", "a@b.c\nQUIT",
              "a@b.c\rRSET", "a@b.c\0", "a@b.c> SIZE=1", "a@b.c>\r\n.\r\n", "<a@b.c>",
              "a@b.c\u2028RCPT TO:<x@y.z>", "\"a\r\nb\"@example.com", "a@[127.0.0.1\r\n]"]


class JobInputs:
    """Frames for parse_job: mutated valid jobs, mostly; a few plain random bytes."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def __call__(self) -> list[Any]:
        kind = self.rng.random()
        if kind < 0.65:
            return self._structured()
        if kind < 0.9:
            return self._mutated_bytes()
        return self._odd_frames()

    # -- addresses and fields --

    def address(self) -> str:
        r = self.rng
        roll = r.random()
        if roll < 0.75:
            local = r.choice(LOCALS[:10])
            local = local if local.startswith('"') else f"{local}{r.randrange(1000)}"
            return f"{local}@{r.choice(DOMAINS[:4])}"
        if roll < 0.85:
            return r.choice(INJECTIONS)
        local, domain = r.choice(LOCALS), r.choice(DOMAINS)
        text = f"{local}@{domain}"
        for _ in range(r.randrange(3)):
            at = r.randrange(len(text) + 1)
            text = text[:at] + r.choice(NASTY_CHARS) + text[at:]
        return text

    def value(self, depth: int = 0) -> Any:
        r = self.rng
        choices: list[Callable[[], Any]] = [
            lambda: r.randrange(-10**6, 10**6), lambda: r.random() * 1e6, lambda: None,
            lambda: r.choice([True, False]), lambda: self.address(), lambda: "",
            lambda: "x" * r.choice([1, 200, 201, 5000]), lambda: 10**r.randrange(1, 400)]
        if depth < 3:
            choices += [lambda: [self.value(depth + 1) for _ in range(r.randrange(4))],
                        lambda: {self.text(): self.value(depth + 1) for _ in range(r.randrange(3))}]
        return r.choice(choices)()

    def text(self) -> str:
        r = self.rng
        alphabet = NASTY_CHARS + list("abcdefghij0123")
        return "".join(r.choice(alphabet) for _ in range(r.randrange(8)))

    def envelope(self) -> dict[str, Any]:
        r = self.rng
        env: dict[str, Any] = {"id": f"job-{r.randrange(10**6)}",
                               "from": r.choice(["", self.address()]),
                               "to": [self.address() for _ in range(r.randrange(1, 4))]}
        if r.random() < 0.2:
            env["ip"] = r.choice(["192.0.2.1", "2001:DB8::1", "fe80::1%eth0", "1.2.3", 7, ""])
        if r.random() < 0.2:
            env["pool"] = r.choice(["default", "bulk", "", "a b", "x" * 201, None])
        if r.random() < 0.3:
            env["meta"] = self.value() if r.random() < 0.2 else {"k": self.text()}
        if r.random() < 0.2:
            env["expires"] = r.choice([60, 0, -1, 1e308, "60", True, 10**400])
        if r.random() < 0.15:  # one field gets a random value of any type
            env[r.choice(["id", "from", "to", "ip", "pool", "meta", "expires", self.text()])] = \
                self.value()
        return env

    def message(self) -> bytes:
        r = self.rng
        pieces = [b"Subject: x\r\n\r\n", b".", b"..", b"\r\n", b"\n", b"\r", b"\r\n.\r\n",
                  b"\n.\n", b"\r.\r", b"\r\n.\n", b"\n.\r\n", b".\r\n", b"\0", b"\xff\xfe",
                  b"hello", b"\x00.", b"\r\r\n", b"\n\r", b" "]
        body = b"".join(r.choice(pieces) for _ in range(r.randrange(0, 40)))
        if r.random() < 0.05:
            body += b"y" * (MAX_SIZE + r.randrange(-5, 5))
        if r.random() < 0.95:
            body = body.replace(b"\0", b"")
        return body

    # -- the three shapes --

    def _structured(self) -> list[Any]:
        return [json.dumps(self.envelope(), ensure_ascii=self.rng.random() < 0.5).encode(
            "utf-8", "surrogatepass"), self.message()]

    def _mutated_bytes(self) -> list[Any]:
        r = self.rng
        raw = bytearray(json.dumps(self.envelope()).encode("utf-8", "surrogatepass"))
        for _ in range(r.randrange(1, 6)):
            op = r.random()
            at = r.randrange(len(raw) + 1)
            if op < 0.3 and raw:
                raw[min(at, len(raw) - 1)] = r.randrange(256)
            elif op < 0.6:
                raw[at:at] = r.choice([b"\\r\\n", b"\\u0000", b"\\ud800", b"\r\n", b"\0", b",",
                                       b"\"", b"{", b"[", b"NaN", b"1e999", b"\xc3", b"\xff",
                                       b"\"to\":[]", b"\"id\":\"x\","])
            else:
                del raw[at:at + r.randrange(1, 8)]
        return [bytes(raw), self.message()]

    def _odd_frames(self) -> list[Any]:
        r = self.rng
        frames: list[Any] = [bytes(r.randrange(256) for _ in range(r.randrange(40)))
                             for _ in range(r.randrange(0, 4))]
        if frames and r.random() < 0.3:
            frames[0] = r.choice(["text", 7, None, bytearray(b"{}"), memoryview(b"{}")])
        if r.random() < 0.3:
            frames = [b"[" * 100000 + b"]" * 100000, b"x"]  # nested too deep
        return frames


def check_job(frames: list[Any]) -> Job | None:
    """parse_job may only accept or raise JobRejected; an accepted job must be wire-safe."""
    try:
        job = parse_job(frames, MAX_SIZE, MAX_RCPTS)
    except JobRejected as rejection:
        if not rejection.reason or not isinstance(rejection.reason, str):
            raise RuleBroken(f"rejection without a reason: {rejection!r}") from None
        return None
    for address in (job.sender, *job.rcpts):
        if any(ch in "<>\x7f" or ch < " " or ch in "\x85\u2028\u2029" for ch in address):
            raise RuleBroken(f"accepted an address that could inject: {address!r}")
    message = job.message
    if b"\0" in message or not message.endswith(b"\r\n"):
        raise RuleBroken("accepted message has a NUL or no final CRLF")
    if message.replace(b"\r\n", b"").count(b"\r") or message.replace(b"\r\n", b"").count(b"\n"):
        raise RuleBroken("accepted message has a bare CR or LF")
    if normalise_message(message) != message:
        raise RuleBroken("normalising the accepted message changes it")
    check_data_encoding(message)
    return job


def check_data_encoding(message: bytes) -> None:
    """What DATA puts on the wire: one terminator, at the end; un-stuffing gives the message."""
    wire = dot_stuff(message) + b".\r\n"
    seen = (b"\r\n" + wire).count(b"\r\n.\r\n")  # the body starts at a line start
    if seen != 1 or not wire.endswith(b"\r\n.\r\n"):
        raise RuleBroken(f"DATA encoding has {seen} terminators")
    lines = wire[:-3].split(b"\r\n")
    unstuffed = b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)
    if unstuffed != message:
        raise RuleBroken("un-stuffing the DATA encoding does not give the message back")


# Message bodies of line-ending and dot tricks (and any bytes) for Hypothesis; SMUGGLER, a
# body built to smuggle a second message in after a forged end of data.
LINE_BITS = st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b".", b"..", b"x", b" ",
                                      b"\r\n.\r\n", b"\n.\n", b"\r.\r", b"MAIL FROM:<a@b.c>",
                                      b"\xff"]), max_size=60).map(b"".join)
BODIES = st.one_of(LINE_BITS, st.binary(max_size=2000)).filter(lambda b: b and b"\0" not in b)

SMUGGLER = (b"Subject: one message\n\n"
            b"first\n.\nMAIL FROM:<evil@example.test>\nRCPT TO:<victim@example.test>\nDATA\n"
            b"\r.\rsecond\r\n.\r\nthird\r\n.\nfourth\n.\r\n..\r\n.\r\r\n. \r\nend")


# ---------------------------------------------------------------------------------------
# Inputs: server replies


CODES = [220, 221, 250, 251, 252, 334, 354, 421, 450, 451, 452, 500, 501, 502, 503, 504, 530,
         550, 552, 553, 554, 555]
EXTENSIONS = ["PIPELINING", "CHUNKING", "SIZE 1000000", "SIZE", "SIZE abc", "8BITMIME",
              "SMTPUTF8", "STARTTLS", "AUTH PLAIN LOGIN", "AUTH=LOGIN", "ENHANCEDSTATUSCODES",
              "DSN", "X-\r", "-bad", "", "\0", "PIPELINING\x00CHUNKING"]


class ReplyInputs:
    """Byte streams a server might send, in the order the client reads replies."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def __call__(self, rcpts: int = 1) -> bytes:
        r = self.rng
        if r.random() < 0.4:
            units = self.conversation(rcpts)
            at = r.randrange(len(units))  # one reply goes wrong
            units[at] = r.choice([self.reply(None), self.line(None, False), b"",
                                  units[at][:r.randrange(len(units[at]) + 1)]])
        else:
            units = [self.reply(220), self.ehlo()]
            units += [self.reply(r.choice([250, 250, 250, 354, None]))
                      for _ in range(r.randrange(1, 8))]
        stream = b"".join(units)
        if r.random() < 0.15:  # cut anywhere
            stream = stream[:r.randrange(len(stream) + 1)]
        if r.random() < 0.1:
            at = r.randrange(len(stream) + 1)
            stream = stream[:at] + bytes(r.randrange(256) for _ in range(r.randrange(1, 30))) \
                + stream[at:]
        return stream[:60000]  # fits a socketpair's buffers

    def conversation(self, rcpts: int) -> list[bytes]:
        """The replies of a server that accepts the message, in the order they are read."""
        r = self.rng
        exts = r.choice([[], ["PIPELINING"], ["PIPELINING", "CHUNKING"], ["CHUNKING"],
                         ["PIPELINING", "SIZE 100000", "8BITMIME"]])
        ehlo = [b"250-mx.fuzz\r\n", *(b"250-%s\r\n" % e.encode() for e in exts)]
        ehlo[-1] = b"250 " + ehlo[-1][4:]
        units = [b"220 mx ESMTP\r\n", b"".join(ehlo), b"250 2.1.0 ok\r\n"]
        units += [r.choice([b"250 2.1.5 ok\r\n", b"550 5.1.1 no\r\n", b"251 ok\r\n"])
                  for _ in range(rcpts)]
        if "CHUNKING" not in exts:
            units.append(b"354 go ahead\r\n")
        units += [b"250 2.0.0 queued\r\n", b"250 2.0.0 reset\r\n", b"221 2.0.0 bye\r\n"]
        return units

    def text(self) -> bytes:
        r = self.rng
        roll = r.random()
        if roll < 0.6:
            return r.choice([b"ok", b"2.0.0 ok", b"4.7.0 slow down", b"5.1.1 no", b"", b" ",
                             b"5.9.999 x", b"\xff\xfe", b"2.0.0"])
        if roll < 0.8:
            return bytes(r.randrange(256) for _ in range(r.randrange(40))).replace(b"\n", b"")
        return b"x" * r.choice([590, 600, 601, 5000])

    def line(self, code: int | None, more: bool) -> bytes:
        r = self.rng
        head = (b"%03d" % code) if code is not None else r.choice(
            [b"000", b"999", b"2", b"25", b"abc", b"-250", b" 250", b"2500", b"199", b"600",
             b"%d" % r.choice(CODES)])
        sep = b"-" if more else r.choice([b" ", b" ", b" ", b"", b"\t", b"x", b"-"])
        end = r.choice([b"\r\n", b"\r\n", b"\r\n", b"\n", b"\r", b""])
        return head + sep + self.text() + end

    def reply(self, code: int | None) -> bytes:
        r = self.rng
        if code is not None and r.random() < 0.85:  # well formed, most of the time
            text = r.choice([b"ok", b"2.0.0 ok", b"", b"4.7.0 slow", b"5.1.1 no"])
            more = b"".join(b"%d-line\r\n" % code for _ in range(r.choice([0, 0, 0, 2])))
            return more + b"%d %s\r\n" % (code, text)
        if code is None or r.random() < 0.2:
            code = r.choice(CODES) if r.random() < 0.9 else None
        extra = r.choice([0, 0, 0, 1, 3, 20])  # 20 lines: over the fuzz cap of 12
        return b"".join(self.line(code, True) for _ in range(extra)) + self.line(code, False)

    def ehlo(self) -> bytes:
        r = self.rng
        if r.random() < 0.1:
            return self.reply(None)
        clean = EXTENSIONS[:6] if r.random() < 0.7 else EXTENSIONS
        exts = r.sample(clean, r.randrange(len(clean)))
        lines = [b"mx.fuzz", *(e.encode("latin-1") for e in exts)]
        return b"".join(b"250-" + ln + b"\r\n" for ln in lines[:-1]) + b"250 " + lines[-1] + b"\r\n"


# ---------------------------------------------------------------------------------------
# One client session over a socketpair, and the strict reading of what the client wrote


@dataclass
class Session:
    banner_or_ehlo_error: DeliveryError | None = None
    results: list[RcptResult] = field(default_factory=list)
    wrote: bytes = b""


def run_session(server: bytes, sender: str, rcpts: Sequence[str], message: bytes,
                smtputf8: bool = False, eightbit: bool = False) -> Session:
    """Banner, EHLO, one transaction and QUIT against `server` (pre-recorded bytes, then EOF)."""
    ours, theirs = socket.socketpair()
    session = Session()
    try:
        theirs.sendall(server)
        theirs.shutdown(socket.SHUT_WR)
        conn = Connection(HELO, "127.0.0.1", FUZZ_TIMEOUTS, FUZZ_LIMITS)
        conn.sock = ours
        try:
            with conn.phase("BANNER", FUZZ_TIMEOUTS.banner):
                banner = conn.reply()
            if banner.ok and conn.hello().ok:
                session.results = send_mail(conn, sender, rcpts, message, smtputf8, eightbit)
        except DeliveryError as err:
            session.banner_or_ehlo_error = err
        conn.quit_quietly()
        ours.close()
        session.wrote = _read_all(theirs)
    finally:
        ours.close()
        theirs.close()
    return session


def _read_all(sock: socket.socket) -> bytes:
    sock.settimeout(2.0)
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


_BDAT = re.compile(rb"BDAT (\d+) LAST")


def check_client_bytes(wrote: bytes, sender: str, rcpts: Sequence[str], message: bytes,
                       smtputf8: bool, eightbit: bool) -> bool:
    """Every line the client wrote is one it may write; returns whether the whole message
    went out (as a BDAT chunk or a terminated DATA body). Raises RuleBroken otherwise."""
    mail = b"MAIL FROM:<" + sender.encode() + b">"
    params = {b"SIZE=%d" % len(message), b"BODY=8BITMIME" if eightbit else b"",
              b"SMTPUTF8" if smtputf8 else b""} - {b""}
    rcpt_lines = {b"RCPT TO:<" + r.encode() + b">" for r in rcpts}
    fixed = {b"EHLO " + HELO.encode(), b"HELO " + HELO.encode(), b"RSET", b"QUIT", b"DATA",
             b"."}
    body = dot_stuff(message) + b".\r\n"
    sent_message = False
    rest = wrote
    while rest:
        if rest.startswith(body) and sent_message is False and _after_data(wrote, rest):
            rest, sent_message = rest[len(body):], True
            continue
        line, crlf, rest = rest.partition(b"\r\n")
        if not crlf:
            raise RuleBroken(f"client wrote an unterminated line {line[:80]!r}")
        if b"\r" in line or b"\n" in line or b"\0" in line:
            raise RuleBroken(f"client line with CR, LF or NUL: {line[:80]!r}")
        bdat = _BDAT.fullmatch(line)
        if bdat is not None:
            size = int(bdat.group(1))
            if size != len(message) or rest[:size] != message:
                raise RuleBroken(f"BDAT {size} does not carry the message ({len(message)} bytes)")
            rest, sent_message = rest[size:], True
        elif line.startswith(b"MAIL FROM:"):
            head, *extra = line[len(mail):].split(b" ") if line.startswith(mail) else (b"x",)
            if head != b"" or not set(extra) <= params or len(set(extra)) != len(extra):
                raise RuleBroken(f"unexpected MAIL command {line[:120]!r}")
        elif _verb_upper(line) not in fixed and line not in rcpt_lines:
            raise RuleBroken(f"client wrote an unexpected line {line[:120]!r}")
    return sent_message


def _verb_upper(line: bytes) -> bytes:
    """smtplib sends "ehlo name": verbs are case-insensitive, the argument is not."""
    verb, space, argument = line.partition(b" ")
    return verb.upper() + space + argument


def _after_data(wrote: bytes, rest: bytes) -> bool:
    """`rest` starts right after a DATA command line."""
    return wrote[:len(wrote) - len(rest)].endswith(b"DATA\r\n")


def check_session(session: Session, sender: str, rcpts: Sequence[str], message: bytes,
                  smtputf8: bool = False, eightbit: bool = False) -> None:
    sent = check_client_bytes(session.wrote, sender, rcpts, message, smtputf8, eightbit)
    if session.results and [r.rcpt for r in session.results] != list(rcpts):
        raise RuleBroken("results do not match the recipients one to one")
    delivered = [r for r in session.results if r.reply.ok]
    if delivered and not sent:
        raise RuleBroken(f"{delivered[0].rcpt} reported delivered ({delivered[0].reply}) "
                         "but the message never went out whole")
    if delivered and any(r.reply.code // 100 != 2 for r in delivered):
        raise RuleBroken(f"a recipient counted delivered on a non-2xx reply: {delivered[0].reply}")


# ---------------------------------------------------------------------------------------
# The two campaigns


@dataclass
class Tally:
    inputs: int = 0
    accepted: int = 0  # jobs: parsed; replies: at least one recipient delivered
    rejected: int = 0  # jobs: JobRejected; replies: refused at banner or EHLO
    sessions: int = 0  # client sessions run and checked byte by byte
    failures: list[str] = field(default_factory=list)


def fuzz_jobs(count: int, seed: int) -> Tally:
    rng = random.Random(seed)
    make, tally = JobInputs(rng), Tally()
    server = b"220 mx\r\n250-mx\r\n250-SIZE 1000000\r\n250-8BITMIME\r\n250 SMTPUTF8\r\n"
    for _ in range(count):
        frames = make()
        tally.inputs += 1
        try:
            job = check_job(frames)
            if job is None:
                tally.rejected += 1
                continue
            tally.accepted += 1
            replies = server + b"250 ok\r\n" * (len(job.rcpts) + 1) + b"354 go\r\n250 ok\r\n"
            if rng.random() < 0.5:  # BDAT: no 354
                replies = replies.replace(b"250 SMTPUTF8", b"250-SMTPUTF8\r\n250-PIPELINING\r\n"
                                                           b"250 CHUNKING")
                replies = replies.replace(b"354 go\r\n", b"")
            session = run_session(replies, job.sender, job.rcpts, job.message, job.smtputf8,
                                  job.eightbit)
            check_session(session, job.sender, job.rcpts, job.message, job.smtputf8,
                          job.eightbit)
            tally.sessions += 1
        except Exception as exc:  # a crash or a broken rule: record the input, go on
            tally.failures.append(f"{type(exc).__name__}: {exc} <- {frames!r:.300}")
    return tally


def fuzz_replies(count: int, seed: int) -> Tally:
    rng = random.Random(seed)
    make, tally = ReplyInputs(rng), Tally()
    message = b"Subject: x\r\n\r\n.leading dot\r\n.\r\nend\r\n"
    for _ in range(count):
        rcpts = [f"r{i}@example.test" for i in range(rng.randrange(1, 4))]
        stream = make(len(rcpts))
        eightbit = rng.random() < 0.3
        tally.inputs += 1
        try:
            session = run_session(stream, "s@example.test", rcpts, message, eightbit=eightbit)
            check_session(session, "s@example.test", rcpts, message, eightbit=eightbit)
            tally.sessions += 1
            if session.banner_or_ehlo_error is not None:
                tally.rejected += 1
            elif any(r.reply.ok for r in session.results):
                tally.accepted += 1
        except Exception as exc:
            tally.failures.append(f"{type(exc).__name__}: {exc} <- {stream!r:.300}")
    return tally


# ---------------------------------------------------------------------------------------
# As a script: the long campaign


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.support.fuzz", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=100_000, help="inputs per fuzzer")
    parser.add_argument("--seed", type=int, default=20261128)
    args = parser.parse_args(argv)
    report: dict[str, Any] = {"count": args.count, "seed": args.seed,
                              "python": sys.version.split()[0]}
    failed = 0
    for name, run in (("jobs", fuzz_jobs), ("replies", fuzz_replies)):
        started = time.monotonic()
        tally = run(args.count, args.seed)
        seconds = time.monotonic() - started
        report[name] = {"inputs": tally.inputs, "accepted": tally.accepted,
                        "rejected": tally.rejected, "sessions_checked": tally.sessions,
                        "failures": len(tally.failures), "seconds": round(seconds, 1)}
        for failure in tally.failures[:20]:
            print(f"{name}: {failure}", file=sys.stderr)
        failed += len(tally.failures)
    print(json.dumps(report, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
