"""Reply decisions: every decision the engine takes on an SMTP reply, in one place.

Each decision is a named, documented function of the reply (and what it needs
to know besides), so "why was this deferred?" is answered in this file. The
data they work on lives elsewhere: `Reply` and the delivery errors in
engine.reply, the operator's rules in engine.config.

Throttles: a reply that means "slow down" (`throttle_rule`) is matched against
the operator's rules first, then the shipped `DEFAULT_RULES`; the provider's
shaper (engine.shaping) then slows down or suspends sending, and the recipient
is deferred, never bounced.

This module imports only engine.reply, engine.protocol, engine.config and the
standard library.
"""
from __future__ import annotations

import fnmatch
from collections.abc import Sequence

from engine.config import ThrottleConfig, ThrottleRule
from engine.reply import Reply

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
