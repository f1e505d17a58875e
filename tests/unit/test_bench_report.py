"""bench/report.py writes docs/PERFORMANCE.md from bench.run's results: the sections other
benchmarks write into the same page (with --docs) are kept as they are, in their order, each
with the anchor above its heading; hand-written notes follow their section; issue #19's
targets come from those benchmarks' own results."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench import report

PAGE = """\
# Performance

## Targets

old table

<a id="findings"></a>

## Findings: where the engine loses time, and the fixes proposed

old findings

---

## Rate accuracy (shaping)

rate text

---

<a id="bench-burst"></a>

## A burst's first deliveries

burst text

## Something a new benchmark wrote

its text
"""


@pytest.fixture
def page(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    doc = tmp_path / "PERFORMANCE.md"
    doc.write_text(PAGE, encoding="utf-8")
    findings = tmp_path / "findings.md"
    findings.write_text("## Findings: where the engine loses time, and the fixes proposed\n\n"
                        "new findings\n", encoding="utf-8")
    monkeypatch.setattr(report, "DOC", str(doc))
    monkeypatch.setattr(report, "FINDINGS", str(findings))
    monkeypatch.setattr(report, "NOTES", str(tmp_path / "notes"))
    return doc


@pytest.mark.timeout(30)
def test_sections_other_benchmarks_wrote_are_kept_in_order(page: Path) -> None:
    report.write({"sections": {}})
    text = page.read_text(encoding="utf-8")
    assert "new findings" in text and "old findings" not in text and "old table" not in text
    kept = ["## Rate accuracy (shaping)\n\nrate text",
            '<a id="bench-burst"></a>\n\n## A burst\'s first deliveries\n\nburst text',
            "## Something a new benchmark wrote\n\nits text"]
    at = [text.find(part) for part in kept]
    assert -1 not in at and at == sorted(at), text
    assert text.count('<a id="bench-burst"></a>') == 1
    report.write({"sections": {}})  # again: the same page
    assert page.read_text(encoding="utf-8") == text


@pytest.mark.timeout(30)
def test_a_sections_notes_follow_its_generated_text(page: Path, tmp_path: Path) -> None:
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "memory.md").write_text("**Tried and not kept:** a note.\n",
                                                  encoding="utf-8")
    with open(Path(report.ROOT) / "bench" / "results" / "latest.json", encoding="utf-8") as f:
        memory = json.load(f)["sections"]["memory"]  # the last run's, as bench.run saved it
    report.write({"sections": {"memory": memory}})
    text = page.read_text(encoding="utf-8")
    section = text[text.index('<a id="bench-memory"></a>'):text.index('<a id="findings"></a>')]
    assert section.rstrip().endswith("**Tried and not kept:** a note.")


@pytest.mark.timeout(30)
def test_issue_19s_targets_come_from_the_other_benchmarks_results(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tail judged on the runs of a quiet machine (a loaded one shown, not judged); the
    burst on the last run of 10,000 jobs (not a floor run of another size after it)."""
    def engine(run: str, p99: float, load: float) -> dict[str, Any]:
        return {"run": run, "delay": {"p50": 100.0, "p99": p99}, "other_load": load}

    def client(run: str) -> dict[str, Any]:
        return {"run": run, "client": "smtplib", "delay": {"p50": 100.0, "p99": 120.0}}
    tail = {"run 1: the engine": engine("run 1", 140.0, 0.05), "run 1: smtplib": client("run 1"),
            "run 2: the engine": engine("run 2", 300.0, 0.9), "run 2: smtplib": client("run 2"),
            "run 3: the engine": engine("run 3", 160.0, 0.1), "run 3: smtplib": client("run 3"),
            "alone": {"run": "alone", "delay": {"p50": 100.0, "p99": 100.0}}}
    burst = {"after": {"count": 10000,
                       "bursts": [{"nth_delivered_ms": v} for v in (40.0, 45.0, 70.0)]},
             "floor": {"count": 250, "bursts": [{"nth_delivered_ms": 99.0}]}}
    for name, data in (("tail", tail), ("burst", burst)):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(data), encoding="utf-8")
        monkeypatch.setattr(report, f"{name.upper()}_RESULTS", str(path))
    monkeypatch.setattr(report, "SCALE_RESULTS", str(tmp_path / "none.json"))
    rows = {target.split(":")[0]: (measured, ok, section)
            for target, measured, ok, section in report.queue_targets()}
    assert rows["tail"] == (
        "held in 1 of the 2 runs with at most 25% other load (run 1: 1.40x (5% other load),"
        " run 2: 3.00x (90% other load), run 3: 1.60x (10% other load))", False, "tail")
    assert rows["a burst of 10,000"] == ("45 ms (median of 3 bursts, `after`)", True, "burst")
    del tail["run 3: the engine"]  # only run 1 quiet, and it held
    (tmp_path / "tail.json").write_text(json.dumps(tail), encoding="utf-8")
    rows = {target.split(":")[0]: (measured, ok, section)
            for target, measured, ok, section in report.queue_targets()}
    assert rows["tail"][1] is True and rows["tail"][0].startswith("held in 1 of the 1 runs")
    assert not any(key.startswith("1M") for key in rows)  # no queue-scale results: no rows
