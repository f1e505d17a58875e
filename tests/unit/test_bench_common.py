"""bench/common.py `write_section`: a benchmark rewriting its section of docs/PERFORMANCE.md
changes that section alone, the separators around it included."""
from __future__ import annotations

from pathlib import Path

from bench.common import write_section

DOC = """\
# Performance

## One

one's text

---

## Two

two's old text

---

<a id="three"></a>

## Three

three's text
"""


def test_rewriting_a_section_keeps_the_rule_and_anchor_before_the_next(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text(DOC, encoding="utf-8")
    write_section(str(doc), "## Two", "## Two\n\ntwo's new text\n")
    assert doc.read_text(encoding="utf-8") == DOC.replace("two's old text", "two's new text")


def test_rewriting_twice_changes_nothing_more(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text(DOC, encoding="utf-8")
    for _ in range(2):
        write_section(str(doc), "## One", "## One\n\none's new text\n")
    assert doc.read_text(encoding="utf-8") == DOC.replace("one's text", "one's new text")


def test_a_section_that_brings_its_own_rule_gets_no_second_one(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text(DOC, encoding="utf-8")
    write_section(str(doc), "## One", "## One\n\nnew\n\n---\n")
    assert doc.read_text(encoding="utf-8").count("---") == 2


def test_the_last_section_and_a_new_one(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text(DOC, encoding="utf-8")
    write_section(str(doc), "## Three", "## Three\n\nthree's new text\n")
    write_section(str(doc), "## Four", "## Four\n\nfour\n")
    assert doc.read_text(encoding="utf-8") == DOC.replace(
        "three's text", "three's new text") + "\n---\n\n## Four\n\nfour\n"
