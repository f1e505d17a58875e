"""DNS names: the one grammar of host and domain names that the engine checks.

RFC 1123 section 2.1 (RFC 5321's Domain): dot-separated labels of letters, digits
and hyphens ("LDH"), each 1-63 octets, neither starting nor ending with a hyphen;
253 octets in all (RFC 1035's 255 in text form, without the trailing dot). An
internationalised name is checked in its A-label (`xn--`) form.

The config checks host names, EHLO names, route domains and provider suffixes
with `is_hostname`; engine.address checks a recipient's domain label by label
with `LABEL`, so that its error can say which label is wrong; engine.mx checks
a domain about to be looked up with the lenient `DNS_NAME`.

A leaf module: it imports nothing of the engine, so engine.config (which
imports no other engine module) and the modules that read names share it.
"""
from __future__ import annotations

import re

MAX_NAME_OCTETS = 253
MAX_LABEL_OCTETS = 63

_LDH_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"

# One LDH label (1-63 octets; ASCII only, whatever the case).
LABEL = re.compile(_LDH_LABEL)
# A host name: LDH labels separated by single dots (the length in all apart: is_hostname).
HOSTNAME = re.compile(rf"{_LDH_LABEL}(?:\.{_LDH_LABEL})*")

# The lenient variant, for a name about to be asked of DNS: DNS holds any octets, and
# names in the wild carry '_' (and hyphens at either end) that the LDH rule refuses.
# The resolver looks such a name up rather than bounce its mail; what it refuses cannot
# be asked at all. (Label lengths are checked by the IDNA codec that encodes the name.)
_DNS_LABEL = r"[A-Za-z0-9_-]+"
DNS_NAME = re.compile(rf"{_DNS_LABEL}(?:\.{_DNS_LABEL})*")


def is_hostname(name: str) -> bool:
    """True for a host name by RFC 1123's rule (LDH labels, 253 octets at most)."""
    return len(name) <= MAX_NAME_OCTETS and HOSTNAME.fullmatch(name) is not None
