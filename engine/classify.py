"""Every reply decision in one module: why a recipient was delivered, deferred or bounced.

Start here to answer "why was this deferred?". Each function below is one decision the
engine takes on a server's reply, or on a failure no server answered (DNS, connect,
timeout, a broken protocol), named after the question it answers. The SMTP layer
(engine.smtp), the connector, the pools, the MX lookup and delivery call these functions;
they do the I/O and act on the answer, but do not decide on their own.

The building blocks are engine.reply's: `Reply.ok`, `.transient` and `.permanent` are the
RFC 5321 reply classes (2xx/3xx positive, 4xx transient, 5xx permanent), `error_for` picks
the error for a reply (PermanentError for 5xx, TransientError otherwise), and an error's
`Blame` says whether the connection (try the next MX host, or a fresh connection) or the
message (the outcome, whatever host) is at fault. The decisions here build on them.

One rule runs through all of them: what the engine does not understand is transient. A bug,
an unknown exception, a server breaking the protocol, a lost connection: the recipient is
deferred and tried again, never bounced.

The decisions, by where they are taken:

- the outcome of a reply: `status`;
- a reply that means "slow down": `throttle_rule`, over `throttle_rules` (the operator's
  rules, then the shipped `DEFAULT_RULES`); the provider's shaper (engine.shaping) then
  slows down or suspends sending, and the recipient is deferred, never bounced;
- inside a transaction (engine.smtp): `speaks_helo_only`, `completion`, `idle_farewell`,
  `data_refusal`, `recipient_replies`, `failed_transaction`, `no_final_reply`,
  `never_sent`, `stopped_before_final_reply`, `deadline_passed`, and the message's own
  faults: `cannot_convert`, `needs_smtputf8`, `unsafe_envelope`;
- opening a connection (engine.connector, engine.pool): `turned_away`, `tls_not_offered`,
  `tls_refused`, `prohibited_destination`, `at_capacity`;
- across a domain's MX hosts (engine.delivery): `refused_at_every_host`, `not_yet`,
  `internal_error`;
- the MX lookup (engine.mx): `no_such_domain`, `no_mx_or_address`, `null_mx`,
  `invalid_domain`, `dns_failed`, `no_address`;
- exceptions: `translate` (socket, ssl, smtplib and timeout errors), `short`.
"""
from __future__ import annotations

import errno
import fnmatch
import re
import smtplib
import socket
import ssl
from collections.abc import Sequence

from engine.config import ThrottleConfig, ThrottleRule
from engine.protocol import Status
from engine.reply import (
    Blame,
    DeliveryError,
    DescriptorsExhausted,
    PermanentError,
    ProtocolError,
    Reply,
    SendingIpGone,
    StaleConnection,
    TlsError,
    TransientError,
    error_for,
)
from engine.text import cut

# Replies to EHLO that mean "I only speak HELO" (RFC 5321 4.1.4); others are final.
_EHLO_UNKNOWN = (500, 502, 504, 550)
# Characters of an exception's text kept in a reply.
_SHORT = 200


# -- the outcome ------------------------------------------------------------------------


def status(reply: Reply) -> Status:
    """A recipient's status from the reply that ends its attempt: a positive reply is
    delivered (only a 2xx ever gets here: see `completion`), a 5xx bounced, anything else
    deferred (tried again by the retry schedule). A throttle defers whatever its code
    (engine.delivery, by the provider's throttle rules)."""
    if reply.ok:
        return Status.DELIVERED
    if reply.permanent:
        return Status.BOUNCED
    return Status.DEFERRED


# -- throttles: "slow down" ------------------------------------------------------------------

