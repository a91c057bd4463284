"""The harness's pure parts: flags, figures, statistics, formatting, the build cache, /proc."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from bench import build, chart, cli, netns, report
from bench.procs import Processes, Usage, process_tree, usage
from bench.runner import Progress, Record, opened_count, parse_udp_snmp, rotated
from bench.settings import DIRECT, MMPROXY, Settings, SettingsError, Target, parse_peer
from bench.stats import count, median, number, per, ratio, times
from bench.targets import udp_port_bound
from bench.workloads import (
    BY_NAME,
    NAMES,
    WORKLOADS,
    client_header,
    idle_figures,
    load_figures,
)

# ------------------------------------------------------------------------------ stats


def test_median_ignores_missing_figures() -> None:
    assert median([3.0, None, 1.0, 2.0]) == 2.0
    assert median([4.0, 1.0]) == 2.5
    assert median([None, None]) is None
    assert median([]) is None


def test_ratio_and_per_refuse_missing_or_zero_references() -> None:
    assert ratio(3.0, 4.0) == 0.75
    assert ratio(None, 4.0) is None
    assert ratio(3.0, None) is None
    assert ratio(3.0, 0.0) is None
    assert per(2.0, 4e9, 1e9) == 0.5  # 2 s of CPU for 4 GB: 0.5 s/GB
    assert per(2.0, 0.0) is None
    assert per(None, 5.0) is None


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (1523101.4, "1,523,101"),
        (123.4, "123"),
        (12.34, "12.3"),
        (1.234, "1.23"),
        (0.01234, "0.0123"),
        (0.0, "0.00"),
        (-2.5, "-2.50"),
        (None, "-"),
    ],
)
def test_number_keeps_about_three_significant_digits(value: float | None, text: str) -> None:
    assert number(value) == text


def test_times_writes_ratios_and_count_whole_numbers() -> None:
    assert times(0.5312) == "0.53x"
    assert times(None) == "-"
    assert count(9000.0) == "9,000"
    assert count(None) == "-"


# --------------------------------------------------------------------------- figures


def test_bulk_figures_are_bits_per_second_and_cpu_per_gigabyte() -> None:
    figures = load_figures(BY_NAME["bulk-up-1"], {"seconds": 2.0, "bytes": 2_000_000_000}, 0.5)
    assert figures["gbps"] == pytest.approx(8.0)
    assert figures["cpu_s_per_gb"] == pytest.approx(0.25)
    assert (
        load_figures(BY_NAME["bulk-down-8"], {"seconds": 1.0, "bytes": 1}, None)["cpu_s_per_gb"]
        is None
    )  # direct: no proxy, no CPU figure


def test_message_and_connection_figures() -> None:
    client = {"seconds": 2.0, "messages": 10_000, "samples": 10, "p50_us": 250, "p99_us": 1500}
    figures = load_figures(BY_NAME["pingpong"], client, 0.2)
    assert figures["msgs_per_s"] == pytest.approx(5000)
    assert figures["cpu_ms_per_1k_msg"] == pytest.approx(20.0)  # 200 ms for 10k messages
    assert figures["p50_ms"] == pytest.approx(0.25)
    assert figures["p99_ms"] == pytest.approx(1.5)
    client = {"seconds": 4.0, "connections": 2000, "samples": 2000, "p50_us": 900, "p99_us": 3000}
    figures = load_figures(BY_NAME["connrate"], client, 1.0)
    assert figures["conns_per_s"] == pytest.approx(500)
    assert figures["cpu_ms_per_1k_conn"] == pytest.approx(500)
    assert figures["p99_ms"] == pytest.approx(3.0)


def test_datagram_figures_count_echoes_in_the_duration_and_every_loss() -> None:
    client = {
        "seconds": 2.0,
        "datagrams": 40_000,  # echoes received within the duration
        "sent": 40_900,
        "received": 40_897,  # also those that came back in the grace period
        "lost": 3,
        "samples": 40_000,
        "p50_us": 400,
        "p99_us": 2500,
    }
    figures = load_figures(BY_NAME["udp"], client, 2.0)
    assert figures == {
        "dgrams_per_s": pytest.approx(20_000),
        "lost": 3.0,
        "p50_ms": pytest.approx(0.4),
        "p99_ms": pytest.approx(2.5),
        "cpu_ms_per_1k_dgram": pytest.approx(50.0),  # 2 s of CPU for 40k datagrams
    }
    direct = load_figures(BY_NAME["udp-1"], client | {"samples": 0}, None)
    assert direct["cpu_ms_per_1k_dgram"] is None
    assert direct["p50_ms"] is None


def test_udp_workloads_send_v2_headers_and_select_udp_mode() -> None:
    for name in ("udp", "udp-1"):
        workload = BY_NAME[name]
        assert workload.protocol == "udp"
        assert workload.kind == "datagrams"
        assert workload.cpu is not None
        assert [m.key for m in workload.metrics] == ["dgrams_per_s", "lost", "p50_ms", "p99_ms"]
        assert client_header(workload, "v1", proxied=True) == "v2"  # v1 has no DGRAM
        assert client_header(workload, "v1", proxied=False) == "none"
    assert BY_NAME["udp"].conns == 50
    assert BY_NAME["udp-1"].conns == 1
    assert client_header(BY_NAME["pingpong"], "v1", proxied=True) == "v1"
    assert client_header(BY_NAME["pingpong"], "v2", proxied=True) == "v2"
    assert all(
        w.protocol == "tcp" for w in WORKLOADS if w.kind != "datagrams" and w.name != "udp-idle"
    )
    idle = BY_NAME["udp-idle"]
    assert (idle.protocol, idle.kind, idle.client, idle.conns) == ("udp", "idle", "udp-idle", None)
    assert client_header(idle, "v1", proxied=True) == "v2"


def test_udp_port_bound_reads_the_proc_net_udp_table() -> None:
    table = (
        "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid\n"
        "  112: 0100007F:4E22 00000000:0000 07 00000000:00000000 00:00000000 00000000     0\n"
        "  113: 00000000000000000000000001000000:4E24 00000000000000000000000000000000:0000 07\n"
    )
    assert udp_port_bound(table, 0x4E22)  # 127.0.0.1:20002
    assert udp_port_bound(table, 0x4E24)  # [::1]:20004 (udp6)
    assert not udp_port_bound(table, 0x4E23)
    assert not udp_port_bound(table, 0)  # the heading and remote columns never match
    assert not udp_port_bound("", 20002)
    assert not udp_port_bound("garbage\n1: nocolon x\n2: 01:zz y\n", 20002)


def test_udp_kernel_counters_come_from_the_snmp_table() -> None:
    text = (
        "Ip: Forwarding DefaultTTL\nIp: 1 64\n"
        "Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors\n"
        "Udp: 1316834 1 33374 1353540 33374 0\n"
        "UdpLite: InDatagrams NoPorts\nUdpLite: 7 8\n"
    )
    counters = parse_udp_snmp(text)
    assert counters["InDatagrams"] == 1316834
    assert counters["RcvbufErrors"] == 33374
    assert counters["SndbufErrors"] == 0
    assert len(counters) == 6  # UdpLite is another table
    assert parse_udp_snmp("") == {}
    assert parse_udp_snmp("Udp: A B\nUdp: 1\n") == {}  # heading and values disagree
    assert parse_udp_snmp("Udp: A\nUdp: x\n") == {}


def test_figures_refuse_a_run_without_time_and_idle_workloads() -> None:
    with pytest.raises(ValueError, match="no time"):
        load_figures(BY_NAME["stream"], {"seconds": 0, "messages": 1}, None)
    with pytest.raises(ValueError, match="not a load workload"):
        load_figures(BY_NAME["idle"], {"seconds": 1}, None)


def test_idle_figures_divide_the_proxys_growth_by_the_connections_held() -> None:
    figures = idle_figures(1000, Usage(cpu_seconds=1.0, rss_kib=24_000, fds=2000, threads=2000))
    assert figures == {
        "held": 1000.0,
        "rss_kib_per_conn": 24.0,
        "fds_per_conn": 2.0,
        "threads_per_conn": 2.0,
    }
    assert idle_figures(5, None) == {
        "held": 5.0,
        "rss_kib_per_conn": None,
        "fds_per_conn": None,
        "threads_per_conn": None,
    }
    assert idle_figures(0, Usage(0.0, 10, 1, 1))["rss_kib_per_conn"] is None


def test_idle_active_is_an_idle_workload_read_after_a_quiet_period() -> None:
    workload = BY_NAME["idle-active"]
    assert (workload.kind, workload.server, workload.client) == ("idle", "echo", "idle-active")
    assert workload.quiet > 1  # past mmproxy's grace, and its burst's workers retiring
    assert workload.conns is None  # --idle-connections
    assert all(other.quiet == 0 for other in WORKLOADS if other is not workload)
    assert [metric.key for metric in workload.metrics] == [
        metric.key for metric in BY_NAME["idle"].metrics
    ]


def test_every_workload_has_figures_and_a_unique_name() -> None:
    assert len(set(NAMES)) == len(NAMES) == len(WORKLOADS)
    for workload in WORKLOADS:
        assert workload.metrics, workload.name
        assert (workload.cpu is None) == (workload.kind == "idle")


# ------------------------------------------------------------------------- settings


def test_peer_template_is_split_like_a_shell_without_one() -> None:
    target = parse_peer("go=/opt/go mmproxy/bin -l {listen} -4 {target4} -6 {target6} -v 0")
    assert target.name == "go"
    assert target.kind == "peer"
    assert target.command("127.0.0.1:1", "127.0.0.1:2", "[::1]:2") == [
        "/opt/go",
        "mmproxy/bin",
        *("-l", "127.0.0.1:1", "-4", "127.0.0.1:2", "-6", "[::1]:2", "-v", "0"),
    ]
    quoted = parse_peer("q='/path with space/p' -l {listen}")
    assert quoted.command("a:1", "b:2", "c:3") == ["/path with space/p", "-l", "a:1"]
    assert not target.selects_protocol


def test_peer_template_may_take_the_workloads_protocol() -> None:
    target = parse_peer("go=/usr/bin/go-mmproxy -p {protocol} -l {listen} -4 {target4}")
    assert target.selects_protocol
    assert target.command("a:1", "b:2", "c:3", "udp") == [
        *("/usr/bin/go-mmproxy", "-p", "udp", "-l", "a:1", "-4", "b:2"),
    ]
    assert target.command("a:1", "b:2", "c:3")[2] == "tcp"  # the default


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("go", "is not NAME='COMMAND TEMPLATE'"),
        ("go=", "is not NAME='COMMAND TEMPLATE'"),
        ("direct=/bin/p -l {listen}", "not a usable name"),
        ("mmproxy=/bin/p -l {listen}", "not a usable name"),
        ("a b=/bin/p -l {listen}", "not a usable name"),
        ("go=/bin/p -4 {target4}", "needs {listen}"),
        ("go=/bin/p -l {listen} -x {port}", "unknown placeholder {port}"),
        ("go=/bin/p -l {listen", "command template"),
        ("go=/bin/p -l '{listen}", "No closing quotation"),
    ],
)
def test_bad_peers_are_refused_in_one_line(text: str, complaint: str) -> None:
    with pytest.raises(SettingsError, match="--peer") as caught:
        parse_peer(text)
    assert complaint in str(caught.value)
    assert "\n" not in str(caught.value)


def test_defaults_and_flags() -> None:
    settings = cli.parse([])
    assert settings.duration == 3.0
    assert settings.repeats == 3
    assert settings.workloads == NAMES
    assert [t.name for t in settings.targets] == [DIRECT, MMPROXY]
    assert settings.python == sys.executable
    settings = cli.parse(
        [
            *("--only", "idle,bulk-up-1", "--duration", "0.5", "--repeats", "1"),
            *("--mmproxy-flags", "-listeners 2 -v 0", "--peer", "p=/bin/p -l {listen}"),
        ]
    )
    assert settings.workloads == ("bulk-up-1", "idle")  # the harness's order, not the flag's
    assert settings.targets[1].flags == ("-listeners", "2", "-v", "0")
    assert settings.targets[2].name == "p"
    relative = os.path.relpath(sys.executable)
    assert cli.parse(["--python", relative]).python == os.path.abspath(relative)


@pytest.mark.parametrize(
    ("argv", "complaint"),
    [
        (["--duration", "0"], "--duration"),
        (["--duration", "abc"], "--duration"),
        (["--repeats", "-1"], "--repeats"),
        (["--only", "bulk,idle"], "unknown workload 'bulk'"),
        (["--only", ","], "no workload"),
        (["--python", "/nonexistent/python"], "--python"),
        (["--header", "v3"], "--header"),
        (["--peer", "p=/bin/p -l {listen}", "--peer", "p=/bin/q -l {listen}"], "used twice"),
        (["--mmproxy-flags", "'unclosed"], "--mmproxy-flags"),
        (["--frobnicate"], "unrecognized"),
    ],
)
def test_bad_flags_exit_2_with_one_line(
    argv: list[str], complaint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(argv) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("bench: error: ")
    assert complaint in err
    assert err.count("\n") == 1
    assert "Traceback" not in err


# --------------------------------------------------------------------------- report


def _settings(*targets: Target) -> Settings:
    return Settings(
        duration=1.0,
        repeats=2,
        workloads=("bulk-up-1", "idle"),
        targets=(Target(DIRECT, DIRECT), Target(MMPROXY, MMPROXY), *targets),
        python=sys.executable,
        idle_connections=100,
    )


def _records() -> list[Record]:
    records = []
    for repeat, (direct, proxied, peer) in enumerate([(10.0, 5.0, 4.0), (12.0, 6.0, None)]):
        records += [
            Record(repeat, "bulk-up-1", DIRECT, {"gbps": direct, "cpu_s_per_gb": None}),
            Record(repeat, "bulk-up-1", MMPROXY, {"gbps": proxied, "cpu_s_per_gb": 0.5}),
            Record(repeat, "bulk-up-1", "go", {"gbps": peer, "cpu_s_per_gb": 0.25}),
        ]
    # a failed measurement's figures (taken before it failed) never reach the table
    records.append(Record(1, "bulk-up-1", "go", {"gbps": 100.0}, error="go exited during the run"))
    records += [
        Record(0, "idle", DIRECT, idle_figures(100, None)),
        Record(0, "idle", MMPROXY, idle_figures(100, Usage(0, 3000, 200, 200))),
        Record(0, "idle", "go", idle_figures(50, Usage(0, 500, 100, 5))),
    ]
    return records


def test_table_has_medians_and_ratios_to_direct_and_to_mmproxy() -> None:
    settings = _settings(Target("go", "peer", "/bin/go -l {listen}"))
    rows = report.summarise(settings, _records())
    assert [(row.workload.name, row.metric.key) for row in rows] == [
        ("bulk-up-1", "gbps"),
        ("bulk-up-1", "cpu_s_per_gb"),
        ("idle", "held"),
        ("idle", "rss_kib_per_conn"),
        ("idle", "fds_per_conn"),
        ("idle", "threads_per_conn"),
    ]
    lines = report.table(settings, rows).splitlines()
    assert lines[0] == (
        "| workload | figure | direct | mmproxy | go | mmproxy/direct | go/direct | go/mmproxy |"
    )
    assert lines[1] == "|---|---|---:|---:|---:|---:|---:|---:|"
    assert len(lines) == 2 + len(rows)
    cells = [cell.strip() for cell in lines[2].strip("|").split("|")]
    # medians: direct 11, mmproxy 5.5, go 4 (its failed repeat has no figure)
    assert cells == [
        "bulk upload, 1 conn",
        "Gbit/s",
        "11.0",
        "5.50",
        "4.00",
        "0.50x",
        "0.36x",
        "0.73x",
    ]
    held = [cell.strip() for cell in lines[4].strip("|").split("|")]
    assert held[:5] == ["idle connections", "held of 100", "100", "100", "50"]
    rss = [cell.strip() for cell in lines[5].strip("|").split("|")]
    assert rss[2:] == ["-", "30.0", "10.0", "-", "-", "0.33x"]


def test_document_keeps_every_repeat_and_the_machine() -> None:
    settings = _settings()
    records = _records()
    rows = report.summarise(settings, records)
    info = report.machine(settings) | {"loadavg_end": [0.0, 0.0, 0.0]}
    doc = report.document(settings, records, rows, info, "start", "end")
    assert doc["schema"] == report.SCHEMA
    assert doc["errors"] == 1
    assert len(doc["runs"]) == len(records)
    assert doc["machine"]["cores"] == os.cpu_count()
    assert doc["machine"]["python_mmproxy"]["version"].startswith(sys.version.split()[0])
    first = doc["summary"][0]
    assert first["targets"][MMPROXY]["values"] == [5.0, 6.0]
    assert first["targets"][MMPROXY]["ratio_to_direct"] == pytest.approx(0.5)
    footer = report.footer(settings, records, rows, info)
    assert "Medians of 2 repeat(s)" in footer
    assert "Failed: bulk-up-1 via go, 1 of 2 repeat(s): go exited during the run" in footer


def test_a_saved_document_prints_the_same_table_again(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = _settings(Target("go", "peer", "/bin/go -l {listen}"))
    records = _records()
    rows = report.summarise(settings, records)
    info = report.machine(settings) | {"loadavg_end": [0.5, 0.5, 0.5]}
    doc = report.document(settings, records, rows, info, "start", "end")
    saved = tmp_path / "run.json"
    saved.write_text(json.dumps(doc))
    again, loaded, machine = report.load(json.loads(saved.read_text()))
    assert again.targets == settings.targets
    assert again.workloads == settings.workloads
    assert [r.as_json() for r in loaded] == [r.as_json() for r in records]
    assert cli.main(["--from-json", str(saved)]) == cli.EXIT_OK
    out = capsys.readouterr().out
    assert out.startswith(report.table(settings, rows) + "\n\n")
    assert report.footer(settings, records, rows, machine) in out
    saved.write_text(json.dumps(doc | {"schema": "other/1"}))
    assert cli.main(["--from-json", str(saved)]) == cli.EXIT_USAGE
    assert "not a mmproxy-bench/1 document" in capsys.readouterr().err


def test_footer_warns_when_a_proxy_comes_close_to_direct() -> None:
    settings = _settings()
    records = [
        Record(0, "bulk-up-1", DIRECT, {"gbps": 10.0}),
        Record(0, "bulk-up-1", MMPROXY, {"gbps": 9.0, "cpu_s_per_gb": 0.1}),
        Record(0, "idle", DIRECT, idle_figures(100, None)),
        Record(0, "idle", MMPROXY, idle_figures(100, Usage(0, 1, 2, 2))),
    ]
    rows = report.summarise(settings, records)
    assert report.suspicious(settings, rows) == ["bulk-up-1 via mmproxy (0.90x)"]
    info = report.machine(settings) | {"loadavg_end": [1.0, 1.0, 1.0]}
    assert "may be the bottleneck" in report.footer(settings, records, rows, info)
    assert report.suspicious(settings, report.summarise(settings, _records())) == []


def test_footer_names_the_header_each_protocol_sends() -> None:
    info = report.machine(_settings()) | {"loadavg_end": [1.0, 1.0, 1.0]}
    for workloads, text in [
        (("bulk-up-1",), "PROXY header v1;"),
        (("udp", "udp-1"), "PROXY header v2 DGRAM (UDP);"),
        (("pingpong", "udp"), "PROXY header v1 (TCP), v2 DGRAM (UDP);"),
    ]:
        settings = replace(_settings(), workloads=workloads)
        assert text in report.footer(settings, [], report.summarise(settings, []), info)
    udp = [
        Record(0, "udp", DIRECT, {"dgrams_per_s": 100_000.0, "lost": 0.0}),
        Record(0, "udp", MMPROXY, {"dgrams_per_s": 5_000.0, "lost": 1820.0}),
    ]
    settings = replace(_settings(), workloads=("udp",))
    table = report.table(settings, report.summarise(settings, udp))
    assert "| UDP echo, 50 flows x 16 in flight | lost | 0 | 1,820 | - |" in table  # a count


def test_chart_is_skipped_without_matplotlib(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(chart, "available", lambda: False)
    settings = _settings()
    assert not chart.render(settings, report.summarise(settings, _records()), tmp_path / "c.png")
    assert not (tmp_path / "c.png").exists()


# --------------------------------------------------------------------------- runner


def test_targets_take_turns_going_first() -> None:
    targets = (Target("a", DIRECT), Target("b", MMPROXY), Target("c", "peer"))
    assert [[t.name for t in rotated(targets, r)] for r in range(4)] == [
        ["a", "b", "c"],
        ["b", "c", "a"],
        ["c", "a", "b"],
        ["a", "b", "c"],
    ]


def test_progress_writes_finished_steps_to_a_log() -> None:
    stream = io.StringIO()
    progress = Progress(2, stream)
    progress.show("running")  # not a terminal: only finished steps are written
    progress.step("one: 1 Gbit/s")
    progress.step("two: 2 Gbit/s")
    progress.finish()
    assert stream.getvalue() == "[1/2] one: 1 Gbit/s\n[2/2] two: 2 Gbit/s\n"


# ---------------------------------------------------------------------------- build


def test_build_caches_by_source_hash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CC", raising=False)
    source = tmp_path / "loadgen.c"
    source.write_text("int main(void) { return 0; }\n")
    cache = tmp_path / "cache"
    first = build.build(source, cache)
    assert first.parent == cache
    assert subprocess.run([first], check=False).returncode == 0
    mtime = first.stat().st_mtime_ns
    assert build.build(source, cache) == first  # reused, not rebuilt
    assert first.stat().st_mtime_ns == mtime
    source.write_text("int main(void) { return 3; }\n")
    second = build.build(source, cache)
    assert second != first
    assert subprocess.run([second], check=False).returncode == 3
    assert sorted(p.name for p in cache.iterdir()) == sorted([first.name, second.name])


def test_build_failures_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "broken.c"
    source.write_text("int main(void) { return }\n")
    with pytest.raises(build.BuildError, match=r"compiling broken\.c failed: ") as caught:
        build.build(source, tmp_path)
    assert "\n" not in str(caught.value)
    assert [p.name for p in tmp_path.iterdir()] == ["broken.c"]  # no partial binary left
    monkeypatch.setenv("CC", "/nonexistent/cc")
    with pytest.raises(build.BuildError, match="no C compiler"):
        build.build(source, tmp_path)


def test_the_real_load_generator_compiles_without_warnings(tmp_path: Path) -> None:
    result = subprocess.run(
        ["cc", *build.CFLAGS, "-Werror", "-o", str(tmp_path / "lg"), str(build.SOURCE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_cache_is_outside_the_checkout(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert build.cache_dir() == tmp_path / "mmproxy-bench"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert not build.cache_dir().is_relative_to(build.SOURCE.parent.parent)


# --------------------------------------------------------------------------- netns


def test_a_namespace_left_by_a_killed_run_is_removed_with_its_processes() -> None:
    with subprocess.Popen(["true"]) as gone:
        gone.wait()
    name = f"{netns.PREFIX}{gone.pid}"  # the pid of a process that has exited: a dead harness
    if netns.exists(name):
        subprocess.run(["ip", "netns", "del", name], check=True)
    subprocess.run(["ip", "netns", "add", name], check=True)
    left = subprocess.Popen(["ip", "netns", "exec", name, "sleep", "60"])
    try:
        deadline = time.monotonic() + 10
        while left.pid not in netns.Namespace(name, existing=True).pids():
            assert time.monotonic() < deadline, "sleep never showed up in the namespace"
            time.sleep(0.05)
        assert name in netns.stale()
        assert f"{netns.PREFIX}{os.getpid()}" not in netns.stale()  # a live pid: not stale
        removed = netns.remove_stale()
        assert name in removed or not netns.exists(name)  # (or a concurrent run removed it)
        assert not netns.exists(name)
        assert left.wait(timeout=10) == -9  # killed with the namespace
    finally:
        if left.poll() is None:
            left.kill()
            left.wait()
        if netns.exists(name):
            subprocess.run(["ip", "netns", "del", name], check=False)


# ----------------------------------------------------------------------------- /proc


def test_stderr_tail_shortens_json_log_lines(tmp_path: Path) -> None:
    lines = [
        "plain text",
        '{"level":"info","msg":"listening","listenAdr":"127.0.0.1:1"}',
        '{"level":"error","msg":"failed to accept","error":"too many open files","stack":"x"}',
    ]
    script = "import sys; sys.stderr.write(sys.argv[1])"
    procs = Processes(tmp_path)
    child = procs.start([sys.executable, "-c", script, "\n".join(lines)], name="talker")
    assert child.wait(30) == 0
    procs.stop(child)
    assert child.stderr_tail() == "plain text | listening | failed to accept: too many open files"
    assert child.stderr_tail(lines=1, width=13) == "...open files"  # 13 characters


def test_usage_arithmetic_covers_every_field() -> None:
    a = Usage(2.0, 100, 10, 3, 1.5, 0.5, 40, 4)
    b = Usage(1.0, 40, 4, 1, 0.5, 0.5, 10, 1)
    assert a - b == Usage(1.0, 60, 6, 2, 1.0, 0.0, 30, 3)
    assert (a - b) + b == a
    assert (a - b).as_json("grown") == {
        "grown_cpu_seconds": 1.0,
        "grown_rss_kib": 60,
        "grown_fds": 6,
        "grown_threads": 2,
        "grown_user_seconds": 1.0,
        "grown_system_seconds": 0.0,
        "grown_voluntary_switches": 30,
        "grown_involuntary_switches": 3,
    }


def test_usage_reads_this_process_and_its_children() -> None:
    with subprocess.Popen(["sleep", "30"]) as child:
        try:
            assert child.pid in process_tree(os.getpid())
            mine = usage(os.getpid())
            alone = usage(child.pid)
            assert mine.rss_kib > alone.rss_kib > 0
            assert mine.fds >= 3
            assert mine.threads >= 2  # this process and sleep
            assert mine.cpu_seconds > 0
            assert mine.cpu_seconds == pytest.approx(mine.user_seconds + mine.system_seconds)
            assert mine.voluntary_switches > 0
            grown = mine - alone
            assert grown.rss_kib == mine.rss_kib - alone.rss_kib
        finally:
            child.kill()


def test_udp_idle_flows_held_are_the_client_s_opened_report() -> None:
    lines = ["noise", '{"event": "opened", "opened": 1998, "failed": 2}', '{"alive": 1998}']
    assert opened_count(lines) == 1998
    assert opened_count(["no report yet"]) == 0
