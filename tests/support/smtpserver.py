"""Real SMTP servers on loopback for the conversation tests, the integration tests and the demo.

Both servers listen on 127.0.0.1 on an ephemeral port (``server.port``), start when constructed,
serve from background threads of the calling process, and stop cleanly with ``stop()`` or at the
end of a ``with`` block. Neither uses gevent: a test process stays unpatched.

:class:`ScriptedServer` plays a *playbook*, in the style of Haraka's tests: one script per
accepted connection, a list of steps saying what the server sends (:class:`S`), what the client
must send (:class:`C`), and what happens on the wire (:class:`TLS`, :class:`DATA`, :class:`BDAT`,
:class:`CLOSE`, ...). It records each conversation, and a client line that does not match the
script is answered ``500 5.5.2 script mismatch: ...`` and recorded in ``server.errors``.

:class:`SinkServer` is a recording sink built on aiosmtpd: STARTTLS with the test certificate,
PIPELINING and CHUNKING (BDAT), per-recipient replies by local part (``reject...`` gets 550,
``defer...`` gets 451), and accounting of connections, concurrency, peers and TLS.

Either also runs as a process of its own, printing its port as the first line of stdout, serving
until SIGTERM, then writing a JSON report::

    python -m tests.support.smtpserver sink [--tls] [--port 0] [--report FILE]
    python -m tests.support.smtpserver scripted --script SCRIPT.json [--report FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import signal
import socket
import ssl
import struct
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from types import FrameType, TracebackType
from typing import Any, Literal, NoReturn, Self, cast

from engine.testing.sink import (
    SinkMessage,
    SinkServer,
    _body_summary,
    _start_thread,
    _text,
    server_tls_context,
)

__all__ = [
    "BDAT",
    "CLOSE",
    "DATA",
    "INJECT",
    "SLEEP",
    "TLS",
    "WAIT_CLOSE",
    "C",
    "S",
    "ScriptedServer",
    "SinkMessage",
    "SinkServer",
    "Step",
    "main",
    "server_tls_context",
    "steps_from_json",
]

LOOPBACK = "127.0.0.1"
_POLL = 0.05  # seconds between checks of a stop request while blocked
_MAX_LINE = 1 << 20

# --------------------------------------------------------------------------------------------
# Playbook steps


class Step:
    """One move of a playbook: something the server says, expects from the client, or does."""

    ends_conversation = False

    def play(self, talk: _Conversation) -> None:
        raise NotImplementedError


class S(Step):
    """The server sends these reply lines, in one write: ``S("250-mx", "250 PIPELINING")``."""

    def __init__(self, *lines: str) -> None:
        if not lines:
            raise ValueError("S() needs at least one line")
        self.lines = lines

    def play(self, talk: _Conversation) -> None:
        talk.say(self.lines)

    def __repr__(self) -> str:
        return f"S({', '.join(map(repr, self.lines))})"


class C(Step):
    """The client must send one line matching ``pattern``.

    ``*`` matches any run of characters and ``?`` any one character; everything else is literal
    (``EHLO [127.0.0.1]`` means itself). Matching ignores case unless ``case=True``: SMTP verbs,
    keywords and parameters are case-insensitive, and smtplib sends ``mail FROM:`` in lower case.
    Lines are read from a buffer, so pipelined commands are consumed one step at a time.
    """

    def __init__(self, pattern: str, *, case: bool = False) -> None:
        self.pattern = pattern
        flags = re.DOTALL | (0 if case else re.IGNORECASE)
        wildcards = {"*": ".*", "?": "."}
        self._regex = re.compile(
            "".join(wildcards.get(char, re.escape(char)) for char in pattern), flags
        )

    def matches(self, line: str) -> bool:
        return self._regex.fullmatch(line) is not None

    def play(self, talk: _Conversation) -> None:
        line = talk.hear()
        if not self.matches(line):
            raise _Mismatch(self.pattern, line)

    def __repr__(self) -> str:
        return f"C({self.pattern!r})"


class TLS(Step):
    """Server side of the TLS handshake after STARTTLS, with the test certificate by default.

    Nothing is read from the socket before wrapping it, so a ClientHello the client already
    sent reaches the handshake intact. Bytes the client pipelined after STARTTLS (which a client
    must not do) are discarded, as real servers do, and reported in ``server.errors``.
    """

    def __init__(self, context: ssl.SSLContext | None = None) -> None:
        self.context = context

    def play(self, talk: _Conversation) -> None:
        talk.start_tls(self.context)

    def __repr__(self) -> str:
        return "TLS()"


class DATA(Step):
    """Read a message body up to the lone ``.`` line, undo dot-stuffing, record it."""

    def play(self, talk: _Conversation) -> None:
        talk.read_data()

    def __repr__(self) -> str:
        return "DATA()"


class BDAT(Step):
    """Read one ``BDAT <size> [LAST]`` command and its chunk; a LAST chunk completes a message.

    ``last=True`` or ``last=False`` also requires the command to be (or not be) the last chunk.
    The step does not reply: follow it with ``S(...)``.
    """

    _COMMAND = re.compile(r"BDAT +(\d+)( +LAST)? *", re.IGNORECASE)

    def __init__(self, last: bool | None = None) -> None:
        self.last = last

    def play(self, talk: _Conversation) -> None:
        line = talk.hear()
        command = self._COMMAND.fullmatch(line)
        if command is None or self.last not in (None, command[2] is not None):
            raise _Mismatch(self._expected(), line)
        talk.read_chunk(int(command[1]), last=command[2] is not None)

    def _expected(self) -> str:
        return {None: "BDAT <size> [LAST]", True: "BDAT <size> LAST"}.get(
            self.last, "BDAT <size>"
        )

    def __repr__(self) -> str:
        return "BDAT()" if self.last is None else f"BDAT(last={self.last})"


class CLOSE(Step):
    """The server closes the connection (``reset=True``: abortively, with a TCP RST)."""

    ends_conversation = True

    def __init__(self, reset: bool = False) -> None:
        self.reset = reset

    def play(self, talk: _Conversation) -> None:
        talk.close(reset=self.reset)

    def __repr__(self) -> str:
        return "CLOSE(reset=True)" if self.reset else "CLOSE()"


class WAIT_CLOSE(Step):
    """Keep the connection open until the client hangs up; lines it sends meanwhile are recorded."""

    ends_conversation = True

    def play(self, talk: _Conversation) -> None:
        talk.wait_for_client_close()

    def __repr__(self) -> str:
        return "WAIT_CLOSE()"


class SLEEP(Step):
    """Pause before the next step (cut short when the server stops)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def play(self, talk: _Conversation) -> None:
        talk.sleep(self.seconds)

    def __repr__(self) -> str:
        return f"SLEEP({self.seconds})"


