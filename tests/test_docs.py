"""The README and the docs pages: every relative link resolves, anchors included; the README stays short."""

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")
CODE_BLOCK = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)


def slug(heading: str) -> str:
    """GitHub's (and mkdocs' default) anchor of a heading: lower case, punctuation dropped, spaces to dashes."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = CODE_BLOCK.sub("", page.read_text())
    return {slug(line.lstrip("#")) for line in text.splitlines() if re.match(r"#{1,6} ", line)}


def links(page: Path) -> list[str]:
    text = CODE_BLOCK.sub("", page.read_text())
    text = re.sub(r"`[^`\n]*`", "", text)  # inline code is not a link
    return [a or b for a, b in LINK.findall(text)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page):
    broken = []
    for target in links(page):
        if re.match(r"^[a-z]+:", target):
            continue  # an address on the web
        path, _, anchor = target.partition("#")
        file = page if not path else (page.parent / path).resolve()
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading #{anchor} in {file.name}")
    assert not broken, f"{page.relative_to(REPO)}: " + "; ".join(broken)


def test_docs_pages_link_only_within_docs():
    # the docs site is built from docs/ alone (mkdocs --strict refuses links out of it): name
    # repository files as code paths instead
    outside = [f"{page.name}: {target}" for page in PAGES[1:] for target in links(page)
               if not re.match(r"^[a-z]+:", target) and target.startswith("..")]
    assert not outside


def test_every_docs_page_is_linked_from_the_readme_and_in_the_site_nav():
    readme = set(links(REPO / "README.md"))
    nav = (REPO / "mkdocs.yml").read_text()
    for page in PAGES[1:]:
        if page.name == "index.md":
            continue
        assert f"docs/{page.name}" in readme, page.name
        assert f" {page.name}" in nav, page.name
