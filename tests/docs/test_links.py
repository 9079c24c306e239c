"""The manual holds together: every relative link in README.md, docs/, load/ and
deploy/ resolves (file and #anchor, GitHub's anchor rules), README.md stays a front door
(at most 250 lines), and load/README.md names every make target of the load kit."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[2]
MANUAL = sorted(
    [
        ROOT / "README.md",
        ROOT / "load" / "README.md",
        ROOT / "deploy" / "README.md",
        *(ROOT / "docs").glob("*.md"),
    ]
)
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_FENCE = re.compile(r"^\s*(```|~~~)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
# The load kit's targets (Makefile): each has its section in load/README.md.
LOAD_TARGETS = ("bench", "instructions", "profile", "load", "soak", "screenshot")


def _prose(path: Path) -> list[tuple[int, str]]:
    """The lines outside fenced code blocks, numbered."""
    lines, fence = [], None
    for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
        match = _FENCE.match(line)
        if match:
            mark = match.group(1)
            fence = mark if fence is None else (None if line.strip().startswith(fence) else fence)
        elif fence is None:
            lines.append((number, line))
    return lines


def _slug(heading: str) -> str:
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    for _, line in _prose(path):
        match = _HEADING.match(line)
        if match:
            slug = _slug(match.group(2))
            seen[slug] = seen.get(slug, -1) + 1
            if seen[slug]:
                seen[f"{slug}-{seen[slug]}"] = 0
    return set(seen)


def _links(path: Path) -> list[tuple[int, str]]:
    found = []
    for number, raw in _prose(path):

        def blank(m: re.Match[str], s: str = raw) -> str:
            in_link_text = m.start() > 0 and s[m.start() - 1] == "[" and s.startswith("](", m.end())
            return m.group(0) if in_link_text else "X" * len(m.group(0))

        line = re.sub(r"`[^`]*`", blank, raw)  # a code span is not a link, unless it is its text
        for match in _LINK.finditer(line):
            target = match.group(1)
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):
                found.append((number, target))
    return found


@pytest.mark.parametrize("page", MANUAL, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page: Path) -> None:
    broken = []
    for number, target in _links(page):
        part, _, fragment = target.partition("#")
        dest = (page.parent / unquote(part)).resolve() if part else page
        if not dest.exists() or (ROOT not in dest.parents and dest != ROOT):
            broken.append(f"{number}: {target} (no such file in the repository)")
        elif fragment and (dest.suffix != ".md" or unquote(fragment) not in _anchors(dest)):
            broken.append(f"{number}: {target} (no such heading)")
    assert broken == [], f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_the_manual_has_the_chapters_the_readme_promises() -> None:
    for chapter in ("configuration", "resilience", "aggregation", "edge", "websockets"):
        assert (ROOT / "docs" / f"{chapter}.md").is_file()
    for chapter in ("operations", "limits", "deployment", "performance", "architecture"):
        assert (ROOT / "docs" / f"{chapter}.md").is_file()


def test_the_readme_is_a_front_door() -> None:
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= 250, f"README.md has {lines} lines; the manual belongs in docs/"


def test_the_load_readme_names_every_target_of_the_kit() -> None:
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    text = (ROOT / "load" / "README.md").read_text(encoding="utf-8")
    for target in LOAD_TARGETS:
        assert re.search(rf"^{target}:", makefile, re.MULTILINE), f"no `{target}` in Makefile"
        assert f"make {target}" in text, f"load/README.md does not describe `make {target}`"


def test_every_package_folder_is_named_in_the_architecture() -> None:
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    packages = [p.parent.name for p in (ROOT / "gateway").glob("*/__init__.py")]
    missing = [name for name in packages if f"`{name}/`" not in text]
    assert missing == [], f"docs/architecture.md does not name {missing}"
