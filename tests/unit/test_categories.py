"""engine.categories: the category of every refusal, checked against a corpus of real replies
(tests/data/refusals.tsv), the documented list (docs/EVENTS.md) and the operator's rules."""
from __future__ import annotations

import collections
import re
from dataclasses import dataclass

import pytest

from engine import categories
from engine.categories import CATEGORIES, SHIPPED, Classifier
from engine.config import CategoryRule, ConfigError, from_dict
from engine.reply import Reply
from tests.support import ROOT

CORPUS = ROOT / "tests" / "data" / "refusals.tsv"
EVENTS_DOC = ROOT / "docs" / "EVENTS.md"


@dataclass(frozen=True)
class Line:
    number: int
    expected: str
    source: str
    raw: str

    @property
    def reply(self) -> Reply:
        """The reply as the engine reads it (engine.smtp): the code from the first line,
        each line's text after its code and separator, joined by newlines."""
        lines = self.raw.split("\\n")
        return Reply.parse(int(lines[0][:3]), "\n".join(line[4:] for line in lines))


def corpus() -> list[Line]:
    lines = []
    for number, text in enumerate(CORPUS.read_text(encoding="utf-8").splitlines(), 1):
        if text.startswith("#") or not text.strip():
            continue
        expected, source, raw = text.split("\t")
        lines.append(Line(number, expected, source, raw))
    return lines


# --------------------------------------------------------------------------------------------
# The corpus


def test_the_corpus_is_large_and_covers_every_category_and_the_providers():
    lines = corpus()
    assert len(lines) >= 150
    assert len({line.raw for line in lines}) == len(lines), "a reply listed twice"
    for line in lines:
        assert line.expected in CATEGORIES, f"line {line.number}: {line.expected!r}"
        assert re.fullmatch(r"[245]\d\d[ -].*", line.raw.split("\\n")[0]), line.number
    assert set(CATEGORIES) == {line.expected for line in lines}
    sources = collections.Counter(line.source for line in lines)
    for provider in ("gmail", "microsoft", "yahoo", "apple", "comcast", "gmx", "orange",
                     "mimecast", "proofpoint", "rfc3463"):
        assert sources[provider] >= 3, provider


def test_every_reply_of_the_corpus_gets_its_category():
    lines = corpus()
    wrong = [f"line {line.number} ({line.source}): expected {line.expected}, got"
             f" {SHIPPED.classify(line.reply)}: {line.raw[:120]}"
             for line in lines if SHIPPED.classify(line.reply) != line.expected]
    by_source: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for line in lines:
        by_source[line.source][0] += SHIPPED.classify(line.reply) == line.expected
        by_source[line.source][1] += 1
    right = len(lines) - len(wrong)
    print(f"\ncategories: {right}/{len(lines)} replies of the corpus classified as expected"
          f" ({100 * right / len(lines):.1f}%)")
    for source, (good, total) in sorted(by_source.items()):
        print(f"  {source:12} {good}/{total}")
    assert not wrong, "\n".join(wrong)
    docs = " ".join(EVENTS_DOC.read_text(encoding="utf-8").split())
    assert f"holds {len(lines)} real-world refusals" in docs, "docs/EVENTS.md: the corpus' size"


def test_every_shipped_rule_decides_at_least_one_reply_of_the_corpus():
    """A rule no real reply needs is a guess: each provider and wording rule is the first
    match of some line."""
    deciding = {id(SHIPPED.rule_for(line.reply)) for line in corpus()}
    unused = [(rule.category, rule.text or rule.enhanced)
              for rule in categories.PROVIDER_RULES + categories.TEXT_RULES
              if id(rule) not in deciding]
    assert not unused


def test_the_words_that_spare_searching_never_miss_a_match():
    """A shipped rule is only searched when the text holds one of its leading words: over
    every reply of the corpus, each rule that matches has one of them."""
    rules = [rule for rule in categories.PROVIDER_RULES + categories.TEXT_RULES
             + categories.WEAK_RULES if rule.text]
    texts = [categories.as_read(line.reply.text) for line in corpus()]
    texts += ["Relay access denied", "we do not relay", "mailbox is full", "BL000001 listed",
              "RL000010 too many", "gray-listed", "Greylisting in action", "log in with"]
    filtered = 0
    for rule in rules:
        assert rule.pattern is not None and rule.text is not None
        words = categories.leading_words(rule.text)
        filtered += words is not None
        for text in texts:
            if rule.pattern.search(text):
                assert words is None or any(w in text.lower() for w in words), (rule, text)
    assert filtered >= len(rules) - 2  # nearly every rule is spared most searches
    assert categories.leading_words(r"\bspf\b|dkim|gr[ae]y|rate.?limit|\[TSS?0\d\]") == \
        ("spf", "dkim", "gr", "rate", "[ts")
    assert categories.leading_words(r"(user|mailbox) unknown|relay") == ("user", "mailbox", "relay")
    assert categories.leading_words(r"(very )?low|x") is None  # an optional start
    assert categories.leading_words(r"\d+ days|x") is None


