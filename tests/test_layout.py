"""The shape of the package that keeps it easy to see: checked so it cannot drift back.

Criteria are chosen through the registry (no comparisons against a criterion's name outside
``allocation/criteria``), the root holds few modules, the README stays short and links its docs
pages, the wizard stays proportionate, and the product speaks in words its users know.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lightning_fisher.allocation.criteria import criterion_names

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "lightning_fisher"


def _sources(folder: Path) -> list[Path]:
    return sorted(path for path in folder.rglob("*.py") if "__pycache__" not in path.parts)


def _comparison() -> re.Pattern:
    """``x == "trace"``, ``"spectrum" != x``, ``x in ("trace", ...)`` for every registered criterion."""
    names = "|".join(map(re.escape, criterion_names()))
    return re.compile(rf"""[=!]=\s*['"]({names})['"]|['"]({names})['"]\s*[=!]=|\bin\s*[(\[{{][^)\]}}]*['"]({names})['"]""")


def test_no_comparison_against_a_criterion_name_outside_the_criteria_package():
    comparison = _comparison()
    found = [
        f"{path.relative_to(REPO)}:{number}: {line.strip()}"
        for path in _sources(PACKAGE)
        if "criteria" not in path.relative_to(PACKAGE).parts
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
        if comparison.search(line)
    ]
    assert len(found) <= 1, "\n".join(found)


def test_the_check_finds_a_comparison_when_there_is_one():
    comparison = _comparison()
    assert comparison.search('if settings.criterion == "spectrum":')
    assert comparison.search("if 'trace' != name:")
    assert comparison.search('if criterion in ("trace", "other"):')
    assert not comparison.search('criterion: str = "trace"')


def test_at_most_six_modules_at_the_package_root_besides_init_version_and_errors():
    root = {path.name for path in PACKAGE.glob("*.py")} - {"__init__.py", "_version.py", "errors.py"}
    assert len(root) <= 6, sorted(root)


def test_readme_is_short_and_links_its_docs_pages():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 200
    pages = set(re.findall(r"\]\((docs/[\w./-]+\.md)", readme))
    assert len(pages) >= 3 and all((REPO / page).is_file() for page in pages), pages


def test_the_wizard_is_at_most_800_lines():
    files = sorted((PACKAGE / "cli").glob("wizard*.py"))
    assert len(files) >= 3
    assert sum(len(path.read_text(encoding="utf-8").splitlines()) for path in files) <= 800


@pytest.mark.parametrize("words", [r"original feature", r"the seed's", r"\blent\b"])
def test_no_words_only_the_team_knows(words):
    texts = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md")), *_sources(PACKAGE)]
    found = [str(path.relative_to(REPO)) for path in texts if re.search(words, path.read_text(encoding="utf-8"), re.I)]
    assert not found
