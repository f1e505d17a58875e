"""engine/provider.py: the provider of an MX host, and its registrable domain by the Public
Suffix List.

Regression (unrelated senders shared one provider's shaping limits): the registrable domain
was guessed as the last two labels (three under `co.uk`-style names), so
`mx1.example.ltd.uk` rolled up as `ltd.uk`, `mx.example.us.com` as `us.com` and every school
under `k12.ca.us` as `ca.us`.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from engine.provider import (
    DEBIAN_LIST,
    SuffixList,
    list_file,
    provider_of,
    registrable_domain,
    suffix_list,
)

# A list written for the tests: a suffix, a two-label suffix, a wildcard with an exception,
# an internationalised rule, comments, blank lines and a private-section rule.
SMALL = """\
// ===BEGIN ICANN DOMAINS===
uk
co.uk

*.ck
!www.ck
// 公司.cn : an IDN rule, kept in Unicode in the list
cn
公司.cn
// ===END ICANN DOMAINS===
// ===BEGIN PRIVATE DOMAINS===
us.com   a comment after the rule
// ===END PRIVATE DOMAINS===
"""

# host -> its registrable domain by the real list (Debian's and PyPI's copies agree).
REAL = {
    "mx1.example.ltd.uk": "example.ltd.uk",
    "mx.example.us.com": "example.us.com",
    "mx.school.k12.ca.us": "school.k12.ca.us",
    "mx1.example.co.uk": "example.co.uk",
    "aspmx.l.google.com.": "google.com",
    "MX.Example.COM": "example.com",
    "mx.example.xn--55qx5d.cn": "example.xn--55qx5d.cn",  # 公司.cn, in its DNS form
    "mx.example.city.kawasaki.jp": "city.kawasaki.jp",  # an exception to *.kawasaki.jp
    "mx.host.example.kawasaki.jp": "host.example.kawasaki.jp",
    "sink.test": "sink.test",  # not in the list: the default rule, one label
    "localhost": "localhost",
    "co.uk": "co.uk",  # a public suffix itself
}


def test_rules_wildcards_exceptions_and_the_default_rule() -> None:
    psl = SuffixList(SMALL.splitlines())
    assert {host: psl.registrable(host) for host in (
        "mx.example.co.uk", "mx.example.uk", "mx.a.b.ck", "b.ck", "mx.www.ck", "www.ck",
        "mx.example.us.com", "mx.example.com", "example.test", "localhost", "co.uk",
    )} == {
        "mx.example.co.uk": "example.co.uk",
        "mx.example.uk": "example.uk",
        "mx.a.b.ck": "a.b.ck",  # *.ck: b.ck is a public suffix
        "b.ck": "b.ck",
        "mx.www.ck": "www.ck",  # !www.ck: registrable, not a suffix
        "www.ck": "www.ck",
        "mx.example.us.com": "example.us.com",  # private-section rules count
        "mx.example.com": "example.com",  # no rule: the default `*`
        "example.test": "example.test",
        "localhost": "localhost",
        "co.uk": "co.uk",
    }


def test_an_internationalised_rule_matches_in_unicode_and_in_its_dns_form() -> None:
    psl = SuffixList(SMALL.splitlines())
    assert psl.registrable("mx.example.xn--55qx5d.cn") == "example.xn--55qx5d.cn"
    assert psl.registrable("mx.example.公司.cn") == "example.公司.cn"
    assert psl.registrable("mx.example.cn") == "example.cn"


def test_names_are_compared_without_case_or_a_trailing_dot() -> None:
    psl = SuffixList(SMALL.splitlines())
    assert psl.registrable("MX.Example.CO.UK.") == "example.co.uk"


def test_with_no_list_every_host_rolls_up_by_its_last_two_labels() -> None:
    assert SuffixList(()).registrable("mx1.example.co.uk") == "co.uk"


def sources() -> list[object]:
    """The list files of both dependency sets; each skipped where it is not installed."""
    pypi = None
    if importlib.util.find_spec("publicsuffixlist") is not None:
        import publicsuffixlist
        pypi = publicsuffixlist.PSLFILE
    return [
        pytest.param(DEBIAN_LIST, id="debian", marks=pytest.mark.skipif(
            not Path(DEBIAN_LIST).exists(), reason="Debian's publicsuffix is not installed")),
        pytest.param(pypi, id="pypi", marks=pytest.mark.skipif(
            pypi is None, reason="the publicsuffixlist package (PyPI) is not installed")),
    ]


@pytest.mark.parametrize("path", sources())
def test_the_real_list_separates_senders_the_two_label_guess_merged(path: str) -> None:
    psl = SuffixList.from_file(path)
    assert len(psl) > 5000
    assert {host: psl.registrable(host) for host in REAL} == REAL


def test_the_engine_reads_one_of_the_lists_and_caches_its_answers() -> None:
    assert list_file() is not None, "neither publicsuffix (Debian) nor publicsuffixlist (PyPI)"
    assert len(suffix_list()) > 5000
    assert {host: registrable_domain(host) for host in REAL} == REAL
    hits = registrable_domain.cache_info().hits
    assert registrable_domain("mx1.example.ltd.uk") == "example.ltd.uk"
    assert registrable_domain.cache_info().hits == hits + 1  # answered from the cache


def test_debians_file_first_else_the_pypi_copy(tmp_path: Path) -> None:
    mine = tmp_path / "list.dat"
    mine.write_text(SMALL, encoding="utf-8")
    assert list_file(str(mine)) == str(mine)
    fallback = list_file(str(tmp_path / "absent.dat"))
    if importlib.util.find_spec("publicsuffixlist") is None:
        assert fallback is None
    else:
        assert fallback is not None and Path(fallback).name == "public_suffix_list.dat"


def test_providers_by_suffix_then_by_registrable_domain() -> None:
    assert provider_of("gmail-smtp-in.l.google.com") == "google"
    assert provider_of("example-com.mail.protection.outlook.com.") == "microsoft"
    assert provider_of("mx1.example.ltd.uk") == "example.ltd.uk"
    assert provider_of("mx1.other.ltd.uk") == "other.ltd.uk"  # not the same provider
    assert provider_of("mx.example.test", {"example.test": "mine"}) == "mine"
    assert provider_of("127.0.0.1") == "127.0.0.1"  # a route to an IP literal


@pytest.mark.skipif(importlib.util.find_spec("publicsuffixlist") is None,
                    reason="the publicsuffixlist package (PyPI) is not installed")
def test_the_parser_agrees_with_the_publicsuffixlist_library_on_every_rule() -> None:
    """For each rule of the PyPI copy, hosts one and two labels under it (a wildcard's `*`
    filled in): the engine's parser and the library's own give the same registrable
    domain."""
    import publicsuffixlist
    with open(publicsuffixlist.PSLFILE, encoding="utf-8") as f:
        lines = f.read().splitlines()
    ours = SuffixList(lines)
    library = publicsuffixlist.PublicSuffixList(lines)
    rules = {line.split()[0].lstrip("!").replace("*", "w") for line in lines
             if line.strip() and not line.startswith("//")}
    differ = {}
    for rule in sorted(rules):
        for host in (f"b.{rule}", f"a.b.{rule}"):
            theirs = library.privatesuffix(host) or host.lower()
            if ours.registrable(host) != theirs:
                differ[host] = (ours.registrable(host), theirs)
    assert len(rules) > 5000
    assert not differ, list(differ.items())[:10]
