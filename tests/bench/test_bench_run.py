"""``python -m bench`` end to end on tiny settings: what it prints and writes, and what it leaves.

Nothing here looks at how fast anything was: only that every figure exists, that the output has
its shape, and that the namespace and every process the harness started are gone afterwards,
also when it is interrupted.  Needs root, iproute2 and a C compiler, like the e2e tests.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from bench import build, freethreaded, interpreters

ROOT = Path(__file__).resolve().parent.parent.parent
TAG = "BENCH_TEST_TAG"  # every process the harness starts inherits it: how leftovers are found


def _tagged_processes(tag: str) -> list[tuple[int, str]]:
    """Processes whose environment carries ``tag``: (pid, command line)."""
    found = []
    needle = f"{TAG}={tag}".encode()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            environ = Path(entry.path, "environ").read_bytes()
            cmdline = Path(entry.path, "cmdline").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0"):
            found.append((int(entry.name), cmdline.replace(b"\0", b" ").decode(errors="replace")))
    return found


def _start(tag: str, *args: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MMPROXY_")}
    env[TAG] = tag
    # Started the way a background job of a shell script is: SIGINT ignored (inherited across
    # exec).  Ctrl-C and kill -INT must stop the run all the same.
    return subprocess.Popen(
        ["sh", "-c", 'trap "" INT; exec "$@"', "sh", sys.executable, "-m", "bench", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _run_ok(tag: str, *args: str) -> tuple[int, str, str]:
    """Run the harness to the end; (pid, stdout, stderr) of a run that succeeded, no traceback."""
    proc = _start(tag, *args)
    try:
        stdout, stderr = proc.communicate(timeout=150)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr
    return proc.pid, stdout, stderr


def _assert_nothing_left(pid: int, tag: str) -> None:
    name = f"mmproxy-bench-{pid}"
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    assert name not in listed.stdout
    assert not Path("/run/netns", name).exists()
    assert _tagged_processes(tag) == []


@pytest.mark.timeout(180)
def test_tiny_run_prints_the_table_and_writes_json_and_chart_line(tmp_path: Path) -> None:
    tag = uuid.uuid4().hex
    out = tmp_path / "results.json"
    png = tmp_path / "chart.png"
    pid, stdout, stderr = _run_ok(
        tag,
        *("--only", "pingpong,idle,udp", "--duration", "0.5", "--repeats", "1"),
        *("--idle-connections", "40", "--json", str(out), "--png", str(png)),
        *("--note", "harness test"),
    )

    # the progress lines: one per measurement, each with its first figure
    steps = [line for line in stderr.splitlines() if line.startswith("[")]
    assert [line.split(": ")[0] for line in steps] == [
        "[1/6] repeat 1/1 pingpong via direct",
        "[2/6] repeat 1/1 pingpong via mmproxy",
        "[3/6] repeat 1/1 idle via direct",
        "[4/6] repeat 1/1 idle via mmproxy",
        "[5/6] repeat 1/1 udp via direct",
        "[6/6] repeat 1/1 udp via mmproxy",
    ]
    assert all(line.endswith(("msg/s", "held", "dgram/s")) for line in steps), steps
    if png.exists():
        assert png.read_bytes().startswith(b"\x89PNG")
    else:
        assert "chart skipped: matplotlib is not installed" in stderr

    # the table: header, alignment row, one row per figure, medians for both targets
    lines = stdout.splitlines()
    assert lines[0] == "| workload | figure | direct | mmproxy | mmproxy/direct |"
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:15]]
    assert [row[1] for row in rows] == [
        "msg/s",
        "p50 ms",
        "p99 ms",
        "CPU ms/1k msg",
        "held of 40",
        "RSS KiB/conn",
        "fds/conn",
        "threads/conn",
        "dgram/s",
        "lost",
        "p50 ms",
        "p99 ms",
        "CPU ms/1k dgram",
    ]
    for row in rows[:3]:
        assert "-" not in row[2:4], row
        assert row[4].endswith("x"), row
    assert rows[3][2] == "-"  # CPU is the proxy's: none for direct
    assert rows[3][3] != "-"
    assert rows[4][2:] == ["40", "40", "1.00x"]
    udp = {row[1]: row for row in rows[8:]}
    assert all(row[0] == "UDP echo, 50 flows x 16 in flight" for row in udp.values())
    for unit in ("dgram/s", "lost"):
        assert "-" not in udp[unit][2:4], udp[unit]  # medians for both targets (loss may be 0)
    # (the round trip needs an echo within the half second: on a loaded machine mmproxy's
    # first ones may come later, so only direct's is required)
    assert udp["p50 ms"][2] != "-"
    assert udp["dgram/s"][4].endswith("x")
    assert udp["CPU ms/1k dgram"][2] == "-"
    assert "Medians of 1 repeat(s) of 0.5 s per workload" in stdout
    assert "Note: harness test" in stdout

    # the JSON document
    doc = json.loads(out.read_text())
    assert doc["schema"] == "mmproxy-bench/1"
    assert doc["errors"] == 0
    assert doc["settings"]["workloads"] == ["pingpong", "idle", "udp"]
    assert doc["settings"]["note"] == "harness test"
    for key in ("cores", "cpu_model", "kernel", "python_harness", "python_mmproxy", "compiler"):
        assert doc["machine"][key], key
    assert doc["machine"]["python_mmproxy"]["path"] == sys.executable
    assert [t["name"] for t in doc["targets"]] == ["direct", "mmproxy"]
    runs = {(run["workload"], run["target"]): run for run in doc["runs"]}
    assert sorted(runs) == [
        ("idle", "direct"),
        ("idle", "mmproxy"),
        ("pingpong", "direct"),
        ("pingpong", "mmproxy"),
        ("udp", "direct"),
        ("udp", "mmproxy"),
    ]
    for run in doc["runs"]:
        assert run["error"] is None
        assert run["client"]["seconds"] > 0
        assert run["client"]["errors"] == 0
        assert run["client"]["mismatches"] == 0
    pingpong = runs[("pingpong", "mmproxy")]
    assert pingpong["client"]["messages"] > 0
    assert pingpong["proxy"]["ready"]["msg"] == "ready"
    assert pingpong["proxy"]["exit_code"] == 0
    assert pingpong["proxy"]["after_cpu_seconds"] >= pingpong["proxy"]["before_cpu_seconds"]
    assert pingpong["proxy"]["after_voluntary_switches"] > 0
    assert pingpong["loadavg"] >= 0
    assert pingpong["figures"]["cpu_ms_per_1k_msg"] is not None
    assert runs[("pingpong", "direct")]["figures"]["cpu_ms_per_1k_msg"] is None
    idle = runs[("idle", "mmproxy")]
    assert idle["client"]["opened"] == 40
    assert idle["client"]["backend_live"] == 40
    assert idle["figures"]["held"] == 40
    assert idle["figures"]["fds_per_conn"] is not None
    udp_run = runs[("udp", "mmproxy")]
    assert udp_run["client"]["sent"] >= 50 * 16  # every flow filled its window
    assert udp_run["client"]["received"] + udp_run["client"]["lost"] == udp_run["client"]["sent"]
    assert udp_run["client"]["addresses_used"] == 50  # one fake client per flow
    assert udp_run["client"]["kernel_udp"]["RcvbufErrors"] >= 0  # where a loss happened
    assert udp_run["proxy"]["ready"]["maxUdpFlows"] > 0  # mmproxy ran in UDP mode
    assert udp_run["proxy"]["cpu_seconds"] >= 0  # the figure is this per 1k datagrams echoed
    assert "cpu_ms_per_1k_dgram" in udp_run["figures"]
    assert runs[("udp", "direct")]["client"]["addresses_used"] == 0  # direct: no header
    summary = {(s["workload"], s["figure"]) for s in doc["summary"]}
    assert ("pingpong", "msgs_per_s") in summary
    assert ("idle", "rss_kib_per_conn") in summary
    assert ("udp", "lost") in summary

    _assert_nothing_left(pid, tag)


def _free_threaded_flag() -> tuple[str, str]:
    """``--free-threaded`` when the cache holds a built interpreter whose venv is current for
    this checkout (nothing to build or install: no network in a test), else ``--free-threaded=``
    this interpreter, which runs the same plumbing on a GIL build.  The interpreter mmproxy-ft
    will run on is the second item.
    """
    root = build.cache_dir() / "python-ft"
    built = freethreaded.installed(root)
    venv = root / "venv"
    if (
        built is not None
        and interpreters.plan(venv, interpreters.stamp_for(built, ROOT)) == "reuse"
    ):
        return "--free-threaded", str(venv / "bin" / "python")
    return f"--free-threaded={sys.executable}", sys.executable


@pytest.mark.timeout(180)
def test_a_run_with_free_threaded_measures_mmproxy_ft_beside_mmproxy(tmp_path: Path) -> None:
    tag = uuid.uuid4().hex
    out = tmp_path / "results.json"
    flag, python = _free_threaded_flag()
    pid, stdout, stderr = _run_ok(
        tag,
        *("--only", "pingpong", "--duration", "0.5", "--repeats", "1", "--json", str(out)),
        flag,
    )
    steps = [line.split(": ")[0] for line in stderr.splitlines() if line.startswith("[")]
    assert steps == [
        "[1/3] repeat 1/1 pingpong via direct",
        "[2/3] repeat 1/1 pingpong via mmproxy",
        "[3/3] repeat 1/1 pingpong via mmproxy-ft",
    ]
    doc = json.loads(out.read_text())
    ft = doc["machine"]["python_mmproxy_ft"]
    assert ft["path"] == python
    # a GIL interpreter passed as PATH is measured, and the run says what it is
    warned = "bench: warning: mmproxy-ft runs on" in stderr
    assert warned == (ft["gil_enabled"] is not False)

    lines = stdout.splitlines()
    assert lines[0] == (
        "| workload | figure | direct | mmproxy | mmproxy-ft "
        "| mmproxy/direct | mmproxy-ft/direct | mmproxy-ft/mmproxy |"
    )
    rate = [cell.strip() for cell in lines[2].strip("|").split("|")]
    assert rate[1] == "msg/s"
    assert "-" not in rate[2:], rate  # a median for each target, every ratio
    assert all(cell.endswith("x") for cell in rate[5:]), rate
    assert "mmproxy on Python " in stdout
    assert ", mmproxy-ft on Python " in stdout

    assert doc["errors"] == 0
    targets = {t["name"]: t for t in doc["targets"]}
    assert targets["mmproxy-ft"]["kind"] == "mmproxy"
    assert targets["mmproxy-ft"]["python"] == python
    runs = {run["target"]: run for run in doc["runs"]}
    assert runs["mmproxy-ft"]["proxy"]["ready"]["msg"] == "ready"
    assert runs["mmproxy-ft"]["client"]["messages"] > 0
    pingpong = doc["summary"][0]["targets"]["mmproxy-ft"]
    assert pingpong["ratio_to_mmproxy"] is not None
    _assert_nothing_left(pid, tag)

    replay = subprocess.run(
        [sys.executable, "-m", "bench", "--from-json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert replay.returncode == 0, replay.stderr
    assert replay.stdout == stdout


def _wait_for_proxy(tag: str, proc: subprocess.Popen[str], timeout: float) -> bool:
    """True once a proxied measurement runs: mmproxy and a load generator client are up."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        commands = [command for _, command in _tagged_processes(tag)]
        if any("-m mmproxy" in c for c in commands) and any(" connrate " in c for c in commands):
            return True
        time.sleep(0.1)
    return False


