"""``mmproxy demo``: the newcomer's first command works, prints its table, and leaves nothing.

The demo lives in a network namespace of its own process (unshare), so "nothing left" means:
its mmproxy child is gone, no named namespace appeared, and the host's rules are untouched.
These tests also interrupt it (Ctrl-C) and kill it outright, since a newcomer will.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

from netns import Deadline

DEMO = [sys.executable, "-m", "mmproxy", "demo"]
# The demo as a background job of a shell script starts it: SIGINT ignored (inherited across
# exec).  Ctrl-C and kill -INT must stop it all the same.
DEMO_IN_BACKGROUND = ["sh", "-c", 'trap "" INT; exec "$@"', "sh", *DEMO]
CLIENTS = ["198.51.100.7:40001", "203.0.113.25:40002", "[2001:db8::7]:40003",
           "[2001:db8:cafe::25]:40004"]  # fmt: skip


def netns_names() -> set[str]:
    done = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in done.stdout.splitlines() if line.strip()}


def host_rules() -> str:
    return subprocess.run(["ip", "rule"], capture_output=True, text=True, check=True).stdout


def mmproxy_pid(output: str) -> int:
    found = re.search(r"^mmproxy: pid (\d+),", output, re.MULTILINE)
    assert found, output
    return int(found.group(1))


def is_gone(pid: int, timeout: float = 10.0) -> bool:
    """True once no process ``pid`` runs mmproxy (a reused pid would run something else)."""
    deadline = Deadline(timeout)
    while not deadline.expired():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            status = Path(f"/proc/{pid}/status").read_text()
        except (FileNotFoundError, ProcessLookupError):
            return True
        if b"mmproxy" not in cmdline or "State:\tZ" in status:
            return True
        threading.Event().wait(0.05)
    return False


def _someone_elses(name: str) -> bool:
    """A namespace another run made: ``mmproxy-<what>-<pid>`` of a process that is not ours."""
    found = re.fullmatch(r"mmproxy-[a-z0-9-]+-(\d+)", name)
    return found is not None and int(found.group(1)) != os.getpid()


def test_demo_shows_every_client_and_cleans_up() -> None:
    names, rules = netns_names(), host_rules()
    done = subprocess.run(DEMO, capture_output=True, text=True, timeout=120, cwd="/", check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stderr == ""
    lines = done.stdout.splitlines()
    table = [line for line in lines if " -> " in line]
    assert len(table) == len(CLIENTS), done.stdout
    for row, client in zip(table, CLIENTS, strict=True):
        assert row.split()[2:] == [client, "->", client, "ok"], row
    assert [row.split()[:2] for row in table] == [["v1", "IPv4"], ["v2", "IPv4"],
                                                  ["v1", "IPv6"], ["v2", "IPv6"]]  # fmt: skip
    for client in CLIENTS:
        assert f"  backend: connection from {client}" in lines
    assert "all 4 matched" in done.stdout
    assert is_gone(mmproxy_pid(done.stdout))
    # Nothing new.  Other runs on a shared machine (a benchmark, another suite's tests) may add
    # and remove their own namespaces meanwhile; those are named "mmproxy-<what>-<their pid>".
    assert {name for name in netns_names() - names if not _someone_elses(name)} == set()
    assert host_rules() == rules


def _start_and_wait_for_pid() -> tuple[subprocess.Popen[str], int, list[str]]:
    proc = subprocess.Popen(
        DEMO_IN_BACKGROUND, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/",
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)

    threading.Thread(target=read, daemon=True).start()
    seen: list[str] = []
    deadline = Deadline(60)
    while not deadline.expired():
        try:
            seen.append(lines.get(timeout=deadline.remaining()))
        except queue.Empty:
            break
        if seen[-1].startswith("mmproxy: pid "):
            return proc, mmproxy_pid(seen[-1]), seen
    proc.kill()
    proc.wait(10)
    raise AssertionError(f"the demo did not start mmproxy: {''.join(seen)}")


def _signal_while_running(signum: int) -> tuple[int, str, int]:
    """Start the demo, send ``signum`` once its mmproxy runs; (exit code, stderr, mmproxy pid).

    Nothing in the demo waits, so on a quick run it can finish between printing the pid and
    the signal's arrival (exit 0).  That attempt proves nothing about interruption and is
    repeated, at most 5 times.
    """
    for _attempt in range(5):
        proc, pid, _ = _start_and_wait_for_pid()
        try:
            proc.send_signal(signum)
            code = proc.wait(30)
            _out, err = proc.communicate(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        if code != 0:
            return code, err, pid
        assert is_gone(pid)
    raise AssertionError("the demo finished before the signal landed, 5 times out of 5")


def test_ctrl_c_cleans_up() -> None:
    code, err, pid = _signal_while_running(signal.SIGINT)
    assert code == 130
    assert "interrupted; cleaning up" in err
    assert "Traceback" not in err
    assert is_gone(pid)


def test_killed_demo_takes_mmproxy_with_it() -> None:
    """SIGKILL leaves no time to clean up: the child dies with its parent (PDEATHSIG)."""
    code, _err, pid = _signal_while_running(signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert is_gone(pid), f"mmproxy {pid} outlived the demo"
