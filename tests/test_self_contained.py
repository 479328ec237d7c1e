"""What a clone holds is all a reader gets: no tracked file outside tests/ may send them to the
development tree's notes beside the repository (`../shared`, its GXPO / DESIGN / PERF / STYLE
notes). The algorithms and the design live in docs/."""

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTES = ("GXPO", "DESIGN", "PERF", "STYLE")
# Upper case, as the notes are named: docs/design.md and docs/performance.md are this repo's own.
FORBIDDEN = re.compile(r"\.\./shared|/work/shared|\b(?:" + "|".join(NOTES) + r")\.md\b")


def _tracked_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True)
    return [name for name in out.stdout.decode().split("\0") if name]


def outside_references(names: list[str]) -> list[str]:
    """`path:line: text` for every line of the given repository files that points outside."""
    hits = []
    for name in names:
        if name.startswith("tests/"):
            continue
        path = REPO / name
        if not path.is_file():  # deleted in the working tree, not yet committed
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:  # images, binary results
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if FORBIDDEN.search(line):
                hits.append(f"{name}:{number}: {line.strip()[:120]}")
    return hits


def test_no_tracked_file_points_outside_the_repository():
    names = _tracked_files()
    assert "README.md" in names and "docs/algorithms.md" in names
    hits = outside_references(names)
    assert not hits, "point to docs/ instead (or inline the fact):\n" + "\n".join(hits)


@pytest.mark.parametrize(
    "line",
    [
        "see ../shared/GXPO.md",
        "data in ../shared/data beside the repo",
        "(DESIGN.md, Configs)",
        "PERF.md's anchor",
        "STYLE.md",
        "/work/shared/notes",
    ],
)
def test_the_pattern_catches_each_kind_of_reference(line):
    assert FORBIDDEN.search(line)


@pytest.mark.parametrize(
    "line",
    [
        "docs/algorithms.md",
        "[docs/design.md](docs/design.md)",
        "docs/performance.md",
        "shared_prefix_rows=G",
        "the shared-prompt forward",
    ],
)
def test_the_pattern_leaves_ordinary_words_alone(line):
    assert not FORBIDDEN.search(line)
