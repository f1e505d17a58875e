"""The suite's own layout: every test file sits in a tier folder, so none escapes the tier
markers and timeouts tests/conftest.py sets from the folder; and no module imports a test
module: what tests share lives in tests/support/."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import PROPERTY_TIMEOUT, TIERS
from tests.support import ROOT

TESTS = ROOT / "tests"


def files_of_tests() -> list[Path]:
    return sorted(TESTS.rglob("test_*.py"))


def test_every_test_file_is_in_a_tier_folder() -> None:
    """Regression (issue #12): 33 flat files, no tier in their names or folders, and tests
    that started the whole engine without the `integration` marker."""
    outside = [str(path.relative_to(TESTS)) for path in files_of_tests()
               if path.relative_to(TESTS).parts[0] not in TIERS]
    assert outside == [], f"test files outside tests/{{{','.join(TIERS)}}}/: {outside}"
    assert all((TESTS / tier / "__init__.py").is_file() for tier in TIERS)


def test_no_module_imports_a_test_module() -> None:
    """Regression (issue #12): seven test files imported helpers from other test files."""
    found = [f"{path.relative_to(TESTS)} imports {name}"
             for path in sorted(TESTS.rglob("*.py")) for name in imported(path)
             if name.rpartition(".")[2].startswith("test_")]
    assert found == [], "shared helpers belong in tests/support/"


@settings(max_examples=1)
@given(st.none())
def test_a_property_test_is_collected(_: None) -> None:
    """So that the session below always holds at least one property test."""


def test_property_tests_get_the_property_timeout(request: pytest.FixtureRequest) -> None:
    """Regression: a 300-example property test ran over the unit tier's 10 s on a loaded CI
    machine with Debian's hypothesis."""
    properties = [item for item in request.session.items
                  if getattr(getattr(item, "obj", None), "is_hypothesis_test", False)]
    assert properties
    for item in properties:
        marker = item.get_closest_marker("timeout")
        assert marker is not None and marker.args[0] >= PROPERTY_TIMEOUT, item.nodeid


def imported(path: Path) -> set[str]:
    """The modules `path` imports, absolute (`from tests.x import y` counts tests.x.y too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the importing file's package, `level` - 1 up
                package = path.relative_to(ROOT).parent.parts
                base = ".".join((*package[:len(package) - node.level + 1], base)).strip(".")
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names
