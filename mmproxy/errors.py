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

    The values are part of the log format (the ``reason`` field) and metric
    labels, so they are few and they do not change.
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


class Refusal(enum.StrEnum):
    """Why a connection or datagram is not relayed, for a reason other than its header's bytes.

    TCP and UDP share these codes; they are the ``reason`` log field and metric labels
    (operators' dashboards read them), so a value never changes once released.
    """

    NOT_ALLOWED = "not_allowed"  # the peer is not in the allowed subnets
    HEADER_TIMEOUT = "header_timeout"  # no complete header within --header-timeout
    READ_ERROR = "read_error"  # the peer reset the connection (or similar) mid-header
    WRONG_TRANSPORT = "wrong_transport"  # a header for the other transport (TCP on UDP...)
    WRONG_VERSION = "wrong_version"  # PROXY v1 on a UDP listener
    BAD_SOURCE = "bad_source"  # a source no real client can have (mmproxy.policy)
    BAD_DESTINATION = "bad_destination"  # a -dynamic-destination target the policy refuses
    UPSTREAM_FAILED = "upstream_failed"  # the upstream socket could not be opened or connected
    STOPPING = "stopping"  # the daemon began to stop before the relay did
    IDLE_TIMEOUT = "idle_timeout"  # a relayed connection moved nothing for --idle-timeout
    NO_FLOW = "no_flow"  # UDP: a datagram without a header, for no open flow
    FLOW_LIMIT = "flow_limit"  # UDP: --max-udp-flows flows are open already
    SEND_FAILED = "send_failed"  # UDP: the datagram could not be sent upstream
    REPLY_FAILED = "reply_failed"  # UDP: a reply could not be sent back to the balancer
    RECEIVE_BUFFER_FULL = "receive_buffer_full"  # UDP: the kernel dropped it, queue full


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

    def __init__(self, reason: Refusal, message: str, detail: str = "") -> None:
        super().__init__(f"{message}: {detail}" if detail else message)
        self.reason = reason
        self.message = message
        self.detail = detail
