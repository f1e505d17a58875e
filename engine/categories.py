"""Categories: the class of a refusal, on every `bounced`, `deferred` and `expired` event.

A producer reading events wants to know what to do about a refusal: remove the address
(`bad-mailbox`, `inactive-mailbox`, `bad-domain`), fix its own setup (`authentication-failed`,
`invalid-sender`), look at its IP's standing (`blocklisted`, `spam-related`), or wait
(`rate-limited`, `greylisted`, `quota-issues`). The list is fixed (`CATEGORIES`, declared in
engine.config for the operator's rules) and close to PowerMTA's bounce categories and
KumoMTA's bounce classes; docs/EVENTS.md has the table and the mapping to both.

A category is a function of the reply alone (its code, enhanced status and text) and the
provider: the first of these that says something decides.

1. the operator's rules (`categories.rules`), in their order;
2. the shipped rules for the large providers' documented replies (Gmail, Microsoft, Yahoo,
   Apple, Comcast, GMX/Web.de, Orange, Mimecast, Proofpoint), whose texts say more than
   their codes (Microsoft answers a rejected recipient with 5.4.1, Mimecast greylists with
   a 451 that never says so);
3. the shipped wording rules: words that name the cause ("user unknown", "over quota",
   "blocked using", "DMARC"), whatever the code;
4. the enhanced status (RFC 3463 and the IANA registry), when it is specific (5.1.1,
   5.2.2, 5.7.26...);
5. weak wording: words that say only "refused by policy" ("denied", "not allowed");
6. the enhanced status's general forms (X.7.1 "not authorized", X.0.0), then the reply
   code (a 421 is the receiver pushing back, a 552 storage);
7. `other`.

The shipped rules (2 to 6) can be turned off (`categories.default_rules: false`): only the
operator's then apply, and what they do not match is `other`.

The rules read the reply's text `as_read`: its lines joined, without what changes from one
message or recipient to the next (an address's local part, Gmail's session id, a server's
name and time stamp). A reply is classified once: the answers are kept per distinct reply,
and per distinct reply as read (bounded memos), so a flood of one kind of refusal costs a
dict lookup or two each (a fraction of a microsecond, about 10 for a Gmail reply), and a
new kind tens of microseconds. The rules are compiled once, when a `Classifier` is built (at
start and at a reload), and the shipped ones are searched only when the text holds one of
their leading words (`leading_words`). The supervisor classifies (the events are made
there); nothing here does I/O.
"""
from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from dataclasses import dataclass

from engine.config import CATEGORIES, CategoriesConfig, CategoryRule
from engine.memo import Memo
from engine.reply import Reply

__all__ = ["CATEGORIES", "SHIPPED", "Classifier", "classifier"]

OTHER = "other"
# Distinct replies whose category is kept (replies carrying queue ids are all distinct:
# the memo is emptied when full, see engine.memo).
MEMO_SIZE = 4096


def _rule(category: str, text: str | None = None, *, code: int | None = None,
          enhanced: str | None = None, provider: str | None = None) -> CategoryRule:
    assert category in CATEGORIES, category
    return CategoryRule(category=category, provider=provider, code=code, enhanced=enhanced,
                        text=text)


