"""Logging in go-mmproxy's shape: one record per line, JSON (default) or text.

Choices an operator can rely on:

* JSON lines start with ``time``, ``level`` and ``msg``, then every ``extra``
  field as given; LogRecord's own attributes (``name``, ``taskName``, ...) are
  left out.  Non-ASCII text is escaped, so every line is plain ASCII.
* ``time`` is always UTC, RFC 3339 with microseconds and a ``Z`` suffix:
  ``2026-11-26T08:47:36.123456Z``.  UTC keeps lines from different hosts
  comparable; ``Z`` is what Go writes for UTC and every RFC 3339 parser takes.
* ``level`` uses slog's names: ``DEBUG``, ``INFO``, ``WARN``, ``ERROR``
  (Python's WARNING is WARN, CRITICAL is ERROR).
* The text format is ``time LEVEL msg key=value ...``; a value with a space,
  a quote, an ``=`` or a control character is written as a JSON string.
* Field names match go-mmproxy (the constants below), so existing pipelines
  keep working.  The two go-mmproxy forks spell the listen address
  differently, so a record with either ``listenAdr`` or ``listenAddr`` carries
  both, with the same value.

Verbosity follows go-mmproxy's ``-v``: 0 logs start-up and daemon errors only,
1 adds per-connection failures, 2 adds every per-connection state change.
Per-connection records are DEBUG records, exactly as go-mmproxy logs them, so
a pipeline alerting on ``level=ERROR`` does not fire on internet noise.  The
``mmproxy`` logger itself therefore passes DEBUG, and :class:`ConnectionLog`
gates by verbosity; at ``-v 0`` the handler also drops DEBUG records, so a
stray debug call elsewhere cannot leak through.
"""

from __future__ import annotations

import functools
import json
import logging
import socket
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, TextIO

from pythonjsonlogger.json import JsonFormatter

from mmproxy import tlv
from mmproxy.errors import HeaderError, Refusal
from mmproxy.header import host_port

LOGGER_NAME = "mmproxy"
LOG_FORMATS = ("json", "text")

# Field names shared with go-mmproxy's logs.
REMOTE_ADDR = "remoteAddr"
LOCAL_ADDR = "localAddr"
CLIENT_ADDR = "clientAddr"
TARGET_ADDR = "targetAddr"
LISTENER_NUM = "listenerNum"
PROTOCOL = "protocol"
LISTEN_ADR = "listenAdr"  # path-network/go-mmproxy's spelling
LISTEN_ADDR = "listenAddr"  # kzemek/go-mmproxy's spelling
DROP_CONNECTION = "dropConnection"
DROP_DATAGRAM = "dropDatagram"  # ours: UDP's counterpart of dropConnection
ERROR = "error"
# Ours: the HeaderError reason code (mmproxy.errors.Reason).
REASON = "reason"
DOWNSTREAM_ADDR = "downstreamAddr"  # go-mmproxy's name for a UDP flow's load balancer
UNKNOWN_CLIENT = "UNKNOWN"  # clientAddr of a header without addresses (LOCAL, UNKNOWN)

# go-mmproxy's messages (path-network/go-mmproxy), written for the same events at
# the same verbosity so that pipelines matching on ``msg`` keep working.  Where an
# event has more detail in mmproxy, it goes in fields (``reason``, ``error``, byte
# counts), never in a different ``msg``.  The README's log table lists each one.
# -- start-up and listeners
MSG_ALLOWED_SUBNET = "allowed subnet"  # INFO, one per entry of the file
MSG_LISTENING = "listening"  # INFO, one per listening socket
MSG_BIND_FAILED = "failed to bind listener"  # ERROR, start-up stops
MSG_ACCEPT_FAILED = "failed to accept new connection"  # go: ERROR and the listener ends
# -- TCP connections (DEBUG; -v 1 for failures, -v 2 for state changes)
MSG_ORIGIN_NOT_ALLOWED = "connection origin not in allowed subnets"
MSG_NEW_CONNECTION = "new connection"
MSG_READ_HEADER_FAILED = "failed to read PROXY header"
MSG_PARSE_HEADER_FAILED = "failed to parse PROXY header"
MSG_HEADER_PARSED = "successfully parsed PROXY header"
MSG_UPSTREAM_FAILED = "failed to establish upstream connection"
MSG_UPSTREAM_ESTABLISHED = "successfully established upstream connection"
MSG_NODELAY_DOWNSTREAM = "successfully set NoDelay on downstream connection"
MSG_NODELAY_UPSTREAM = "successfully set NoDelay on upstream connection"
MSG_WRITE_UPSTREAM_FAILED = "failed to write data to upstream connection"
MSG_CONNECTION_BROKEN = "connection broken"
MSG_CONNECTION_CLOSING = "connection closing"
# -- UDP datagrams and flows (DEBUG)
MSG_PACKET_NOT_ALLOWED = "packet origin not in allowed subnets"
MSG_UDP_CONNECT_FAILED = "failed to connect to upstream"
MSG_UDP_WRITE_FAILED = "failed to write to upstream socket"  # go: ERROR
MSG_UDP_READ_FAILED = "failed to read from upstream"
# -- UDP drops go-mmproxy has no message for (its design never meets them): mmproxy's own
MSG_UDP_NO_FLOW = "datagram without a flow"
MSG_UDP_FLOW_LIMIT = "UDP flow limit reached"

