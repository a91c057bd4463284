"""PROXY protocol version 1: the human-readable line (§2.1).

``PROXY TCP4|TCP6 <source> <destination> <sport> <dport>\\r\\n`` or
``PROXY UNKNOWN ...\\r\\n``, at most 107 bytes.  The grammar is strict (digits by
pattern, no leading zeros, single spaces), and an incomplete line is judged as far
as it goes, so a header is refused for the same reason however it was split.
"""

from __future__ import annotations

import ipaddress
import re

from mmproxy.errors import HeaderError, Reason
from mmproxy.header import (
    V1_MAX_LENGTH,
    V1_PREFIX,
    Command,
    Family,
    InetAddress,
    IPAddress,
    NeedMore,
    Parsed,
    ProxyHeader,
    Transport,
)

# §2.1: decimal octets without leading zeros; ports 0-65535 in plain decimal.
# (int() alone would take "+80", "080", " 80" and "8_0".)
_V1_IPV4 = re.compile(rb"(?:0|[1-9][0-9]{0,2})(?:\.(?:0|[1-9][0-9]{0,2})){3}")
_V1_IPV6 = re.compile(rb"[0-9A-Fa-f:.]{2,45}")  # ipaddress checks the rest; no "%scope"
_V1_PORT = re.compile(rb"0|[1-9][0-9]{0,4}")
_V1_TCP4_LINE = re.compile(
    rb"PROXY TCP4 (%s) (%s) (%s) (%s)"
    % (_V1_IPV4.pattern, _V1_IPV4.pattern, _V1_PORT.pattern, _V1_PORT.pattern)
)
# What an incomplete field may look like while it is still arriving.
_V1_IPV4_SO_FAR = re.compile(rb"[0-9.]{0,15}")
_V1_IPV6_SO_FAR = re.compile(rb"[0-9A-Fa-f:.]{0,45}")
_V1_PORT_SO_FAR = re.compile(rb"|0|[1-9][0-9]{0,4}")
_V1_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")
_V1_TOKENS = (b"TCP4", b"TCP6", b"UNKNOWN")
_V1_FIELD_NAMES = ("source", "destination", "source port", "destination port")


def parse_v1(data: bytes) -> NeedMore | Parsed:
    """``data`` holds at most the first 107 bytes received."""
    prefix_length = min(len(data), len(V1_PREFIX))
    if data[:prefix_length] != V1_PREFIX[:prefix_length]:
        raise HeaderError(Reason.NOT_PROXY_PROTOCOL, "starts with 'P' but not with 'PROXY'")
    end = data.find(b"\r\n")
    if end >= 0:
        return Parsed(_parse_v1_line(data[:end]), end + 2)
    # Not complete: refuse now if no continuation can make it valid, so the
    # sender hears about it at once (§2.1 asks receivers to abort "soon").
    # A final CR is judged with the byte after it (LF ends the line, anything
    # else puts a control byte in a field), so that a header is refused for
    # the same reason however it was split.  Checked before the length, so the
    # reason is the one a reader fed byte by byte would have met first.
    _check_v1(data.removesuffix(b"\r"), complete=False)
    if len(data) >= V1_MAX_LENGTH:
        raise HeaderError(Reason.V1_TOO_LONG, f"no CRLF within the first {V1_MAX_LENGTH} bytes")
    return NeedMore(1)


def _parse_v1_line(line: bytes) -> ProxyHeader:
    """Parse one complete line, CRLF excluded."""
    fast = _tcp4_line(line)
    if fast is not None:
        return fast
    family = _check_v1(line, complete=True)
    if family is Family.UNSPEC:
        return ProxyHeader(1, Command.PROXY, Family.UNSPEC, Transport.UNSPEC)
    _, _, src, dst, sport, dport = line.split(b" ")
    return ProxyHeader(
        1,
        Command.PROXY,
        family,
        Transport.STREAM,
        InetAddress(_v1_address(src, family), int(sport)),
        InetAddress(_v1_address(dst, family), int(dport)),
    )


def _tcp4_line(line: bytes) -> ProxyHeader | None:
    """The common case, a well-formed TCP4 line, in one match; None for anything else,
    which :func:`_check_v1` then judges (and refuses with its reason, if it must)."""
    match = _V1_TCP4_LINE.fullmatch(line)
    if match is None:
        return None
    source, destination, source_port, destination_port = match.groups()
    sport, dport = int(source_port), int(destination_port)
    if sport > 0xFFFF or dport > 0xFFFF:
        return None
    try:  # the pattern leaves only octets above 255 to refuse: bytes() refuses them
        src = ipaddress.IPv4Address(bytes(map(int, source.split(b"."))))
        dst = ipaddress.IPv4Address(bytes(map(int, destination.split(b"."))))
    except ValueError:
        return None
    return ProxyHeader(
        1,
        Command.PROXY,
        Family.INET,
        Transport.STREAM,
        InetAddress(src, sport),
        InetAddress(dst, dport),
    )


