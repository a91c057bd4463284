"""The tools beside the daemon: routing pieces and commands, flags, dispatch, the demo's guard.

What needs a network namespace (reading and changing real rules, the demo itself) is in
tests/e2e; here are the parts that do not.
"""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from mmproxy import cli, commands, demo, routing
from mmproxy.config import build_config

V4, V6 = socket.AF_INET, socket.AF_INET6


def test_pieces_are_the_readme_commands() -> None:
    assert [piece.command() for piece in routing.pieces()] == [
        "ip rule add from 127.0.0.1/8 iif lo table 123",
        "ip route add local 0.0.0.0/0 dev lo table 123",
        "ip -6 rule add from ::1/128 iif lo table 123",
        "ip -6 route add local ::/0 dev lo table 123",
    ]


def test_pieces_with_a_mark_and_a_table() -> None:
    commands_ = [piece.command() for piece in routing.pieces(100, 42)]
    assert commands_[-2:] == [
        "ip rule add fwmark 42 lookup 100",
        "ip -6 rule add fwmark 42 lookup 100",
    ]
    assert commands_[0] == "ip rule add from 127.0.0.1/8 iif lo table 100"
    assert (
        routing.Piece(V6, "route", 7).command("del") == "ip -6 route del local ::/0 dev lo table 7"
    )


def test_pieces_without_ipv6() -> None:
    assert {piece.family for piece in routing.pieces(mark=1, ipv6=False)} == {V4}


@pytest.mark.parametrize(
    ("table", "problem"),
    [(0, "out of range"), (253, "kernel's own"), (254, "kernel's own"), (255, "kernel's own"),
     (2**32, "out of range")],
)  # fmt: skip
def test_reserved_and_impossible_tables_are_refused(table: int, problem: str) -> None:
    reason = routing.check_table(table)
    assert reason is not None
    assert problem in reason


@pytest.mark.parametrize("table", [1, 123, 252, 256, 2**32 - 1])
def test_usable_tables(table: int) -> None:
    assert routing.check_table(table) is None


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as caught:
        cli.main(args)
    out, err = capsys.readouterr()
    code = caught.value.code
    return (code if isinstance(code, int) else 1), out, err


@pytest.mark.parametrize(
    ("args", "start"),
    [
        (["routing", "check", "--table", "254"], "mmproxy: error: -table: 254 is one of"),
        (["routing", "apply", "-table=0"], "mmproxy: error: -table: 0 is out of range"),
        (["routing", "remove", "-mark", "-1"], "mmproxy: error: -mark: -1 is out of range"),
        (["routing", "check", "-mark", "x"], "mmproxy: error: -mark: "),
        (["routing", "check", "--nope"], "mmproxy: error: No such option '--nope'"),
        (["routing", "nope"], "mmproxy: error: No such command 'nope'"),
        (["demo", "extra"], "mmproxy: error: Got unexpected extra argument"),
    ],
)
def test_bad_tool_flags_are_one_line_and_exit_2(
    args: list[str], start: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(args, capsys)
    assert code == 2
    assert out == ""
    assert len(err.splitlines()) == 1, err
    assert err.startswith(start), err


def test_routing_alone_prints_its_usage(capsys: pytest.CaptureFixture[str]) -> None:
    code, _out, err = run(["routing"], capsys)
    assert code == 2
    assert "check" in err
    assert "apply" in err
    assert "remove" in err


@pytest.mark.parametrize(
    "args", [["routing", "-h"], ["routing", "check", "--help"], ["demo", "-h"]]
)
def test_tool_help_exits_0(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _err = run(args, capsys)
    assert code == 0
    assert out.startswith("Usage: mmproxy")


def test_mark_and_table_come_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """MMPROXY_MARK is the daemon's variable too: one environment file serves both."""
    seen: list[tuple[int, int]] = []

    def fake_apply(table: int, mark: int) -> list[tuple[routing.Piece, bool]]:
        seen.append((table, mark))
        return [(piece, True) for piece in routing.pieces(table, mark)]

    monkeypatch.setattr(routing, "apply", fake_apply)
    monkeypatch.setenv("MMPROXY_MARK", "0x10")
    monkeypatch.setenv("MMPROXY_ROUTING_TABLE", "100")
    code, out, _err = run(["routing", "apply"], capsys)
    assert (code, seen) == (0, [(100, 16)])
    assert "added    ip -6 rule add fwmark 16 lookup 100" in out.splitlines()
    code, _out, _err = run(["routing", "apply", "-mark=3", "--table", "7"], capsys)
    assert seen[-1] == (7, 3)


def test_netlink_failure_is_one_line_and_exit_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def refuse(table: int, mark: int) -> list[tuple[routing.Piece, bool]]:
        raise routing.RoutingError("ip rule add ...: Operation not permitted", 1)

    monkeypatch.setattr(routing, "apply", refuse)
    code, out, err = run(["routing", "apply"], capsys)
    assert (code, out) == (1, "")
    assert err == (
        "mmproxy: error: routing apply: ip rule add ...: Operation not permitted "
        "(needs root or CAP_NET_ADMIN)\n"
    )


def test_demo_as_non_root_is_one_line_and_exit_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(demo.os, "geteuid", lambda: 1000)
    code, out, err = run(["demo"], capsys)
    assert (code, out) == (1, "")
    assert err == (
        "mmproxy demo: needs root (it makes a network namespace); run: sudo mmproxy demo\n"
    )


def test_tools_are_not_daemon_flags() -> None:
    """Only a bare first word is a tool; the daemon's command line is unchanged."""
    assert cli.SUBCOMMANDS == ("routing", "demo")
    assert commands.tools.commands.keys() == {"routing", "demo"}


def test_daemon_help_names_the_tools() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "mmproxy", "-h"],
        capture_output=True,
        text=True,
        check=False,
        cwd="/",
    )
    assert done.returncode == 0
    assert "mmproxy routing check|apply|remove" in " ".join(done.stdout.split())
    assert "mmproxy demo" in done.stdout


def test_metrics_and_routing_check_flags(capsys: pytest.CaptureFixture[str]) -> None:
    cli.main(["--metrics", "127.0.0.1:9464", "--no-routing-check", "--check-config"])
    out = capsys.readouterr().out
    assert '"metrics": "127.0.0.1:9464"' in out
    assert '"routingCheck": false' in out
    config = build_config(
        protocol="tcp", listen=":1", target4="127.0.0.1:2", target6="[::1]:2",
        allowed_subnets=None, listeners=1, mark=0, verbose=0, close_after=60,
        dynamic_destination=False, listen_transparent=False, header_timeout=1.0,
        log_format="json", metrics=":0",
    )  # fmt: skip
    assert str(config.metrics) == "[::]:0"
    assert config.routing_check


@pytest.mark.parametrize("value", ["9100", "localhost", "[::1]", "127.0.0.1:99999"])
def test_bad_metrics_address_is_one_line(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, _out, err = run(["--metrics", value], capsys)
    assert code == 2
    assert len(err.splitlines()) == 1
    assert err.startswith(f'mmproxy: error: --metrics: "{value}"'), err