# Which message a refusal's ``reason`` code is logged with.  Codes not listed are the
# PROXY parser's (mmproxy.errors.Reason) and the other header checks: go-mmproxy
# reports all of those as a header it failed to parse.
_TCP_MESSAGE_OF_REASON: dict[str, str] = {
    Refusal.NOT_ALLOWED: MSG_ORIGIN_NOT_ALLOWED,
    Refusal.HEADER_TIMEOUT: MSG_READ_HEADER_FAILED,
    Refusal.READ_ERROR: MSG_READ_HEADER_FAILED,
    Refusal.BAD_DESTINATION: MSG_UPSTREAM_FAILED,  # go dials what the header names, and fails
    Refusal.UPSTREAM_FAILED: MSG_UPSTREAM_FAILED,
}
_UDP_MESSAGE_OF_REASON: dict[str, str] = {
    Refusal.NOT_ALLOWED: MSG_PACKET_NOT_ALLOWED,
    Refusal.BAD_DESTINATION: MSG_UDP_CONNECT_FAILED,
    Refusal.UPSTREAM_FAILED: MSG_UDP_CONNECT_FAILED,
    Refusal.SEND_FAILED: MSG_UDP_WRITE_FAILED,
    Refusal.NO_FLOW: MSG_UDP_NO_FLOW,
    Refusal.FLOW_LIMIT: MSG_UDP_FLOW_LIMIT,
}


def tcp_refusal_message(reason: str) -> str:
    """go-mmproxy's ``msg`` for a TCP connection refused with ``reason``."""
    return _TCP_MESSAGE_OF_REASON.get(reason, MSG_PARSE_HEADER_FAILED)


def udp_drop_message(reason: str) -> str:
    """go-mmproxy's ``msg`` for a datagram dropped with ``reason``."""
    return _UDP_MESSAGE_OF_REASON.get(reason, MSG_PARSE_HEADER_FAILED)


# TLVs shown at -v 2 on MSG_HEADER_PARSED: stable field names, each value cut to
# this many characters so that a sender cannot make a log line grow without bound.
TLV_FIELD_MAX = 256
TLV_ALPN = "tlvAlpn"
TLV_AUTHORITY = "tlvAuthority"
TLV_UNIQUE_ID = "tlvUniqueId"  # hex
TLV_NETNS = "tlvNetns"
TLV_SSL = "tlvSsl"  # true when the client used TLS to reach the sender
TLV_SSL_VERIFIED = "tlvSslVerified"  # a client certificate was presented and verified
TLV_SSL_VERSION = "tlvSslVersion"
TLV_SSL_CN = "tlvSslCn"
TLV_SSL_CIPHER = "tlvSslCipher"
TLV_SSL_SIG_ALG = "tlvSslSigAlg"
TLV_SSL_KEY_ALG = "tlvSslKeyAlg"
TLV_AWS_VPCE_ID = "tlvAwsVpceId"
TLV_AZURE_LINK_ID = "tlvAzureLinkId"
TLV_GCP_PSC_ID = "tlvGcpPscConnectionId"
_SSL_TEXT_FIELDS = (
    (tlv.PP2_SUBTYPE_SSL_VERSION, TLV_SSL_VERSION),
    (tlv.PP2_SUBTYPE_SSL_CN, TLV_SSL_CN),
    (tlv.PP2_SUBTYPE_SSL_CIPHER, TLV_SSL_CIPHER),
    (tlv.PP2_SUBTYPE_SSL_SIG_ALG, TLV_SSL_SIG_ALG),
    (tlv.PP2_SUBTYPE_SSL_KEY_ALG, TLV_SSL_KEY_ALG),
)