# The large providers' documented throttle replies first (they suspend), then
# the generic ones (they only slow down). Checked in order; the first match wins.
DEFAULT_RULES: tuple[ThrottleRule, ...] = (
    ThrottleRule("gmail-unsolicited-rate", provider="google", enhanced="4.7.28", suspend=900),
    ThrottleRule("gmail-rate", provider="google", enhanced="4.7.*", suspend=300,
                 text=r"unusual rate|rate limit|temporarily rate limited"),
    ThrottleRule("microsoft-busy", provider="microsoft", suspend=300,
                 text=r"S3150|S775|server busy|throttl"),
    ThrottleRule("yahoo-deferred", provider="yahoo", suspend=900,
                 text=r"TS0[1-4]|TSS0[1-9]|temporarily deferred"),
    ThrottleRule("apple-rate", provider="apple", suspend=600, text=r"CS0[1-9]|rate limit"),
    ThrottleRule("comcast-rate", provider="comcast", suspend=600, text=r"RL0{3,}\d|rate limit"),
    ThrottleRule("mailru-ratelimit", provider="mailru", suspend=600, text=r"ratelimit|too many"),
    ThrottleRule("yandex-ratelimit", provider="yandex", suspend=600, text=r"ratelimit|too many"),
    # Not "try again later" alone: greylisting says that too, and is no throttle.
    ThrottleRule("rate-text", text=r"rate.?limit|too many (messages|mails|connections|"
                                   r"recipients from)|throttl|slow down|(rate|limit) exceeded"),
    ThrottleRule("421", code=421),
    ThrottleRule("4.7.x-policy", enhanced="4.7.*", text=r"rate|limit|volume|busy|temporar"),
)


def throttle_rules(throttle: ThrottleConfig) -> tuple[ThrottleRule, ...]:
    """The rules in the order they are checked: the operator's (`throttle.rules`), then
    the shipped DEFAULT_RULES unless `throttle.default_rules` is off."""
    return throttle.rules + (DEFAULT_RULES if throttle.default_rules else ())


def throttle_rule(rules: Sequence[ThrottleRule], provider: str,
                  reply: Reply) -> ThrottleRule | None:
    """The first of `rules` that `reply` from `provider` matches: the reply is a throttle.

    None: not a throttle. A success never is. Greylisting ("try again later") and
    per-mailbox limits (4.2.1, 4.2.2) match no shipped rule: they defer the
    recipient without slowing the provider down.
    """
    if reply.ok:
        return None
    for rule in rules:
        if _matches(rule, provider, reply):
            return rule
    return None


def _matches(rule: ThrottleRule, provider: str, reply: Reply) -> bool:
    """Every field the rule gives matches: provider, code, enhanced status (a glob, against
    the code's class when the reply has none), text (searched, case-insensitive)."""
    if rule.provider is not None and rule.provider != provider:
        return False
    if rule.code is not None and rule.code != reply.code:
        return False
    if rule.enhanced is not None and not fnmatch.fnmatchcase(reply.status, rule.enhanced):
        return False
    return rule.pattern is None or rule.pattern.search(reply.text) is not None


# -- push-back by behaviour, and blocks -------------------------------------------------

# Greylisting says "try again later" to a first contact: it is not about our pace.
_GREYLISTING = re.compile(r"gr[ae]y[ -]?list", re.IGNORECASE)
# How the engine words a connection the server closed (translate): a server that hangs up
# on us is pushing back as surely as one that says so.
HUNG_UP = "connection lost"


def refusal(reply: Reply) -> bool:
    """Whether a refused transaction (every recipient, or the connection) may be the
    provider pushing back on our pace, whatever its words (engine.pushback decides, from
    how many come in a row after mail was accepted).

    Yes: a server's 4xx at the banner, EHLO, MAIL, RCPT or DATA, and a server closing the
    connection on us. No: what is about the mailbox (4.2.x: full, busy, disabled) or the
    address (4.1.x), greylisting, a 5xx (a refusal, not a pace), and the engine's own
    failures (DNS, timeouts, TLS, its own deadlines and policies)."""
    if not reply.transient:
        return False
    if reply.made_here:
        return reply.text.startswith(HUNG_UP)
    if reply.status.startswith(("4.1.", "4.2.")):
        return False
    return _GREYLISTING.search(reply.text) is None


