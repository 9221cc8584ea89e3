"""The manual: the README is its front door, every link in it resolves, and every page of the manual is linked."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MANUAL = [ROOT / "README.md", ROOT / "bench" / "README.md", ROOT / "deploy" / "README.md",
          *sorted((ROOT / "docs").glob("*.md"))]


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    heads = re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", path.read_text(), flags=re.S), re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in heads}


def test_every_relative_link_of_the_manual_resolves():
    checked = 0
    for page in MANUAL:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            assert dest.exists(), f"{page.relative_to(ROOT)}: link to {target}: no such file"
            if anchor:
                assert anchor in anchors(dest), f"{page.relative_to(ROOT)}: link to {target}: no such heading"
            checked += 1
    assert checked > 20


def test_the_front_door_is_short_and_links_every_page_of_the_manual():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) <= 25_000
    for page in MANUAL[1:]:
        assert f"]({page.relative_to(ROOT)})" in readme, page
    for section in ("## Quick start", "## The demo", "### How to read it", "## Running it for real",
                    "## The study commands", "## The report", "## The manual"):
        assert section in readme, section