def _bounded(text: str) -> str:
    if len(text) <= TLV_FIELD_MAX:
        return text
    return text[: TLV_FIELD_MAX - 3] + "..."


def tlv_fields(tlvs: tuple[tlv.Tlv, ...]) -> dict[str, object]:
    """Log fields for the TLVs an operator looks for; the first of each type wins."""
    fields: dict[str, object] = {}
    for item in tlvs:
        if isinstance(item, tlv.Alpn):
            fields.setdefault(TLV_ALPN, _bounded(item.protocol.decode("ascii", "backslashreplace")))
        elif isinstance(item, tlv.Authority):
            fields.setdefault(TLV_AUTHORITY, _bounded(item.host))
        elif isinstance(item, tlv.UniqueId):
            fields.setdefault(TLV_UNIQUE_ID, _bounded(item.unique_id.hex()))
        elif isinstance(item, tlv.Netns):
            fields.setdefault(TLV_NETNS, _bounded(item.name))
        elif isinstance(item, tlv.Ssl) and TLV_SSL not in fields:
            fields[TLV_SSL] = item.client_used_tls
            fields[TLV_SSL_VERIFIED] = item.certificate_verified
            for subtype, name in _SSL_TEXT_FIELDS:
                text = item.text(subtype)
                if text is not None:
                    fields[name] = _bounded(text)
        elif isinstance(item, tlv.AwsVpceId):
            fields.setdefault(TLV_AWS_VPCE_ID, _bounded(item.vpce_id))
        elif isinstance(item, tlv.AzureLinkId):
            fields.setdefault(TLV_AZURE_LINK_ID, item.link_id)
        elif isinstance(item, tlv.GcpPscConnectionId):
            fields.setdefault(TLV_GCP_PSC_ID, item.connection_id)
    return fields


_CORE_KEYS = frozenset({"time", "level", "msg"})
# Attributes every LogRecord has; whatever else a record carries came from extra=.
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}


def local_address(sock: socket.socket) -> str:
    """The socket's own address as Go writes it (``localAddr``), or ``?`` when it has none."""
    try:
        host, port = sock.getsockname()[:2]
    except OSError:
        return "?"
    return host_port(host, int(port))