class INJECT(Step):
    """Send raw bytes at once, exactly as given (``str`` is encoded as Latin-1)."""

    def __init__(self, data: bytes | str) -> None:
        self.data = data.encode("latin-1") if isinstance(data, str) else data

    def play(self, talk: _Conversation) -> None:
        talk.inject(self.data)

    def __repr__(self) -> str:
        return f"INJECT({self.data!r})"


_STEPS: dict[str, type[Step]] = {
    step.__name__: step for step in (S, C, TLS, DATA, BDAT, CLOSE, WAIT_CLOSE, SLEEP, INJECT)
}


def steps_from_json(script: Sequence[Sequence[Any]]) -> list[Step]:
    """Build a script from JSON-friendly lists: ``[["S", "220 mx"], ["C", "EHLO *"], ["TLS"]]``."""
    steps = []
    for name, *args in script:
        if name not in _STEPS:
            raise ValueError(f"unknown playbook step {name!r}; known: {', '.join(_STEPS)}")
        steps.append(_STEPS[name](*args))
    return steps


class _Mismatch(Exception):
    def __init__(self, expected: str, got: str) -> None:
        super().__init__(f"expected {expected!r}, got {got!r}")


class _Abort(Exception):
    """The conversation cannot go on (timeout, TLS failure, server stopping...)."""


class _PeerClosed(_Abort):
    pass


# --------------------------------------------------------------------------------------------
# The scripted server


