"""The command line: go-mmproxy's flags and spellings, environment, errors, start-up."""

from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result

import mmproxy
from mmproxy import cli, daemon, goflags, logs
from mmproxy.config import Config

ENV_NAMES = (
    *("L", "LISTEN", "4", "TARGET4", "6", "TARGET6", "ALLOWED_SUBNETS", "LISTENERS", "MARK"),
    *("V", "VERBOSE", "P", "PROTOCOL", "CLOSE_AFTER", "DYNAMIC_DESTINATION"),
    *("LISTEN_TRANSPARENT", "HEADER_TIMEOUT", "LOG_FORMAT", "CHECK_CONFIG"),
)


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No MMPROXY_* variable from the machine running the tests, and no stale log handler."""
    for name in ENV_NAMES:
        monkeypatch.delenv(f"MMPROXY_{name}", raising=False)
    yield
    logger = logging.getLogger(logs.LOGGER_NAME)
    for handler in [h for h in logger.handlers if type(h).__module__ == logs.__name__]:
        logger.removeHandler(handler)


class FakeDaemon:
    """Stands in for daemon.run: records what it was given, returns a chosen code."""

    def __init__(self, code: int = 0) -> None:
        self.code = code
        self.configs: list[Config] = []
        self.loggers: list[logging.Logger] = []

    def __call__(self, config: Config, log: logging.Logger) -> int:
        self.configs.append(config)
        self.loggers.append(log)
        return self.code

    @property
    def config(self) -> Config:
        (config,) = self.configs
        return config


@pytest.fixture
def fake_daemon(monkeypatch: pytest.MonkeyPatch) -> FakeDaemon:
    fake = FakeDaemon()
    monkeypatch.setattr(daemon, "run", fake)
    return fake


def invoke(args: str | list[str], env: dict[str, str] | None = None) -> Result:
    argv = shlex.split(args) if isinstance(args, str) else args
    return CliRunner(catch_exceptions=False).invoke(cli.command, argv, env=env)


def run_config(
    fake: FakeDaemon, args: str | list[str], env: dict[str, str] | None = None
) -> Config:
    result = invoke(args, env)
    assert result.exit_code == 0, result.stderr
    return fake.config


def assert_one_error_line(result: Result, start: str) -> str:
    assert result.exit_code == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"mmproxy: error: {start}"), lines[0]
    assert "Traceback" not in result.stderr
    assert "Usage" not in result.stderr
    return lines[0]


@pytest.fixture
def subnets_file(tmp_path: Path) -> Path:
    path = tmp_path / "allowed-subnets.txt"
    path.write_text("# load balancers\n192.0.2.0/24\n2001:db8::/32\n")
    return path


# --- go-mmproxy README command lines -----------------------------------------


def test_path_network_readme(
    fake_daemon: FakeDaemon, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("path-prefixes.txt").write_text("192.0.2.0/24\n2001:db8::/32\n")
    config = run_config(
        fake_daemon,
        "-l 0.0.0.0:25577 -4 127.0.0.1:25578 -6 [::1]:25578 --allowed-subnets ./path-prefixes.txt",
    )
    assert str(config.listen) == "0.0.0.0:25577"
    assert str(config.target4) == "127.0.0.1:25578"
    assert str(config.target6) == "[::1]:25578"
    assert config.allow_list.path == "./path-prefixes.txt"
    assert config.allow_list.cidrs == ("192.0.2.0/24", "2001:db8::/32")
    assert config.protocol == "tcp"


def test_kzemek_readme(
    fake_daemon: FakeDaemon, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("allowed-subnets.txt.example").write_text("203.0.113.0/24 # lb\n")
    config = run_config(
        fake_daemon,
        "-l 0.0.0.0:25577 -4 127.0.0.1:25578 -6 [::1]:25578 "
        "-allowed-subnets ./allowed-subnets.txt.example",
    )
    assert str(config.listen) == "0.0.0.0:25577"
    assert config.allow_list.cidrs == ("203.0.113.0/24",)


def test_transparent_and_dynamic_destination_readme(
    fake_daemon: FakeDaemon, subnets_file: Path
) -> None:
    config = run_config(
        fake_daemon,
        "-l 0.0.0.0:25577 -4 127.0.0.1:25578 -6 [::1]:25578 "
        f"-listen-transparent -dynamic-destination -allowed-subnets {subnets_file}",
    )
    assert config.listen_transparent is True
    assert config.dynamic_destination is True
    assert str(config.target6) == "[::1]:25578"


def test_udp_readme(fake_daemon: FakeDaemon) -> None:
    config = run_config(fake_daemon, "-p udp -close-after 30 -listeners 4 -mark 123 -v 2")
    assert config.protocol == "udp"
    assert config.close_after == 30
    assert config.listeners == 4
    assert config.mark == 123
    assert config.verbose == 2


def test_defaults_equal_go_mmproxys(fake_daemon: FakeDaemon) -> None:
    config = run_config(fake_daemon, [])
    assert config.summary() == {
        "protocol": "tcp",
        "listen": "0.0.0.0:8443",
        "target4": "127.0.0.1:443",
        "target6": "[::1]:443",
        "allowedSubnets": None,
        "allowedSubnetsCount": None,
        "listeners": 1,
        "mark": 0,
        "verbose": 0,
        "closeAfter": 60,
        "dynamicDestination": False,
        "listenTransparent": False,
        "headerTimeout": 10.0,
        "connectTimeout": 5.0,
        "drainTimeout": 30.0,
        "idleTimeout": 0.0,
        "relay": "splice",
        "logFormat": "json",
        "udpHeader": "every",
        "maxUdpFlows": 0,
        "metrics": None,
        "routingCheck": True,
        "allowedDestinations": None,
        "maxConnections": 0,
    }
    assert config.allow_list.allows_everyone


# --- spellings -----------------------------------------------------------------


@pytest.mark.parametrize("args", ["-v 2", "--v 2", "-v=2", "--v=2"])
def test_one_or_two_dashes_with_or_without_equals(fake_daemon: FakeDaemon, args: str) -> None:
    assert run_config(fake_daemon, args).verbose == 2


@pytest.mark.parametrize(
    "args",
    [
        "-allowed-subnets {path}",
        "--allowed-subnets {path}",
        "-allowed-subnets={path}",
        "--allowed-subnets={path}",
    ],
)
def test_long_flag_spellings(fake_daemon: FakeDaemon, subnets_file: Path, args: str) -> None:
    config = run_config(fake_daemon, args.format(path=subnets_file))
    assert config.allow_list.path == str(subnets_file)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ("-l=192.0.2.1:1", "192.0.2.1:1"),
        ("--l=[2001:db8::1]:2", "[2001:db8::1]:2"),
        ("--l 192.0.2.1:3", "192.0.2.1:3"),
        ("-l :4", "[::]:4"),
    ],
)
def test_listen_spellings(fake_daemon: FakeDaemon, args: str, expected: str) -> None:
    assert str(run_config(fake_daemon, args).listen) == expected


def test_digit_flags(fake_daemon: FakeDaemon) -> None:
    config = run_config(fake_daemon, "--4=192.0.2.9:1 --6 [2001:db8::9]:2")
    assert str(config.target4) == "192.0.2.9:1"
    assert str(config.target6) == "[2001:db8::9]:2"


@pytest.mark.parametrize(
    ("word", "value"),
    [
        *((word, True) for word in ("true", "TRUE", "True", "t", "T", "1")),
        *((word, False) for word in ("false", "FALSE", "False", "f", "F", "0")),
    ],
)
def test_go_bool_words(fake_daemon: FakeDaemon, subnets_file: Path, word: str, value: bool) -> None:
    config = run_config(
        fake_daemon,
        f"-dynamic-destination={word} --listen-transparent={word} -allowed-subnets {subnets_file}",
    )
    assert config.dynamic_destination is value
    assert config.listen_transparent is value


def test_long_single_dash_flags_do_not_collide_with_l(fake_daemon: FakeDaemon) -> None:
    config = run_config(fake_daemon, "-listeners 4 -listen-transparent -l 192.0.2.1:8443")
    assert config.listeners == 4
    assert config.listen_transparent is True
    assert str(config.listen) == "192.0.2.1:8443"


@pytest.mark.parametrize(
    ("literal", "value"),
    [("0x10", 16), ("0X1f", 31), ("017", 15), ("0o17", 15), ("0b101", 5), ("1_000", 1000)],
)
def test_go_integer_literals(fake_daemon: FakeDaemon, literal: str, value: int) -> None:
    # Go's int flags take these (strconv.ParseInt with base 0); fwmarks are often hex.
    assert run_config(fake_daemon, f"-mark {literal}").mark == value


def test_a_value_may_start_with_a_dash(
    fake_daemon: FakeDaemon, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Go gives a flag the next word whatever it looks like.
    monkeypatch.chdir(tmp_path)
    Path("-odd.txt").write_text("192.0.2.0/24\n")
    assert run_config(fake_daemon, ["-allowed-subnets", "-odd.txt"]).allow_list.path == "-odd.txt"


def test_last_occurrence_wins(fake_daemon: FakeDaemon) -> None:
    assert run_config(fake_daemon, "-v 1 --v=2").verbose == 2


def test_double_dash_ends_flags(fake_daemon: FakeDaemon) -> None:
    assert run_config(fake_daemon, "-v 1 --").verbose == 1


# --- environment ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value", "field", "expected"),
    [
        ("L", "192.0.2.1:1", "listen", "192.0.2.1:1"),
        ("LISTEN", "192.0.2.1:2", "listen", "192.0.2.1:2"),
        ("4", "192.0.2.2:1", "target4", "192.0.2.2:1"),
        ("TARGET4", "192.0.2.2:2", "target4", "192.0.2.2:2"),
        ("6", "[2001:db8::2]:1", "target6", "[2001:db8::2]:1"),
        ("TARGET6", "[2001:db8::2]:2", "target6", "[2001:db8::2]:2"),
        ("LISTENERS", "8", "listeners", 8),
        ("MARK", "0x20", "mark", 32),
        ("V", "1", "verbose", 1),
        ("VERBOSE", "2", "verbose", 2),
        ("P", "udp", "protocol", "udp"),
        ("PROTOCOL", "udp", "protocol", "udp"),
        ("CLOSE_AFTER", "5", "close_after", 5),
        ("LISTEN_TRANSPARENT", "1", "listen_transparent", True),
        ("HEADER_TIMEOUT", "2.5", "header_timeout", 2.5),
        ("CONNECT_TIMEOUT", "0.5", "connect_timeout", 0.5),
        ("DRAIN_TIMEOUT", "0", "drain_timeout", 0.0),
        ("IDLE_TIMEOUT", "300", "idle_timeout", 300.0),
        ("LOG_FORMAT", "text", "log_format", "text"),
        ("UDP_HEADER", "first", "udp_header", "first"),
        ("MAX_UDP_FLOWS", "500", "max_udp_flows", 500),
        ("MAX_CONNECTIONS", "64", "max_connections", 64),
    ],
)
def test_every_flag_reads_its_environment_variable(
    fake_daemon: FakeDaemon, name: str, value: str, field: str, expected: object
) -> None:
    config = run_config(fake_daemon, [], env={f"MMPROXY_{name}": value})
    actual = getattr(config, field)
    assert (str(actual) if field in ("listen", "target4", "target6") else actual) == expected


def test_dynamic_destination_and_its_lists_from_environment(
    fake_daemon: FakeDaemon, subnets_file: Path
) -> None:
    env = {
        "MMPROXY_DYNAMIC_DESTINATION": "true",
        "MMPROXY_ALLOWED_SUBNETS": str(subnets_file),
        "MMPROXY_ALLOWED_DESTINATIONS": str(subnets_file),
    }
    config = run_config(fake_daemon, [], env=env)
    assert config.dynamic_destination is True
    assert config.allowed_destinations is not None
    assert config.allowed_destinations.path == str(subnets_file)


def test_dynamic_destination_open_to_everyone_is_one_error_line(fake_daemon: FakeDaemon) -> None:
    line = assert_one_error_line(invoke("-dynamic-destination"), "-dynamic-destination")
    assert "-dynamic-destination: needs -allowed-subnets" in line
    assert not fake_daemon.configs


def test_allowed_subnets_from_environment(fake_daemon: FakeDaemon, subnets_file: Path) -> None:
    config = run_config(fake_daemon, [], env={"MMPROXY_ALLOWED_SUBNETS": str(subnets_file)})
    assert config.allow_list.path == str(subnets_file)


def test_command_line_beats_environment_beats_default(fake_daemon: FakeDaemon) -> None:
    assert run_config(fake_daemon, "-v 2", env={"MMPROXY_V": "1"}).verbose == 2
    fake_daemon.configs.clear()
    assert run_config(fake_daemon, [], env={"MMPROXY_V": "1"}).verbose == 1
    fake_daemon.configs.clear()
    assert run_config(fake_daemon, []).verbose == 0


def test_command_line_false_beats_environment_true(fake_daemon: FakeDaemon) -> None:
    env = {"MMPROXY_DYNAMIC_DESTINATION": "true"}
    assert run_config(fake_daemon, "-dynamic-destination=false", env).dynamic_destination is False


def test_flag_named_variable_beats_its_alias(fake_daemon: FakeDaemon) -> None:
    env = {"MMPROXY_L": "192.0.2.1:1", "MMPROXY_LISTEN": "192.0.2.1:2"}
    assert str(run_config(fake_daemon, [], env).listen) == "192.0.2.1:1"


def test_empty_variable_counts_as_unset(fake_daemon: FakeDaemon) -> None:
    assert run_config(fake_daemon, [], env={"MMPROXY_V": "", "MMPROXY_VERBOSE": "2"}).verbose == 2


def test_check_config_has_no_environment_variable(fake_daemon: FakeDaemon) -> None:
    # A leftover variable must not turn the daemon into a checker.
    invoke([], env={"MMPROXY_CHECK_CONFIG": "true"})
    assert len(fake_daemon.configs) == 1


# --- errors --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        ("-l nowhere", "-l"),
        ("-l=", "-l"),
        ("-l 192.0.2.1:70000", "-l"),
        ("-4 [::1]:443", "-4"),
        ("-4 192.0.2.1", "-4"),
        ("-6 127.0.0.1:443", "-6"),
        ("-6 [::1]:0", "-6"),
        ("-allowed-subnets /nonexistent/allowed.txt", "-allowed-subnets"),
        ("-listeners abc", "-listeners"),
        ("-listeners 0", "-listeners"),
        ("-listeners 1025", "-listeners"),
        ("-listeners 1.5", "-listeners"),
        ("-mark -1", "-mark"),
        ("-mark 4294967296", "-mark"),
        ("-mark 08", "-mark"),
        ("-mark ' 1'", "-mark"),
        ("-v 3", "-v"),
        ("-v -1", "-v"),
        ("-v=two", "-v"),
        ("-p sctp", "-p"),
        ("-p TCP", "-p"),
        ("-close-after -1", "-close-after"),
        ("-close-after 1m", "-close-after"),
        ("-dynamic-destination=yes", "-dynamic-destination"),
        ("-dynamic-destination=", "-dynamic-destination"),
        ("-listen-transparent=2", "-listen-transparent"),
        ("--header-timeout 0", "--header-timeout"),
        ("--header-timeout -1", "--header-timeout"),
        ("--header-timeout abc", "--header-timeout"),
        ("--header-timeout nan", "--header-timeout"),
        ("--header-timeout inf", "--header-timeout"),
        ("--header-timeout 3601", "--header-timeout"),
        ("--connect-timeout 0", "--connect-timeout"),
        ("--connect-timeout 3601", "--connect-timeout"),
        ("--drain-timeout -1", "--drain-timeout"),
        ("--drain-timeout 1e9", "--drain-timeout"),
        ("--drain-timeout 86401", "--drain-timeout"),
        ("--idle-timeout -1", "--idle-timeout"),
        ("--idle-timeout 5m", "--idle-timeout"),
        ("--idle-timeout 604801", "--idle-timeout"),
        ("--log-format xml", "--log-format"),
        ("--check-config=maybe", "--check-config"),
    ],
)
def test_each_invalid_value_is_one_line_naming_the_flag(args: str, flag: str) -> None:
    assert_one_error_line(invoke(args), f"{flag}: ")


def test_exact_error_line() -> None:
    result = invoke("-4 [::1]:443")
    assert result.stderr == 'mmproxy: error: -4: "[::1]:443" is not an IPv4 address:port\n'


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ("-bogus", "-bogus: unknown flag (see mmproxy -h)"),
        ("--bogus=1", "--bogus: unknown flag"),
        ("-list 4", "-list: unknown flag"),  # click alone would read -l "ist"
        ("-v2", "-v2: unknown flag"),  # Go has no attached short values either
        ("-l", "-l: needs a value"),
        ("--allowed-subnets", "--allowed-subnets: needs a value"),
        ("extra", 'unexpected argument "extra"'),
        ("-v 1 extra", 'unexpected argument "extra"'),
        ("-- extra", 'unexpected argument "extra"'),
        ("-", 'unexpected argument "-"'),
        ("---l x", 'bad flag syntax: "---l"'),
        ("-=x", 'bad flag syntax: "-=x"'),
        ("-h=1", "-h: takes no value"),
        ("-dynamic-destination true", 'unexpected argument "true" (a bool flag takes'),
    ],
)
def test_usage_errors_are_one_line(args: str, message: str) -> None:
    line = assert_one_error_line(invoke(args), "")
    assert line.startswith(f"mmproxy: error: {message}")


def test_bad_allowed_subnets_line(tmp_path: Path) -> None:
    path = tmp_path / "allowed.txt"
    path.write_text("192.0.2.0/24\n\n01.2.3.4\n")
    line = assert_one_error_line(invoke(["-allowed-subnets", str(path)]), "-allowed-subnets: ")
    assert line.startswith(f'mmproxy: error: -allowed-subnets: {path}:3: "01.2.3.4"')


def test_empty_allowed_subnets_file(tmp_path: Path) -> None:
    path = tmp_path / "allowed.txt"
    path.write_text("# nobody yet\n")
    line = assert_one_error_line(invoke(["-allowed-subnets", str(path)]), "-allowed-subnets: ")
    assert "no subnets listed" in line


@pytest.mark.parametrize(
    ("env", "start"),
    [
        ({"MMPROXY_LISTENERS": "abc"}, '-listeners (from MMPROXY_LISTENERS): "abc"'),
        ({"MMPROXY_TARGET4": "[::1]:1"}, '-4 (from MMPROXY_TARGET4): "[::1]:1"'),
        ({"MMPROXY_V": "7"}, "-v (from MMPROXY_V): 7 is out of range"),
        ({"MMPROXY_ALLOWED_SUBNETS": "/nonexistent"}, "-allowed-subnets (from MMPROXY_"),
        ({"MMPROXY_LISTEN_TRANSPARENT": "yes"}, "-listen-transparent (from MMPROXY_"),
        ({"MMPROXY_LOG_FORMAT": "xml"}, '--log-format (from MMPROXY_LOG_FORMAT): "xml"'),
    ],
)
def test_environment_errors_say_which_variable(env: dict[str, str], start: str) -> None:
    assert_one_error_line(invoke([], env=env), start)


def test_command_line_error_does_not_blame_the_environment() -> None:
    line = assert_one_error_line(invoke("-v 7", env={"MMPROXY_VERBOSE": "1"}), "-v: ")
    assert "from" not in line


# --- help, version, check-config -----------------------------------------------


@pytest.mark.parametrize("args", ["-h", "-help", "--help", "--h"])
def test_help(args: str) -> None:
    result = invoke(args)
    assert result.exit_code == 0
    assert result.stdout.startswith("Usage: mmproxy [flags]")
    for flag in ("-allowed-subnets", "-listen-transparent", "--header-timeout", "MMPROXY_L,"):
        assert flag in result.stdout
    assert result.stderr == ""


@pytest.mark.parametrize("args", ["--version", "-version"])
def test_version(args: str) -> None:
    result = invoke(args)
    assert result.exit_code == 0
    assert result.stdout == f"mmproxy {mmproxy.__version__}\n"


def test_check_config_prints_json_and_does_not_start(
    fake_daemon: FakeDaemon, subnets_file: Path
) -> None:
    result = invoke(["--check-config", "-allowed-subnets", str(subnets_file), "-p", "udp"])
    assert result.exit_code == 0, result.stderr
    assert result.stdout.count("\n") == 1
    resolved = json.loads(result.stdout)
    assert resolved["protocol"] == "udp"
    assert resolved["listen"] == "0.0.0.0:8443"
    assert resolved["allowedSubnets"] == str(subnets_file)
    assert resolved["allowedSubnetsCount"] == 2
    assert resolved["allowedSubnetsCidrs"] == ["192.0.2.0/24", "2001:db8::/32"]
    assert fake_daemon.configs == []


def test_check_config_fails_on_a_bad_file(fake_daemon: FakeDaemon, tmp_path: Path) -> None:
    path = tmp_path / "allowed.txt"
    path.write_text("example.com\n")
    assert_one_error_line(invoke(["--check-config", "-allowed-subnets", str(path)]), "-allowed")
    assert fake_daemon.configs == []


# --- start-up ------------------------------------------------------------------


def test_start_up_log_lines(fake_daemon: FakeDaemon, subnets_file: Path) -> None:
    result = invoke(["-allowed-subnets", str(subnets_file), "-l", "127.0.0.1:25577", "-v", "1"])
    assert result.exit_code == 0
    starting, *subnets, allowed = (json.loads(line) for line in result.stdout.splitlines())
    assert starting["level"] == "INFO"
    assert starting["msg"] == "starting"
    assert starting["version"] == mmproxy.__version__
    assert starting["python"].split()[0] in ("CPython", "PyPy")
    assert isinstance(starting["gil"], bool)
    assert starting["listen"] == "127.0.0.1:25577"
    assert starting["verbose"] == 1
    # go-mmproxy's line per subnet, then mmproxy's summary.
    assert [(line["level"], line["msg"]) for line in subnets] == [("INFO", "allowed subnet")] * 2
    assert all(isinstance(line["subnet"], str) for line in subnets)
    assert allowed == {
        "time": allowed["time"],
        "level": "INFO",
        "msg": "allowed subnets",
        "path": str(subnets_file),
        "count": 2,
    }


def test_start_up_warns_when_everyone_is_allowed(fake_daemon: FakeDaemon) -> None:
    result = invoke([])
    warning = json.loads(result.stdout.splitlines()[1])
    assert warning["level"] == "WARN"
    assert warning["msg"] == "allowed subnets not set: every peer may send PROXY headers"


def test_text_log_format(fake_daemon: FakeDaemon) -> None:
    result = invoke("--log-format text")
    first = result.stdout.splitlines()[0]
    assert " INFO starting version=" in first
    assert "logFormat=text" in first


def test_daemon_exit_code_is_the_process_exit_code(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeDaemon(code=3)
    monkeypatch.setattr(daemon, "run", fake)
    assert invoke("-p udp").exit_code == 3
    assert fake.config.protocol == "udp"


def test_the_daemon_receives_the_configured_logger(fake_daemon: FakeDaemon) -> None:
    invoke([])
    assert [log.name for log in fake_daemon.loggers] == ["mmproxy"]
    assert fake_daemon.loggers[0].propagate is False


def test_main_returns_after_check_config(capsys: pytest.CaptureFixture[str]) -> None:
    cli.main(["--check-config", "-v", "2"])  # returns instead of raising SystemExit
    assert json.loads(capsys.readouterr().out)["verbose"] == 2


def test_main_exits_2_on_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        cli.main(["-nope"])
    assert caught.value.code == 2
    assert capsys.readouterr().err == "mmproxy: error: -nope: unknown flag (see mmproxy -h)\n"


# --- the pre-pass, and why it exists ---------------------------------------------


def test_go_argv_canonical_form() -> None:
    assert cli.go_argv(
        ["-l=192.0.2.1:1", "--v", "2", "-dynamic-destination", "-listen-transparent=false", "-h"]
    ) == [
        "--l",
        "192.0.2.1:1",
        "--v",
        "2",
        "--dynamic-destination",
        "true",
        "--listen-transparent",
        "false",
        "--help",
    ]


def test_click_alone_misreads_go_style_equals() -> None:
    # Without the pre-pass, click takes "-v=2" as the short option -v with value "=2".
    with pytest.raises(click.BadParameter, match='"=2" is not an integer'):
        cli.command.make_context("mmproxy", ["-v=2"])


def test_click_alone_reads_a_typo_as_l_with_a_value() -> None:
    with cli.command.make_context("mmproxy", ["-list"]) as ctx:
        assert ctx.params["listen"] == "ist"


def test_click_alone_keeps_long_single_dash_flags_apart_from_l() -> None:
    args = ["-listeners", "4", "-listen-transparent", "true", "-l", "192.0.2.1:1"]
    with cli.command.make_context("mmproxy", args) as ctx:
        assert ctx.params["listeners"] == 4
        assert ctx.params["listen_transparent"] is True
        assert ctx.params["listen"] == "192.0.2.1:1"


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0", 0),
        ("42", 42),
        ("-7", -7),
        ("+7", 7),
        ("0x1F", 31),
        ("0o17", 15),
        ("017", 15),
        ("0_17", 15),
        ("0b11", 3),
        ("1_000_000", 1_000_000),
        ("0x_ff", 255),
    ],
)
def test_parse_go_int(text: str, value: int) -> None:
    assert goflags.parse_go_int(text) == value


@pytest.mark.parametrize(
    "text", ["", " 1", "1 ", "1\n", "08", "0x", "1__0", "_1", "1_", "1.0", "1e3", "\u0661", "--1"]
)
def test_parse_go_int_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="is not a Go integer"):
        goflags.parse_go_int(text)


# --- a real process ----------------------------------------------------------------


def run_process(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MMPROXY_")}
    return subprocess.run(
        [sys.executable, "-m", "mmproxy", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    "args",
    [("-bogus",), ("-4", "[::1]:443"), ("-v=9",), ("-listeners", "x"), ("extra",)],
)
def test_process_bad_flag_exits_2_with_one_line(args: tuple[str, ...]) -> None:
    done = run_process(*args)
    assert done.returncode == 2
    assert done.stdout == ""
    assert len(done.stderr.splitlines()) == 1
    assert done.stderr.startswith("mmproxy: error: ")
    assert "Traceback" not in done.stderr


def test_process_bad_subnets_line(tmp_path: Path) -> None:
    path = tmp_path / "allowed.txt"
    path.write_text("192.0.2.0/24\n1.2.3.4/33\n")
    done = run_process("-allowed-subnets", str(path))
    assert done.returncode == 2
    expected = (
        f'mmproxy: error: -allowed-subnets: {path}:2: "1.2.3.4/33": '
        "prefix length 33 is out of range for IPv4 (0-32)"
    )
    assert done.stderr.splitlines() == [expected]


def test_process_check_config(subnets_file: Path) -> None:
    done = run_process(
        "-l", "0.0.0.0:25577", "-4", "127.0.0.1:25578", "-6", "[::1]:25578",
        "--allowed-subnets", str(subnets_file), "--check-config",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    resolved = json.loads(done.stdout)
    assert resolved["listen"] == "0.0.0.0:25577"
    assert resolved["target6"] == "[::1]:25578"
    assert resolved["allowedSubnetsCount"] == 2


def test_process_help_exits_0() -> None:
    done = run_process("-h")
    assert done.returncode == 0
    assert done.stdout.startswith("Usage: mmproxy")
