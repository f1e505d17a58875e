"""One SMTP session of the test sink (engine/testing/sink.py), on aiosmtpd: what it records.

`_SinkSMTP` is aiosmtpd's session plus what the sink adds: connection accounting, the rate
limit checked at MAIL FROM, and BDAT (RFC 3030, which aiosmtpd lacks). `_SinkHandler` holds
aiosmtpd's hooks: the extensions advertised, the recipient rules, and each accepted message,
recorded as a `SinkMessage` with its envelope and how it arrived. The `SinkServer` owning the
sessions keeps the records and the counts; a session reports to it through its `_opened`,
`_closed`, `_admit`, `_refuse` and `_received`.
"""
from __future__ import annotations

import asyncio
import base64
import collections
import hashlib
import re
import socket
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AnyStr, cast

from aiosmtpd.smtp import MISSING, SMTP, Envelope, Session, syntax

if TYPE_CHECKING:
    from engine.testing.sink import SinkServer


_REQUIRETLS = re.compile(r"\s+REQUIRETLS(?=\s|$)", re.IGNORECASE)


def _body_summary(body: bytes, content: bool) -> dict[str, Any]:
    summary: dict[str, Any] = {"size": len(body), "sha256": hashlib.sha256(body).hexdigest()}
    if content:
        summary["content_b64"] = base64.b64encode(body).decode("ascii")
    return summary


@dataclass(frozen=True)
class SinkMessage:
    """One message the sink accepted, with its envelope and how it arrived."""

    mail_from: str  # "" for the null sender <>
    rcpt_tos: tuple[str, ...]  # accepted recipients only
    content: bytes  # exactly the bytes received, dot-stuffing undone
    peer: tuple[str, int]  # the client's address: check the engine's source IP here
    tls: str | None  # "TLSv1.3", or None for plaintext
    conn_id: int  # 1, 2, ... in order of accepted connections
    seq: int  # 1, 2, ... messages on that connection (2+ means the connection was reused)
    helo: str | None
    via: str  # "DATA" or "BDAT"
    mail_options: tuple[str, ...] = ()
    received: float = field(default_factory=time.time)
    # The sink kept the message and dropped the connection instead of replying (SinkServer's
    # `drop_after_dot`): the client cannot know it was delivered.
    unanswered: bool = False

    @property
    def size(self) -> int:
        return len(self.content)

    def to_json(self, content: bool = False) -> dict[str, Any]:
        data: dict[str, Any] = {
            "mail_from": self.mail_from,
            "rcpt_tos": list(self.rcpt_tos),
            "peer": list(self.peer),
            "tls": self.tls,
            "conn_id": self.conn_id,
            "seq": self.seq,
            "helo": self.helo,
            "via": self.via,
            "mail_options": list(self.mail_options),
            "received": self.received,
            "unanswered": self.unanswered,
        }
        return data | _body_summary(self.content, content)


class _SinkEnvelope(Envelope):
    def __init__(self) -> None:
        super().__init__()
        self.chunks: list[bytes] = []
        self.via = "DATA"


