"""The PROXY header as values: what a parsed header says, and the protocol's fixed sizes.

Section numbers (§) refer to HAProxy's doc/proxy-protocol.txt.  Parsing and
encoding live in :mod:`mmproxy.protocol` (v1 in :mod:`mmproxy.protocol_v1`,
v2 in :mod:`mmproxy.protocol_v2`).
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass, field
from typing import TypeVar

from mmproxy.tlv import Tlv

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

V1_PREFIX = b"PROXY"
V1_MAX_LENGTH = 107  # §2.1: the longest line, CRLF included
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"  # §2.2, 12 bytes with a NUL inside
V2_FIXED_LENGTH = 16  # signature, ver_cmd, fam, len
V2_MAX_LENGTH = V2_FIXED_LENGTH + 0xFFFF
UNIX_PATH_LENGTH = 108  # §2.2: each AF_UNIX address is 108 bytes, NUL padded

_T = TypeVar("_T")


class Command(enum.IntEnum):
    """v2 command (low nibble of byte 13).  v1 headers are always PROXY."""

    LOCAL = 0x0  # the proxy's own connection (health check): use the real endpoints
    PROXY = 0x1  # relayed on behalf of a client: the header carries its address


class Family(enum.IntEnum):
    """Address family (high nibble of byte 14; v1 TCP4/TCP6/UNKNOWN map here)."""

    UNSPEC = 0x0
    INET = 0x1
    INET6 = 0x2
    UNIX = 0x3


class Transport(enum.IntEnum):
    """Transport protocol (low nibble of byte 14; v1 is always STREAM)."""

    UNSPEC = 0x0
    STREAM = 0x1
    DGRAM = 0x2


def host_port(host: object, port: int) -> str:
    """``host:port`` as go-mmproxy (Go's net.JoinHostPort) writes it: an IPv6 host in brackets.

    The one formatter of an address in mmproxy's logs, messages and flags.
    """
    text = str(host)
    return f"[{text}]:{port}" if ":" in text else f"{text}:{port}"


@dataclass(frozen=True, slots=True)
class InetAddress:
    """An IP address and port: from a header, or (as :class:`mmproxy.config.Endpoint`) a flag."""

    host: IPAddress
    port: int

    @classmethod
    def of(cls, host: str, port: int) -> InetAddress:
        return cls(ipaddress.ip_address(host), port)

    def __str__(self) -> str:
        return host_port(self.host, self.port)


@dataclass(frozen=True, slots=True)
class UnixAddress:
    """A unix socket path from a v2 AF_UNIX header (NUL padding removed)."""

    path: bytes

    def __str__(self) -> str:
        return "unix:" + self.path.decode("utf-8", "backslashreplace")


Address = InetAddress | UnixAddress


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A decoded PROXY header.

    ``source``/``destination`` are set only when the header carries addresses
    a receiver may use: PROXY with INET, INET6 (v1 TCP4/TCP6) or UNIX.  They
    are ``None`` for LOCAL (whose address block must be ignored, §2.2), for
    UNSPEC and for v1 UNKNOWN.
    """

    version: int
    command: Command
    family: Family
    transport: Transport
    source: Address | None = None
    destination: Address | None = None
    tlvs: tuple[Tlv, ...] = field(default=())

    @classmethod
    def proxy(
        cls,
        source: InetAddress,
        destination: InetAddress,
        *,
        version: int = 2,
        transport: Transport = Transport.STREAM,
        tlvs: tuple[Tlv, ...] = (),
    ) -> ProxyHeader:
        """A PROXY header for a client at ``source`` that reached ``destination``."""
        if source.host.version != destination.host.version:
            raise ValueError("source and destination must be of one address family")
        family = Family.INET if source.host.version == 4 else Family.INET6
        return cls(version, Command.PROXY, family, transport, source, destination, tlvs)

    @classmethod
    def local(cls, *, version: int = 2, tlvs: tuple[Tlv, ...] = ()) -> ProxyHeader:
        """A LOCAL header (v2), or ``PROXY UNKNOWN`` when ``version`` is 1."""
        if version == 1:
            if tlvs:
                raise ValueError("v1 has no TLVs")
            return cls(1, Command.PROXY, Family.UNSPEC, Transport.UNSPEC)
        return cls(2, Command.LOCAL, Family.UNSPEC, Transport.UNSPEC, tlvs=tlvs)

    @property
    def client(self) -> InetAddress | None:
        """The client address to impersonate, or ``None`` to use the real peer.

        ``None`` for LOCAL, UNSPEC, v1 UNKNOWN and AF_UNIX (a TCP/UDP relay
        cannot bind a unix path, so it falls back to the real endpoints, §2.2).
        """
        return self.source if isinstance(self.source, InetAddress) else None

    def find(self, tlv_type: type[_T]) -> _T | None:
        """The first TLV of class ``tlv_type`` (e.g. ``find(Authority)``), or ``None``."""
        return next((t for t in self.tlvs if isinstance(t, tlv_type)), None)


@dataclass(frozen=True, slots=True)
class NeedMore:
    """Not a header yet, nor wrong yet: at least ``at_least`` more bytes are needed."""

    at_least: int


@dataclass(frozen=True, slots=True)
class Parsed:
    """A complete header; ``consumed`` bytes belong to it, the rest is payload."""

    header: ProxyHeader
    consumed: int