# A block of the sending IP, not of this message: a block list, a reputation block, a ban.
_BLOCKED = re.compile(
    r"blocked using|listed (at|in|on|by)|\b(spamhaus|spamcop|barracuda(central)?|sorbs|"
    r"uceprotect|spamrats|blocklist\.de)\b|poor reputation|"
    r"\b(client host|your (ip|host|server|network|mail server)|sending ip|ip address|\bip\b|"
    r"\[\d{1,3}(\.\d{1,3}){3}\]).{0,60}\b(is |are |has been |was )?(blocked|blacklisted|"
    r"blocklisted|denylisted|banned|listed)\b", re.IGNORECASE)


def block(reply: Reply) -> bool:
    """Whether a refusal says the sending IP is blocked or listed (`554 5.7.1 Service
    unavailable; Client host [x] blocked using zen.spamhaus.org`, Microsoft's 5.7.606-649
    "banned sending IP"): no recipient is at fault, and retrying at once only burns their
    tries and the IP's standing. engine.shaping suspends the IP x provider instead
    (`throttle.block_suspend`)."""
    if reply.ok or reply.made_here:
        return False
    status = reply.status
    if status.startswith("5.7.6") and status[6:].isdigit() and 606 <= int(status[4:]) <= 649:
        return True
    return _BLOCKED.search(reply.text) is not None


# -- inside a transaction ---------------------------------------------------------------


def speaks_helo_only(code: int) -> bool:
    """A reply to EHLO that means the server does not know it (RFC 5321 4.1.4): say HELO
    instead. Any other refusal of EHLO is final (`turned_away`)."""
    return code in _EHLO_UNKNOWN


def completion(reply: Reply, command: str) -> Reply:
    """`reply`, the answer to MAIL, RCPT or the message, where success is 2xx only (RFC 5321
    4.2.1, 4.3.2); a 3xx there raises ProtocolError (translated: 451 4.5.0, deferred).

    Regression (fuzzing found it): a "354" after the message counted as delivered; a 3xx
    here is a protocol error, never a success."""
    if 300 <= reply.code < 400:
        raise ProtocolError(f"{reply.code} reply to {command}, where only 2xx is success")
    return reply


def idle_farewell(mail: Reply, reused: bool) -> bool:
    """Whether the reply to MAIL, the first of a transaction, is a stale connection's
    farewell rather than an answer to this message.

    On a reused connection, a 421 there is almost always the server's idle-timeout farewell
    crossing our MAIL on the wire (sent before it read MAIL): the connection was stale, the
    message was not refused, and it goes out again on a fresh connection (StaleConnection,
    no attempt counted). A 4.7.x 421 ("4.7.0 rate limited") is policy: the answer to this
    MAIL, never an idle farewell; retrying it at once on fresh connections would hammer a
    server that just told us to slow down, and hide the throttle from the shaper."""
    return mail.code == 421 and reused and not (mail.enhanced or "").startswith("4.7.")


def data_refusal(reply: Reply) -> Reply | None:
    """None if the reply to DATA opens the message (354), else the refusal (the outcome).

    Regression (fuzzing found it): a server answering 250 to DATA had the recipients
    reported delivered, although the body was never sent. Only 354 opens the body;
    another success code is a protocol error (TransientError 451 4.5.0), a refusal is the
    outcome."""
    if reply.code == 354:
        return None
    if reply.ok:
        raise TransientError(Reply.local(451, "4.5.0", f"protocol error: {reply.code} reply to"
                                   " DATA, where 354 was expected"), "DATA")
    return reply


def recipient_replies(mail: Reply, rcpt_replies: Sequence[Reply], final: Reply,
                      count: int) -> list[Reply]:
    """Each of `count` recipients' outcome (RFC 5321 results are per recipient): a refused
    MAIL refuses them all, a refused RCPT its recipient; the others get `final` (the reply
    to the final dot or BDAT LAST, or the refusal of DATA)."""
    if not mail.ok:
        return [mail] * count
    return [final if rcpt.ok else rcpt for rcpt in rcpt_replies]