def _check_v1(line: bytes, *, complete: bool) -> Family:
    """Validate a v1 line, or the part of one received so far.

    One function for both cases, so a header is refused with the same reason
    whether it arrives whole or byte by byte.  Fields are checked in order;
    the last one of an incomplete line only has to be a possible beginning.
    Returns the family (UNSPEC for UNKNOWN; meaningless when incomplete).
    """
    if len(line) > len(V1_PREFIX) and line[len(V1_PREFIX)] != 0x20:
        raise HeaderError(Reason.V1_BAD_SYNTAX, "'PROXY' is not followed by a single space")
    if complete and len(line) <= len(V1_PREFIX) + 1:
        raise HeaderError(Reason.V1_BAD_SYNTAX, "no protocol after 'PROXY'")
    token, space, rest = line[len(V1_PREFIX) + 1 :].partition(b" ")
    if space and not token:
        raise HeaderError(Reason.V1_BAD_SYNTAX, "two spaces after 'PROXY'")
    if token == b"UNKNOWN" and (space or complete):
        return Family.UNSPEC  # §2.1: anything up to the CRLF is ignored
    if not (space or complete):
        if not any(t.startswith(token) for t in _V1_TOKENS):
            raise HeaderError(Reason.V1_BAD_PROTOCOL, f"unknown protocol {_show(token)}")
        return Family.UNSPEC
    # Comparisons, not a dict lookup: on free-threaded CPython a lookup with bytes keys
    # locks the dict, and every connection's thread parses here.
    if token == b"TCP4":
        family = Family.INET
    elif token == b"TCP6":
        family = Family.INET6
    else:
        raise HeaderError(Reason.V1_BAD_PROTOCOL, f"unknown protocol {_show(token)}")
    fields = rest.split(b" ") if space else []
    last = len(fields) if complete else len(fields) - 1  # fields[last] is still arriving
    for index, value in enumerate(fields[: min(last, 4)]):
        _check_v1_field(index, value, family)
    if len(fields) > 4 or (complete and len(fields) < 4):
        raise HeaderError(
            Reason.V1_BAD_SYNTAX,
            f"{token.decode()} needs 4 fields separated by single spaces: {_show(line)}",
        )
    if last < len(fields):
        _check_v1_field(last, fields[last], family, so_far=True)
    return family


def _check_v1_field(index: int, value: bytes, family: Family, *, so_far: bool = False) -> None:
    """Check field ``index`` (0 source, 1 destination, 2-3 ports) of a TCP4/TCP6 line."""
    which = _V1_FIELD_NAMES[index] if index < len(_V1_FIELD_NAMES) else "field"
    if not so_far and not value:
        raise HeaderError(Reason.V1_BAD_SYNTAX, f"empty {which} (two spaces in a row)")
    control = _V1_CONTROL.search(value)
    if control:
        # A tab, NUL, bare CR or bare LF is a framing mistake, not a bad value;
        # but what came before it in the field is judged first, as it was
        # when those bytes arrived on their own.
        _check_v1_field(index, value[: control.start()], family, so_far=True)
        raise HeaderError(
            Reason.V1_BAD_SYNTAX,
            f"control byte 0x{control.group()[0]:02x} in {which}: fields are separated by"
            " single spaces and the line ends with CRLF",
        )
    if index >= 2:
        pattern = _V1_PORT_SO_FAR if so_far else _V1_PORT
        if not pattern.fullmatch(value) or int(value or 0) > 0xFFFF:
            raise HeaderError(Reason.V1_BAD_PORT, f"{which} {_show(value)} is not 0-65535")
    elif so_far:
        pattern = _V1_IPV4_SO_FAR if family is Family.INET else _V1_IPV6_SO_FAR
        if not pattern.fullmatch(value):
            kind = "IPv4" if family is Family.INET else "IPv6"
            raise HeaderError(
                Reason.V1_BAD_ADDRESS, f"{which} {_show(value)} is not an {kind} address"
            )
    else:
        _v1_address(value, family, which)


def _v1_address(text: bytes, family: Family, which: str = "address") -> IPAddress:
    pattern = _V1_IPV4 if family is Family.INET else _V1_IPV6
    kind = "IPv4" if family is Family.INET else "IPv6"
    if pattern.fullmatch(text):
        try:
            if family is Family.INET:
                return ipaddress.IPv4Address(text.decode("ascii"))
            return ipaddress.IPv6Address(text.decode("ascii"))
        except ValueError:
            pass
    raise HeaderError(Reason.V1_BAD_ADDRESS, f"{which} {_show(text)} is not an {kind} address")


def _show(raw: bytes) -> str:
    """Quote peer bytes for a log line: bounded and printable."""
    shown = repr(raw[:48])[1:]
    return shown + ("..." if len(raw) > 48 else "")


def encode_v1(header: ProxyHeader) -> bytes:
    if header.tlvs or header.command is not Command.PROXY:
        raise ValueError("v1 has no TLVs and no LOCAL command")
    if header.family is Family.UNSPEC:
        return b"PROXY UNKNOWN\r\n"
    src, dst = header.source, header.destination
    if (
        header.transport is not Transport.STREAM
        or not isinstance(src, InetAddress)
        or not isinstance(dst, InetAddress)
    ):
        raise ValueError("v1 only expresses TCP over IPv4 or IPv6")
    token = "TCP4" if header.family is Family.INET else "TCP6"
    source, destination = _v1_text(src.host), _v1_text(dst.host)
    return f"PROXY {token} {source} {destination} {src.port} {dst.port}\r\n".encode("ascii")


def _v1_text(host: IPAddress) -> str:
    """The address as v1 writes it: RFC 5952, IPv4-mapped in mixed notation (``::ffff:192.0.2.1``).

    ``str()`` alone writes mapped addresses in hex before Python 3.13 and mixed from 3.13 on;
    the wire must not depend on the interpreter.
    """
    if isinstance(host, ipaddress.IPv6Address) and host.ipv4_mapped is not None:
        return f"::ffff:{host.ipv4_mapped}"
    return str(host)
