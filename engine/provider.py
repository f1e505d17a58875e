"""Which receiving provider an MX host belongs to.

Metrics, and later traffic shaping, are kept per sending IP x provider, so that
every domain hosted by one provider (all of Google Workspace, all of Microsoft
365) shares one set of figures and limits. A provider is recognised by the
suffix of its MX host names; any other MX rolls up by its registrable domain.
"""
from __future__ import annotations

from collections.abc import Mapping

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

# Second-level labels under which registrations happen one level deeper (co.uk).
_SHARED_SECOND_LEVEL = {"co", "com", "net", "org", "ac", "gov", "edu", "ne", "or"}


def registrable_domain(host: str) -> str:
    """A cheap approximation of the registrable domain: two labels, three under co.uk-style."""
    labels = host.lower().rstrip(".").split(".")
    if len(labels) >= 3 and labels[-2] in _SHARED_SECOND_LEVEL and len(labels[-1]) == 2:
        return ".".join(labels[-3:])
    return ".".join(labels[-2:])


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