# -- 2. the large providers' documented replies -----------------------------------------
# Each names its provider in a comment; none needs the provider to match (their texts or
# codes are their own), so that a provider reached through another name still matches.
PROVIDER_RULES: tuple[CategoryRule, ...] = (
    # Gmail (Google Workspace "SMTP error reference")
    _rule("rate-limited", r"unusual rate of (unsolicited )?mail", enhanced="4.*"),
    _rule("rate-limited", r"try again later, closing connection"),
    _rule("rate-limited", r"(daily|peak) (sending quota|smtp relay limit)|relay limit exceeded"
                          r"|email quota exceeded"),
    _rule("quota-issues", r"receiving mail (too quickly|at a rate)"),
    _rule("invalid-sender", r"mail sending denied|sender account is disabled"),
    _rule("blocklisted", r"(not authorized|not allowed) to send (email )?directly"),
    _rule("blocklisted", r"low reputation of the sending"),
    _rule("virus-related", r"potential security issue|illegal attachment"),
    _rule("policy-related", r"not in whitelist for rcpt domain|multiple destination"
                            r" domains"),
    _rule("protocol-errors", r"too many unauthenticated commands"),
    _rule("relaying-issues", r"invalid credentials for relay"),
    # Microsoft (Exchange Online and Outlook.com NDRs)
    _rule("blocklisted", enhanced="?.7.6[0-4][0-9]"),  # 5.7.606-649: banned sending IP
    _rule("blocklisted", r"\bS3140\b|\bS3150\b|part of their network is on our block list"
                         r"|banned sender|traffic not accepted from this ip"
                         r"|tenant has exceeded threshold"),
    _rule("rate-limited", r"temporarily rate limited due to ip reputation|\bS775\d*\b"
                          r"|\bS77719\b|server busy"),
    _rule("relaying-issues", r"TenantAttribution|tenant.{0,40}relay|relay access denied"),
    _rule("bad-mailbox", r"AS\(201806281\)|RecipNotFound|RecipientNotFound"
                         r"|mailbox unavailable \(S2017062302\)"),
    _rule("rate-limited", r"submission ?quota|sending limits? exceeded|"
                          r"exceeded.{0,30}(sending|recipient rate) limit"),
    _rule("invalid-sender", r"unregistered domains?"),
    _rule("policy-related", r"SenderNotAuthenticatedForGroup|RESOLVER\.RST\.|external forwarding"),
    _rule("spam-related", r"detected as spam|rejected as spam"),
    _rule("quota-issues", r"QuotaExceededException|recipient thread limit|recipient's per-hour"
                          r" message limit"),
    _rule("blocklisted", r"spam abuse detected|request removal from this list"),
    # Yahoo and AOL (Yahoo Sender Hub "SMTP error codes")
    _rule("blocklisted", r"\[TSS09\]|permanently deferred|\[BL2[0-9]\]|\[BL\d\d\]"),
    _rule("policy-related", r"\[TSS11\]|excessive unknown recipients"),
    _rule("rate-limited", r"\[TSS?0\d\]|temporarily deferred due to (unexpected volume|user"
                          r" complaints)|message temporarily deferred - \[\d+\]"),
    _rule("invalid-sender", r"unresolvable rfc\.?5321 from domain"),
    _rule("inactive-mailbox", r"this mailbox is disabled|\(554\.30\)"),
    _rule("bad-mailbox", r"doesn't have a \S+ account|mailbox not found"),
    _rule("policy-related", r"\[PH0\d\]|not accepted for policy reasons"),
    # Apple iCloud Mail (Postmaster information for iCloud Mail)
    _rule("policy-related", r"\[(CS|HM|MM)\d\d\]|rejected due to local policy"),
    # Comcast (SMTP error codes page: BL blocks, RL rate limits, RDNS, SPF)
    _rule("blocklisted", r"\bBL0\d{5}\b|comcast block for spam"),
    _rule("rate-limited", r"\bRL0\d{5}\b|too many sessions"),
    _rule("policy-related", r"\bRDNS0\d{5}\b"),
    _rule("bad-mailbox", r"not our customer"),
    # GMX and Web.de (1&1 postmaster error messages)
    _rule("blocklisted", r"ip address is block ?listed|nemesis.{0,80}(block|bl)\b"),
    _rule("policy-related", r"reject due to policy restrictions"),
    # Orange (OFR codes)
    _rule("rate-limited", r"too many connections, slow down|OFR00\d_104"),
    _rule("bad-mailbox", r"destinataire invalide|invalid recipient\. OFR"),
    _rule("quota-issues", r"boite du destinataire pleine|recipient overquota"),
    _rule("blocklisted", r"service refus|OFR_999|OFR004_105"),
    # Mimecast (SMTP error codes)
    _rule("greylisted", r"internal resource (is )?temporarily unavailable"),
    _rule("rate-limited", r"unable to process connection at this time"),
    _rule("blocklisted", r"local ct ip reputation|\bIP reputation\b.{0,20}\breject"),
    _rule("policy-related", r"anti-spoofing|envelope blocked|blocked senders?|"
                            r"rejected due to security policies|administrative prohibition"),
    _rule("relaying-issues", r"open relay not allowed"),
    # Proofpoint (on premise and Essentials, and iCloud's, which uses it)
    _rule("blocklisted", r"ipcheck\.proofpoint\.com|dnsbl-lookup|proofpoint.{0,40}block"),
)

