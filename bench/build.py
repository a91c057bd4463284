"""Compiles ``loadgen.c`` with the system compiler, once per version of the source.

The binary goes to a cache outside the checkout (``$XDG_CACHE_HOME/mmproxy-bench``, else
``~/.cache/mmproxy-bench``, else the temporary directory), named after a hash of the source and
the compile command, so an edited source or another compiler gets a fresh build and an
unchanged one is reused.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCE = Path(__file__).resolve().parent / "loadgen.c"
CFLAGS = ("-O2", "-Wall", "-Wextra", "-std=gnu11")


class BuildError(RuntimeError):
    """The load generator could not be compiled; the message says why in one line."""


def cache_dir() -> Path:
    """Where compiled load generators live."""
    base = os.environ.get("XDG_CACHE_HOME")
    if base:
        return Path(base) / "mmproxy-bench"
    home = Path.home()
    if home.is_dir() and os.access(home, os.W_OK):
        return home / ".cache" / "mmproxy-bench"
    return Path(tempfile.gettempdir()) / "mmproxy-bench"


def compiler() -> list[str]:
    """``$CC`` (may hold flags) or ``cc``."""
    return shlex.split(os.environ.get("CC", "cc")) or ["cc"]


def binary_name(source: bytes, command: list[str]) -> str:
    """``loadgen-<hash>``: changes with the source or the compile command."""
    digest = hashlib.sha256(source)
    digest.update("\0".join(command).encode())
    return f"loadgen-{digest.hexdigest()[:16]}"


def build(source: Path = SOURCE, directory: Path | None = None) -> Path:
    """The path of a load generator built from ``source``; compiles it if needed."""
    cc = compiler()
    if shutil.which(cc[0]) is None:
        raise BuildError(
            f"no C compiler: {cc[0]!r} not found (install gcc, or set CC); "
            "the load generator is C so that it is never the bottleneck"
        )
    text = source.read_bytes()
    command = [*cc, *CFLAGS]
    directory = directory or cache_dir()
    target = directory / binary_name(text, command)
    if target.is_file() and os.access(target, os.X_OK):
        return target
    directory.mkdir(parents=True, exist_ok=True)
    partial = directory / f".{target.name}.{os.getpid()}.tmp"
    try:
        result = subprocess.run(
            [*command, "-o", str(partial), str(source)],
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
        if result.returncode != 0:
            first = (result.stderr.strip().splitlines() or ["no output"])[0]
            raise BuildError(f"compiling {source.name} failed: {first}")
        partial.replace(target)  # atomic: a concurrent run sees the old binary or the new one
    finally:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
    return target
