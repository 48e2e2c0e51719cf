"""The README and docs/: short README, no references outside the repository, every relative link resolves.

Pure file reads (no processes, no imports of the product)."""
from __future__ import annotations

import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")  # [text](target) and ![alt](target)
CODE = re.compile(r"```.*?```", re.S)  # fenced blocks: commands and outputs, not links


def name(path: str) -> str:
    return os.path.relpath(path, ROOT)


def text(path: str) -> str:
    with open(path, encoding="utf-8") as fh:
        return fh.read()


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (but - and _), spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: str) -> set[str]:
    return {slug(h) for h in re.findall(r"^#{1,6} (.+)$", CODE.sub("", text(path)), re.M)}


def test_readme_is_short():
    lines = text(os.path.join(ROOT, "README.md")).count("\n")
    assert lines <= 250, f"README.md has {lines} lines: move detail into docs/ (limit 250)"


@pytest.mark.parametrize("page", PAGES, ids=name)
def test_no_references_outside_the_repository(page):
    body = text(page)
    for bad in (r"\.\./shared", r"/work/", r"\bissue #?[0-9]", r"\bthe issue's\b"):
        hit = re.search(bad, body, re.I)
        assert not hit, f"{name(page)} refers to something outside the repository: {hit.group(0)!r}"


@pytest.mark.parametrize("page", PAGES, ids=name)
def test_relative_links_resolve(page):
    for target in LINK.findall(CODE.sub("", text(page))):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
        assert os.path.commonpath([dest, ROOT]) == ROOT, f"{name(page)}: {target} leaves the repository"
        assert os.path.exists(dest), f"{name(page)}: {target} points at a missing file"
        if anchor and dest.endswith(".md"):
            assert anchor in anchors(dest), f"{name(page)}: {target}: no such heading in {name(dest)}"