# -- 3. wording that names the cause -----------------------------------------------------
# In order: the first match wins, so the narrower meanings come first (a "domain not
# found" is no unknown user, a Spamhaus listing no spam content).
TEXT_RULES: tuple[CategoryRule, ...] = (
    _rule("greylisted", r"gr[ae]y[ -]?list"),
    _rule("virus-related", r"\bvirus|malware|infected|trojan|ransomware"),
    _rule("message-expired", r"message expired|delivery time expired|time limit.{0,20}exceeded"
                             r"|too old|queue(d)? too long"),
    _rule("authentication-failed",
          r"\bspf\b|dkim|dmarc|\barc\b|unauthenticated|authentication (failed|failure|required|type"
          r"|check|credentials|level|information)|not authenticated|fails? to pass"
          r" authentication|authentication mechanism|username and password|password"
          r"|credentials|log ?in with"),
    _rule("policy-related", r"\btls\b.{0,10}required|must issue a starttls|encryption"
                            r" required|requiretls"),
    _rule("policy-related", r"reverse (dns|hostname)|\brdns\b|ptr record"),
    _rule("blocklisted",
          r"blocked using|(listed|blocked) (at|in|on|by) .{0,60}(list|bl|dnsbl|rbl)\b|block ?list"
          r"|black ?list|deny ?list|spamhaus|spamcop|barracuda|\bsorbs\b|uceprotect|spamrats"
          r"|\bdnsbl\b|\brbl\b|cloudmark|senderscore|invaluement|\bpsbl\b|mailspike|abuseat"
          r"|poor reputation|bad reputation|low reputation|reputation (block|too low)"
          r"|(client host|sending ip|your ip|ip address).{0,60}\b(blocked|banned|listed"
          r"|blacklisted)\b|\[\d{1,3}(\.\d{1,3}){3}\].{0,60}\b(blocked|banned|listed"
          r"|blacklisted)\b|dynamic ip|residential ip"),
    _rule("rate-limited",
          r"rate.?limit|too many (messages|mails|connections|sessions|concurrent|errors)"
          r"|throttl|slow down|(rate|limit) exceeded|unexpected volume|too (fast|quickly)"
          r"|too many login attempts|mail flood|congestion|connection limit|(hourly|daily) limit"),
    _rule("quota-issues",
          r"quota|mailbox( is)? full|full mailbox|insufficient (system )?storage|exceeded"
          r" storage|(storage|disk|mailbox) (space )?(limit|full|exceeded)|mailbox size"
          r" limit|out of (disk )?space"),
    _rule("inactive-mailbox",
          r"(account|mailbox|user|recipient|address)\b.{0,30}\b(is |has been |was )?(disabled"
          r"|inactive|deactivated|suspended|closed|locked|frozen|expired|terminated|dormant"
          r"|no longer (active|in use|available|valid))\b|inactive (user|account|mailbox)"
          r"|moved, no forwarding"),
    _rule("invalid-sender",
          r"sender (address |domain )?(rejected|invalid|unknown|not (allowed|permitted)|verify"
          r" failed|verification failed|could not be verified|does not exist|not found|must"
          r" exist)|invalid sender|unknown sender|bad sender|sender's system address"
          r"|requires valid sender"
          r"|no mx for envelope sender|unable to verify sender|sender address has null mx"
          r"|adresse d.?exp[eé]diteur|envelope from.{0,40}(unresolvable|does not exist|invalid)"
          r"|mail from.{0,40}(unresolvable|does not exist|invalid)"),
    _rule("bad-domain",
          r"domain (name )?(not found|does not exist|doesn't exist|unknown|not resolv"
          r"|has no mx)|no such domain|unknown domain|host (not found|unknown)|null mx"
          r"|does not accept mail|unrouteable domain|invalid domain|find the recipient domain"
          r"|nxdomain|no mx or address records|domain.{0,30}(not|no longer) (exist|registered"
          r"|valid)"),
    _rule("bad-mailbox",
          r"user unknown|unknown user|no such (user|mailbox|recipient|address|account|person)"
          r"|(user|mailbox|recipient|address|account)\b.{0,50}\b(does not|doesn't|doesnt|not)"
          r" exist|invalid (recipient|mailbox|address|user)|recipient (address )?(unknown"
          r"|not found|invalid)|mailbox (not found|unavailable|does not exist)"
          r"|unknown (recipient|mailbox|local.?part)|(user|recipient|mailbox|address) not"
          r" found|unrouteable address|no mailbox|bad destination mailbox|not a valid"
          r" (mailbox|recipient|rfc ?5321 address)|not (a )?known user"
          r"|mailbox name (not allowed|invalid)"),
    _rule("relaying-issues",
          r"relay(ing)? (access )?(denied|not (permitted|allowed)|prohibited)|not (permitted|"
          r"allowed) to relay|unable to relay|relay access|we do not relay|i do not relay"
          r"|cannot relay"
          r"|no relaying|allowed rcpthosts"),
    _rule("spam-related",
          r"spam|junk|unsolicited|bulk mail|\bUCE\b|content filter|suspicious|phish|scam"),
    _rule("content-related",
          r"message (size|too (big|large)|length)|size limit|too (big|large)|exceeds.{0,30}"
          r"(size|limit)|message content|content (rejected|not allowed|restrictions)"
          r"|size exceed|attachment|\bmime\b|malformed|not rfc ?5322|rfc ?2?822|header"
          r"|bare (linefeed|lf)|BareLinefeeds|line (is )?too long|message-id|8bitmime|8-bit"
          r"|smtputf8"),
    _rule("policy-related", r"too many recipients|size per transaction"),
    _rule("protocol-errors",
          r"syntax error|(command|verb) (not recognized|unrecognized|not implemented)|"
          r"unrecognized command|unimplemented command|bad sequence|out of sequence|pipelin"
          r"|protocol (error|violation)|mail first|rcpt first|helo first|ehlo first"
          r"|argument is invalid"
          r"|cannot decode"),
    _rule("no-answer-from-host", r"connection refused|no route to host|unreachable"
                                 r"|no answer|timeout after \S+ in CONNECT"),
    _rule("bad-connection", r"connection (lost|reset|closed|dropped)|timeout|timed out"
                            r"|broken pipe|tls failure|handshake|took longer than"),
    _rule("routing-errors", r"\bdns\b|mail loop|loop detected|hop count|routing|unable to"
                            r" route|no address for mx|prohibited destination"),
)

