"""The daemon says which interpreter runs it and whether the GIL is on, as an operator reads it.

These run under whichever interpreter runs the suite: CI runs the end-to-end suite twice, with
the GIL build and with a free-threaded build, and each test asserts what is right for the
interpreter at hand (``sys.executable`` runs both pytest and the daemon).
"""

from __future__ import annotations

import platform
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
from daemon_runner import StartDaemon

FREE_THREADED = bool(sysconfig.get_config_var("Py_GIL_DISABLED"))


def _line(daemon_logs: list[dict[str, object]], msg: str) -> dict[str, object]:
    found = [line for line in daemon_logs if line.get("msg") == msg]
    assert found, f"no {msg!r} line in {daemon_logs}"
    return found[0]


def test_start_up_names_the_interpreter_and_the_gil(mmproxy: StartDaemon) -> None:
    daemon = mmproxy()
    assert daemon.wait_for(lambda line: line.get("msg") == "ready"), daemon.describe()
    starting = _line(daemon.logs, "starting")
    ready = _line(daemon.logs, "ready")
    python = str(starting["python"])
    assert python.startswith(f"CPython {platform.python_version()}")
    assert python.endswith(" free-threaded") is FREE_THREADED
    # A free-threaded build runs the daemon without the GIL: nothing it imports turns it on.
    assert starting["gil"] is (not FREE_THREADED)
    assert ready["gil"] is (not FREE_THREADED)
    warnings = [line for line in daemon.logs if line.get("level") == "WARN"]
    assert not any("GIL" in str(line.get("msg")) for line in warnings), warnings
    assert "GIL" not in daemon.stderr


def test_a_gil_forced_on_is_reported_with_its_cause(
    monkeypatch: pytest.MonkeyPatch, mmproxy: StartDaemon
) -> None:
    """PYTHON_GIL=1 on a free-threaded build: a warning that names it; a GIL build ignores it."""
    monkeypatch.setenv("PYTHON_GIL", "1")  # before 3.13 an unknown variable, ignored
    daemon = mmproxy()
    assert daemon.wait_for(lambda line: line.get("msg") == "ready"), daemon.describe()
    assert _line(daemon.logs, "ready")["gil"] is True
    reported = [line for line in daemon.logs if "GIL" in str(line.get("msg"))]
    if FREE_THREADED:
        assert [line["level"] for line in reported] == ["WARN"], daemon.describe()
        assert "switched on by PYTHON_GIL=1" in str(reported[0]["msg"])
    else:
        assert reported == [], daemon.describe()


# A C extension module that declares nothing about the GIL: importing it on a free-threaded
# build switches the GIL back on, as an operator's site-wide extension might.
GIL_NEEDING_EXTENSION = r"""
#include <Python.h>
static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "needs_the_gil", NULL, 0, NULL};
PyMODINIT_FUNC PyInit_needs_the_gil(void) { return PyModuleDef_Init(&def); }
"""


def test_an_extension_that_switched_the_gil_on_is_named(
    monkeypatch: pytest.MonkeyPatch, mmproxy: StartDaemon, tmp_path: Path
) -> None:
    """Imported at interpreter start (sitecustomize), before mmproxy runs: found by elimination."""
    source = tmp_path / "needs_the_gil.c"
    source.write_text(GIL_NEEDING_EXTENSION)
    built = tmp_path / f"needs_the_gil{sysconfig.get_config_var('EXT_SUFFIX')}"
    compiler = shutil.which("cc") or shutil.which("gcc")
    assert compiler, "the test suite's install brings gcc"
    subprocess.run(
        [compiler, "-shared", "-fPIC", "-I", sysconfig.get_paths()["include"], str(source),
         "-o", str(built)],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    (tmp_path / "sitecustomize.py").write_text("import needs_the_gil\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    daemon = mmproxy()
    assert daemon.wait_for(lambda line: line.get("msg") == "ready"), daemon.describe()
    reported = [line for line in daemon.logs if "GIL" in str(line.get("msg"))]
    if FREE_THREADED:
        assert _line(daemon.logs, "ready")["gil"] is True
        assert [line["level"] for line in reported] == ["WARN"], daemon.describe()
        warning = str(reported[0]["msg"])
        assert "needs_the_gil" in warning, daemon.describe()
        assert "_socket" not in warning, "the standard library's own modules are not suspects"
    else:
        assert _line(daemon.logs, "ready")["gil"] is True
        assert reported == [], daemon.describe()