def failed_transaction(err: DeliveryError, reused: bool, mail: Reply | None,
                       data_sent: bool) -> tuple[Reply, bool]:
    """What a transaction that failed before the replies that judge it (`err`) means for
    each recipient: (the reply, ambiguous). `data_sent`: the end of the message (its final
    dot, or the BDAT LAST chunk) was handed to the socket.

    - the message is to blame (refused before anything was sent): `err`'s reply;
    - a reused connection that failed before the server answered MAIL (`mail` None) was
      stale if the server cannot have the message: its end was never written, or the
      first reply was the server's farewell (`idle_farewell`: it closed the session before
      reading our commands). Raises StaleConnection, and the message goes out again at
      once on a fresh connection (no attempt counted);
    - MAIL was refused: the refusal;
    - the end of the message was written, the reply to it never came: 451 4.4.2,
      ambiguous (the server may have it; a retry may deliver it twice). Deferred by the
      retry schedule, like any loss after the final dot (Postfix does the same);
    - else `err`'s reply (a connection failure: deferred).

    Regression (issue #14): with PIPELINING and CHUNKING the whole message leaves with
    MAIL, before the first reply; a reused connection lost before that reply was taken for
    stale and the message sent again at once, uncounted, although the server may have
    taken it before it died."""
    if err.blame is Blame.MESSAGE:
        return err.reply, False
    if reused and mail is None and (not data_sent or _farewell(err.reply)):
        raise StaleConnection(err.reply, err.command, Blame.CONNECTION) from err
    if mail is not None and not mail.ok:
        # Regression (a pipelined MAIL answered "421 rate limited", then the server
        # hung up, as servers do after a 421): the refusal is the outcome. The
        # server took nothing, so the loss is neither ambiguous nor the reply.
        return mail, False
    if data_sent:
        return Reply.local(451, "4.4.2", f"{err.reply.text}; the message may have been"
                                   " delivered (no reply to the final dot)"), True
    return err.reply, False


def _farewell(reply: Reply) -> bool:
    """The server's own reply to MAIL on a reused connection was its farewell (a 421 that
    `idle_farewell` judged crossed our MAIL): it read none of our commands."""
    return not reply.made_here and idle_farewell(reply, reused=True)


def no_final_reply() -> Reply:
    """A message handed on with its connection whose final reply was never read (the
    connection closed first): deferred, ambiguous."""
    return Reply.local(451, "4.4.2", "connection lost before the reply to the final dot; the"
                               " message may have been delivered")


def never_sent() -> Reply:
    """A message handed on with its connection that closed before the next holder began
    writing it: deferred, not ambiguous (the server cannot have it)."""
    return Reply.local(451, "4.4.2", "connection lost before the message was sent")


def stopped_before_final_reply() -> Reply:
    """The worker's drain deadline (SIGTERM) came while a transaction whose end of message
    was written still waited for its final reply: deferred, ambiguous (the server may have
    it; the retry after the restart may deliver it twice)."""
    return Reply.local(451, "4.4.2", "engine stopping: final reply not received, may have"
                               " been delivered")


def deadline_passed(name: str, seconds: float, command: str) -> Reply:
    """A deadline over several phases ("setup", "transaction") ran out in `command`:
    deferred, like a timeout."""
    where = f" (in {command})" if command else ""
    return Reply.local(451, "4.4.2", f"{name} took longer than {seconds:g}s{where}")


def cannot_convert(why: str) -> DeliveryError:
    """An 8-bit message for a server without 8BITMIME that cannot be converted to 7-bit
    (engine.downgrade): bounced, 554 5.6.3, before MAIL; the message is to blame, so no
    other MX host is tried."""
    return error_for(Reply.local(554, "5.6.3", "8-bit message, the server does not offer"
                           f" 8BITMIME, and conversion to 7-bit is not possible: {why}"),
                     "MAIL", Blame.MESSAGE)