# -- 4. and 6. the enhanced status (RFC 3463, IANA's registry) ---------------------------
# By "subject.detail", whatever the class. The strong ones decide before weak wording.
ENHANCED: dict[str, str] = {
    "1.1": "bad-mailbox", "1.2": "bad-domain", "1.3": "bad-mailbox", "1.4": "bad-mailbox",
    "1.6": "inactive-mailbox", "1.7": "invalid-sender", "1.8": "invalid-sender",
    "1.10": "bad-domain",
    "2.1": "inactive-mailbox", "2.2": "quota-issues", "2.3": "content-related",
    "2.4": "bad-configuration",
    "3.1": "quota-issues", "3.3": "protocol-errors", "3.4": "content-related",
    "3.5": "bad-configuration",
    "4.1": "no-answer-from-host", "4.2": "bad-connection", "4.3": "routing-errors",
    "4.4": "routing-errors", "4.5": "rate-limited", "4.6": "routing-errors",
    "4.7": "message-expired",
    "5.1": "protocol-errors", "5.2": "protocol-errors", "5.3": "policy-related",
    "5.4": "protocol-errors", "5.5": "protocol-errors", "5.6": "protocol-errors",
    "6.1": "content-related", "6.2": "content-related", "6.3": "content-related",
    "6.4": "content-related", "6.5": "content-related", "6.6": "content-related",
    "6.7": "content-related", "6.8": "content-related", "6.9": "content-related",
    "6.10": "content-related",
    "7.2": "policy-related", "7.3": "policy-related", "7.4": "policy-related",
    "7.5": "policy-related", "7.6": "policy-related", "7.7": "content-related",
    "7.8": "authentication-failed", "7.9": "authentication-failed", "7.10": "policy-related",
    "7.11": "policy-related", "7.12": "authentication-failed", "7.13": "inactive-mailbox",
    "7.14": "policy-related", "7.15": "policy-related", "7.16": "content-related",
    "7.17": "inactive-mailbox", "7.18": "bad-domain", "7.20": "authentication-failed",
    "7.21": "authentication-failed", "7.22": "authentication-failed",
    "7.23": "authentication-failed", "7.24": "authentication-failed",
    "7.25": "policy-related", "7.26": "authentication-failed", "7.27": "invalid-sender",
    "7.28": "rate-limited", "7.29": "authentication-failed", "7.30": "policy-related",
}
# The general forms, and any detail not above, by subject: after weak wording.
SUBJECTS: dict[str, str] = {
    "1": "bad-mailbox", "2": "bad-mailbox", "3": OTHER, "4": "routing-errors",
    "5": "protocol-errors", "6": "content-related", "7": "policy-related",
}

