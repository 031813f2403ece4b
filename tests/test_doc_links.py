"""Every relative link in README.md and docs/*.md names a file that exists and, with `#anchor`, a heading there
(GitHub's slug rule): a renamed heading or moved file otherwise leaves the front door pointing nowhere."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.M | re.S)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but `-` and `_` dropped, spaces to `-`."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for line in FENCE.sub("", page.read_text()).splitlines():
        if match := re.match(r"#{1,6} (.*)", line):
            base = slug(match.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(page: Path) -> list[str]:
    return [target for target in LINK.findall(FENCE.sub("", page.read_text()))
            if not re.match(r"[a-z]+:", target)]


def test_slug_follows_github():
    assert slug("Bases: `base add | list | show | rm`") == "bases-base-add--list--show--rm"
    assert slug("A tour of every command (real output, from the demo)") == \
        "a-tour-of-every-command-real-output-from-the-demo"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_relative_links_resolve(page):
    broken = []
    for target in links(page):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{page.name}: " + ", ".join(broken)


def test_the_tied_head_table_counted_as_it_is():
    """docs/architectures.md said the table held 85 classes (72 → 84, then CSM) after FSMT and Whisper's two joined."""
    from loraops.check import TIED_HEAD_OF_CLASS

    text = (ROOT / "docs" / "architectures.md").read_text()
    heading = re.search(r"^### More classes in `TIED_HEAD_OF_CLASS` \(72 → 84; (\d+) now, with CSM, FSMT and "
                        r"Whisper's two, below\)$", text, re.M)
    listed = re.search(r"`check\.TIED_HEAD_OF_CLASS`: these (\d+) classes, plus CSM, FSMT and Whisper's two", text)
    assert heading and listed
    assert int(heading.group(1)) == int(listed.group(1)) + 4 == len(TIED_HEAD_OF_CLASS)
