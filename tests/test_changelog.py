"""CHANGELOG.md keeps the Keep a Changelog form, and its newest release is the package's version."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import mmproxy

ROOT = Path(__file__).resolve().parent.parent
RELEASE = re.compile(r"## \[(\d+\.\d+\.\d+)\] - (\d{4}-\d{2}-\d{2})")
KINDS = {"Added", "Changed", "Deprecated", "Removed", "Fixed", "Security"}


def headings(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("## ")]


def test_unreleased_comes_first_then_dated_releases_newest_first() -> None:
    found = headings((ROOT / "CHANGELOG.md").read_text())
    assert found[0] == "## [Unreleased]"
    releases = [RELEASE.fullmatch(line) for line in found[1:]]
    assert releases, "no release yet"
    assert all(releases), found
    versions = [tuple(int(part) for part in m.group(1).split(".")) for m in releases if m]
    assert versions == sorted(versions, reverse=True)


def test_sections_are_keep_a_changelog_kinds_and_each_change_is_one_line() -> None:
    for number, line in enumerate((ROOT / "CHANGELOG.md").read_text().splitlines(), 1):
        if line.startswith("### "):
            assert line[4:] in KINDS, f"line {number}: {line}"
        assert not line.startswith((" ", "\t")), f"line {number} continues a change: {line!r}"


def test_the_package_version_is_the_newest_release() -> None:
    text = (ROOT / "CHANGELOG.md").read_text()
    newest = next(m.group(1) for line in headings(text) if (m := RELEASE.fullmatch(line)))
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["version"] == newest
    assert mmproxy.__version__ == newest  # what --version prints
