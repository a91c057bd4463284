"""``.ci/run`` itself, run for real against a stand-in checkout.

The script is copied into a temporary checkout with a README whose shell block records what the
steps saw, and ``python3`` on PATH is a stand-in that plays ``bench.freethreaded`` (with the
exit status a test chooses) and the free-threaded interpreter, its pip and its pytest.  So each
branch of the script runs as CI runs it, in seconds, without installing or building anything.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from bench import freethreaded

ROOT = Path(__file__).resolve().parent.parent

README = """# stand-in

<!-- ci: install, test -->
```sh
echo "CI=${CI:-unset}" > steps.txt
echo tested >> steps.txt
```
"""

# python3: the GIL interpreter's version line, and bench.freethreaded.
PYTHON3 = """#!/bin/bash
if [ "$1" = "--version" ]; then echo "Python 3.99 (stand-in)"; exit 0; fi
if [ "$1" = "-m" ] && [ "$2" = "bench.freethreaded" ]; then
    echo "the stand-in's reason" >&2
    if [ "$FT_STATUS" = 0 ]; then echo "$FT_PYTHON"; fi
    exit "$FT_STATUS"
fi
exit 99
"""

# The free-threaded interpreter: -VV, and -m venv DIR making a pip and a python (pytest).
FT = """#!/bin/bash
if [ "$1" = "-VV" ]; then echo "Python 3.13.0 experimental free-threading build"; exit 0; fi
if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then
    mkdir -p "$3/bin"
    printf '#!/bin/bash\\nexit "$PIP_STATUS"\\n' > "$3/bin/pip"
    printf '#!/bin/bash\\necho "$*" > ft-pytest.txt\\nexit "$PYTEST_STATUS"\\n' > "$3/bin/python"
    chmod +x "$3/bin/pip" "$3/bin/python"
    exit 0
fi
exit 98
"""


def _script(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    root = tmp_path / "checkout"
    (root / ".ci").mkdir(parents=True)
    for script in ("run", "readme-commands"):
        shutil.copy(ROOT / ".ci" / script, root / ".ci" / script)
    (root / "README.md").write_text(README)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _script(bin_dir / "python3", PYTHON3)
    _script(tmp_path / "ft-python", FT)
    return root


def run_ci(
    checkout: Path, ft: int, pip: int = 0, pytest_status: int = 0
) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if key not in ("CI", "VIRTUAL_ENV")}
    env.update(
        PATH=f"{checkout.parent / 'bin'}:/usr/bin:/bin",
        FT_STATUS=str(ft),
        FT_PYTHON=str(checkout.parent / "ft-python"),
        PIP_STATUS=str(pip),
        PYTEST_STATUS=str(pytest_status),
    )
    return subprocess.run(
        ["bash", str(checkout / ".ci" / "run")],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


def test_the_readme_steps_run_with_ci_set(checkout: Path) -> None:
    done = run_ci(checkout, ft=0)
    assert done.returncode == 0, done
    assert (checkout / "steps.txt").read_text().splitlines() == ["CI=true", "tested"]
    assert "tests/e2e tests/unit" in (checkout / "ft-pytest.txt").read_text()


def test_unavailable_skips_the_free_threaded_leg_in_one_line(checkout: Path) -> None:
    done = run_ci(checkout, ft=freethreaded.EXIT_UNAVAILABLE)
    assert done.returncode == 0, done
    assert "== free-threaded: UNAVAILABLE on this machine" in done.stdout
    assert not (checkout / "ft-pytest.txt").exists()


@pytest.mark.parametrize("status", [freethreaded.EXIT_FAILED, 2, 120])
def test_any_other_failure_of_the_interpreter_fails_ci(checkout: Path, status: int) -> None:
    done = run_ci(checkout, ft=status)
    assert done.returncode != 0, done
    assert f"FAILED (exit {status}" in done.stderr
    assert not (checkout / "ft-pytest.txt").exists()


def test_a_failed_venv_install_fails_ci(checkout: Path) -> None:
    done = run_ci(checkout, ft=0, pip=1)
    assert done.returncode != 0, done
    assert "virtual environment could not be installed" in done.stderr
    assert not (checkout / "ft-pytest.txt").exists()


def test_a_failing_free_threaded_test_fails_ci(checkout: Path) -> None:
    done = run_ci(checkout, ft=0, pytest_status=1)
    assert done.returncode == 1, done
    assert (checkout / "ft-pytest.txt").exists()


# ---------------------------------------------------------- bench.freethreaded's exit status


def test_freethreaded_exits_3_only_when_it_cannot_be_had(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def unavailable(root: Path, jobs: int) -> Path:
        raise freethreaded.Unavailable("apt-get not found")

    monkeypatch.setattr(freethreaded, "provide", unavailable)
    assert freethreaded.main(["--cache", str(tmp_path)]) == freethreaded.EXIT_UNAVAILABLE
    assert "UNAVAILABLE on this machine: apt-get not found" in capsys.readouterr().err


def test_a_build_that_fails_is_a_failure_not_unavailable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A real ``configure`` that fails (from a real tarball): exit 1, which fails CI."""
    source = tmp_path / "Python-3.13.0"
    source.mkdir()
    _script(source / "configure", "#!/bin/sh\necho 'configure: error: no compiler' >&2\nexit 1\n")
    tarball = tmp_path / "python3.13_3.13.0.orig.tar.xz"
    with tarfile.open(tarball, "w:xz") as archive:
        archive.add(source, arcname=source.name)

    def provide(root: Path, jobs: int) -> Path:
        return freethreaded.build(tarball, root, jobs)

    monkeypatch.setattr(freethreaded, "provide", provide)
    assert freethreaded.main(["--cache", str(tmp_path / "cache")]) == freethreaded.EXIT_FAILED
    err = capsys.readouterr().err
    assert "FAILED: BuildFailed: configure failed: configure: error: no compiler" in err


def test_a_bug_is_a_failure_too(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(root: Path, jobs: int) -> Path:
        raise KeyError("oops")

    monkeypatch.setattr(freethreaded, "provide", broken)
    assert freethreaded.main(["--cache", str(tmp_path)]) == freethreaded.EXIT_FAILED
    assert "FAILED: KeyError" in capsys.readouterr().err