def needs_smtputf8() -> DeliveryError:
    """Addresses that need SMTPUTF8, for a server that does not offer it (RFC 6531):
    bounced, 553 5.6.7; the message is to blame."""
    return error_for(Reply.local(553, "5.6.7", "address needs SMTPUTF8, which the server"
                           " does not offer"), "MAIL", Blame.MESSAGE)


def unsafe_envelope() -> DeliveryError:
    """CR, LF or NUL in an envelope address or parameter (it could inject commands):
    bounced, 501 5.1.3, nothing sent; the message is to blame."""
    return error_for(Reply.local(501, "5.1.3", "CR, LF or NUL in an envelope field refused"),
                     "MAIL", Blame.MESSAGE)


# -- opening a connection ---------------------------------------------------------------


def turned_away(reply: Reply, command: str) -> DeliveryError:
    """A refusal at the door (a 421 or 554 banner, a refused EHLO): the connection is to
    blame, the next MX host is tried. Only if every host refuses does it reach the
    recipients (`refused_at_every_host`)."""
    return error_for(reply, command)


def tls_not_offered(host: str) -> TransientError:
    """TLS is required (smtp.tls `required` or `verify`) and `host` does not offer
    STARTTLS: deferred, the next MX host is tried."""
    return TransientError(Reply.local(451, "4.7.4", f"TLS is required, but {host} does not offer"
                                " STARTTLS"), "EHLO")


def tls_refused(host: str, reply: Reply) -> TransientError:
    """TLS is required and `host` refused STARTTLS (454 and friends, fine for opportunistic
    TLS): deferred, the next MX host is tried."""
    return TransientError(Reply.local(451, "4.7.5", f"TLS is required, but {host} refused"
                                f" STARTTLS: {reply}"), "STARTTLS")


def dane_no_starttls(host: str) -> TransientError:
    """`host` has usable DANE TLSA records (RFC 7672) and does not offer STARTTLS (or
    refused it): deferred 4.7.5, the next MX host is tried, never plaintext."""
    return TransientError(Reply.local(451, "4.7.5", f"DANE: {host} has TLSA records but does"
                                      " not offer STARTTLS"), "EHLO")


def dane_mismatch(host: str) -> TransientError:
    """No usable TLSA record of `host` matched the certificate it presented (RFC 7672 3):
    deferred 4.7.5, the next MX host is tried; nothing was sent."""
    return TransientError(Reply.local(451, "4.7.5", f"DANE: no TLSA record matched the"
                                      f" certificate of mx {host}"), "STARTTLS")


def requiretls_not_offered(host: str) -> PermanentError:
    """The job requires TLS end to end (RFC 8689) and `host`, over verified TLS, does not
    offer REQUIRETLS: 550 5.7.30 at this host, the next MX host is tried (engine.delivery
    bounces the recipients when no host offers it)."""
    return PermanentError(Reply.local(550, "5.7.30", f"REQUIRETLS support required, but {host}"
                                      " does not offer it"), "EHLO", Blame.CONNECTION)


def requiretls_unverified(host: str) -> TransientError:
    """The job requires TLS end to end (RFC 8689) and the session with `host` is not TLS with
    a verified certificate: deferred 451 4.7.30, the next MX host is tried."""
    return TransientError(Reply.local(451, "4.7.30", f"REQUIRETLS: no TLS with a certificate"
                                      f" valid for {host}"), "STARTTLS")


def sts_no_mx(domain: str, hosts: Sequence[str]) -> TransientError:
    """The MTA-STS policy of `domain` (mode enforce) matches none of its MX hosts: deferred
    451 4.7.5, nothing connected to (RFC 8461 4.1)."""
    return TransientError(Reply.local(451, "4.7.5", f"MTA-STS policy of {domain} allows none"
                                      f" of its MX hosts ({', '.join(hosts)[:200]})"), "CONNECT")


