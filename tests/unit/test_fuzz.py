"""A bounded run of the atheris harness over the parser (tests/fuzz/fuzz_protocol.py).

The harness runs in a subprocess, as it would by hand: libFuzzer owns the process it runs in.
CONTRIBUTING.md gives the command for a longer run.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CI_SECONDS = 10  # the bounded CI run; CONTRIBUTING.md's longer run takes -max_total_time=600


def run_harness(
    tmp_path: Path, *args: str, code: str | None = None
) -> subprocess.CompletedProcess[str]:
    flags = [f"-seed_corpus={tmp_path / 'corpus'}", f"-artifact_prefix={tmp_path}/", *args]
    if code is None:
        command = [sys.executable, "-m", "tests.fuzz.fuzz_protocol", *flags]
    else:
        command = [sys.executable, "-c", code, *flags]
    return subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=CI_SECONDS + 90, check=False
    )


def test_bounded_fuzz_run_finds_nothing(tmp_path: Path) -> None:
    """Seeded with the unit corpus, the parser keeps its invariant for the whole run."""
    result = run_harness(tmp_path, f"-max_total_time={CI_SECONDS}", "-print_final_stats=1")
    assert result.returncode == 0, result.stderr[-4000:]
    done = re.search(r"Done (\d+) runs in", result.stderr)
    assert done, result.stderr[-4000:]
    assert int(done.group(1)) >= 1000  # a real run, not a start-up that ended at once
    assert not list(tmp_path.glob("crash-*"))


def test_harness_reports_a_parser_that_breaks_the_invariant(tmp_path: Path) -> None:
    """The harness is not vacuous: a parser that raises anything but HeaderError is caught."""
    code = textwrap.dedent(
        """
        import sys
        from tests.fuzz import fuzz_protocol as harness
        real = harness.parse
        def broken(data):
            if bytes(data[:6]) == b"PROXY " and len(data) > 30:
                raise ValueError("planted parser bug")
            return real(data)
        harness.parse = broken
        harness.main(sys.argv)
        """
    )
    result = run_harness(tmp_path, "-runs=2000", code=code)
    assert result.returncode != 0
    assert "planted parser bug" in result.stdout + result.stderr
    assert list(tmp_path.glob("crash-*"))
