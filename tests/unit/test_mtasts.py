"""engine.mtasts's rules (RFC 8461: the TXT record, the policy file, MX patterns, the cache
file) and engine.tlspolicy's order of decisions. The fetch, the cache across restarts and
delivery under a policy run against real servers: tests/conversation/test_mtasts.py."""
from __future__ import annotations

import threading
from pathlib import Path

import pytest

from engine.mtasts import MtaSts, Policy, PolicyError, PolicyStore, mx_matches, parse_policy
from engine.mtasts import parse_txt as txt_id
from engine.tlspolicy import TlsPolicies
from tests.support.wait import until

NOW = 1_800_000_000.0


def policy(text: str) -> Policy:
    return parse_policy(text.encode(), "example.com", "id1", NOW)


@pytest.mark.parametrize(("records", "expected"), [
    (["v=STSv1; id=20160831085700Z;"], "20160831085700Z"),
    (["v=STSv1;id=abc"], "abc"),
    (["v=STSv1; id=abc; ext=value;"], "abc"),  # extensions are ignored
    (["v=spf1 -all", "v=STSv1; id=abc;"], "abc"),  # other records do not count
    ([], None),
    (["v=STSv1; id=a;", "v=STSv1; id=b;"], None),  # two policies announced: none
    (["v=STSv1;"], None),  # no id
    (["v=STSv1; id=" + "a" * 33], None),  # an id of 33 characters
    (["v=STSv1; id=ab-c;"], None),  # only letters and digits
    (["v=STSv1; id"], None),
    (["id=abc; v=STSv1;"], None),  # v must come first
    (["v=STSv10; id=abc;"], None),
])
def test_the_txt_record_announces_an_id(records: list[str], expected: str | None) -> None:
    assert txt_id(records) == expected


def test_a_policy_is_read() -> None:
    read = policy("version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\n"
                  "mx: *.example.net\r\nmx: backupmx.example.com.\r\nmax_age: 604800\r\n"
                  "future_field: whatever\r\n")
    assert (read.mode, read.max_age, read.id) == ("enforce", 604800, "id1")
    assert read.mx == ("mail.example.com", "*.example.net", "backupmx.example.com")
    assert read.expires == NOW + 604800


def test_a_policy_with_lf_line_ends_and_spaces_is_read() -> None:
    read = policy("version: STSv1\nmode:testing\nmx:   mx.example.com  \nmax_age: 0\n")
    assert (read.mode, read.mx, read.max_age) == ("testing", ("mx.example.com",), 0)


def test_mode_none_needs_no_mx() -> None:
    assert policy("version: STSv1\r\nmode: none\r\nmax_age: 86400\r\n").mx == ()


@pytest.mark.parametrize(("text", "words"), [
    ("mode: enforce\r\nmx: a.example.com\r\nmax_age: 1\r\n", "version"),
    ("version: STSv2\r\nmode: enforce\r\nmx: a.example.com\r\nmax_age: 1\r\n", "version"),
    ("version: STSv1\r\nmode: Enforce\r\nmx: a.example.com\r\nmax_age: 1\r\n", "mode"),
    ("version: STSv1\r\nmode: enforce\r\nmx: a.example.com\r\n", "max_age"),
    ("version: STSv1\r\nmode: enforce\r\nmx: a.example.com\r\nmax_age: 31557601\r\n",
     "max_age"),
    ("version: STSv1\r\nmode: enforce\r\nmx: a.example.com\r\nmax_age: -1\r\n", "max_age"),
    ("version: STSv1\r\nmode: enforce\r\nmax_age: 1\r\n", "no mx"),
    ("version: STSv1\r\nmode: enforce\r\nmode: none\r\nmx: a.example.com\r\nmax_age: 1\r\n",
     "twice"),
    ("version: STSv1\r\nmode: enforce\r\nmx: *.*.example.com\r\nmax_age: 1\r\n",
     "not an mx pattern"),
    ("version: STSv1\r\nmode: enforce\r\nmx: com\r\nmax_age: 1\r\n", "not an mx pattern"),
    ("version: STSv1\r\nmode enforce\r\nmx: a.example.com\r\nmax_age: 1\r\n", "line 2"),
    ("version: STSv1\r\nmode: enforce\r\nmx: \xe9.example.com\r\nmax_age: 1\r\n", "ASCII"),
])
def test_a_policy_is_read_strictly(text: str, words: str) -> None:
    with pytest.raises(PolicyError, match=words):
        parse_policy(text.encode("latin-1"), "example.com", "id1", NOW)