def sts_refused(domain: str, reply: Reply) -> Reply:
    """No MX host of `domain` took the mail under its MTA-STS policy (mode enforce),
    `reply` the outcome of the last (deferred: refused_at_every_host): the same, said to be
    under the policy (a TLS failure 4.7.4 or 4.7.5; never sent in plaintext)."""
    return Reply.local(reply.code, reply.status, f"MTA-STS policy of {domain}: {reply.text}")


def prohibited_destination(host: str, why: str) -> TransientError:
    """Every address of MX host `host` is refused by the destination policy (`why`, e.g. a
    private address; docs/SECURITY.md): deferred 451 4.4.4, never connected to."""
    reply = Reply.local(451, "4.4.4", f"MX host {host} is a prohibited destination: {why}"
                                      " (see security.allow_private_destinations)")
    return TransientError(reply, "CONNECT")


def at_capacity(err: DeliveryError, open_connections: int) -> bool:
    """Whether a failed connect is the server's capacity, not an outage: a 4xx ("421 too
    many connections") while other connections to it are open and working. The pool then
    uses fewer connections for a while; failing every waiter would defer mail that the
    open ones carry."""
    return open_connections > 0 and not err.permanent


# -- across a domain's MX hosts ---------------------------------------------------------


def refused_at_every_host(reply: Reply) -> Reply:
    """The outcome when no MX host of a domain would take the mail, `reply` the last
    host's. A 5xx at every door (554 banner: often a blocklist of our IP) says nothing
    final about the recipients: deferred 451 4.4.0, never bounced."""
    if reply.permanent:
        return Reply.local(451, "4.4.0", f"no MX host would take the mail; last said: {reply}")
    return reply


def not_yet(provider: str, reason: str) -> Reply:
    """Shaping keeps the recipients waiting for the provider's turn (a pace, a cap, a
    suspension: `reason`): deferred 451 4.4.5, not attempted. A cluster-wide limit's
    ("cluster ...", engine.cluster_limits) is every host's, not this IP's."""
    whose = "" if reason.startswith("cluster") else " for this IP"
    return Reply.local(451, "4.4.5", f"not sent yet: {provider} {reason}{whose}")


def internal_error(exc: BaseException) -> Reply:
    """A bug of ours while delivering a domain's recipients: deferred 451 4.3.0, never lost
    or bounced."""
    return Reply.local(451, "4.3.0", f"internal error: {type(exc).__name__}: {exc}"[:300])


# -- the MX lookup ----------------------------------------------------------------------


def no_such_domain(domain: str) -> PermanentError:
    """DNS says the domain does not exist (NXDOMAIN): bounced 550 5.1.2."""
    return _bad_domain(550, "5.1.2", f"domain {domain} does not exist")


def no_mx_or_address(domain: str) -> PermanentError:
    """Neither MX nor address records (RFC 5321 5.1): bounced 550 5.1.2."""
    return _bad_domain(550, "5.1.2", f"domain {domain} has no MX or address records")


def null_mx(domain: str) -> PermanentError:
    """The domain says it takes no mail (RFC 7505 null MX): bounced 556 5.1.10."""
    return _bad_domain(556, "5.1.10", "Recipient address rejected: "
                                      f"{domain} does not accept mail (null MX)")


def invalid_domain(domain: str) -> PermanentError:
    """Not a domain name at all: bounced 550 5.1.2."""
    return _bad_domain(550, "5.1.2",
                       f"Recipient address rejected: invalid domain {domain[:100]!r}")


def dns_failed(name: str, why: str, blame: Blame) -> TransientError:
    """No nameserver answered (timeout, SERVFAIL...): deferred 451 4.4.3. `blame`: the
    message for the domain's MX lookup (no other host would do better), the connection
    for an MX host's address (the next host is tried)."""
    reply = Reply.local(451, "4.4.3", f"DNS lookup for {name} failed: {why}")
    return TransientError(reply, blame=blame)


