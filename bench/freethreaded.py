"""Provides a free-threaded CPython (``--disable-gil``) on a machine that has none.

``python3 -m bench.freethreaded`` prints the path of a free-threaded ``python3.13t`` on stdout,
building it first if the cache holds none.  Progress goes to stderr.  When the interpreter
cannot be had on this machine (not Linux, no apt-get or Debian keyring, no Debian archive in the
apt sources, the archive or the build packages out of reach) it says why in one line and exits
with :data:`EXIT_UNAVAILABLE` (3), which ``.ci/run`` treats as "skip this leg".  Any other
failure (a build step failing, an interpreter that is not free-threaded, a bug here) is one line
and exit status 1, and fails CI.

Where the source comes from: the upstream tarball of CPython 3.13 as Debian's archive ships it
(the ``.orig.tar.xz`` of the source package ``python3.13``), fetched with ``apt-get source``
under a private apt configuration kept in the cache, so the system's own sources, lists and
locks are never touched.  The archive is the one the system already uses (its first ``URIs:``
or ``deb`` line), with the suite that carries python3.13 (``trixie``).  apt checks the
tarball's hash against the signed index, as it does for any package.

Where it goes: ``$XDG_CACHE_HOME/mmproxy-bench/python-ft`` (else ``~/.cache/…``), outside the
checkout; a finished install is reused, so only the first run pays for the build (about 3
minutes on 2 cores).  Debian's own patches are not applied: this is the upstream interpreter,
built plainly (no PGO or LTO).

Operators who want the free-threaded interpreter for production should not build it this way:
``uv python install 3.14t`` (or a distribution's package, e.g. Fedora's
``python3.14-freethreading``) gives a supported, optimised build.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Sequence
from pathlib import Path

from bench.build import cache_dir

SOURCE_PACKAGE = "python3.13"
SUITE = "trixie"
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
# Debian packages the build needs for the modules pip and the test suite use (ssl, zlib, ctypes,
# bz2, lzma, sqlite3, readline); installed from the system's own sources when missing.
BUILD_PACKAGES = (
    "gcc",
    "make",
    "xz-utils",
    "libssl-dev",
    "zlib1g-dev",
    "libffi-dev",
    "libbz2-dev",
    "liblzma-dev",
    "libsqlite3-dev",
    "libreadline-dev",
    "uuid-dev",
)
# Every step is bounded: a stuck download or build ends the script instead of hanging CI.
APT_TIMEOUT = 600
BUILD_TIMEOUT = 3600


EXIT_FAILED = 1
EXIT_UNAVAILABLE = 3  # distinct from 1 (failure) and 2 (argparse's usage error)


class NoInterpreterError(RuntimeError):
    """No free-threaded interpreter came of it; the message says why in one line."""


class Unavailable(NoInterpreterError):  # noqa: N818 (the name says what the caller meets)
    """This machine lacks what it takes to get one (a platform, a tool, the archive)."""


class BuildFailed(NoInterpreterError):  # noqa: N818
    """Everything was there, and the build still failed: a real failure."""


def _log(message: str) -> None:
    print(f"bench.freethreaded: {message}", file=sys.stderr, flush=True)


def is_free_threaded(python: Path) -> bool:
    """Whether ``python`` runs and is a free-threaded build with the GIL off."""
    probe = (
        "import sys, sysconfig; "
        "sys.exit(0 if sysconfig.get_config_var('Py_GIL_DISABLED') "
        "and not sys._is_gil_enabled() else 1)"
    )
    try:
        result = subprocess.run([str(python), "-c", probe], capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


def installed(root: Path) -> Path | None:
    """A finished install under ``root`` (the ``current`` link written last), if it works."""
    python = root / "current" / "bin" / "python3.13t"
    return python if is_free_threaded(python) else None


def archive_uri(sources: Sequence[Path] = ()) -> str:
    """The Debian archive this system installs from, read from its own apt sources."""
    paths = list(sources) or [
        Path("/etc/apt/sources.list"),
        *sorted(Path("/etc/apt/sources.list.d").glob("*.sources")),
        *sorted(Path("/etc/apt/sources.list.d").glob("*.list")),
    ]
    for path in paths:
        try:
            text = path.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip()
            deb822 = re.match(r"URIs:\s*(\S+)", line)
            one_line = re.match(r"deb(?:-src)?\s+(?:\[[^]]*\]\s+)?(\S+)\s+(\S+)", line)
            uri = deb822.group(1) if deb822 else one_line.group(1) if one_line else ""
            # The main archive, not its security or third-party siblings.
            if uri.rstrip("/").endswith("/debian"):
                return uri.rstrip("/")
    raise Unavailable("no Debian archive found in the system's apt sources")


def _run(
    command: Sequence[str],
    timeout: float,
    cwd: Path | None = None,
    what: str = "",
    failure: type[NoInterpreterError] = Unavailable,
) -> None:
    """Run one step; raise ``failure`` (one line) when it fails, times out or cannot start."""
    try:
        result = subprocess.run(
            list(command), cwd=cwd, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as exc:
        raise failure(f"{what or command[0]} did not finish in {timeout:.0f} s") from exc
    except OSError as exc:
        raise failure(f"{what or command[0]} could not run: {exc.strerror}") from exc
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines() or ["no output"]
        errors = [line for line in lines if re.search(r"\b(E:|error)", line, re.IGNORECASE)]
        raise failure(f"{what or command[0]} failed: {(errors or lines)[-1].strip()}")


def install_build_packages() -> None:
    """Installs what the compile needs from the system's own sources, if anything is missing."""
    missing = []
    for package in BUILD_PACKAGES:
        try:
            query = subprocess.run(
                ["dpkg-query", "-W", "-f=${Status}", package],
                capture_output=True,
                text=True,
                timeout=60,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise Unavailable(f"cannot ask dpkg which build packages are installed: {exc}") from exc
        if "install ok installed" not in query.stdout:
            missing.append(package)
    if not missing:
        return
    _log(f"installing build packages: {' '.join(missing)}")
    environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-upgrade", *missing],
    ):
        try:
            subprocess.run(
                command, check=True, capture_output=True, env=environment, timeout=APT_TIMEOUT
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise Unavailable(f"installing build packages failed: {' '.join(command)}") from exc


def fetch_source(work: Path) -> Path:
    """Downloads the upstream tarball of python3.13 through a private apt configuration."""
    if shutil.which("apt-get") is None:
        raise Unavailable("apt-get not found: the source comes from Debian's archive")
    if not KEYRING.is_file():
        raise Unavailable(f"{KEYRING} missing: cannot verify Debian's archive")
    apt = work / "apt"
    for sub in ("lists/partial", "cache/archives/partial"):
        (apt / sub).mkdir(parents=True, exist_ok=True)
    sources = apt / "sources.list"
    sources.write_text(f"deb-src [signed-by={KEYRING}] {archive_uri()} {SUITE} main\n")
    options = [
        f"-oDir::Etc::SourceList={sources}",
        "-oDir::Etc::SourceParts=/nonexistent",  # nothing from the system's sources.list.d
        f"-oDir::State::Lists={apt / 'lists'}",
        f"-oDir::Cache={apt / 'cache'}",
        "-oAPT::Sandbox::User=root",  # the private directories belong to root, not _apt
        "-q",
    ]
    _run(["apt-get", *options, "update"], APT_TIMEOUT, what="apt-get update (private)")
    download = work / "source"
    shutil.rmtree(download, ignore_errors=True)
    download.mkdir()
    _run(
        ["apt-get", *options, "source", "--download-only", SOURCE_PACKAGE],
        APT_TIMEOUT,
        cwd=download,
        what=f"apt-get source {SOURCE_PACKAGE}",
    )
    tarballs = sorted(download.glob(f"{SOURCE_PACKAGE}_*.orig.tar.xz"))
    if not tarballs:
        raise Unavailable(f"apt-get source {SOURCE_PACKAGE} brought no .orig.tar.xz")
    return tarballs[-1]


def build(tarball: Path, root: Path, jobs: int) -> Path:
    """Configures, compiles and installs the tarball with ``--disable-gil`` under ``root``."""
    version = tarball.name.split("_")[1].removesuffix(".orig.tar.xz")
    tree = root / "build"
    shutil.rmtree(tree, ignore_errors=True)
    tree.mkdir(parents=True)
    _log(f"unpacking {tarball.name}")
    with tarfile.open(tarball) as archive:
        archive.extractall(tree, filter="data")
    (source,) = [path for path in tree.iterdir() if path.is_dir()]
    prefix = root / f"python-{version}t"
    shutil.rmtree(prefix, ignore_errors=True)
    _log(f"building CPython {version} with --disable-gil into {prefix} ({jobs} jobs)")
    _run(
        [
            "./configure",
            "--disable-gil",
            f"--prefix={prefix}",
            "--with-ensurepip=install",
            "--disable-test-modules",
        ],
        BUILD_TIMEOUT,
        cwd=source,
        what="configure",
        failure=BuildFailed,
    )
    _run(["make", f"-j{jobs}"], BUILD_TIMEOUT, cwd=source, what="make", failure=BuildFailed)
    _run(["make", "install"], BUILD_TIMEOUT, cwd=source, what="make install", failure=BuildFailed)
    python = prefix / "bin" / "python3.13t"
    if not is_free_threaded(python):
        raise BuildFailed(f"{python} was built but is not a free-threaded interpreter")
    # The link is written last and atomically, so a half-finished build is never "installed".
    link = root / "current.tmp"
    link.unlink(missing_ok=True)
    link.symlink_to(prefix.name)
    link.replace(root / "current")
    shutil.rmtree(tree, ignore_errors=True)
    return python


def provide(root: Path, jobs: int) -> Path:
    """A free-threaded interpreter: the cached one, else one built now."""
    python = installed(root)
    if python is not None:
        return python
    if sys.platform != "linux":
        raise Unavailable("building from Debian's source package needs Linux")
    root.mkdir(parents=True, exist_ok=True)
    install_build_packages()
    tarball = fetch_source(root)
    return build(tarball, root, jobs)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m bench.freethreaded", description=__doc__)
    parser.add_argument(
        "--cache",
        type=Path,
        default=cache_dir() / "python-ft",
        help="where the interpreter is built and kept (default: %(default)s)",
    )
    parser.add_argument(
        "--jobs", type=int, default=os.cpu_count() or 1, help="parallel compile jobs"
    )
    args = parser.parse_args(argv)
    try:
        python = provide(args.cache.resolve(), max(1, args.jobs))
    except Unavailable as exc:
        _log(f"no free-threaded interpreter: UNAVAILABLE on this machine: {exc}")
        return EXIT_UNAVAILABLE
    except Exception as exc:  # noqa: BLE001 - any other failure is one line and fails CI
        _log(f"no free-threaded interpreter: FAILED: {type(exc).__name__}: {exc}")
        return EXIT_FAILED
    print(python)
    return 0


if __name__ == "__main__":
    sys.exit(main())