# -- 5. weak wording: refused, without saying why ---------------------------------------
WEAK_RULES: tuple[CategoryRule, ...] = (
    _rule(OTHER, r"system problem|internal (server )?error|local error|temporary (server )?"
                 r"(failure|error)|not accepting (network )?messages"),
    _rule("policy-related", r"polic(y|ies)|not authori[sz]ed|prohibited|administrative"
                            r"|denied|refused|not (allowed|permitted)|spoof|blocked"),
)

# -- 6. the reply code, when nothing else said anything ---------------------------------
# A 421 is first: whatever general status it carries, it is the receiver pushing back.
CODE_FIRST: dict[int, str] = {421: "rate-limited"}
CODES: dict[int, str] = {
    450: OTHER, 451: OTHER, 452: "quota-issues", 454: OTHER,
    500: "protocol-errors", 501: "protocol-errors", 502: "protocol-errors",
    503: "protocol-errors", 504: "protocol-errors", 555: "protocol-errors",
    530: "authentication-failed", 534: "authentication-failed", 535: "authentication-failed",
    550: OTHER, 551: "bad-mailbox", 552: "quota-issues", 553: "bad-mailbox", 554: OTHER,
    556: "bad-domain",
}


@dataclass(frozen=True)
class _Compiled:
    """A rule ready to match: its glob as a regular expression, built once, and for the
    shipped rules the words one of which a text must hold to match (`words`, see
    `leading_words`): a substring test costs a fraction of a microsecond, a search of a
    large case-insensitive alternation tens of them, and most rules miss most replies."""

    rule: CategoryRule
    category: str
    provider: str | None
    code: int | None
    enhanced: re.Pattern[str] | None
    pattern: re.Pattern[str] | None
    words: tuple[str, ...] | None

    @classmethod
    def of(cls, rule: CategoryRule, shipped: bool = False) -> _Compiled:
        glob = re.compile(fnmatch.translate(rule.enhanced)) if rule.enhanced else None
        words = leading_words(rule.text) if shipped and rule.text else None
        return cls(rule, rule.category, rule.provider, rule.code, glob, rule.pattern, words)

    def matches(self, provider: str, code: int, status: str, text: str, lowered: str) -> bool:
        """Every field the rule gives matches: provider, code, enhanced status (against
        the code's class, X.0.0, when the reply has none), text (searched; `lowered` is
        the text in lower case, for `words`)."""
        return ((self.code is None or self.code == code)
                and (self.provider is None or self.provider == provider)
                and (self.enhanced is None or self.enhanced.match(status) is not None)
                and (self.words is None or any(word in lowered for word in self.words))
                and (self.pattern is None or self.pattern.search(text) is not None))


_META = set(".^$*+?{}[]()|\\")
_QUANTIFIERS = set("?*{")
_ESCAPED_LITERALS = set(".^$*+?{}[]()|\\-#/ ")


