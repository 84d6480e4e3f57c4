"""Every relative link in the README and the docs points to a file that exists and, with a
``#fragment``, to a heading of that file (GitHub's anchor rules). Pure text: no processes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.distributed_harness import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *ROOT.glob("examples/**/*.md")]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^\s*(```|~~~)")


def _prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped (letters of any script, digits,
    ``_`` and ``-`` kept), spaces to ``-``; repeats get ``-1``, ``-2``, ..."""
    seen: dict[str, int] = {}
    out = set()
    for line in _prose_lines(path.read_text()):
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not heading:
            continue
        slug = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        out.add(slug if count == 0 else f"{slug}-{count}")
    return out


def links(path: Path) -> list[str]:
    return [m.group(1) for line in _prose_lines(path.read_text()) for m in LINK.finditer(line)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path):
    broken = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, fragment = target.partition("#")
        linked = (page.parent / file_part).resolve() if file_part else page
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif fragment and linked.suffix == ".md" and fragment not in anchors(linked):
            broken.append(f"{target}: no heading with that anchor in {linked.name}")
    assert not broken, broken


def test_the_checker_catches_broken_links(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "# Choosing σ, ε and C\n## FSDP2 × TP memory\n```\n# not a heading\n[x](gone.md)\n```\n"
    )
    assert anchors(page) == {"choosing-σ-ε-and-c", "fsdp2--tp-memory"}
    assert links(page) == []
    page.write_text("[a](#choosing) [b](page.md#top) ![img](pic.png) [c](https://x.org/a)\n")
    assert links(page) == ["#choosing", "page.md#top", "https://x.org/a"]
