"""``--free-threaded``: the flag, the cached virtual environment, and the report's two interpreters.

No network and no build here: the interpreter and pip are stand-ins wherever they would be
fetched or run for real; the short real run with ``--free-threaded`` is in test_bench_run.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

import pytest

from bench import chart, cli, freethreaded, interpreters, report
from bench.runner import Record
from bench.settings import (
    DIRECT,
    MMPROXY,
    MMPROXY_FT,
    Settings,
    SettingsError,
    Target,
    parse_peer,
)

FT_PYTHON = "/opt/ft/bin/python"

# ------------------------------------------------------------------------------ flag


def test_free_threaded_is_off_unless_asked_for() -> None:
    settings = cli.parse([])
    assert settings.free_threaded is None
    assert [t.name for t in settings.targets] == [DIRECT, MMPROXY]


def test_free_threaded_without_a_value_asks_for_the_cached_interpreter() -> None:
    assert cli.parse(["--free-threaded"]).free_threaded == ""
    # no value, then another flag: the flag is not taken for a PATH
    settings = cli.parse(["--free-threaded", "--only", "pingpong"])
    assert settings.free_threaded == ""
    assert settings.workloads == ("pingpong",)


def test_free_threaded_with_a_path_takes_it_as_an_absolute_path() -> None:
    relative = os.path.relpath(sys.executable)
    assert cli.parse([f"--free-threaded={relative}"]).free_threaded == os.path.abspath(relative)
    assert cli.parse(["--free-threaded", sys.executable]).free_threaded == sys.executable


def test_a_free_threaded_path_that_is_no_program_is_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli.main(["--free-threaded=/nonexistent/python3.13t"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert (
        err == "bench: error: --free-threaded: /nonexistent/python3.13t is not an executable file\n"
    )


def test_no_peer_may_take_the_free_threaded_targets_name() -> None:
    with pytest.raises(SettingsError, match="not a usable name"):
        parse_peer("mmproxy-ft=/bin/p -l {listen}")


def test_mmproxy_ft_follows_mmproxy_with_its_flags_and_its_own_interpreter() -> None:
    settings = cli.parse(
        ["--mmproxy-flags", "-listeners 2", "--peer", "go=/bin/go -l {listen}", "--free-threaded"]
    )
    assert [t.name for t in settings.targets] == [DIRECT, MMPROXY, "go"]  # not yet resolved
    both = settings.with_free_threaded(FT_PYTHON)
    assert [t.name for t in both.targets] == [DIRECT, MMPROXY, MMPROXY_FT, "go"]
    gil, ft = both.targets[1], both.targets[2]
    assert ft == Target(MMPROXY_FT, MMPROXY, flags=("-listeners", "2"), python=FT_PYTHON)
    assert gil.python is None
    assert both.interpreter(gil) == settings.python == sys.executable
    assert both.interpreter(ft) == FT_PYTHON
    assert both.with_free_threaded("/other").targets[2].python == "/other"  # replaced, not added
    assert len(both.with_free_threaded("/other").targets) == 4


def test_a_failed_free_threaded_interpreter_stops_the_run_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def unavailable(request: str) -> str:
        raise interpreters.InterpreterError(
            "--free-threaded: no free-threaded interpreter: apt-get not found"
        )

    monkeypatch.setattr(cli, "_preflight", lambda: None)
    monkeypatch.setattr(cli.build, "build", lambda: Path("/nonexistent/loadgen"))
    monkeypatch.setattr(interpreters, "free_threaded", unavailable)
    monkeypatch.setattr(cli.netns, "remove_stale", _must_not_run)  # it stops before any of it
    assert cli.main(["--free-threaded", "--only", "pingpong"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err == (
        "bench: error: --free-threaded: no free-threaded interpreter: apt-get not found\n"
    )


def _must_not_run() -> list[str]:
    raise AssertionError("the run went on after the interpreter failed")


# ------------------------------------------------------------------------ the check


def test_an_interpreter_that_imports_mmproxy_passes_the_check() -> None:
    interpreters.check_mmproxy(sys.executable, "--free-threaded")  # this venv has it all


def test_an_interpreter_without_mmproxys_dependencies_is_refused_in_one_line(
    tmp_path: Path,
) -> None:
    bare = tmp_path / "python3.13t"
    bare.write_text(
        "#!/bin/sh\necho \"ModuleNotFoundError: No module named 'click'\" >&2\nexit 1\n"
    )
    bare.chmod(0o755)
    with pytest.raises(interpreters.InterpreterError) as caught:
        interpreters.check_mmproxy(str(bare), "--free-threaded")
    message = str(caught.value)
    assert message.startswith(f"--free-threaded: {bare} cannot import mmproxy (")
    assert "No module named 'click'" in message
    assert f"make a venv of it and pip install -e {interpreters.REPO} there" in message
    assert "\n" not in message


def test_mmproxy_is_checked_and_run_with_this_checkout_first_on_the_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    monkeypatch.setenv("MMPROXY_LISTEN_ADDR", "0.0.0.0:1")
    env = interpreters.mmproxy_env()
    assert env["PYTHONPATH"] == f"{interpreters.REPO}{os.pathsep}/elsewhere"
    assert not [key for key in env if key.startswith("MMPROXY_")]


# ------------------------------------------------------------------- the cached venv


class FakeRun:
    """Stands in for subprocess.run: records which step ran; ``venv`` makes bin/python."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.fail: str | None = None

    def __call__(self, argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        assert kwargs["timeout"] > 0  # every step is bounded
        if argv[1:3] == ["-m", "venv"]:
            step = "venv"
            python = Path(argv[-1]) / "bin" / "python"
            python.parent.mkdir(parents=True, exist_ok=True)
            python.write_text("")
        elif argv[1:3] == ["-m", "pip"]:
            step = "pip"
            assert argv[-2] == "-e"  # this checkout, editable
        else:
            step = "check"
        self.calls.append(step)
        failed = step == self.fail
        return subprocess.CompletedProcess(argv, int(failed), "", "ERROR: boom\n" if failed else "")


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    tree = tmp_path / "checkout"
    tree.mkdir()
    (tree / "pyproject.toml").write_text('[project]\nname = "mmproxy"\n')
    return tree


def test_the_venv_is_made_once_and_reused(tmp_path: Path, checkout: Path) -> None:
    run, venv, python = FakeRun(), tmp_path / "venv", tmp_path / "python3.13t"
    assert interpreters.plan(venv, interpreters.stamp_for(python, checkout)) == "create"
    assert interpreters.ensure_venv(python, venv, checkout, run) == str(venv / "bin" / "python")
    assert run.calls == ["venv", "pip"]
    stamp = json.loads((venv / interpreters.STAMP).read_text())
    assert stamp == interpreters.stamp_for(python, checkout)
    assert stamp["checkout"] == str(checkout.resolve())
    run.calls.clear()
    assert interpreters.ensure_venv(python, venv, checkout, run) == str(venv / "bin" / "python")
    assert run.calls == []


def test_an_edited_pyproject_or_another_checkout_installs_again(
    tmp_path: Path, checkout: Path
) -> None:
    run, venv, python = FakeRun(), tmp_path / "venv", tmp_path / "python3.13t"
    interpreters.ensure_venv(python, venv, checkout, run)
    run.calls.clear()
    (checkout / "pyproject.toml").write_text('[project]\nname = "mmproxy"\nversion = "2"\n')
    interpreters.ensure_venv(python, venv, checkout, run)
    assert run.calls == ["pip"]
    other = tmp_path / "other"
    other.mkdir()
    (other / "pyproject.toml").write_bytes((checkout / "pyproject.toml").read_bytes())
    run.calls.clear()
    interpreters.ensure_venv(python, venv, other, run)
    assert run.calls == ["pip"]
    assert json.loads((venv / interpreters.STAMP).read_text())["checkout"] == str(other.resolve())


def test_another_interpreter_makes_the_venv_afresh(tmp_path: Path, checkout: Path) -> None:
    run, venv = FakeRun(), tmp_path / "venv"
    interpreters.ensure_venv(tmp_path / "python-3.13.5t", venv, checkout, run)
    run.calls.clear()
    interpreters.ensure_venv(tmp_path / "python-3.13.6t", venv, checkout, run)
    assert run.calls == ["venv", "pip"]


def test_a_failed_install_is_one_line_and_never_reused(tmp_path: Path, checkout: Path) -> None:
    run, venv, python = FakeRun(), tmp_path / "venv", tmp_path / "python3.13t"
    run.fail = "pip"
    with pytest.raises(interpreters.InterpreterError) as caught:
        interpreters.ensure_venv(python, venv, checkout, run)
    assert str(caught.value) == f"--free-threaded: pip install -e {checkout} failed: ERROR: boom"
    assert not (venv / interpreters.STAMP).exists()
    run.fail, run.calls = None, []
    interpreters.ensure_venv(python, venv, checkout, run)
    assert run.calls == ["venv", "pip"]  # half made: made again


def test_no_value_provides_the_interpreter_then_its_venv_then_checks_it(tmp_path: Path) -> None:
    run, provided = FakeRun(), tmp_path / "current" / "bin" / "python3.13t"
    asked: list[tuple[Path, int]] = []

    def provide(root: Path, jobs: int) -> Path:
        asked.append((root, jobs))
        return provided

    python = interpreters.free_threaded("", tmp_path, run, provide)
    assert python == str(tmp_path / "venv" / "bin" / "python")
    assert asked == [(tmp_path, os.cpu_count() or 1)]
    assert run.calls == ["venv", "pip", "check"]
    stamp = json.loads((tmp_path / "venv" / interpreters.STAMP).read_text())
    assert stamp["checkout"] == str(interpreters.REPO)
    run.calls.clear()
    assert interpreters.free_threaded("", tmp_path, run, provide) == python
    assert run.calls == ["check"]  # reused


def test_no_interpreter_to_be_had_is_one_line(tmp_path: Path) -> None:
    def provide(root: Path, jobs: int) -> Path:
        raise freethreaded.Unavailable("apt-get not found: the source comes from Debian's archive")

    with pytest.raises(interpreters.InterpreterError) as caught:
        interpreters.free_threaded("", tmp_path, FakeRun(), provide)
    assert str(caught.value) == (
        "--free-threaded: no free-threaded interpreter: "
        "apt-get not found: the source comes from Debian's archive"
    )


def test_a_path_is_only_checked(tmp_path: Path) -> None:
    run = FakeRun()
    assert interpreters.free_threaded("/opt/ft/bin/python", tmp_path, run) == "/opt/ft/bin/python"
    assert run.calls == ["check"]
    assert not (tmp_path / "venv").exists()


# --------------------------------------------------------------------------- report


def _both(*peers: Target) -> Settings:
    plain = Settings(
        duration=1.0,
        repeats=2,
        workloads=("bulk-up-1", "pingpong"),
        targets=(Target(DIRECT, DIRECT), Target(MMPROXY, MMPROXY), *peers),
        python=sys.executable,
    )
    return plain.with_free_threaded(FT_PYTHON)


def _records() -> list[Record]:
    records = []
    for repeat, (direct, gil, ft) in enumerate([(10.0, 5.0, 7.5), (12.0, 6.0, 9.0)]):
        records += [
            Record(repeat, "bulk-up-1", DIRECT, {"gbps": direct, "cpu_s_per_gb": None}),
            Record(repeat, "bulk-up-1", MMPROXY, {"gbps": gil, "cpu_s_per_gb": 0.5}),
            Record(repeat, "bulk-up-1", MMPROXY_FT, {"gbps": ft, "cpu_s_per_gb": 0.25}),
            Record(repeat, "pingpong", DIRECT, {"msgs_per_s": 100_000.0, "p50_ms": 0.4}),
            Record(repeat, "pingpong", MMPROXY, {"msgs_per_s": 10_000.0, "p50_ms": 2.0}),
            Record(repeat, "pingpong", MMPROXY_FT, {"msgs_per_s": 30_000.0, "p50_ms": 0.8}),
        ]
    return records


def _machine() -> dict[str, Any]:
    return {
        "cores": 2,
        "cpu_model": "AMD EPYC",
        "kernel": "6.1",
        "loadavg_start": [0.1, 0.1, 0.1],
        "loadavg_end": [0.2, 0.2, 0.2],
        "python_mmproxy": {
            "path": sys.executable,
            "version": "3.11.7 (main, May  9 2026, 07:35:25) [GCC 12.2.0]",
            "gil_enabled": True,
            "free_threaded_build": False,
        },
        "python_mmproxy_ft": {
            "path": FT_PYTHON,
            "version": "3.13.5 experimental free-threading build (main) [GCC 12.2.0]",
            "gil_enabled": False,
            "free_threaded_build": True,
        },
    }


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_the_table_compares_mmproxy_ft_with_direct_and_with_mmproxy() -> None:
    settings = _both(Target("go", "peer", "/bin/go -l {listen}"))
    lines = report.table(settings, report.summarise(settings, _records())).splitlines()
    assert _cells(lines[0]) == [
        *("workload", "figure", "direct", "mmproxy", "mmproxy-ft", "go"),
        *("mmproxy/direct", "mmproxy-ft/direct", "go/direct"),
        *("mmproxy-ft/mmproxy", "go/mmproxy"),
    ]
    rows = {(cells[0], cells[1]): cells[2:] for cells in map(_cells, lines[2:])}
    # medians: direct 11, mmproxy 5.5, mmproxy-ft 8.25 (go measured nothing)
    assert rows[("bulk upload, 1 conn", "Gbit/s")] == [
        *("11.0", "5.50", "8.25", "-"),
        *("0.50x", "0.75x", "-"),
        *("1.50x", "-"),
    ]
    assert rows[("bulk upload, 1 conn", "CPU s/GB")][7] == "0.50x"  # half the CPU per GB
    assert rows[("PING ping-pong, 50 conns", "msg/s")][7] == "3.00x"
    assert rows[("PING ping-pong, 50 conns", "p50 ms")][7] == "0.40x"


def test_the_json_carries_both_interpreters_and_replays_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings, records = _both(), _records()
    rows = report.summarise(settings, records)
    doc = report.document(settings, records, rows, _machine(), "start", "end")
    targets = {t["name"]: t for t in doc["targets"]}
    assert targets[MMPROXY]["python"] is None  # the run's --python
    assert targets[MMPROXY_FT]["python"] == FT_PYTHON
    assert targets[MMPROXY_FT]["flags"] == []
    gbps = doc["summary"][0]["targets"][MMPROXY_FT]
    assert gbps["median"] == pytest.approx(8.25)
    assert gbps["ratio_to_direct"] == pytest.approx(0.75)
    assert gbps["ratio_to_mmproxy"] == pytest.approx(1.5)  # free-threaded over GIL
    saved = tmp_path / "run.json"
    saved.write_text(json.dumps(doc))
    again, loaded, machine = report.load(json.loads(saved.read_text()))
    assert again.targets == settings.targets
    assert again.interpreter(again.targets[2]) == FT_PYTHON
    assert cli.main(["--from-json", str(saved)]) == cli.EXIT_OK
    out = capsys.readouterr().out
    assert out.startswith(report.table(settings, rows) + "\n\n")
    assert report.footer(settings, loaded, rows, machine) in out


def test_the_footer_names_both_interpreters_and_what_the_gil_was_in_each() -> None:
    settings, records = _both(), _records()
    rows = report.summarise(settings, records)
    footer = report.footer(settings, records, rows, _machine())
    assert (
        "; mmproxy on Python 3.11.7 (GIL), mmproxy-ft on Python 3.13.5 (free-threaded, GIL off).\n"
    ) in footer
    switched_on = _machine()
    switched_on["python_mmproxy_ft"]["gil_enabled"] = True
    assert "mmproxy-ft on Python 3.13.5 (free-threaded build, GIL on)." in report.footer(
        settings, records, rows, switched_on
    )
    # with mmproxy alone, the line is what it always was
    alone = Settings(
        duration=1.0,
        repeats=2,
        workloads=("bulk-up-1",),
        targets=(Target(DIRECT, DIRECT), Target(MMPROXY, MMPROXY)),
        python=sys.executable,
    )
    footer = report.footer(alone, [], report.summarise(alone, []), _machine())
    assert "; mmproxy on Python 3.11.7.\n" in footer


def test_a_free_threaded_target_with_the_gil_on_is_warned_about() -> None:
    settings = _both()
    assert report.interpreter_warnings(settings, _machine()) == []
    machine = _machine()
    machine["python_mmproxy_ft"]["gil_enabled"] = True
    (warning,) = report.interpreter_warnings(settings, machine)
    assert warning.startswith(f"mmproxy-ft runs on {FT_PYTHON}, where the GIL is on")
    del machine["python_mmproxy_ft"]  # not described at all: not known to be free-threaded
    assert len(report.interpreter_warnings(settings, machine)) == 1


def test_the_machine_describes_each_mmproxy_interpreter() -> None:
    plain = Settings(targets=(Target(MMPROXY, MMPROXY),), python=sys.executable)
    info = report.machine(plain.with_free_threaded(sys.executable))
    assert info["python_mmproxy"]["path"] == sys.executable
    assert info["python_mmproxy_ft"]["path"] == sys.executable
    for key in ("python_mmproxy", "python_mmproxy_ft"):
        assert info[key]["version"].split()[0] == ".".join(map(str, sys.version_info[:3]))
        gil = getattr(sys, "_is_gil_enabled", lambda: True)()
        assert info[key]["gil_enabled"] is gil
        assert info[key]["free_threaded_build"] is (not gil)
        assert info[key]["configure"] == (sysconfig.get_config_var("CONFIG_ARGS") or "")
    assert "python_mmproxy_ft" not in report.machine(plain)


def test_the_chart_draws_mmproxy_ft_beside_mmproxy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _both()
    rows = report.summarise(settings, _records())
    png = tmp_path / "chart.png"
    if not chart.available():  # the [bench] extra is not installed: nothing is drawn
        assert not chart.render(settings, rows, png)
        assert not png.exists()
        return
    from matplotlib import pyplot

    kept: list[Any] = []
    close = pyplot.close
    monkeypatch.setattr(pyplot, "close", kept.append)
    try:
        assert chart.render(settings, rows, png)
        (figure,) = kept
        legend = [text.get_text() for text in figure.axes[0].get_legend().get_texts()]
        assert legend == [MMPROXY, MMPROXY_FT]
    finally:
        for figure in kept:
            close(figure)
    assert png.read_bytes().startswith(b"\x89PNG")