class _SinkSMTP(SMTP):
    """aiosmtpd's SMTP session plus connection accounting and BDAT (RFC 3030)."""

    _BDAT_ARG = re.compile(r"(\d+)( +LAST)? *", re.IGNORECASE)

    def __init__(self, sink: SinkServer, handler: _SinkHandler, **options: Any) -> None:
        # aiosmtpd keeps these limits in one dict shared by all sessions: each EHLO raises the
        # MAIL limit for everyone, each new session resets it. Give every session its own.
        self.command_size_limits = collections.defaultdict(lambda: SMTP.command_size_limit)
        super().__init__(handler, **options)
        self.sink = sink
        self.conn_id = 0
        self.delivered = 0
        self.dropped = False  # hung up instead of a reply: nothing more is read or answered
        self._counted = False

    def _create_envelope(self) -> _SinkEnvelope:
        return _SinkEnvelope()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        upgrade = self._original_transport is not None  # called again after STARTTLS
        super().connection_made(transport)
        if not upgrade:
            # aiosmtpd writes each pipelined reply on its own; without NODELAY,
            # Nagle holds the second until the client's delayed ACK (40 ms).
            # Real servers (Postfix) coalesce pipelined replies instead.
            sock = transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.conn_id = self.sink._opened(self)
            self._counted = True

    def connection_lost(self, error: Exception | None) -> None:
        try:
            super().connection_lost(error)
        finally:
            if self._counted:
                self._counted = False
                self.sink._closed(self.conn_id)

    async def _handle_client(self) -> None:
        """The banner, unless the sink's policy refuses the connection (a connection cap, a
        block): then its reply instead, and the connection closed."""
        refusal = self.sink._admit("connect", self.peer_ip)
        if refusal is not None:
            await self.push(refusal)
            self.hang_up()
            return
        await super()._handle_client()

    async def smtp_MAIL(self, arg: str | None) -> None:
        """MAIL FROM, behind the sink's policy (a refused MAIL takes no token)."""
        assert self.session is not None and self.envelope is not None
        if self.dropped:
            return
        if self.session.host_name and arg is not None and not self.envelope.mail_from:
            refusal = self.sink._admit("mail", self.peer_ip)
            if refusal is not None:
                await self.push(refusal)
                if refusal.startswith("421"):
                    self.hang_up()  # 421: the server closes the connection (RFC 5321 3.8)
                return
        requiretls = 0
        if arg is not None and self.sink.requiretls and self.session.ssl:
            arg, requiretls = _REQUIRETLS.subn("", arg)
        await super().smtp_MAIL(arg)
        if requiretls and self.envelope.mail_from:  # aiosmtpd knows no REQUIRETLS: ours
            self.envelope.mail_options.append("REQUIRETLS")

    async def push(self, status: AnyStr) -> None:
        """A reply, unless the session dropped the connection: then no reply ever leaves
        (what the client already sent behind it, pipelined, is read into nothing)."""
        if not self.dropped:
            await super().push(status)

    def drop(self) -> None:
        """Hang up without a reply to what was just read: a server that crashed, or a
        connection that broke, after it took the message."""
        self.dropped = True
        self.hang_up(abort=True)

    @property
    def peer_ip(self) -> str:
        peer = cast(tuple[str, int], self.session.peer) if self.session else ("", 0)
        return peer[0]

    def hang_up(self, abort: bool = False) -> None:
        transport = self._original_transport or self.transport
        if transport is None:
            return
        if abort:
            transport.abort()  # type: ignore[attr-defined]
        else:
            transport.close()

    @syntax("BDAT <size> [LAST]")
    async def smtp_BDAT(self, arg: str | None) -> None:
        command = self._BDAT_ARG.fullmatch(arg or "")
        if command is None:
            await self.push("501 5.5.4 Syntax: BDAT <size> [LAST]")
            return
        try:
            chunk = await self._reader.readexactly(int(command[1]))
        except asyncio.IncompleteReadError:
            self.hang_up()
            return
        await self._take_chunk(chunk, last=command[2] is not None)

    async def _take_chunk(self, chunk: bytes, last: bool) -> None:
        envelope = self.envelope
        assert isinstance(envelope, _SinkEnvelope) and self.session is not None
        if not self.session.host_name or not envelope.rcpt_tos:
            envelope.chunks.clear()
            await self.push("503 5.5.1 Error: need EHLO, MAIL and RCPT before BDAT")
            return
        envelope.chunks.append(chunk)
        if not last:
            await self.push(f"250 2.0.0 {len(chunk)} octets received")
            return
        envelope.content = envelope.original_content = b"".join(envelope.chunks)
        envelope.via = "BDAT"
        status = await self._call_handler_hook("DATA")
        self.envelope = self._create_envelope()  # what aiosmtpd's DATA does next
        await self.push("250 OK" if status is MISSING else status)


class _SinkHandler:
    """aiosmtpd hooks: advertise extensions, apply recipient rules, record messages."""

    def __init__(self, sink: SinkServer) -> None:
        self.sink = sink

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        extensions = [f"250-{name}" for name in self.sink.extensions]
        if self.sink.requiretls and session.ssl:
            extensions.append("250-REQUIRETLS")
        return responses[:-1] + extensions + responses[-1:]

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        refusal = self.sink.rcpt_reply(address)
        if refusal is None and isinstance(server, _SinkSMTP):
            refusal = self.sink._admit("rcpt", server.peer_ip, str(envelope.mail_from), address)
        if refusal is not None:
            assert isinstance(server, _SinkSMTP)
            self.sink._refuse(server.conn_id, address, refusal)
            return refusal
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 2.1.5 OK"

    async def handle_DATA(
        self, server: SMTP, session: Session, envelope: Envelope
    ) -> str:
        assert isinstance(server, _SinkSMTP) and isinstance(envelope, _SinkEnvelope)
        if server.dropped:
            return "451 4.3.0 connection dropped"  # never sent: the session is over
        unanswered = self.sink._drop_now()
        server.delivered += 1
        peer = cast(tuple[str, int], session.peer)  # aiosmtpd annotates it as str
        message = SinkMessage(
            mail_from="" if envelope.mail_from == "<>" else str(envelope.mail_from),
            rcpt_tos=tuple(envelope.rcpt_tos),
            content=bytes(envelope.original_content or b""),
            peer=(peer[0], peer[1]),
            tls=session.ssl["ssl_object"].version() if session.ssl else None,
            conn_id=server.conn_id,
            seq=server.delivered,
            helo=session.host_name,
            via=envelope.via,
            mail_options=tuple(envelope.mail_options),
            unanswered=unanswered,
        )
        self.sink._received(message)
        if unanswered:
            server.drop()  # kept, and no reply: the client cannot tell it was delivered
        return f"250 2.0.0 OK queued as {message.conn_id}.{message.seq}"