# --------------------------------------------------------------------------------------------
# The list: fixed, and documented as it is


def documented() -> list[str]:
    """The categories of docs/EVENTS.md's table, in its order."""
    text = EVENTS_DOC.read_text(encoding="utf-8")
    section = text.split("### Categories", 1)[1].split("\n#", 1)[0]
    return re.findall(r"^\| `([a-z-]+)` \|", section, re.MULTILINE)


def test_the_docs_list_the_categories_of_the_code_in_its_order():
    assert documented() == list(CATEGORIES)
    assert len(CATEGORIES) == len(set(CATEGORIES))
    assert all(re.fullmatch(r"[a-z]+(-[a-z]+)*", c) for c in CATEGORIES)


def test_every_category_the_shipped_rules_give_is_in_the_list():
    given = {rule.category for rule in categories.PROVIDER_RULES + categories.TEXT_RULES
             + categories.WEAK_RULES}
    given |= set(categories.ENHANCED.values()) | set(categories.SUBJECTS.values())
    given |= set(categories.CODES.values()) | set(categories.CODE_FIRST.values())
    assert given <= set(CATEGORIES)


# --------------------------------------------------------------------------------------------
# The order of the decisions


@pytest.mark.parametrize(("reply", "expected"), [
    # words before the enhanced status: Microsoft's rejected recipient says 5.4.1
    (Reply(550, "5.4.1", "Recipient address rejected: Access denied. AS(201806281)"),
     "bad-mailbox"),
    # a specific enhanced status before weak words ("refused")
    (Reply(501, "5.1.3", "CR, LF or NUL in an envelope field refused"), "bad-mailbox"),
    # weak words before the general status
    (Reply(550, "5.7.1", "Message refused"), "policy-related"),
    # a 421 is push-back whatever its general status, unless words say more
    (Reply(421, "4.7.0", "closing connection"), "rate-limited"),
    (Reply(421, "4.7.0", "TLS required for RCPT domain"), "policy-related"),
    # the code alone, and what nothing explains
    (Reply(552, None, "Requested mail action aborted"), "quota-issues"),
    (Reply(550, None, "Rejected"), "other"),
    (Reply(554, "5.9.99", "???"), "other"),
    (Reply(451, "bogus", "whatever"), "other"),
])
def test_the_decisions_are_taken_in_order(reply: Reply, expected: str) -> None:
    assert SHIPPED.classify(reply) == expected


def test_a_multi_line_reply_is_read_as_one_sentence():
    """Gmail breaks its sentences across lines, each starting with the enhanced status."""
    reply = Reply(550, "5.1.1", "The email account that you tried to reach does not\n"
                                "5.1.1 exist. Please try")
    assert categories.flat(reply.text) == ("The email account that you tried to reach does"
                                           " not exist. Please try")
    assert SHIPPED.classify(reply) == "bad-mailbox"


# --------------------------------------------------------------------------------------------
# The operator's rules


def test_the_operators_rules_come_first():
    mine = Classifier([CategoryRule("policy-related", text=r"user unknown"),
                       CategoryRule("spam-related", code=554, enhanced="5.7.*")])
    assert mine.classify(Reply(550, "5.1.1", "User unknown")) == "policy-related"
    assert mine.classify(Reply(554, "5.7.1", "Service unavailable")) == "spam-related"
    assert mine.classify(Reply(554, None, "Service unavailable")) == "other"  # 5.0.0: no glob
    assert mine.classify(Reply(552, "5.2.2", "Mailbox full")) == "quota-issues"  # shipped


def test_a_rule_for_one_provider_applies_to_its_replies_only():
    mine = Classifier([CategoryRule("rate-limited", provider="example", text="go away")])
    reply = Reply(550, "5.7.1", "go away")
    assert mine.classify(reply, "example") == "rate-limited"
    assert mine.classify(reply, "other-provider") == "policy-related"
    assert mine.classify(reply, "example") == "rate-limited"  # not the other's answer