class ScriptedServer:
    """Plays one script per accepted connection and records what was said.

    ``scripts`` is a list of scripts (lists of steps), used in the order connections arrive; a
    single flat list of steps is one script. Connections beyond the list get the last script
    again (``extra="repeat_last"``) or, by default, ``421`` and a recorded error
    (``extra="refuse"``). When a script runs out without :class:`CLOSE` or
    :class:`WAIT_CLOSE`, the server closes the connection.

    Every read waits at most ``timeout`` seconds; running out of time is a recorded error.
    ``host`` and ``port`` choose where to listen: two servers on one port number at different
    loopback addresses (127.0.0.10, 127.0.0.11) play two MX hosts behind one ``smtp.port``.
    """

    def __init__(
        self,
        scripts: Sequence[Sequence[Step]] | Sequence[Step],
        *,
        extra: Literal["refuse", "repeat_last"] = "refuse",
        tls_context: ssl.SSLContext | None = None,
        timeout: float = 10.0,
        host: str = LOOPBACK,
        port: int = 0,
    ) -> None:
        self._scripts = _check_scripts(scripts)
        if extra not in ("refuse", "repeat_last"):
            raise ValueError(f"extra must be 'refuse' or 'repeat_last', not {extra!r}")
        self._extra = extra
        self._tls_context = tls_context
        self.timeout = timeout
        self._state = threading.Condition()
        self._transcripts: list[list[tuple[str, str]]] = []
        self._messages: list[bytes] = []
        self._errors: list[str] = []
        self._finished = 0
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._listener = socket.create_server((host, port))  # port 0: an ephemeral one
        self._listener.settimeout(_POLL)
        self.host, self.port = self._listener.getsockname()[:2]
        self._acceptor = _start_thread(self._accept_loop, f"scripted-accept-{self.port}")

    # -- results (thread-safe copies) --

    @property
    def connections(self) -> int:
        """How many connections were accepted."""
        with self._state:
            return len(self._transcripts)

    @property
    def messages(self) -> list[bytes]:
        """Message bodies received with DATA (dot-stuffing undone) or BDAT, in arrival order."""
        with self._state:
            return list(self._messages)

    @property
    def errors(self) -> list[str]:
        """Script mismatches and other failures, each naming the connection and the step."""
        with self._state:
            return list(self._errors)

    def transcript(self, conn_index: int = 0) -> list[tuple[str, str]]:
        """The conversation of one connection as ``(who, line)`` pairs, in order.

        ``who`` is ``"C"`` (client line), ``"S"`` (server line) or ``"*"`` for an event:
        ``TLS TLSv1.3``, ``DATA 123 bytes``, ``BDAT 10 bytes``, ``closed by server``,
        ``closed by client``.
        """
        with self._state:
            return list(self._transcripts[conn_index])

    def client_lines(self, conn_index: int = 0) -> list[str]:
        """Only what the client sent on one connection."""
        return [line for who, line in self.transcript(conn_index) if who == "C"]

    def pending(self) -> bool:
        """Whether a connection waits in the listen queue, made but not accepted (nor counted
        in `connections`) yet: a test that expects no connection checks both."""
        return bool(select.select([self._listener], [], [], 0)[0])

    def wait_finished(self, count: int = 1, timeout: float = 5.0) -> None:
        """Block until ``count`` conversations have ended (their scripts played out)."""
        with self._state:
            if not self._state.wait_for(lambda: self._finished >= count, timeout):
                raise TimeoutError(
                    f"{self._finished} of {count} conversations finished in {timeout}s; "
                    f"errors: {self._errors}"
                )

    # -- lifecycle --

    def stop(self) -> None:
        """Stop accepting, cut running conversations short, and join every thread."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        self._acceptor.join()
        self._listener.close()
        for thread in self._threads:
            thread.join(self.timeout + 1)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def summary(self, content: bool = False) -> dict[str, Any]:
        """Everything recorded, as JSON-ready data (bodies base64-encoded if ``content``)."""
        with self._state:
            return {
                "server": "scripted",
                "port": self.port,
                "connections": len(self._transcripts),
                "transcripts": [[list(pair) for pair in talk] for talk in self._transcripts],
                "messages": [_body_summary(body, content) for body in self._messages],
                "errors": list(self._errors),
            }

    # -- inside the server threads --

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                sock, _peer = self._listener.accept()
            except TimeoutError:
                continue
            index, script = self._next_script()
            talk = _Conversation(self, index, sock, script)
            self._threads.append(_start_thread(talk.run, f"scripted-{self.port}-{index}"))

    def _next_script(self) -> tuple[int, Sequence[Step]]:
        with self._state:
            index = len(self._transcripts)
            self._transcripts.append([])
        if index < len(self._scripts):
            return index, self._scripts[index]
        if self._extra == "repeat_last":
            return index, self._scripts[-1]
        self._record_error(f"conn {index}: unexpected connection, no script left")
        return index, [S("421 4.3.2 no script for this connection"), CLOSE()]

    def _record(self, index: int, who: str, line: str) -> None:
        with self._state:
            self._transcripts[index].append((who, line))

    def _record_message(self, body: bytes) -> None:
        with self._state:
            self._messages.append(body)

    def _record_error(self, error: str) -> None:
        with self._state:
            self._errors.append(error)

    def _conversation_ended(self) -> None:
        with self._state:
            self._finished += 1
            self._state.notify_all()


def _check_scripts(
    given: Sequence[Sequence[Step]] | Sequence[Step],
) -> list[Sequence[Step]]:
    if given and all(isinstance(step, Step) for step in given):
        scripts = [cast(Sequence[Step], given)]
    else:
        scripts = list(cast(Sequence[Sequence[Step]], given))
    if not scripts:
        raise ValueError("ScriptedServer needs at least one script")
    for number, script in enumerate(scripts):
        for position, step in enumerate(script, 1):
            if not isinstance(step, Step):
                raise TypeError(f"script {number}: {step!r} is not a playbook step")
            if step.ends_conversation and position < len(script):
                raise ValueError(f"script {number}: {step!r} must be the last step")
    return scripts


class _Conversation:
    """One accepted connection playing one script, in its own thread."""

    def __init__(
        self, server: ScriptedServer, index: int, sock: socket.socket, script: Sequence[Step]
    ) -> None:
        self.server = server
        self.index = index
        self.sock: socket.socket = sock
        self.script = script
        self.buffer = bytearray()
        self.chunks: list[bytes] = []
        self.closed = False  # by either side
        sock.settimeout(server.timeout)

    def run(self) -> None:
        number, step = 0, None
        try:
            for number, step in enumerate(self.script):  # noqa: B007 -- reported on failure
                step.play(self)
        except _Mismatch as mismatch:
            self._failed(number, step, f"script mismatch: {mismatch}")
            self._try(self.say, [f"500 5.5.2 script mismatch: {mismatch}"])
        except _Abort as abort:
            if not self.server._stopping.is_set():
                self._failed(number, step, str(abort))
        except Exception as error:  # a thread's last resort: report, never die silently
            self._failed(number, step, f"{type(error).__name__}: {error}")
        finally:
            self._try(self.close)
            self.server._conversation_ended()

    # -- what steps do --

    def say(self, lines: Iterable[str]) -> None:
        lines = list(lines)
        for line in lines:
            self.server._record(self.index, "S", line)
        self._send("".join(f"{line}\r\n" for line in lines).encode("utf-8"))

    def inject(self, data: bytes) -> None:
        self.server._record(self.index, "S", data.decode("latin-1"))
        self._send(data)

    def hear(self) -> str:
        """Read one client line (from the buffer first), record it, return it without CRLF."""
        line = _text(self._read_line())
        self.server._record(self.index, "C", line)
        return line

    def read_data(self) -> None:
        body = bytearray()
        while (line := self._read_line()).rstrip(b"\r\n") != b".":
            body += line[1:] if line.startswith(b".") else line
        self._event(f"DATA {len(body)} bytes")
        self.server._record_message(bytes(body))

    def read_chunk(self, size: int, last: bool) -> None:
        while len(self.buffer) < size:
            self._fill()
        self.chunks.append(bytes(self.buffer[:size]))
        del self.buffer[:size]
        self._event(f"BDAT {size} bytes")
        if last:
            self.server._record_message(b"".join(self.chunks))
            self.chunks.clear()

    def start_tls(self, context: ssl.SSLContext | None) -> None:
        if self.buffer:
            self.server._record_error(
                f"conn {self.index}: client sent {len(self.buffer)} bytes after STARTTLS "
                "before the TLS handshake (discarded)"
            )
            self.buffer.clear()
        context = context or self.server._tls_context or server_tls_context()
        self.sock.settimeout(self.server.timeout)
        try:
            self.sock = context.wrap_socket(self.sock, server_side=True)
        except (ssl.SSLError, OSError) as error:
            raise _Abort(f"TLS handshake failed: {error}") from error
        assert isinstance(self.sock, ssl.SSLSocket)
        self._event(f"TLS {self.sock.version()}")

    def wait_for_client_close(self) -> None:
        try:
            while True:
                self.hear()
        except _PeerClosed:
            pass

    def sleep(self, seconds: float) -> None:
        if self.server._stopping.wait(seconds):
            raise _Abort("server stopping")

    def close(self, reset: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        if reset:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        else:
            self._try(self.sock.shutdown, socket.SHUT_WR)
        self.sock.close()
        self._event("closed by server (reset)" if reset else "closed by server")

    # -- the socket --

    def _send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as error:
            raise _Abort(f"send failed: {error}") from error

    def _read_line(self) -> bytes:
        while (end := self.buffer.find(b"\n")) < 0:
            if len(self.buffer) > _MAX_LINE:
                raise _Abort(f"client line longer than {_MAX_LINE} bytes")
            self._fill()
        line = bytes(self.buffer[: end + 1])
        del self.buffer[: end + 1]
        return line

    def _fill(self) -> None:
        """Wait for client bytes (or EOF), checking for a stop request every ``_POLL`` s."""
        deadline = time.monotonic() + self.server.timeout
        while not self._readable():
            if self.server._stopping.is_set():
                raise _Abort("server stopping")
            if time.monotonic() > deadline:
                raise _Abort(f"timeout: client silent for {self.server.timeout}s")
        try:
            data = self.sock.recv(65536)
        except OSError as error:
            self._peer_gone(f"connection lost: {error}")
        if not data:
            self._peer_gone("closed by client")
        self.buffer += data

    def _peer_gone(self, why: str) -> NoReturn:
        if self.buffer:  # an unfinished last line
            self.server._record(self.index, "C", _text(bytes(self.buffer)))
        self._event(why)
        self.closed = True
        self.sock.close()
        raise _PeerClosed(why)

    def _readable(self) -> bool:
        if isinstance(self.sock, ssl.SSLSocket) and self.sock.pending():
            return True
        return bool(select.select([self.sock], [], [], _POLL)[0])

    def _event(self, what: str) -> None:
        self.server._record(self.index, "*", what)

    def _failed(self, number: int, step: Step | None, reason: str) -> None:
        self.server._record_error(f"conn {self.index} step {number} {step!r}: {reason}")

    @staticmethod
    def _try(action: Any, *args: Any) -> None:
        try:
            action(*args)
        except (OSError, _Abort):
            pass


# --------------------------------------------------------------------------------------------
# As a process


def main(argv: Sequence[str] | None = None) -> int:
    """Serve until SIGTERM or SIGINT; print the port first; write the JSON report at the end."""
    args = _arguments().parse_args(argv)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)
    server = _server_from(args)
    try:
        print(server.port, flush=True)
        while not stop.wait(0.2):
            pass
    finally:
        server.stop()
        if args.report:
            _write_json(args.report, server.summary(content=args.report_content))
    return 0


def _arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tests.support.smtpserver", description="SMTP test servers on loopback"
    )
    parser.add_argument("--host", default=LOOPBACK)
    parser.add_argument("--report", metavar="FILE", help="write a JSON summary here on exit")
    parser.add_argument("--report-content", action="store_true", help="include bodies (base64)")
    kinds = parser.add_subparsers(dest="kind", required=True)
    sink = kinds.add_parser("sink", help="recording sink (aiosmtpd)")
    sink.add_argument("--port", type=int, default=0, help="0 (default): an ephemeral port")
    sink.add_argument("--tls", action="store_true", help="offer STARTTLS")
    sink.add_argument("--require-tls", action="store_true", help="refuse mail before STARTTLS")
    sink.add_argument("--certfile", help="server certificate (default: an untrusted localhost one)")
    sink.add_argument("--keyfile")
    sink.add_argument("--no-pipelining", action="store_true")
    sink.add_argument("--no-chunking", action="store_true")
    sink.add_argument("--idle-timeout", type=float, default=300.0)
    scripted = kinds.add_parser("scripted", help="playbook server; steps as JSON lists")
    scripted.add_argument(
        "--script", required=True, help='JSON: [[["S", "220 mx"], ["C", "EHLO *"], ...], ...]'
    )
    scripted.add_argument("--extra", choices=["refuse", "repeat_last"], default="refuse")
    scripted.add_argument("--timeout", type=float, default=10.0)
    return parser


def _server_from(args: argparse.Namespace) -> SinkServer | ScriptedServer:
    if args.kind == "scripted":
        with open(args.script, encoding="utf-8") as file:
            scripts = [steps_from_json(script) for script in json.load(file)]
        return ScriptedServer(scripts, extra=args.extra, timeout=args.timeout, host=args.host)
    context = server_tls_context(args.certfile, args.keyfile) if args.tls else None
    return SinkServer(
        tls=args.tls,
        require_tls=args.require_tls,
        host=args.host,
        port=args.port,
        tls_context=context,
        pipelining=not args.no_pipelining,
        chunking=not args.no_chunking,
        idle_timeout=args.idle_timeout,
    )


def _write_json(path: str, data: dict[str, Any]) -> None:
    """Write atomically, so a reader never sees half a report."""
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "w", encoding="utf-8") as file:
        json.dump(data, file, indent=1)
    os.replace(temporary, path)


if __name__ == "__main__":
    sys.exit(main())
