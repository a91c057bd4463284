"""The interpreter facts the start-up log reports, and naming what switched the GIL back on."""

from __future__ import annotations

import platform
import sys
import sysconfig
import warnings

import pytest

from mmproxy import runtime

# CPython's own text (Python/import.c) when an extension module switches the GIL on.
CPYTHON_WARNING = (
    "The global interpreter lock (GIL) has been enabled to load module 'fake_ext', which has "
    "not declared that it can run safely without the GIL. To override this behavior and keep "
    "the GIL disabled (at your own risk), run with PYTHON_GIL=0 or -Xgil=0."
)


def test_the_facts_match_this_interpreter() -> None:
    build = bool(sysconfig.get_config_var("Py_GIL_DISABLED"))
    assert runtime.free_threaded_build() is build
    assert runtime.interpreter().startswith(f"CPython {platform.python_version()}")
    assert runtime.interpreter().endswith("free-threaded") is build
    expected = sys._is_gil_enabled() if hasattr(sys, "_is_gil_enabled") else True
    assert runtime.gil_enabled() is expected
    # This suite runs as an operator would: nothing it imports switched the GIL back on.
    assert runtime.gil_problem() is None


@pytest.fixture
def free_threaded_with_gil(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend to be a free-threaded build whose GIL got switched on, watching from scratch."""
    monkeypatch.setattr(runtime, "free_threaded_build", lambda: True)
    monkeypatch.setattr(runtime, "gil_enabled", lambda: True)
    monkeypatch.setattr(runtime, "_watching", False)
    monkeypatch.setattr(runtime, "_enabled_by", [])
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # restored afterwards
    monkeypatch.delenv("PYTHON_GIL", raising=False)
    monkeypatch.setattr(sys, "_xoptions", {})


@pytest.mark.usefixtures("free_threaded_with_gil")
def test_the_import_that_switched_the_gil_on_is_named() -> None:
    shown: list[str] = []
    with warnings.catch_warnings():  # restores showwarning, wrapper and all
        warnings.simplefilter("always")
        warnings.showwarning = lambda message, *_args: shown.append(str(message))
        runtime.watch_gil()
        runtime.watch_gil()  # idempotent: one wrapper, one record per warning
        warnings.warn_explicit(CPYTHON_WARNING, RuntimeWarning, "<frozen>", 1)
    assert runtime.gil_problem() == "the GIL was switched on by importing fake_ext"
    assert shown == [CPYTHON_WARNING]  # the warning is still shown as before


@pytest.mark.usefixtures("free_threaded_with_gil")
def test_other_warnings_name_nothing() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = lambda *_args: None
        runtime.watch_gil()
        warnings.warn_explicit("something else", RuntimeWarning, "<x>", 1)
    problem = runtime.gil_problem()
    assert problem is not None
    assert "fake_ext" not in problem


@pytest.mark.usefixtures("free_threaded_with_gil")
@pytest.mark.parametrize(
    ("env", "xoptions", "named"),
    [("1", {}, "PYTHON_GIL=1"), (None, {"gil": "1"}, "-X gil=1")],
)
def test_a_setting_that_asked_for_the_gil_is_named(
    monkeypatch: pytest.MonkeyPatch, env: str | None, xoptions: dict[str, str], named: str
) -> None:
    if env is not None:
        monkeypatch.setenv("PYTHON_GIL", env)
    monkeypatch.setattr(sys, "_xoptions", xoptions)
    assert runtime.gil_problem() == f"the GIL was switched on by {named}"


def test_no_problem_on_a_gil_build(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "free_threaded_build", lambda: False)
    monkeypatch.setattr(runtime, "gil_enabled", lambda: True)
    assert runtime.gil_problem() is None


def test_the_standard_librarys_extensions_are_not_suspects() -> None:
    import _socket  # an extension module of the standard library, in every build

    assert _socket.__name__ not in runtime._foreign_extensions()