def leading_words(pattern: str) -> tuple[str, ...] | None:
    """Words, in lower case, one of which any text that `pattern` (case-insensitive)
    matches contains: each top-level alternative's leading literal characters, or the
    options of a leading group of plain words. None when an alternative has none (it
    could match anything): the rule is then always searched.

    Only for the shipped rules, whose patterns tests/unit/test_categories.py checks
    against it (an operator's pattern may use any syntax, and is always searched)."""
    words: list[str] = []
    for alternative in _top_level(pattern, "|"):
        found = _leading(alternative)
        if not found or not all(found):
            return None
        words.extend(found)
    return tuple(dict.fromkeys(words))


def _leading(alternative: str) -> list[str]:
    """The literal start of one alternative: its plain characters up to the first
    metacharacter, or a leading group's plain options (a required group only)."""
    if alternative.startswith("\\b"):
        alternative = alternative[2:]
    if alternative.startswith("("):
        group, rest = _group(alternative)
        if group is None or rest[:1] in _QUANTIFIERS:
            return []
        options = _top_level(group, "|")
        plain = [o for o in options if o and not (set(o) & _META)]
        return [o.lower() for o in options] if len(plain) == len(options) else []
    literal, i = [], 0
    while i < len(alternative):
        char = alternative[i]
        if char == "\\" and i + 1 < len(alternative) and alternative[i + 1] in _ESCAPED_LITERALS:
            char, step = alternative[i + 1], 2
        elif char in _META:
            break
        else:
            step = 1
        if alternative[i + step:i + step + 1] in _QUANTIFIERS and alternative[i + step:]:
            break  # this character is optional: the literal ends before it
        literal.append(char)
        i += step
    return ["".join(literal).lower()]


def _group(text: str) -> tuple[str | None, str]:
    """(the inside of the group `text` starts with, what follows it); None inside when
    the group is not a plain one (a `(?` extension) or is not closed."""
    if text.startswith("(?"):
        return None, ""
    depth = 0
    for i, char in enumerate(text):
        if char == "\\":
            continue
        if char == "(" and (i == 0 or text[i - 1] != "\\"):
            depth += 1
        elif char == ")" and text[i - 1] != "\\":
            depth -= 1
            if depth == 0:
                return text[1:i], text[i + 1:]
    return None, ""


def _top_level(pattern: str, separator: str) -> list[str]:
    """`pattern` split at `separator` outside groups, classes and escapes."""
    parts, current, depth, in_class, i = [], [], 0, False, 0
    while i < len(pattern):
        char = pattern[i]
        if char == "\\":
            current.append(pattern[i:i + 2])
            i += 2
            continue
        if in_class:
            in_class = char != "]"
        elif char == "[":
            in_class = True
        elif char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        elif char == separator and depth == 0:
            parts.append("".join(current))
            current = []
            i += 1
            continue
        current.append(char)
        i += 1
    parts.append("".join(current))
    return parts