@pytest.mark.parametrize(("pattern", "host", "matches"), [
    ("mail.example.com", "mail.example.com", True),
    ("mail.example.com", "MAIL.Example.COM.", True),
    ("mail.example.com", "mail2.example.com", False),
    ("*.example.com", "mx1.example.com", True),
    ("*.example.com", "example.com", False),  # the wildcard is one label, never none
    ("*.example.com", "a.b.example.com", False),  # ...nor two
    ("*.example.com", "mx1.example.net", False),
])
def test_mx_patterns_match_as_rfc_8461_says(pattern: str, host: str, matches: bool) -> None:
    assert mx_matches(pattern, host) is matches


def test_the_store_keeps_policies_until_they_expire(tmp_path: Path) -> None:
    path = str(tmp_path / "sts.db")
    store = PolicyStore(path)
    kept = Policy("example.com", "enforce", ("mx.example.com", "*.example.net"), 3600, "a",
                  NOW)
    store.save(kept)
    store.save(Policy("old.example", "testing", ("mx.old.example",), 10, "b", NOW - 60))
    store.close()
    again = PolicyStore(path)
    assert again.load(NOW) == {"example.com": kept}
    again.close()


def test_an_unwritable_store_keeps_policies_in_memory(tmp_path: Path) -> None:
    store = PolicyStore(str(tmp_path / "missing" / "sts.db"))
    store.save(Policy("example.com", "enforce", ("mx.example.com",), 3600, "a", NOW))
    assert store.load(NOW) == {}


# -- engine.tlspolicy --------------------------------------------------------------------


def sts_with(mode: str, tmp_path: Path, asked: list[str] | None = None) -> MtaSts:
    """An MtaSts with one policy for example.com in its store, whose TXT record names it
    (the lookups answer from here: the decision's order is under test, not DNS); the names
    looked up go to `asked`."""
    store = PolicyStore(str(tmp_path / "sts.db"))
    store.save(Policy("example.com", mode, ("mx.example.com",), 3600, "a", NOW))

    def fetch(domain: str, address: str) -> bytes:
        raise PolicyError("no fetch expected")

    def txt(name: str) -> list[str]:
        if asked is not None:
            asked.append(name)
        return ["v=STSv1; id=a;"]

    return MtaSts(txt, lambda host: ["192.0.2.1"], fetch, store, clock=lambda: NOW)


def test_the_default_applies_without_any_policy() -> None:
    decision = TlsPolicies("opportunistic", mta_sts=None).decide("example.com", "other")
    assert (decision.policy, decision.mode, decision.pool_mode) == (
        "opportunistic", "opportunistic", "opportunistic")
    assert decision.allows("anything.example")


def test_an_enforced_mta_sts_policy_verifies_and_picks_mx_hosts(tmp_path: Path) -> None:
    decision = TlsPolicies("opportunistic", mta_sts=sts_with("enforce", tmp_path)).decide(
        "example.com", "other")
    assert (decision.policy, decision.mode) == ("mta-sts", "verify")
    assert decision.allows("mx.example.com") and not decision.allows("mx.evil.example")


def test_a_testing_policy_keeps_the_default_and_names_the_shortfall(tmp_path: Path) -> None:
    decision = TlsPolicies("opportunistic", mta_sts=sts_with("testing", tmp_path)).decide(
        "example.com", "other")
    assert (decision.policy, decision.mode) == ("mta-sts-testing", "opportunistic")
    assert decision.allows("mx.evil.example")  # testing: delivered all the same
    assert decision.shortfall("mx.example.com", True) is None
    assert "certificate" in (decision.shortfall("mx.example.com", False) or "")
    assert "matches no mx" in (decision.shortfall("mx.evil.example", True) or "")


def test_an_exception_in_the_config_wins_over_mta_sts(tmp_path: Path) -> None:
    sts = sts_with("enforce", tmp_path)
    by_domain = TlsPolicies("opportunistic", {"example.com": "none"}, mta_sts=sts)
    assert by_domain.decide("example.com", "other").policy == "none"
    by_provider = TlsPolicies("opportunistic", providers={"bigmail": "verify"}, mta_sts=sts)
    assert (by_provider.decide("example.com", "bigmail").mode, by_provider.decide(
        "example.com", "other").policy) == ("verify", "mta-sts")
    both = TlsPolicies("opportunistic", {"example.com": "required"}, {"bigmail": "none"})
    assert both.decide("example.com", "bigmail").policy == "required"  # the domain's first


