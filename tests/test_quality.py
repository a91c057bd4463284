"""The quality gates, run as tests so the README's one test command covers them.

ruff (lint and format) over the whole tree and mypy --strict over the package and the
benchmark harness.
They run the tools installed by the test extra, from this interpreter's
environment, so a developer and CI see the same verdict.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, check=False
    )


def test_ruff_lint() -> None:
    result = _run("ruff", "check", "--no-cache", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format() -> None:
    result = _run("ruff", "format", "--no-cache", "--check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.timeout(300)
def test_mypy_strict() -> None:
    result = _run("mypy", "--strict", "mmproxy", "bench")
    assert result.returncode == 0, result.stdout + result.stderr
