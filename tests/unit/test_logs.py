"""Log lines: go-mmproxy's keys and level names, one line per record, verbosity gating."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from mmproxy import logs, tlv
from mmproxy.errors import HeaderError, Reason, Refusal

TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")


def our_handlers(logger: logging.Logger) -> list[logging.Handler]:
    # pytest attaches its own capture handler to non-propagating loggers too.
    return [h for h in logger.handlers if type(h).__module__ == logs.__name__]


@pytest.fixture(autouse=True)
def _fresh_logger() -> Iterator[None]:
    """Leave no handler behind pointing at a stream another test closed."""
    yield
    logger = logging.getLogger(logs.LOGGER_NAME)
    for handler in our_handlers(logger):
        logger.removeHandler(handler)


def json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def setup(log_format: str = "json", verbose: int = 2) -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    return logs.configure(log_format, verbose, stream), stream


# --- JSON --------------------------------------------------------------------


def test_json_line_has_go_mmproxy_keys_first_then_extras() -> None:
    logger, stream = setup()
    logger.info("listening", extra={"protocol": "tcp", "listenerNum": 0, "gil": True})
    (record,) = json_lines(stream)
    assert list(record) == ["time", "level", "msg", "protocol", "listenerNum", "gil"]
    assert record["level"] == "INFO"
    assert record["msg"] == "listening"
    assert record["protocol"] == "tcp"
    assert record["listenerNum"] == 0
    assert record["gil"] is True


def test_json_line_carries_no_logging_noise() -> None:
    logger, stream = setup()
    logger.warning("plain")
    (record,) = json_lines(stream)
    assert set(record) == {"time", "level", "msg"}


def test_time_is_rfc3339_utc_with_microseconds() -> None:
    logger, stream = setup()
    before = datetime.now(UTC)
    logger.info("tick")
    (record,) = json_lines(stream)
    assert TIME.fullmatch(record["time"]), record["time"]
    stamp = datetime.fromisoformat(record["time"])
    assert stamp.utcoffset() == timedelta(0)
    assert before - timedelta(seconds=1) <= stamp <= datetime.now(UTC) + timedelta(seconds=1)


@pytest.mark.parametrize(
    ("level", "name"),
    [
        (logging.DEBUG, "DEBUG"),
        (logging.INFO, "INFO"),
        (logging.WARNING, "WARN"),
        (logging.ERROR, "ERROR"),
        (logging.CRITICAL, "ERROR"),
        (logging.INFO + 5, "INFO"),  # levels in between round down, as slog's do
    ],
)
def test_level_names_are_slogs(level: int, name: str) -> None:
    logger, stream = setup(verbose=1)
    logger.log(level, "event")
    assert json_lines(stream)[0]["level"] == name


def test_extras_keep_their_json_types() -> None:
    logger, stream = setup()
    logger.info("x", extra={"count": 3, "ratio": 0.5, "list": ["192.0.2.0/24"], "none": None})
    (record,) = json_lines(stream)
    assert record["count"] == 3
    assert record["ratio"] == 0.5
    assert record["list"] == ["192.0.2.0/24"]
    assert record["none"] is None


def test_extras_cannot_replace_core_keys() -> None:
    logger, stream = setup()
    logger.info("real", extra={"time": "fake", "level": "fake"})
    (record,) = json_lines(stream)
    assert record["level"] == "INFO"
    assert TIME.fullmatch(record["time"])
    assert record["extra.time"] == "fake"
    assert record["extra.level"] == "fake"


@pytest.mark.parametrize("given", [logs.LISTEN_ADR, logs.LISTEN_ADDR])
def test_both_listen_address_spellings_are_emitted(given: str) -> None:
    logger, stream = setup()
    logger.info("listening", extra={given: "0.0.0.0:25577"})
    (record,) = json_lines(stream)
    assert record["listenAdr"] == "0.0.0.0:25577"
    assert record["listenAddr"] == "0.0.0.0:25577"


def test_field_names_match_go_mmproxy() -> None:
    assert (
        logs.REMOTE_ADDR,
        logs.LOCAL_ADDR,
        logs.CLIENT_ADDR,
        logs.TARGET_ADDR,
        logs.LISTENER_NUM,
        logs.PROTOCOL,
        logs.LISTEN_ADR,
        logs.LISTEN_ADDR,
        logs.DROP_CONNECTION,
        logs.ERROR,
        logs.REASON,
    ) == (
        "remoteAddr",
        "localAddr",
        "clientAddr",
        "targetAddr",
        "listenerNum",
        "protocol",
        "listenAdr",
        "listenAddr",
        "dropConnection",
        "error",
        "reason",
    )


def test_multi_line_message_and_traceback_stay_on_one_json_line() -> None:
    logger, stream = setup()
    try:
        raise RuntimeError("first\nsecond")
    except RuntimeError:
        logger.exception("failed\nbadly")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["msg"] == "failed\nbadly"
    assert record["level"] == "ERROR"
    assert "RuntimeError: first\nsecond" in record["exc_info"]


def test_non_ascii_is_escaped() -> None:
    logger, stream = setup()
    logger.info("caf\u00e9")
    assert stream.getvalue().isascii()
    assert json_lines(stream)[0]["msg"] == "caf\u00e9"


# --- text --------------------------------------------------------------------


def test_text_line_format() -> None:
    logger, stream = setup("text")
    logger.warning(
        "allowed subnets not set: every peer may send PROXY headers",
        extra={"path": "/etc/mmproxy/allowed subnets.txt", "count": 2, "gil": False},
    )
    line = stream.getvalue()
    assert line.endswith("\n")
    assert line.count("\n") == 1
    stamp, level, rest = line.rstrip("\n").split(" ", 2)
    assert TIME.fullmatch(stamp)
    assert level == "WARN"
    assert rest == (
        "allowed subnets not set: every peer may send PROXY headers "
        'path="/etc/mmproxy/allowed subnets.txt" count=2 gil=false'
    )


@pytest.mark.parametrize(
    ("value", "written"),
    [
        ("192.0.2.1:5000", "192.0.2.1:5000"),
        ("two words", '"two words"'),
        ('say "hi"', '"say \\"hi\\""'),
        ("a=b", '"a=b"'),
        ("", '""'),
        ("tab\there", '"tab\\there"'),
        (None, "null"),
        (True, "true"),
        (1.5, "1.5"),
        (["192.0.2.0/24", "2001:db8::/32"], '"[\\"192.0.2.0/24\\",\\"2001:db8::/32\\"]"'),
        (Reason.V1_BAD_SYNTAX, "v1_bad_syntax"),
    ],
)
def test_text_values_are_quoted_only_when_needed(value: object, written: str) -> None:
    logger, stream = setup("text")
    logger.info("m", extra={"k": value})
    assert stream.getvalue().rstrip("\n").endswith(f" m k={written}")


def test_text_traceback_stays_on_one_line() -> None:
    logger, stream = setup("text")
    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("crashed\nhard")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    assert ' ERROR "crashed\\nhard" exc_info="Traceback' in lines[0]


# --- configure ---------------------------------------------------------------


def test_configure_is_idempotent() -> None:
    stream = io.StringIO()
    logs.configure("json", 0, stream)
    logger = logs.configure("json", 0, stream)
    logger.info("once")
    assert len(json_lines(stream)) == 1
    assert len(our_handlers(logger)) == 1


def test_reconfiguring_switches_format_and_stream() -> None:
    first, second = io.StringIO(), io.StringIO()
    logs.configure("json", 0, first)
    logs.configure("text", 0, second).info("hello")
    assert first.getvalue() == ""
    assert " INFO hello" in second.getvalue()


class Collector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_no_propagation_to_root() -> None:
    logger, stream = setup()
    root = logging.getLogger()
    collector = Collector()
    root.addHandler(collector)
    try:
        logger.error("only on our stream")
    finally:
        root.removeHandler(collector)
    assert collector.records == []
    assert logger.propagate is False
    assert logger.name == "mmproxy"
    assert len(json_lines(stream)) == 1


def test_default_stream_is_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure("json", 0).info("to stdout")
    captured = capsys.readouterr()
    assert json.loads(captured.out)["msg"] == "to stdout"
    assert captured.err == ""


def test_logger_lets_debug_through() -> None:
    # Per-connection records are DEBUG; the logger must not be what hides them.
    logger, _ = setup(verbose=1)
    assert logger.isEnabledFor(logging.DEBUG)


def test_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="json or text"):
        logs.configure("xml", 0, io.StringIO())


# --- ConnectionLog and verbosity ---------------------------------------------


def emit_all(verbose: int) -> list[dict[str, Any]]:
    logger, stream = setup(verbose=verbose)
    logger.info("starting")
    logger.error("daemon failure")
    conn = logs.ConnectionLog(logger, verbose).bind(remoteAddr="192.0.2.1:40000")
    conn.state("new connection")
    conn.failure("failed to read PROXY header", HeaderError(Reason.INCOMPLETE, "closed"))
    conn.state("connection closing")
    return json_lines(stream)


def test_verbosity_0_hides_every_per_connection_record() -> None:
    assert [r["msg"] for r in emit_all(0)] == ["starting", "daemon failure"]


def test_verbosity_1_shows_failures_only() -> None:
    assert [r["msg"] for r in emit_all(1)] == [
        "starting",
        "daemon failure",
        "failed to read PROXY header",
    ]


def test_verbosity_2_shows_state_changes_too() -> None:
    assert [r["msg"] for r in emit_all(2)] == [
        "starting",
        "daemon failure",
        "new connection",
        "failed to read PROXY header",
        "connection closing",
    ]


def test_failure_record_shape() -> None:
    (failure,) = [r for r in emit_all(1) if r["msg"].startswith("failed")]
    assert failure == {
        "time": failure["time"],
        "level": "DEBUG",  # exactly as go-mmproxy: internet noise is not an ERROR
        "msg": "failed to read PROXY header",
        "remoteAddr": "192.0.2.1:40000",
        "dropConnection": True,
        "error": "incomplete: closed",
        "reason": "incomplete",
    }


def test_state_records_are_debug_without_drop_flag() -> None:
    states = [r for r in emit_all(2) if r["msg"] != "failed to read PROXY header"][2:]
    assert [r["level"] for r in states] == ["DEBUG", "DEBUG"]
    assert all("dropConnection" not in r for r in states)
    assert all(r["remoteAddr"] == "192.0.2.1:40000" for r in states)


def test_failure_with_plain_error_and_extra_fields() -> None:
    logger, stream = setup(verbose=1)
    conn = logs.ConnectionLog(logger, 1, {"listenerNum": 3})
    conn.failure("dial failed", ConnectionRefusedError(111, "Connection refused"), targetAddr="x")
    conn.failure("no error object")
    first, second = json_lines(stream)
    assert first["error"] == "[Errno 111] Connection refused"
    assert first["listenerNum"] == 3
    assert first["targetAddr"] == "x"
    assert "reason" not in first
    assert second["dropConnection"] is True
    assert "error" not in second


def test_bind_returns_a_new_log_and_leaves_the_original_alone() -> None:
    logger, stream = setup(verbose=2)
    base = logs.ConnectionLog(logger, 2, {"listenerNum": 0})
    bound = base.bind(remoteAddr="192.0.2.1:1")
    assert bound is not base
    base.state("base")
    bound.state("bound", targetAddr="127.0.0.1:443")
    first, second = json_lines(stream)
    assert "remoteAddr" not in first
    assert second["listenerNum"] == 0
    assert second["remoteAddr"] == "192.0.2.1:1"
    assert second["targetAddr"] == "127.0.0.1:443"


class ExplosiveError(Exception):
    """An error that fails the test if anything turns it into a string."""

    def __str__(self) -> str:
        raise AssertionError("the error was formatted although the record is gated off")


def test_gated_calls_build_nothing() -> None:
    logger, stream = setup(verbose=0)
    conn = logs.ConnectionLog(logger, 0)
    assert conn.bind(remoteAddr="192.0.2.1:1") is conn  # no copy at -v 0
    conn.failure("x", ExplosiveError())
    logs.ConnectionLog(logger, 1).state("y", field=ExplosiveError())
    assert stream.getvalue() == ""


def test_gate_properties() -> None:
    logger = logging.getLogger(logs.LOGGER_NAME)
    assert [logs.ConnectionLog(logger, v).failures for v in (0, 1, 2)] == [False, True, True]
    assert [logs.ConnectionLog(logger, v).states for v in (0, 1, 2)] == [False, False, True]


def test_notice_appears_from_v1_without_dropping() -> None:
    for verbose, expected in ((0, 0), (1, 1), (2, 1)):
        logger, stream = setup(verbose=verbose)
        logs.ConnectionLog(logger, verbose, {"remoteAddr": "192.0.2.1:1"}).notice("odd", x=1)
        lines = [json.loads(line) for line in stream.getvalue().splitlines()]
        assert len(lines) == expected
        for line in lines:
            assert line["msg"] == "odd"
            assert line["x"] == 1
            assert line["remoteAddr"] == "192.0.2.1:1"
            assert "dropConnection" not in line


# --- go-mmproxy's messages ------------------------------------------------------


def go_messages() -> dict[str, str]:
    return {name: value for name, value in vars(logs).items() if name.startswith("MSG_")}


def test_every_refusal_reason_has_a_message() -> None:
    """Each reason code the relays log maps to go-mmproxy's message for that event."""
    assert (
        logs.tcp_refusal_message(Refusal.NOT_ALLOWED) == "connection origin not in allowed subnets"
    )
    assert logs.tcp_refusal_message(Refusal.HEADER_TIMEOUT) == "failed to read PROXY header"
    assert logs.tcp_refusal_message(Refusal.UPSTREAM_FAILED) == (
        "failed to establish upstream connection"
    )
    assert logs.tcp_refusal_message(Refusal.WRONG_TRANSPORT) == "failed to parse PROXY header"
    assert logs.tcp_refusal_message(Reason.V1_BAD_SYNTAX.value) == "failed to parse PROXY header"
    assert logs.udp_drop_message(Refusal.NOT_ALLOWED) == "packet origin not in allowed subnets"
    assert logs.udp_drop_message(Refusal.UPSTREAM_FAILED) == "failed to connect to upstream"
    assert logs.udp_drop_message(Refusal.SEND_FAILED) == "failed to write to upstream socket"
    assert logs.udp_drop_message(Refusal.WRONG_VERSION) == "failed to parse PROXY header"
    for reason in (Refusal.NO_FLOW, Refusal.FLOW_LIMIT):
        assert logs.udp_drop_message(reason) != "failed to parse PROXY header"