def no_address(host: str) -> TransientError:
    """An MX host without an address of the sending IP's family: the next host is tried
    (451 4.4.4 if none is left)."""
    return TransientError(Reply.local(451, "4.4.4", f"no address for MX host {host}"),
                          blame=Blame.CONNECTION)


def _bad_domain(code: int, enhanced: str, text: str) -> PermanentError:
    """The domain cannot take mail: the message is to blame, whatever host."""
    return PermanentError(Reply.local(code, enhanced, text), blame=Blame.MESSAGE)


# -- exceptions -------------------------------------------------------------------------


def translate(exc: BaseException, command: str, timeout: float) -> DeliveryError:
    """smtplib, socket, ssl and timeout errors -> the engine's errors (the only place).

    Every one is transient and blames the connection; the reply text names the phase
    (`command`), since it is all that reaches the recipient's event. A TLS failure is a
    TlsError (engine.connector retries in plaintext or without the check); an exception
    not known here is a bug of ours, which must never bounce mail."""
    if out_of_descriptors(exc):  # before TLS: not a handshake that failed
        return descriptors_exhausted(exc, command)
    if command == "CONNECT" and not_held(exc):  # the bind to the sending IP failed
        return sending_ip_gone(exc, command)
    if isinstance(exc, ssl.SSLError) or command == "TLS":  # any handshake failure
        return TlsError(Reply.local(451, "4.7.5", f"TLS failure: {short(exc)}"), command)
    where = f" in {command}" if command else ""
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return TransientError(Reply.local(451, "4.4.2", f"timeout after {timeout:g}s{where}"),
                              command)
    if isinstance(exc, ConnectionRefusedError):
        return TransientError(Reply.local(451, "4.4.1", "connection refused"), command)
    if isinstance(exc, (smtplib.SMTPServerDisconnected, ConnectionError, EOFError)):
        return TransientError(Reply.local(451, "4.4.2", f"{HUNG_UP}{where}: {short(exc)}"),
                              command)
    if isinstance(exc, ProtocolError):
        return TransientError(Reply.local(451, "4.5.0", f"protocol error: {short(exc)}"), command)
    if isinstance(exc, OSError):
        return TransientError(Reply.local(451, "4.4.1", f"network error: {short(exc)}"), command)
    return TransientError(Reply.local(451, "4.3.0", f"internal error: {type(exc).__name__}: "
                                              f"{short(exc)}"), command)


def out_of_descriptors(exc: BaseException) -> bool:
    """An error that says the process (EMFILE) or the system (ENFILE) has no file descriptor
    left: the machine's fault, not the destination's."""
    return isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE)


def descriptors_exhausted(exc: BaseException, command: str = "") -> DescriptorsExhausted:
    """The worker ran out of file descriptors in `command` (or a DNS lookup): waited out and
    tried again by the caller (engine.delivery), never an attempt."""
    where = f" in {command}" if command else ""
    return DescriptorsExhausted(Reply.local(451, "4.3.0", f"out of file descriptors{where}:"
                                                  f" {short(exc)}"), command)


def not_held(exc: BaseException) -> bool:
    """An error that says the host does not hold the address a socket was bound to
    (EADDRNOTAVAIL: the sending IP is no address of any interface, or no longer)."""
    return isinstance(exc, OSError) and exc.errno == errno.EADDRNOTAVAIL


def sending_ip_gone(exc: BaseException, command: str = "CONNECT") -> SendingIpGone:
    """The connect could not bind to the sending IP: the worker's trouble, never an attempt
    (engine.connector confirms it with a bind test, engine.delivery sends the recipients
    back to the spool)."""
    return SendingIpGone(Reply.local(451, "4.4.1", f"sending IP not held by this host:"
                                                  f" {short(exc)}"), command)


def short(exc: BaseException, limit: int = _SHORT) -> str:
    """An exception in a few words for a reply's text: its message (or its type's name),
    cut short."""
    return cut(str(exc) or type(exc).__name__, limit)
