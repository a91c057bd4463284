"""What the interpreter is: name, version, whether free-threaded, whether the GIL is on.

The relay is threads blocked in system calls, so it is at its fastest on a free-threaded CPython
(3.13t, 3.14t) with the GIL off.  On such a build, importing an extension module that has not
declared it can run without the GIL switches the GIL back on for the whole process, silently
apart from a ``RuntimeWarning``.  :func:`watch_gil` records those warnings from the moment it
is called, so that :func:`gil_problem` can name the module; modules imported before the watch
began are found by elimination (the extension modules loaded from outside the standard library).
"""

from __future__ import annotations

import os
import platform
import re
import sys
import sysconfig
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

# CPython's words when an import switches the GIL back on (Python/import.c, 3.13 and 3.14).
_GIL_ENABLED_BY = re.compile(r"GIL\) has been enabled to load module '([^']+)'")

_lock = threading.Lock()
_enabled_by: list[str] = []  # modules named by those warnings, in import order
_watching = False


def free_threaded_build() -> bool:
    """True on a CPython built with ``--disable-gil`` (whether or not the GIL is on now)."""
    return bool(sysconfig.get_config_var("Py_GIL_DISABLED"))


def gil_enabled() -> bool:
    """Whether the GIL is on now (always True before CPython 3.13)."""
    check: Callable[[], bool] | None = getattr(sys, "_is_gil_enabled", None)
    return True if check is None else bool(check())


def interpreter() -> str:
    """``CPython 3.13.5`` or ``CPython 3.13.5 free-threaded``: the start-up log's ``python``."""
    name = f"{platform.python_implementation()} {platform.python_version()}"
    return f"{name} free-threaded" if free_threaded_build() else name


def watch_gil() -> None:
    """Start recording which imports switch the GIL back on (idempotent; a no-op with a GIL build).

    Wraps :func:`warnings.showwarning`, which the warnings machinery calls for a warning that
    its filters let through; the warning is still shown as before.
    """
    global _watching
    if not free_threaded_build():
        return
    with _lock:
        if _watching:
            return
        _watching = True
        shown = warnings.showwarning

        def record(
            message: Warning | str,
            category: type[Warning],
            filename: str,
            lineno: int,
            file: TextIO | None = None,
            line: str | None = None,
        ) -> None:
            found = _GIL_ENABLED_BY.search(str(message))
            if found:
                with _lock:
                    _enabled_by.append(found.group(1))
            shown(message, category, filename, lineno, file, line)

        warnings.showwarning = record


def _requested() -> str | None:
    """The setting that asked for the GIL, if one did (``PYTHON_GIL=1`` or ``-X gil=1``)."""
    option: Any = sys._xoptions.get("gil")
    if option is not None and str(option) != "0":
        return f"-X gil={option}"
    value = os.environ.get("PYTHON_GIL")
    if value and value != "0":
        return f"PYTHON_GIL={value}"
    return None


def _foreign_extensions() -> list[str]:
    """Extension modules loaded from outside the standard library, by name."""
    # "stdlib", not "platstdlib": in a virtual environment the latter is the venv's own lib.
    stdlib = Path(sysconfig.get_path("stdlib")).resolve()
    found = []
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if not path or not path.endswith(".so"):
            continue
        where = Path(path).resolve()
        third_party = {"site-packages", "dist-packages"} & set(where.parts)
        if third_party or stdlib not in where.parents:
            found.append(name)
    return sorted(found)


def gil_problem() -> str | None:
    """On a free-threaded build with the GIL on: why, as well as it can be told; else None."""
    if not free_threaded_build() or not gil_enabled():
        return None
    requested = _requested()
    if requested:
        return f"the GIL was switched on by {requested}"
    with _lock:
        named = list(dict.fromkeys(_enabled_by))
    if named:
        return f"the GIL was switched on by importing {', '.join(named)}"
    suspects = _foreign_extensions()
    if suspects:
        return (
            "the GIL was switched on by an extension module that does not support running "
            f"without it; loaded from outside the standard library: {', '.join(suspects)}"
        )
    return "the GIL was switched on, cause unknown"
