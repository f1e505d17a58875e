"""The SMTP layer: one outbound connection and the transactions it carries.

Four parts, by composition, each depending only on those listed before it:

- engine.smtp.deadlines: each phase's timeout and the deadlines over several phases
  (setup, transaction), with the gevent backstop;
- engine.smtp.handover: what a connection carries from one transaction to the next (the
  message handed on before its final reply, and the reply owed to it), and `Stopping`,
  what a transaction leaves to report when the worker's drain deadline ends it;
- engine.smtp.connection: `Connection`, the socket and its bounded replies, the session
  (banner, EHLO or HELO, STARTTLS with its injection check, QUIT), the check before reuse;
- engine.smtp.transaction: `send_mail`, MAIL, RCPT, DATA or BDAT in the three modes
  (PIPELINING with CHUNKING, PIPELINING, lock step), and the hand-over of a connection to
  the next message before the reply to the final dot.

What the replies mean (delivered, deferred, bounced; a stale connection; a protocol error)
is decided in engine.classify, which also translates socket, ssl and smtplib errors. This
layer imports no ZeroMQ, spool, shaping, pool or delivery.
"""
from engine.reply import ProtocolError, StaleConnection, TlsError
from engine.smtp.connection import MAX_REPLY_TEXT, Connection, Keepalive, ReplyLimits
from engine.smtp.handover import Holder, RcptResult, Stopping
from engine.smtp.transaction import dot_stuff, send_mail

__all__ = [
    "MAX_REPLY_TEXT",
    "Connection",
    "Holder",
    "Keepalive",
    "ProtocolError",
    "RcptResult",
    "ReplyLimits",
    "StaleConnection",
    "Stopping",
    "TlsError",
    "dot_stuff",
    "send_mail",
]