def test_readme_log_table_lists_every_message() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    table = readme.split("#### Messages", 1)[1].split("\n\n", 2)[1]
    missing = [msg for msg in go_messages().values() if f"| `{msg}` |" not in table]
    assert not missing, missing


def test_tlv_fields_are_named_and_bounded() -> None:
    fields = logs.tlv_fields(
        (
            tlv.Authority("x" * 5000),
            tlv.Authority("second"),  # the first of a type wins
            tlv.Alpn(b"\xffh2"),
            tlv.UniqueId(bytes(128)),
            tlv.Netns("blue"),
            tlv.AwsVpceId("vpce-0123"),
            tlv.AzureLinkId(7),
            tlv.GcpPscConnectionId(1 << 40),
            tlv.Ssl(tlv.PP2_CLIENT_SSL, 1, (tlv.SslString(tlv.PP2_SUBTYPE_SSL_CIPHER, "c"),)),
        )
    )
    assert len(fields["tlvAuthority"]) == logs.TLV_FIELD_MAX
    assert fields["tlvAlpn"] == "\\xffh2"
    assert fields["tlvUniqueId"] == "00" * 128
    assert fields["tlvNetns"] == "blue"
    assert fields["tlvAwsVpceId"] == "vpce-0123"
    assert fields["tlvAzureLinkId"] == 7
    assert fields["tlvGcpPscConnectionId"] == 1 << 40
    assert (fields["tlvSsl"], fields["tlvSslVerified"], fields["tlvSslCipher"]) == (
        True,
        False,
        "c",
    )
    assert all(len(str(value)) <= logs.TLV_FIELD_MAX for value in fields.values())
