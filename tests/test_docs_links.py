"""Every relative link in README.md, CHANGELOG.md and docs/*.md points to a file that exists, and every link to a
heading of a Markdown file (``page.md#heading``, ``#heading``) to a heading that exists (GitHub's anchors)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = sorted([REPO / "README.md", REPO / "CHANGELOG.md", *(REPO / "docs").glob("*.md")])
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s+<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$", re.M)


def _prose(text: str) -> str:
    """The text without fenced code blocks and inline code spans (links there are not links)."""
    text = re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", text, flags=re.M | re.S)
    return re.sub(r"(`+)(?:(?!\1).)+?\1", "", text, flags=re.S)


def links(page: Path) -> list[str]:
    prose = _prose(page.read_text(encoding="utf-8"))
    return LINK.findall(prose) + REFERENCE.findall(prose)


def _external(target: str) -> bool:
    return bool(re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I))  # http:, https:, mailto:, ...


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors (the heading's text in lower case, code marks and punctuation other than '-' and '_'
    dropped, spaces to '-', repeats numbered) and explicit ``<a id="...">`` anchors."""
    seen: dict[str, int] = {}
    out: set[str] = set()
    fence = None
    for line in page.read_text(encoding="utf-8").splitlines():
        m = re.match(r"^\s{0,3}(```|~~~)", line)
        if m:
            fence = None if fence == m.group(1) else fence or m.group(1)
            continue
        if fence:
            continue
        out.update(re.findall(r"<a\s+(?:id|name)=\"([^\"]+)\"", line))  # explicit HTML anchors
        m = re.match(r"^\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", m.group(1)).replace("`", "").lower()
        slug = re.sub(r"[^\w\- ]", "", text).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_point_to_existing_files(page: Path):
    missing = []
    for target in links(page):
        if _external(target) or target.startswith("#"):
            continue
        path = target.split("#", 1)[0].split("?", 1)[0]
        if not (page.parent / path).exists():
            missing.append(target)
    assert not missing, f"{page.relative_to(REPO)} links to files that do not exist: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_links_to_headings_point_to_existing_headings(page: Path):
    missing = []
    for target in links(page):
        if _external(target) or "#" not in target:
            continue
        path, anchor = target.split("#", 1)
        dest = (page.parent / path) if path else page
        if dest.suffix != ".md" or not dest.is_file():
            continue  # a missing file is the other test's failure
        if anchor not in anchors(dest):
            missing.append(target)
    assert not missing, f"{page.relative_to(REPO)} links to headings that do not exist: {missing}"


def test_the_checker_finds_links_and_anchors_and_skips_code(tmp_path: Path):
    page = tmp_path / "probe.md"
    page.write_text("# The `probe` (page)\n\n[a](x.md) ![i](images/p.png) `[no](code.md)` [web](https://example.com)\n"
                    "```\n[no](block.md)\n# not a heading\n```\n## Same\n## Same\n<a id=\"own\"></a>\n",
                    encoding="utf-8")
    assert links(page) == ["x.md", "images/p.png", "https://example.com"]
    assert anchors(page) == {"the-probe-page", "same", "same-1", "own"}
    assert len(PAGES) > 3
