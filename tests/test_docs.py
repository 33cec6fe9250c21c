"""The README stays an introduction, CI can read its commands, and every docs page is on the site."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"

#: The README's longest allowed length: what a new user reads in about ten minutes.
README_MAX_LINES = 200

#: The commands .ci/run reads from the README (``readme_block`` there), exactly as CI runs them.
COMMAND_BLOCKS = {
    "example-command": (
        'pip install torch==2.13.0 && pip install -e ".[examples]" && python examples/digits.py'
    ),
    "test-command": 'pip install torch==2.13.0 && pip install -e ".[dev]" && python -m pytest -q',
}


def readme_block(text: str, name: str) -> list[str]:
    """The lines between ``<!-- name -->`` and ``<!-- /name -->``, without code fences (as .ci/run)."""
    lines, on = [], False
    for line in text.split("\n"):
        if f"<!-- {name} -->" in line:
            on = True
            continue
        if f"<!-- /{name} -->" in line:
            on = False
        if on and not line.startswith("```"):
            lines.append(line)
    return lines


def nav_pages(nav: list) -> list[str]:
    """Every page path in an mkdocs ``nav`` (nested sections flattened)."""
    pages = []
    for entry in nav:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        if isinstance(value, list):
            pages += nav_pages(value)
        else:
            pages.append(value)
    return pages


def test_readme_is_short():
    lines = README.read_text().split("\n")
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail to docs/"


@pytest.mark.parametrize("name", sorted(COMMAND_BLOCKS))
def test_readme_keeps_the_commands_ci_reads(name):
    assert readme_block(README.read_text(), name) == [COMMAND_BLOCKS[name]]


def test_readme_block_reader_matches_ci():
    """The reader above is .ci/run's awk (start and end markers, fences dropped)."""
    ci = (ROOT / ".ci" / "run").read_text()
    assert "index($0, start) { on = 1; next }" in ci and "on && !/^```/ { print }" in ci
    assert 'test_command="$(readme_block test-command)"' in ci


def test_every_docs_page_is_in_the_nav_and_every_nav_page_exists():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    in_nav = nav_pages(config["nav"])
    on_disk = sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md"))
    assert sorted(set(in_nav)) == sorted(in_nav), "a page is in the nav twice"
    assert sorted(set(on_disk) - set(in_nav)) == [], "docs pages missing from mkdocs.yml's nav"
    assert sorted(set(in_nav) - set(on_disk)) == [], "nav entries without a page"


def test_readme_links_to_docs_pages_that_exist():
    links = re.findall(r"\]\((docs/[^)#]+)", README.read_text())
    assert links, "the README links to the documentation"
    assert [link for link in links if not (ROOT / link).is_file()] == []


def test_the_example_of_driving_the_mechanism_without_a_trainer_runs():
    page = (ROOT / "docs" / "concepts" / "architecture.md").read_text()
    code = page.split("```python\n", 1)[1].split("```", 1)[0]
    printed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT, check=True
    ).stdout
    promised = code.split("print(mechanism.ledger.segments)  # ", 1)[1].splitlines()[0]
    assert printed.strip() == promised
