"""What CI runs comes from the README: the reader finds the two marked commands and only them."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
READER = ROOT / ".ci" / "readme-commands"


def commands(markdown: Path) -> list[str]:
    result = subprocess.run(
        ["bash", str(READER), str(markdown)], capture_output=True, text=True, check=True, timeout=10
    )
    return result.stdout.splitlines()


def test_the_readme_gives_ci_an_install_and_a_test_command() -> None:
    install, test = commands(ROOT / "README.md")
    assert "pip install -e '.[test]'" in install
    assert "apt-get install" in install
    assert test.endswith("-m pytest")


def test_only_the_marked_block_counts_and_continuations_join(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "```sh\nnot this\n```\n"
        "<!-- ci: install, test -->\n"
        "```sh\n"
        "first part \\\n"
        "    second part\n"
        "\n"
        "run tests\n"
        "```\n"
        "```sh\nnor this\n```\n"
    )
    assert commands(page) == ["first part     second part", "run tests"]


def test_no_marker_gives_no_command(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("```sh\ninstall\ntest\n```\n")
    assert commands(page) == []
