"""The artifacts an operator installs: ``python -m build`` makes an sdist that carries contrib/
and a wheel that installs into a clean virtual environment and runs.

The build runs on a copy of the source tree (building writes ``build/`` and ``*.egg-info``
beside the sources, which must not touch the checkout), in build's usual isolated
environment.  The fresh venv has no access to this one's packages: pip resolves the
dependencies from the configured index, as an operator's ``pip install`` would.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import mmproxy

ROOT = Path(__file__).resolve().parent.parent
# Not sources: environments, caches, build output, results.
NOT_SOURCES = shutil.ignore_patterns(
    ".git",
    ".venv*",
    "__pycache__",
    "*.egg-info",
    ".*_cache",
    ".hypothesis",
    ".fuzz-corpus",
    "build",
    "dist",
    "results",
)


def run(*args: str | Path, cwd: Path | None = None) -> str:
    done = subprocess.run(
        [str(arg) for arg in args],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=cwd,
        check=False,
    )
    assert done.returncode == 0, f"{args}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The sdist and the wheel, built by ``python -m build`` (the wheel from the sdist)."""
    work = tmp_path_factory.mktemp("build")
    source = work / "source"
    shutil.copytree(ROOT, source, ignore=NOT_SOURCES)
    out = work / "dist"
    run(sys.executable, "-m", "build", "--outdir", out, source)
    (sdist,) = out.glob("mmproxy-*.tar.gz")
    (wheel,) = out.glob("mmproxy-*-py3-none-any.whl")
    return sdist, wheel


def test_sdist_carries_contrib_and_the_docs(artifacts: tuple[Path, Path]) -> None:
    sdist, _ = artifacts
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    shipped = {path.relative_to(ROOT).as_posix() for path in (ROOT / "contrib").rglob("*")}
    assert shipped, "contrib/ is empty"
    assert shipped <= names, sorted(shipped - names)
    assert {"README.md", "CHANGELOG.md", "pyproject.toml", "mmproxy/cli.py"} <= names
    assert not [name for name in names if "__pycache__" in name or name.endswith(".pyc")]


def test_wheel_holds_the_package_only(artifacts: tuple[Path, Path]) -> None:
    _, wheel = artifacts
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    top = {name.split("/", 1)[0] for name in names}
    assert top == {"mmproxy", f"mmproxy-{mmproxy.__version__}.dist-info"}, top
    modules = {path.name for path in (ROOT / "mmproxy").iterdir() if path.suffix in (".py", "")}
    assert {f"mmproxy/{name}" for name in modules if name.endswith(".py")} <= set(names)
    assert "mmproxy/py.typed" in names


def test_wheel_installs_into_a_clean_venv_and_runs(
    artifacts: tuple[Path, Path], tmp_path: Path
) -> None:
    """What the README's production install does: a dedicated venv, the wheel, its console
    script; the daemon's whole import graph loads and a configuration checks out."""
    _, wheel = artifacts
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv)
    run(venv / "bin" / "python", "-m", "pip", "install", "--quiet", wheel)
    script = venv / "bin" / "mmproxy"
    assert run(script, "--version").split()[-1] == mmproxy.__version__
    subnets = ROOT / "contrib" / "allowed-subnets.example"
    flags = ["-l", "127.0.0.1:25577", "-4", "127.0.0.1:25578", "-allowed-subnets", subnets]
    resolved = json.loads(run(script, *flags, "--check-config"))
    assert resolved["listen"] == "127.0.0.1:25577"
    # From tmp_path, so that ``-c`` cannot find the checkout's package instead.
    imports = "import mmproxy.daemon, mmproxy.commands, mmproxy.routing, mmproxy.demo\n"
    show = "import mmproxy; print(mmproxy.__file__)"
    location = run(venv / "bin" / "python", "-c", imports + show, cwd=tmp_path)
    assert location.startswith(str(venv)), location
