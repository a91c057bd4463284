"""--relay: which relay runs, said once at start-up; a sockmap that cannot work refuses to start.

Without CAP_BPF (and CAP_SYS_ADMIN, which implies it) bpf(2) refuses the maps, as it does under
a container's seccomp profile; ``capsh --drop`` takes them from a root process and keeps
CAP_NET_ADMIN for IP_TRANSPARENT.  The relays' promises are the TCP suites' job, run on both.
"""

from __future__ import annotations

import json
import shlex
import signal
import socket
import subprocess
import sys

from daemon_runner import Daemon, LogLine, StartDaemon
from netns import Backend, ClientAddresses, Deadline, Net, recv_to_eof
from test_metrics_scrape import metrics_address, scrape_until, value
from test_reliability import Usage, connect, open_echoed, v1_header

NO_BPF = "cap_bpf,cap_sys_admin,cap_perfmon"


def relay_lines(daemon: Daemon) -> list[LogLine]:
    daemon.wait_for(lambda line: line.get("msg") == "ready")
    return [line for line in daemon.logs if str(line.get("msg", "")).startswith("relay: ")]


def test_sockmap_runs_here_and_says_so(
    net: Net, mmproxy: StartDaemon, backend4: Backend, addresses: ClientAddresses
) -> None:
    daemon = mmproxy("--relay", "sockmap")
    (line,) = relay_lines(daemon)
    assert line["relay"] == "sockmap"
    assert line["reason"] == "--relay sockmap"
    (ready,) = daemon.wait_for(lambda line: line.get("msg") == "ready")
    assert ready["relay"] == "sockmap"
    with connect(net, daemon) as sock:
        sock.sendall(v1_header(addresses.v4()) + b"ping")
        sock.shutdown(1)
        assert recv_to_eof(sock, Deadline(10)) == b"ping"


def test_auto_runs_splice_and_says_why(mmproxy: StartDaemon) -> None:
    """auto does not choose the kernel relay while it has no backpressure, where bpf works."""
    (line,) = relay_lines(mmproxy("--relay", "auto"))
    assert line["relay"] == "splice"
    assert "no backpressure" in line["reason"]
    assert "--relay sockmap" in line["reason"]


def test_splice_says_so_too(mmproxy: StartDaemon) -> None:
    (line,) = relay_lines(mmproxy())
    assert (line["relay"], line["reason"]) == ("splice", "--relay splice")


def run_without_bpf(net: Net, backend4: Backend, relay: str) -> subprocess.Popen[str]:
    argv = [
        *(sys.executable, "-m", "mmproxy", "-l", "127.0.0.1:0", "-4", backend4.target()),
        *("--relay", relay, "--log-format", "json", "--no-routing-check"),
    ]
    return subprocess.Popen(
        [
            *("ip", "netns", "exec", net.ns.name, "capsh", f"--drop={NO_BPF}", "--"),
            *("-c", f"exec {shlex.join(argv)}"),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_sockmap_that_cannot_work_stops_start_up_with_one_line(net: Net, backend4: Backend) -> None:
    proc = run_without_bpf(net, backend4, "sockmap")
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode != 0
    assert "Traceback" not in stderr
    errors = [json.loads(line) for line in stdout.splitlines() if '"ERROR"' in line]
    assert len(errors) == 1, stdout
    assert errors[0]["msg"].startswith("--relay sockmap: cannot relay in the kernel: ")
    assert "CAP_BPF" in errors[0]["msg"]
    assert "listening" not in stdout


def test_auto_without_bpf_runs_splice_too(net: Net, backend4: Backend) -> None:
    proc = run_without_bpf(net, backend4, "auto")
    try:
        assert proc.stdout is not None
        lines: list[LogLine] = []
        deadline = Deadline(30)
        while not deadline.expired() and not any(line.get("msg") == "ready" for line in lines):
            text = proc.stdout.readline()
            if not text:
                break
            lines.append(json.loads(text))
        relay = [line for line in lines if str(line.get("msg", "")).startswith("relay: ")]
        assert len(relay) == 1, lines
        assert relay[0]["relay"] == "splice"
        assert "no backpressure" in relay[0]["reason"]
        assert lines[-1]["msg"] == "ready"
        assert lines[-1]["relay"] == "splice"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    assert proc.returncode == 0


def test_established_kernel_pairs_hold_no_thread(
    net: Net, mmproxy: StartDaemon, backend4: Backend, addresses: ClientAddresses
) -> None:
    """40 pairs that exchanged a message and stay open, in the kernel: threads stay few."""
    daemon = mmproxy("--relay", "sockmap", verbose=0)
    baseline = Usage.of(daemon).threads
    open_socks: list[socket.socket] = []
    try:
        open_echoed(net, daemon, addresses, 40, open_socks)
        usage = Usage.of(daemon)
        print(
            f"FIGURE sockmap: threads with 40 established pairs: {usage.threads} ({baseline} idle)"
        )
        assert usage.threads < baseline + 20  # splice would hold 80 while they relay
    finally:
        for sock in open_socks:
            sock.close()


def test_pairs_in_the_kernel_and_fallbacks_are_logged_and_counted(
    net: Net, mmproxy: StartDaemon, backend4: Backend, addresses: ClientAddresses
) -> None:
    """One pair goes to the kernel; one whose client already ended goes to splice, at -v 2 and
    in ``kernel_relay_fallbacks{reason="ended"}``; both relay every byte."""
    daemon = mmproxy("--relay", "sockmap", "--metrics", "127.0.0.1:0")
    address = metrics_address(daemon)
    with connect(net, daemon) as sock:  # kernel: the client ends after the hand-over
        sock.sendall(v1_header(addresses.v4()) + b"ping")
        assert daemon.wait_for(lambda line: line.get("msg") == "relayed in the kernel")
        sock.sendall(b"later")
        sock.shutdown(socket.SHUT_WR)
        assert recv_to_eof(sock, Deadline(10)) == b"pinglater"
    with connect(net, daemon) as sock:  # splice: header, data and FIN before the hand-over
        sock.sendall(v1_header(addresses.v4()) + b"at once")
        sock.shutdown(socket.SHUT_WR)
        assert recv_to_eof(sock, Deadline(10)) == b"at once"
    (line,) = daemon.wait_for(lambda line: "kernel relay not used" in str(line.get("msg")))
    assert line["msg"] == "kernel relay not used (ended): relaying with splice"
    samples = scrape_until(net, address, lambda s: value(s, "mmproxy_connections_active") == 0)
    assert value(samples, "mmproxy_kernel_relayed_total") == 1
    assert value(samples, "mmproxy_kernel_relay_fallbacks_total", reason="ended") == 1
    assert value(samples, "mmproxy_kernel_relay_fallbacks_total", reason="insert_failed") == 0
    assert value(samples, "mmproxy_relayed_bytes_total", direction="to_target") == 16