@pytest.mark.timeout(120)
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_run_stops_everything_and_deletes_the_namespace(signum: int) -> None:
    tag = uuid.uuid4().hex
    proc = _start(tag, "--only", "connrate", "--duration", "1", "--repeats", "20")
    try:
        assert _wait_for_proxy(tag, proc, 60), proc.communicate(timeout=30)
        assert Path("/run/netns", f"mmproxy-bench-{proc.pid}").exists()
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, stderr
    assert "bench: interrupted; every process stopped, namespace deleted" in stderr
    assert "Traceback" not in stderr
    _assert_nothing_left(proc.pid, tag)


@pytest.mark.timeout(180)
def test_idle_active_holds_connections_that_went_quiet_after_a_request(tmp_path: Path) -> None:
    """idle-active: each connection's request was echoed (the client counts it opened only
    then), the connections stay open through the quiet period, and mmproxy's threads per
    connection are read after it."""
    tag = uuid.uuid4().hex
    out = tmp_path / "results.json"
    pid, _stdout, stderr = _run_ok(
        tag,
        *("--only", "idle-active", "--repeats", "1", "--idle-connections", "40"),
        *("--json", str(out)),
    )
    steps = [line for line in stderr.splitlines() if line.startswith("[")]
    assert [line.split(": ")[0] for line in steps] == [
        "[1/2] repeat 1/1 idle-active via direct",
        "[2/2] repeat 1/1 idle-active via mmproxy",
    ]
    runs = {run["target"]: run for run in json.loads(out.read_text())["runs"]}
    proxied = runs["mmproxy"]
    assert proxied["error"] is None
    assert proxied["client"]["opened"] == 40
    assert proxied["client"]["mismatches"] == 0
    assert proxied["client"]["alive"] == 40
    assert proxied["client"]["quiet_seconds"] > 0
    assert proxied["figures"]["held"] == 40
    assert proxied["figures"]["threads_per_conn"] is not None
    assert "quiet_seconds" not in runs["direct"]["client"]  # nothing to wait for without a proxy
    _assert_nothing_left(pid, tag)
