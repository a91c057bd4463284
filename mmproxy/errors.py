"""The error types mmproxy raises on purpose.

Two kinds of failure matter to an operator and they never mix:

* :class:`ConfigError` - a bad flag, environment variable or configuration
  file.  It stops start-up with one line and exit code 2.
* :class:`HeaderError` - a peer sent bytes that are not a valid PROXY header.
  It closes that one connection (or drops that one datagram) and is logged
  with its :class:`Reason`; the daemon keeps serving everyone else.

Any other exception escaping the parser is a bug in mmproxy, and the
property tests state exactly that.
"""

from __future__ import annotations

import enum


class MmproxyError(Exception):
    """Base class of every error mmproxy raises deliberately."""


class ConfigError(MmproxyError):
    """Invalid configuration; ``str(error)`` is the whole one-line message."""


class Reason(enum.StrEnum):
    """Why a PROXY header was rejected: a short, stable, machine-readable code.

    The values are part of the log format (the ``reason`` field) and, later,
    of metric labels, so they are few and they do not change.
    """

    NOT_PROXY_PROTOCOL = "not_proxy_protocol"  # neither signature at byte 0
    INCOMPLETE = "incomplete"  # the peer closed (or timed out) mid-header
    V1_TOO_LONG = "v1_too_long"  # no CRLF within the first 107 bytes
    V1_BAD_SYNTAX = "v1_bad_syntax"  # spacing, token count, stray bytes, bare CR/LF
    V1_BAD_PROTOCOL = "v1_bad_protocol"  # not TCP4, TCP6 or UNKNOWN
    V1_BAD_ADDRESS = "v1_bad_address"  # not an address of the announced family
    V1_BAD_PORT = "v1_bad_port"  # not 0-65535 in plain decimal
    V2_BAD_VERSION = "v2_bad_version"  # version nibble other than 2
    V2_BAD_COMMAND = "v2_bad_command"  # command other than LOCAL or PROXY
    V2_BAD_FAMILY = "v2_bad_family"  # undefined family or transport nibble
    V2_SHORT_ADDRESS = "v2_short_address"  # length smaller than the address block
    V2_BAD_TLV = "v2_bad_tlv"  # a TLV overruns the header, or its value is invalid
    V2_BAD_CRC = "v2_bad_crc"  # the CRC32C TLV does not match the header


class HeaderError(MmproxyError):
    """The bytes received are not a valid PROXY header.

    ``reason`` classifies the failure; ``detail`` says exactly what was wrong,
    for the log line that accompanies the closed connection.
    """

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


class RefusedError(MmproxyError):
    """A connection (TCP) or datagram (UDP) is not relayed, for a reason other than its bytes.

    ``reason`` is the log code and metric label, ``message`` the fixed log
    message (``msg``) and ``detail`` the specifics (the ``error`` field).
    """

    def __init__(self, reason: str, message: str, detail: str = "") -> None:
        super().__init__(f"{message}: {detail}" if detail else message)
        self.reason = reason
        self.message = message
        self.detail = detail