def _timestamp(created: float) -> str:
    return datetime.fromtimestamp(created, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _level(levelno: int) -> str:
    """slog's level name for a Python level number (levels in between round down)."""
    if levelno >= logging.ERROR:
        return "ERROR"
    if levelno >= logging.WARNING:
        return "WARN"
    if levelno >= logging.INFO:
        return "INFO"
    return "DEBUG"


def _extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The record's ``extra`` fields, in the order given, with both listen-address spellings."""
    fields: dict[str, Any] = {}
    for key, value in vars(record).items():
        if key in _RECORD_ATTRS or key.startswith("_"):
            continue
        # Never let an extra field replace time, level or msg.
        fields[f"extra.{key}" if key in _CORE_KEYS else key] = value
    if LISTEN_ADR in fields:
        fields.setdefault(LISTEN_ADDR, fields[LISTEN_ADR])
    elif LISTEN_ADDR in fields:
        fields[LISTEN_ADR] = fields[LISTEN_ADDR]
    return fields


class _JsonLineFormatter(JsonFormatter):
    """python-json-logger's formatter with go-mmproxy's keys and key order."""

    def add_fields(
        self,
        log_data: dict[str, Any],
        record: logging.LogRecord,
        message_dict: dict[str, Any],
    ) -> None:
        log_data["time"] = _timestamp(record.created)
        log_data["level"] = _level(record.levelno)
        log_data["msg"] = record.message  # set by JsonFormatter.format
        log_data.update(_extra_fields(record))
        log_data.update(message_dict)  # exc_info / stack_info, when present


class _TextFormatter(logging.Formatter):
    """``time LEVEL msg key=value ...`` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        parts = [
            _timestamp(record.created),
            _level(record.levelno),
            message if message.isprintable() else json.dumps(message),
        ]
        fields = _extra_fields(record)
        if record.exc_info:
            fields["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            fields["stack_info"] = self.formatStack(record.stack_info)
        parts.extend(f"{key}={_text_value(value)}" for key, value in fields.items())
        return " ".join(parts)


def _text_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, list | tuple | dict):
        text = json.dumps(value, default=str, separators=(",", ":"))
    else:
        text = str(value)
    if text and text.isprintable() and not any(c in text for c in ' "='):
        return text
    return json.dumps(text)


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """Marks the handler :func:`configure` installs, so a second call replaces it."""


def configure(log_format: str, verbose: int, stream: TextIO | None = None) -> logging.Logger:
    """Set up and return the ``mmproxy`` logger: one line per record to ``stream``.

    ``stream`` defaults to ``sys.stdout`` as it is at call time.  The logger
    does not propagate to the root logger.  Calling again replaces the
    handler this function installed, so handlers never pile up.
    """
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log_format must be json or text, not {log_format!r}")
    logger = logging.getLogger(LOGGER_NAME)
    for old in [h for h in logger.handlers if isinstance(h, _Handler)]:
        logger.removeHandler(old)
        old.close()
    handler = _Handler(sys.stdout if stream is None else stream)
    handler.setFormatter(
        # Compact separators, as Go's slog writes them.
        _JsonLineFormatter(json_serializer=functools.partial(json.dumps, separators=(",", ":")))
        if log_format == "json"
        else _TextFormatter()
    )
    handler.setLevel(logging.DEBUG if verbose >= 1 else logging.INFO)
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    return logger


class ConnectionLog:
    """Per-connection records, gated by verbosity and logged at DEBUG.

    ``failure`` appears from ``-v 1`` on, ``state`` from ``-v 2`` on.  Both
    check the verbosity before building anything; the caller's keyword
    arguments are evaluated before the call, though, so guard a costly field
    with :attr:`failures` or :attr:`states`.  Field names must not be
    LogRecord attributes (``name``, ``args``, ``module``...): logging refuses
    those.
    """

    __slots__ = ("_fields", "_logger", "_verbose")

    def __init__(
        self, logger: logging.Logger, verbose: int, fields: Mapping[str, object] | None = None
    ) -> None:
        self._logger = logger
        self._verbose = verbose
        self._fields: dict[str, object] = dict(fields) if fields else {}

    @property
    def failures(self) -> bool:
        """True when :meth:`failure` records are emitted (``-v 1`` and up)."""
        return self._verbose >= 1

    @property
    def states(self) -> bool:
        """True when :meth:`state` records are emitted (``-v 2``)."""
        return self._verbose >= 2

    def bind(self, **fields: object) -> ConnectionLog:
        """A ConnectionLog whose records carry ``fields`` too (this one is unchanged).

        At ``-v 0`` nothing is ever logged, so this returns ``self`` without copying.
        """
        if self._verbose < 1:
            return self  # nothing will ever be logged: skip the copy on the hot path
        return ConnectionLog(self._logger, self._verbose, {**self._fields, **fields})

    def failure(self, msg: str, error: BaseException | str | None = None, **fields: object) -> None:
        """Log that the connection is being dropped (``-v 1`` and up).

        Adds ``dropConnection: true``, ``error`` as a string, and ``reason``
        when ``error`` is a HeaderError.
        """
        self._dropped(DROP_CONNECTION, msg, error, fields)

    def drop(self, msg: str, error: BaseException | str | None = None, **fields: object) -> None:
        """Log that a datagram is being dropped (``-v 1`` and up): UDP's :meth:`failure`.

        The same fields, with ``dropDatagram: true`` in place of ``dropConnection``.
        """
        self._dropped(DROP_DATAGRAM, msg, error, fields)

    def _dropped(
        self, flag: str, msg: str, error: BaseException | str | None, fields: Mapping[str, object]
    ) -> None:
        if self._verbose < 1:
            return
        extra: dict[str, object] = {**self._fields, **fields, flag: True}
        if error is not None:
            extra[ERROR] = str(error)
            if isinstance(error, HeaderError):
                extra.setdefault(REASON, error.reason.value)
        self._logger.debug(msg, extra=extra)

    def notice(self, msg: str, **fields: object) -> None:
        """Log something unusual that does not drop the connection (``-v 1`` and up)."""
        if self._verbose < 1:
            return
        self._logger.debug(msg, extra={**self._fields, **fields})

    def state(self, msg: str, **fields: object) -> None:
        """Log a per-connection state change (``-v 2`` only)."""
        if self._verbose < 2:
            return
        self._logger.debug(msg, extra={**self._fields, **fields})