class Classifier:
    """The category of a refusal (`classify`): the operator's rules, then (unless
    `default_rules` is off) the shipped ones. Built once per config; keeps its answers."""

    def __init__(self, rules: Sequence[CategoryRule] = (), default_rules: bool = True) -> None:
        self.default_rules = default_rules
        self._first = tuple(map(_Compiled.of, rules))
        if default_rules:
            self._first += tuple(_Compiled.of(rule, shipped=True)
                                 for rule in PROVIDER_RULES + TEXT_RULES)
        self._weak = tuple(_Compiled.of(rule, shipped=True)
                           for rule in WEAK_RULES) if default_rules else ()
        # The provider is part of the key only when a rule looks at it.
        self._by_provider = any(rule.provider is not None for rule in self._first)
        self._memo: Memo[tuple[object, ...], str] = Memo(MEMO_SIZE)  # by the reply
        self._read: Memo[tuple[object, ...], str] = Memo(MEMO_SIZE)  # by the reply as read

    def classify(self, reply: Reply, provider: str = "") -> str:
        """One of CATEGORIES for `reply` from `provider` (a success is `other`: it is never
        asked, events carry no category for it)."""
        by = provider if self._by_provider else None
        key = (reply.code, reply.enhanced, reply.text, by)
        found = self._memo.get(key)
        if found is None:
            text = as_read(reply.text)
            read = (reply.code, reply.enhanced, text, by)
            found = self._read.get(read)
            if found is None:
                found = self._read.keep(read, self._decide(reply.code, reply.status, text,
                                                           provider))
            self._memo.keep(key, found)
        return found

    def rule_for(self, reply: Reply, provider: str = "") -> CategoryRule | None:
        """The rule that decides `reply`'s category when a rule does (an operator's, a
        provider's or a wording rule, steps 1 to 3); None when the codes decide. To answer
        "why this category?" (not memoised)."""
        text = as_read(reply.text)
        return self._first_rule(provider, reply.code, reply.status, text, text.lower())

    def _first_rule(self, provider: str, code: int, status: str, text: str, lowered: str
                    ) -> CategoryRule | None:
        for compiled in self._first:
            if compiled.matches(provider, code, status, text, lowered):
                return compiled.rule
        return None

    def _decide(self, code: int, status: str, text: str, provider: str) -> str:
        """The category of a reply (its code, enhanced status, text `as_read`)."""
        lowered = text.lower()
        rule = self._first_rule(provider, code, status, text, lowered)
        if rule is not None:
            return rule.category
        if not self.default_rules:
            return OTHER
        parts = status.split(".")
        subject, detail = (parts[1], parts[2]) if len(parts) == 3 else ("0", "0")
        strong = ENHANCED.get(f"{subject}.{detail}")
        if strong is not None:
            return strong
        for weak in self._weak:
            if weak.matches(provider, code, status, text, lowered):
                return weak.category
        first = CODE_FIRST.get(code)
        if first is not None:
            return first
        if subject != "0":
            return SUBJECTS.get(subject, OTHER)
        return CODES.get(code, OTHER)


# A line break of a multi-line reply, with the enhanced status the server may repeat on
# each line ("550-5.1.1 ...\n550 5.1.1 ..." reaches here as "...\n5.1.1 ...").
_LINE_BREAK = re.compile(r"\s*\n\s*(?:[245]\.\d{1,3}\.\d{1,3}(?:\s+|$))?")


def flat(text: str) -> str:
    """A reply's lines joined by a space, without the enhanced status repeated at the start
    of each (Gmail breaks its sentences there)."""
    return _LINE_BREAK.sub(" ", text) if "\n" in text else text


_GMAIL_TRAILER = " - gsmtp"
# An address's local part (the domain stays): per recipient, and no rule's business.
_LOCAL_PART = re.compile(r"[^\s<>()\[\]\"',;:=]+@(?=[\w-]+\.)")
# A bracketed server name or queue id (Microsoft's "[AM4PEPF00025F97.EURPRD83.prod.outlook.com
# 2024-06-01T10:00:00.000Z ...]", Mimecast's "[Aj3QXapeMpqZYaeFwWhjzw.us32]"), and
# Microsoft's "[MxId=...]": a first part of 12 or more letters and digits before a dot, so
# that an IP ("[203.0.113.10]") or a code ("[TSS04]") stays.
_SERVER_ID = re.compile(r"\[(?:[A-Za-z0-9_-]{12,}\.[^\[\]]*|MxId=[0-9A-Fa-f]+)\]")


def as_read(text: str) -> str:
    """A reply's text as the rules see it: `flat`, and without what changes from one
    message or recipient to the next (an address's local part, Gmail's session id, a
    server's name and time stamp, a queue id). So replies that differ only there are one
    reply to the memo, and Gmail's, which all differ, are classified once per kind."""
    text = flat(text)
    if text.endswith(_GMAIL_TRAILER):
        cut = text.rfind(" ", 0, len(text) - len(_GMAIL_TRAILER))
        text = text[:cut] + _GMAIL_TRAILER if cut >= 0 else text
    if "@" in text:
        text = _LOCAL_PART.sub("@", text)
    if "[" in text:
        text = _SERVER_ID.sub("[]", text)
    return text


def classifier(cfg: CategoriesConfig) -> Classifier:
    """The classifier of config section `categories`."""
    return Classifier(cfg.rules, cfg.default_rules)


# The shipped rules alone: for events made where no config is at hand (tests, tools).
SHIPPED = Classifier()
