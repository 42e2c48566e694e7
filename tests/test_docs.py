"""The README and docs/ hold together: every relative link and image in them points at a file
that exists (anchors aside), and the README stays a short first read."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MARKDOWN = [README, *sorted((ROOT / "docs").rglob("*.md"))]
README_MAX_LINES = 200

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
INLINE_CODE = re.compile(r"`[^`\n]*`")
# [text](target) and ![alt](target), with an optional "title" after the target.
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")  # http:, https:, mailto:, ...


def relative_targets(markdown: str) -> list[str]:
    """The relative link and image targets of a markdown text, without their #anchor.

    Code blocks and code spans are left out (a link's text may be code: its target counts).

    >>> relative_targets("[a](docs/x.md#top) ![b](p.png) [c](https://x.org) [d](#here)")
    ['docs/x.md', 'p.png']
    >>> relative_targets("```\\n[e](not/a/link.md)\\n```\\n[`f`](y.md)")
    ['y.md']
    """
    text = INLINE_CODE.sub("", FENCE.sub("", markdown))
    targets = []
    for match in LINK.finditer(text):
        target = match.group(1)
        if target.startswith("#") or SCHEME.match(target):
            continue
        path = unquote(target.split("#", 1)[0].split("?", 1)[0])
        if path:
            targets.append(path)
    return targets


def test_there_are_docs() -> None:
    assert README.is_file()
    assert len(MARKDOWN) > 1, "docs/ holds no markdown"


@pytest.mark.parametrize("page", MARKDOWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page: Path) -> None:
    """Each relative target exists, read from the folder of the file that links to it."""
    missing = [t for t in relative_targets(page.read_text()) if not (page.parent / t).exists()]
    assert not missing, f"{page.relative_to(ROOT)} links to missing files: {missing}"


def test_readme_is_short() -> None:
    lines = len(README.read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; the rest belongs in docs/"


MEASURED = re.compile(r"<!-- measured: ([0-9a-f]{7,40}) (benchmarks/\S+\.py) -->")


def _changed_since(commit: str, script: str) -> list[str]:
    """The commits after ``commit`` that changed ``script`` (git's history of this checkout)."""
    import subprocess

    known = subprocess.run(
        ["git", "-C", str(ROOT), "cat-file", "-e", f"{commit}^{{commit}}"], capture_output=True
    )
    if known.returncode != 0:
        pytest.skip(f"commit {commit} is not in this checkout's history (a shallow clone)")
    log = subprocess.run(
        ["git", "-C", str(ROOT), "log", "--format=%h", f"{commit}..HEAD", "--", script],
        capture_output=True,
        text=True,
        check=True,
    )
    return log.stdout.split()


def test_results_whose_script_changed_are_marked_stale() -> None:
    """Each section of docs/performance.md names the commit and script it was measured with;
    it says **Stale** exactly when the script changed after that commit."""
    text = (ROOT / "docs" / "performance.md").read_text()
    sections = re.split(r"^## ", text, flags=re.M)[1:]
    checked = 0
    for section in sections:
        title = section.splitlines()[0]
        for commit, script in MEASURED.findall(section):
            assert (ROOT / script).is_file(), (title, script)
            changed = _changed_since(commit, script)
            said = "**Stale:**" in section and f"`{script}` (after {commit})" in section
            assert said == bool(changed), (title, script, commit, changed)
            checked += 1
    assert checked >= 6