def test_without_the_shipped_rules_only_the_operators_decide():
    mine = Classifier([CategoryRule("bad-mailbox", text="nobody")], default_rules=False)
    assert mine.classify(Reply(550, "5.1.1", "nobody here")) == "bad-mailbox"
    assert mine.classify(Reply(552, "5.2.2", "Mailbox full")) == "other"


def test_the_config_builds_the_classifier_and_refuses_bad_rules():
    base = {"ips": [{"address": "127.0.0.2"}]}
    cfg = from_dict(base | {"categories": {"rules": [
        {"category": "blocklisted", "code": 550, "enhanced": "5.7.*", "text": "AUP#\\d+"}]}})
    mine = categories.classifier(cfg.categories)
    assert mine.classify(Reply(550, "5.7.1", "Rejected, see AUP#1270")) == "blocklisted"
    assert categories.classifier(from_dict(base).categories).default_rules
    for rules, where in [
            ([{"text": "x"}], "categories.rules[0].category: required"),
            ([{"category": "bounced", "text": "x"}], "categories.rules[0].category: must be"),
            ([{"category": "other"}], "categories.rules[0]: a rule needs at least one"),
            ([{"category": "other", "text": "(x"}], "categories.rules[0].text: not a regular"),
            ([{"category": "other", "enhanced": "5.7"}], "categories.rules[0].enhanced: must"),
            ([{"category": "other", "code": 99}], "categories.rules[0].code:"),
            ([{"category": "other", "code": 550, "why": 1}], "categories.rules[0].why: unknown")]:
        with pytest.raises(ConfigError) as caught:
            from_dict(base | {"categories": {"rules": rules}})
        assert str(caught.value).startswith(where), str(caught.value)


# --------------------------------------------------------------------------------------------
# Cheap: each distinct reply is classified once


class Counting(Classifier):
    """A classifier that counts its decisions."""

    def __init__(self) -> None:
        super().__init__()
        self.decided = 0

    def _decide(self, code: int, status: str, text: str, provider: str) -> str:
        self.decided += 1
        return super()._decide(code, status, text, provider)


def test_a_reply_is_classified_once_however_often_it_comes():
    counting = Counting()
    flood = [Reply(421, "4.7.0", "[TSS04] Messages from 203.0.113.10 temporarily deferred"),
             Reply(550, "5.1.1", "User unknown")] * 500
    assert {counting.classify(reply, "yahoo") for reply in flood} == {"rate-limited",
                                                                      "bad-mailbox"}
    assert counting.decided == 2


def test_replies_that_differ_by_recipient_or_session_id_are_one_reply():
    """Gmail's replies all end with a session id, Postfix's name the recipient, Microsoft's
    its server and the time: each kind is decided once."""
    counting = Counting()
    for n in range(categories.MEMO_SIZE + 10):
        replies = [
            Reply(550, "5.1.1", f"The email account that you tried to reach does not\n5.1.1"
                                f" exist. d9443c01a{n}si1234567ad.89 - gsmtp"),
            Reply(550, "5.1.1", f"<user{n}.x+tag@example.com>: Recipient address rejected:"
                                " User unknown in virtual mailbox table"),
            Reply(451, "4.7.500", f"Server busy. Please try again later from [203.0.113.10]."
                                  f" (S77719) [BN{n:012d}.eop-nam02.prod.protection.outlook"
                                  f".com 2024-06-01T10:00:{n % 60:02d}.000Z]")]
        assert [counting.classify(r) for r in replies] == ["bad-mailbox", "bad-mailbox",
                                                           "rate-limited"]
    assert counting.decided == 3
    assert categories.as_read("Mailbox full: <bob.smith@example.com> [TSS04] [203.0.113.10]"
                              " [Aj3QXapeMpqZYaeFwWhjzw.us32] (#5.2.2) x1 - gsmtp") == \
        "Mailbox full: <@example.com> [TSS04] [203.0.113.10] [] (#5.2.2) - gsmtp"


def test_replies_carrying_other_ids_stay_within_the_memos_bound():
    counting = Counting()
    for n in range(categories.MEMO_SIZE * 2 + 10):
        assert counting.classify(Reply(550, "5.1.1", f"User unknown id={n}")) == "bad-mailbox"
    assert counting.decided == categories.MEMO_SIZE * 2 + 10
