"""The interpreters that run mmproxy: checking that one can, and the free-threaded one's venv.

mmproxy runs as ``PYTHON -m mmproxy`` with this checkout first on ``PYTHONPATH``
(:func:`mmproxy_env`), so an interpreter needs mmproxy's dependencies, not mmproxy itself.
:func:`check_mmproxy` tries that very import before anything is measured, so that an
interpreter without them is one line at the start rather than a failure per measurement.

``--free-threaded`` with no value takes the interpreter :mod:`bench.freethreaded` provides
(built into the cache on first use) and runs mmproxy from a virtual environment made for it next
to it, ``<cache>/python-ft/venv``, with this checkout installed (``pip install -e``), which
brings the dependencies.  The environment is made once and reused: a stamp file in it records
what it was made from (the interpreter, the checkout, a hash of ``pyproject.toml``); another
checkout or an edited ``pyproject.toml`` installs again, another interpreter makes it afresh.
``--free-threaded=PATH`` uses PATH as it is.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench import freethreaded
from bench.build import cache_dir

REPO = Path(__file__).resolve().parent.parent
STAMP = "mmproxy-bench.json"
CHECK_TIMEOUT = 60.0
VENV_TIMEOUT = 300.0
INSTALL_TIMEOUT = 900.0
LOCK_TIMEOUT = VENV_TIMEOUT + INSTALL_TIMEOUT  # another run may be making the same venv

# subprocess.run, or a stand-in for it in the tests
Run = Callable[..., subprocess.CompletedProcess[str]]


class InterpreterError(RuntimeError):
    """No interpreter for a target; the message is the one line shown to the user."""


def _say(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def mmproxy_env(checkout: Path = REPO) -> dict[str, str]:
    """mmproxy's environment: no ``MMPROXY_*`` settings, the checkout first on the path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MMPROXY_")}
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = f"{checkout}{os.pathsep}{path}" if path else str(checkout)
    return env


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def check_mmproxy(python: str, flag: str, run: Run = subprocess.run) -> None:
    """Raises :class:`InterpreterError` unless ``python`` imports mmproxy as the harness runs it."""
    try:
        result = run(
            [python, "-c", "import mmproxy.cli"],
            env=mmproxy_env(),
            capture_output=True,
            text=True,
            timeout=CHECK_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise InterpreterError(
            f"{flag}: {python} did not import mmproxy within {CHECK_TIMEOUT:g} s"
        ) from None
    except OSError as error:
        raise InterpreterError(f"{flag}: {python} could not run: {error.strerror}") from None
    if result.returncode != 0:
        raise InterpreterError(
            f"{flag}: {python} cannot import mmproxy ({_last_line(result.stderr)}); it needs "
            f"mmproxy's dependencies: make a venv of it and pip install -e {REPO} there"
        )


# ------------------------------------------------------------------ the free-threaded venv


def stamp_for(interpreter: Path, checkout: Path) -> dict[str, str]:
    """What a virtual environment is made from; a difference means installing again."""
    try:
        pyproject = hashlib.sha256((checkout / "pyproject.toml").read_bytes()).hexdigest()
    except OSError:
        pyproject = ""
    return {
        "interpreter": str(interpreter.resolve()),
        "checkout": str(checkout.resolve()),
        "pyproject": pyproject,
    }


def _read_stamp(venv: Path) -> dict[str, Any] | None:
    try:
        saved = json.loads((venv / STAMP).read_text())
    except (OSError, ValueError):
        return None
    return saved if isinstance(saved, dict) else None


def plan(venv: Path, wanted: dict[str, str]) -> str:
    """``reuse``, ``install`` (this checkout again) or ``create`` (a fresh venv, then install).

    A venv without a stamp is one whose install never finished: it is made afresh.
    """
    saved = _read_stamp(venv)
    if not (venv / "bin" / "python").exists() or saved is None:
        return "create"
    if saved.get("interpreter") != wanted["interpreter"]:
        return "create"
    return "reuse" if saved == wanted else "install"


def _step(run: Run, argv: list[str], timeout: float, what: str) -> None:
    try:
        result = run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise InterpreterError(f"--free-threaded: {what} did not finish in {timeout:g} s") from None
    except OSError as error:
        raise InterpreterError(f"--free-threaded: {what} could not run: {error.strerror}") from None
    if result.returncode != 0:
        output = result.stderr or result.stdout
        raise InterpreterError(f"--free-threaded: {what} failed: {_last_line(output)}")


@contextlib.contextmanager
def _locked(path: Path, timeout: float) -> Iterator[None]:
    """Holds an exclusive lock on ``path`` (two runs never build one venv at once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        end = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > end:
                    raise InterpreterError(
                        f"--free-threaded: {path} stayed locked for {timeout:g} s "
                        "(another run making the venv?)"
                    ) from None
                time.sleep(0.5)
        yield  # the lock goes with the file's closing


def ensure_venv(
    interpreter: Path, venv: Path, checkout: Path = REPO, run: Run = subprocess.run
) -> str:
    """The python of a venv of ``interpreter`` with ``checkout`` installed; made when needed."""
    wanted = stamp_for(interpreter, checkout)
    python = venv / "bin" / "python"
    with _locked(venv.parent / f"{venv.name}.lock", LOCK_TIMEOUT):
        step = plan(venv, wanted)
        if step == "reuse":
            return str(python)
        if step == "create":
            _say(f"making a virtual environment for {interpreter} in {venv}")
            _step(
                run,
                [str(interpreter), "-m", "venv", "--clear", str(venv)],
                VENV_TIMEOUT,
                "making the virtual environment",
            )
        (venv / STAMP).unlink(missing_ok=True)
        _say(f"installing {checkout} into {venv}")
        _step(
            run,
            [str(python), "-m", "pip", "install", "-q", "-e", str(checkout)],
            INSTALL_TIMEOUT,
            f"pip install -e {checkout}",
        )
        (venv / STAMP).write_text(json.dumps(wanted, indent=1) + "\n")
    return str(python)


def free_threaded(
    request: str,
    root: Path | None = None,
    run: Run = subprocess.run,
    provide: Callable[[Path, int], Path] = freethreaded.provide,
) -> str:
    """The interpreter of ``mmproxy-ft``: PATH as given, or "" for the cache's own (see above)."""
    if request:
        check_mmproxy(request, "--free-threaded", run)
        return request
    root = root or cache_dir() / "python-ft"
    if freethreaded.installed(root) is None:
        _say(f"no free-threaded CPython in {root} yet: building one (minutes, once)")
    try:
        interpreter = provide(root, os.cpu_count() or 1)
    except freethreaded.NoInterpreterError as error:
        raise InterpreterError(f"--free-threaded: no free-threaded interpreter: {error}") from None
    python = ensure_venv(interpreter, root / "venv", REPO, run)
    check_mmproxy(python, "--free-threaded", run)
    return python
