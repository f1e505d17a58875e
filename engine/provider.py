"""Which receiving provider an MX host belongs to.

Metrics and traffic shaping are kept per sending IP x provider, so that every domain hosted
by one provider (all of Google Workspace, all of Microsoft 365) shares one set of figures
and limits. A provider is recognised by the suffix of its MX host names; any other MX rolls
up by its registrable domain: the public suffix under which names are registered, plus one
label (`mx1.example.co.uk` -> `example.co.uk`, `mx.example.us.com` -> `example.us.com`).

Public suffixes come from the Public Suffix List (https://publicsuffix.org), the list
browsers use for the same question: Debian's copy (package `publicsuffix`, the file
DEBIAN_LIST) when it is there, else the copy that ships in the `publicsuffixlist` package
from PyPI. Both dependency sets read the same file format with the same small parser
(`SuffixList`), so a host gets the same provider whichever set is installed. The list is
read once, on first use; lookups are cached.
"""
from __future__ import annotations

import functools
import logging
import os
from collections.abc import Iterable, Mapping

from engine import logs

log = logging.getLogger("mailengine.provider")

DEFAULT_PROVIDERS: Mapping[str, str] = {
    "google.com": "google",
    "googlemail.com": "google",
    "outlook.com": "microsoft",
    "hotmail.com": "microsoft",
    "yahoodns.net": "yahoo",
    "icloud.com": "apple",
    "me.com": "apple",
    "gmx.net": "gmx",
    "web.de": "gmx",
    "mail.ru": "mailru",
    "yandex.net": "yandex",
    "yandex.ru": "yandex",
    "comcast.net": "comcast",
}

DEBIAN_LIST = "/usr/share/publicsuffix/public_suffix_list.dat"


class SuffixList:
    """The rules of a Public Suffix List file (https://publicsuffix.org/list/), both its
    ICANN and its private sections.

    A rule is a suffix (`co.uk`), a wildcard (`*.ck`: every label under `ck` is a public
    suffix) or an exception to a wildcard (`!www.ck`: `www.ck` is registrable). The list
    writes internationalised names in Unicode; DNS answers carry their ASCII form
    (`xn--...`), so each such rule is kept in both forms.
    """

    def __init__(self, lines: Iterable[str]) -> None:
        self.rules: set[str] = set()
        self.wildcards: set[str] = set()  # "*.ck" kept as "ck"
        self.exceptions: set[str] = set()  # "!www.ck" kept as "www.ck"
        for line in lines:
            self._add(line)

    @classmethod
    def from_file(cls, path: str) -> SuffixList:
        with open(path, encoding="utf-8") as f:
            return cls(f)

    def _add(self, line: str) -> None:
        # A rule is the line's first word; comments start with //.
        words = line.split()
        if not words or words[0].startswith("//"):
            return
        rule = words[0].lower()
        if rule.startswith("!"):
            kind, rule = self.exceptions, rule[1:]
        elif rule.startswith("*."):
            kind, rule = self.wildcards, rule[2:]
        else:
            kind = self.rules
        kind.add(rule)
        kind.add(_ascii(rule))

    def __len__(self) -> int:
        return len(self.rules) + len(self.wildcards) + len(self.exceptions)

    def suffix_labels(self, labels: list[str]) -> int:
        """How many of `labels`' last labels are its public suffix.

        The list's algorithm: an exception rule prevails; else the matching rule with the
        most labels; else the default rule `*` (the last label)."""
        count = len(labels)
        for start in range(count):
            if ".".join(labels[start:]) in self.exceptions:
                return count - start - 1
        for start in range(count):
            suffix = ".".join(labels[start:])
            if suffix in self.rules or ".".join(labels[start + 1:]) in self.wildcards:
                return count - start
        return 1

    def registrable(self, host: str) -> str:
        """`host`'s registrable domain; the host itself when it is a public suffix (or
        has a single label)."""
        labels = host.lower().rstrip(".").split(".")
        keep = self.suffix_labels(labels) + 1
        return ".".join(labels[-keep:])


def _ascii(name: str) -> str:
    """`name` with each non-ASCII label in its IDNA ASCII form (xn--, RFC 3492)."""
    return ".".join(label if label.isascii() else "xn--" + label.encode("punycode").decode()
                    for label in name.split("."))


def list_file(debian: str = DEBIAN_LIST) -> str | None:
    """The Public Suffix List file to read: Debian's (`debian`), else the PyPI package's;
    None if neither is installed."""
    if os.path.exists(debian):
        return debian
    try:  # the PyPI dependency set; Debian's has no python3-publicsuffixlist
        import publicsuffixlist
    except ImportError:
        return None
    path = getattr(publicsuffixlist, "PSLFILE", None)
    return path if isinstance(path, str) and os.path.exists(path) else None


@functools.cache
def suffix_list() -> SuffixList:
    """The list, read once. Without one (a broken install), only the default rule: every
    host rolls up by its last two labels, and a warning says what to install."""
    path = list_file()
    if path is None:
        log.warning(logs.kv("no_public_suffix_list", wanted=DEBIAN_LIST,
                            install="publicsuffix (Debian) or publicsuffixlist (PyPI)"))
        return SuffixList(())
    return SuffixList.from_file(path)


@functools.lru_cache(maxsize=4096)
def registrable_domain(host: str) -> str:
    """`host`'s registrable domain by the Public Suffix List (cached)."""
    return suffix_list().registrable(host)


def provider_of(mx_host: str, providers: Mapping[str, str] = DEFAULT_PROVIDERS) -> str:
    """The provider name for `mx_host`: a configured suffix match, else its registrable domain."""
    host = mx_host.lower().rstrip(".")
    labels = host.split(".")
    for i in range(len(labels)):
        suffix = ".".join(labels[i:])
        if suffix in providers:
            return providers[suffix]
    if all(part.isdigit() for part in labels):  # an IP literal route
        return host
    return registrable_domain(host)