def test_mta_sts_off_by_default_applies_where_the_config_says_so(tmp_path: Path) -> None:
    policies = TlsPolicies("opportunistic", {"example.com": "mta-sts"},
                           mta_sts=sts_with("enforce", tmp_path), sts_default=False)
    assert policies.decide("example.com", "other").policy == "mta-sts"
    assert policies.decide("example.org", "other").policy == "opportunistic"


def test_routes_and_address_literals_are_not_under_mta_sts(tmp_path: Path) -> None:
    asked: list[str] = []
    policies = TlsPolicies("opportunistic", mta_sts=sts_with("enforce", tmp_path, asked))
    assert policies.decide("example.com", "other", routed=True).policy == "opportunistic"
    assert policies.decide("[192.0.2.1]", "other").policy == "opportunistic"
    assert asked == []  # not even looked up
    assert policies.decide("example.com", "other").policy == "mta-sts"
    assert asked == ["_mta-sts.example.com"]


def test_requiretls_raises_the_floor_whatever_else_applies(tmp_path: Path) -> None:
    policies = TlsPolicies("none", {"example.org": "none"},
                           mta_sts=sts_with("enforce", tmp_path))
    for domain in ("example.com", "example.org"):
        decision = policies.decide(domain, "other", requiretls=True)
        assert (decision.policy, decision.mode, decision.requiretls) == (
            "requiretls", "verify", True)
        assert decision.pool_mode == "verify+requiretls"  # never a connection of another
    assert not policies.decide("example.com", "other", True).allows("mx.evil.example")


@pytest.mark.parametrize("fails", [False, True])
def test_callers_at_once_share_one_fetch(tmp_path: Path, fails: bool) -> None:
    """Many deliveries to a domain start together: one fetch, whose result (or failure)
    every caller waiting for it takes."""
    calls: list[str] = []
    release = threading.Event()

    def fetch(domain: str, address: str) -> bytes:
        calls.append(domain)
        release.wait(5)
        if fails:
            raise PolicyError("down")
        return b"version: STSv1\r\nmode: enforce\r\nmx: mx.example.com\r\nmax_age: 60\r\n"

    sts = MtaSts(lambda name: ["v=STSv1; id=a;"], lambda host: ["192.0.2.1"], fetch,
                 PolicyStore(None))
    found: list[Policy | None] = []
    callers = [threading.Thread(target=lambda: found.append(sts.policy("example.com")))
               for _ in range(5)]
    for caller in callers:
        caller.start()
    until(lambda: len(calls) == 1, 5, "the first fetch")
    release.set()
    for caller in callers:
        caller.join(5)
    assert calls == ["example.com"]
    assert len(found) == 5
    assert {p.mode if p else None for p in found} == ({None} if fails else {"enforce"})


def test_tls_required_no_skips_the_receivers_enforced_policy_only(tmp_path: Path) -> None:
    """RFC 8689 5: the default instead of the receiver's enforced MTA-STS policy; not the
    operator's exceptions, and REQUIRETLS wins over the header."""
    policies = TlsPolicies("opportunistic", {"example.org": "verify"}, {"bigmail": "mta-sts"},
                           mta_sts=sts_with("enforce", tmp_path))
    skipped = policies.decide("example.com", "other", tls_optional=True)
    assert (skipped.policy, skipped.mode, skipped.sts) == ("mta-sts-skipped", "opportunistic",
                                                           None)
    assert skipped.allows("mx.evil.example")
    assert policies.decide("example.org", "other", tls_optional=True).policy == "verify"
    assert policies.decide("example.com", "bigmail", tls_optional=True).policy == "mta-sts"
    assert policies.decide("example.com", "other", True, tls_optional=True).policy == \
        "requiretls"
    testing = TlsPolicies("opportunistic", mta_sts=sts_with("testing", tmp_path))
    assert testing.decide("example.com", "other", tls_optional=True).policy == \
        "mta-sts-testing"  # delivers anyway: nothing to skip
