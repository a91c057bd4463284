"""The daemon's configuration: one frozen :class:`Config`, built and checked once.

:func:`build_config` takes the values the command line (or environment) gave,
already converted to Python types, and checks every one of them; anything
wrong is a :class:`FlagError` (a :class:`~mmproxy.errors.ConfigError`) whose
one-line message starts with the flag's name.  Nothing here knows about click.
"""

from __future__ import annotations

import ipaddress
import math
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from mmproxy.acl import AllowList
from mmproxy.errors import ConfigError
from mmproxy.header import InetAddress, IPAddress

Protocol = Literal["tcp", "udp"]
LogFormat = Literal["json", "text"]
UdpHeader = Literal["every", "first"]
Relay = Literal["splice", "sockmap", "auto"]

PROTOCOLS: tuple[Protocol, ...] = ("tcp", "udp")
LOG_FORMATS: tuple[LogFormat, ...] = ("json", "text")
UDP_HEADER_MODES: tuple[UdpHeader, ...] = ("every", "first")
RELAYS: tuple[Relay, ...] = ("splice", "sockmap", "auto")
MAX_LISTENERS = 1024
MAX_MARK = 2**32 - 1  # SO_MARK is a u32
MAX_VERBOSE = 2
MAX_CLOSE_AFTER = 2**31 - 1  # seconds; keeps timer arithmetic far from float overflow
MAX_HEADER_TIMEOUT = 3600.0
MAX_CONNECT_TIMEOUT = 3600.0
MAX_DRAIN_TIMEOUT = 86400.0
MAX_UDP_FLOWS = 1 << 20  # one descriptor and one thread each
MAX_IDLE_TIMEOUT = 7 * 86400.0
MAX_CONNECTIONS = 1 << 24  # two descriptors and up to two threads each

# A DNS name as RFC 1123 allows it: dot-separated labels of letters, digits and
# inner hyphens.  Anything else is neither an address nor a name.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")
_PORT = re.compile(r"[0-9]{1,5}")

_Fail = Callable[[str], "FlagError"]  # turns a reason into the error to raise


class FlagError(ConfigError):
    """A ConfigError about one flag; ``str()`` is ``"{flag}: {reason}"``."""

    def __init__(self, flag: str, reason: str) -> None:
        super().__init__(f"{flag}: {reason}")
        self.flag = flag
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Endpoint(InetAddress):
    """An address to listen on or connect to: the one address type, with what sockets need.

    ``family`` and ``sockaddr`` are worked out once, when it is made: a target's are used
    for every upstream connection.
    """

    # ``socket.AF_INET`` or ``socket.AF_INET6``.
    family: socket.AddressFamily = field(init=False, repr=False, compare=False)
    # The address tuple ``bind`` and ``connect`` take for ``family``.
    sockaddr: tuple[str, int] | tuple[str, int, int, int] = field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        v4 = self.host.version == 4
        object.__setattr__(self, "family", socket.AF_INET if v4 else socket.AF_INET6)
        object.__setattr__(self, "sockaddr", sockaddr(self.host, self.port))


def sockaddr(host: IPAddress, port: int) -> tuple[str, int] | tuple[str, int, int, int]:
    """The address tuple ``bind`` and ``connect`` take for ``host`` and ``port`` (an IPv4
    address formatted by ``inet_ntoa``, a third of ``str()``'s cost: upstream binds to the
    client's address for every connection)."""
    if host.version == 4:
        return (socket.inet_ntoa(host.packed), port)
    return (str(host), port, 0, 0)


def parse_endpoint(
    text: str, *, flag: str, family: int | None = None, allow_port_zero: bool = False
) -> Endpoint:
    """Parse ``host:port`` the way go-mmproxy's flags take it.

    ``host`` is an IPv4 address, an IPv6 address in brackets, a hostname
    (resolved once, here, with getaddrinfo; the first address of ``family``
    wins), or empty: ``:port`` means every address, ``[::]`` (dual stack, as
    Go's ``:port``), or ``0.0.0.0`` when ``family`` is AF_INET.  ``port`` is
    decimal 1-65535, or 0 too with ``allow_port_zero``.  With ``family`` set,
    an address of the other family is refused (go-mmproxy refuses an IPv6
    ``-4`` and an IPv4 or IPv4-mapped ``-6``).  Zone ids (``%eth0``) are not
    supported.  Errors are :class:`FlagError` naming ``flag``.
    """
    if family == socket.AF_INET:
        wanted = "IPv4 "
    elif family == socket.AF_INET6:
        wanted = "IPv6 "
    elif family is None:
        wanted = ""
    else:
        raise ValueError(f"family must be AF_INET, AF_INET6 or None, not {family!r}")

    def fail(reason: str) -> FlagError:
        return FlagError(flag, f'"{text}" {reason}')

    host_text, port_text = _split_host_port(text, fail, wanted)
    if not _PORT.fullmatch(port_text):
        raise fail(f'has an invalid port "{port_text}" (expected a decimal number)')
    port = int(port_text)
    low = 0 if allow_port_zero else 1
    if not low <= port <= 65535:
        raise fail(f"has port {port}, outside {low}-65535")

    host: IPAddress
    if not host_text:
        host = ipaddress.IPv4Address(0) if family == socket.AF_INET else ipaddress.IPv6Address(0)
    else:
        try:
            host = ipaddress.ip_address(host_text)
        except ValueError:
            host = _resolve(host_text, port, family, fail, wanted)
    if family == socket.AF_INET and host.version != 4:
        raise fail("is not an IPv4 address:port")
    if family == socket.AF_INET6 and (host.version != 6 or host.ipv4_mapped is not None):
        raise fail("is not an IPv6 address:port")
    return Endpoint(host, port)


def _split_host_port(text: str, fail: _Fail, wanted: str) -> tuple[str, str]:
    """Split Go-style ``host:port`` / ``[v6]:port`` text without judging either part."""
    if text.startswith("["):
        inside, bracket, rest = text[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            raise fail(f"is not an {wanted}address:port (expected [IPv6]:port)")
        if "%" in inside:
            raise fail("has a zone id; zone ids are not supported")
        try:
            ipaddress.IPv6Address(inside)
        except ValueError:
            raise fail(f'has "{inside}" in brackets, which is not an IPv6 address') from None
        return inside, rest[1:]
    host, colon, port = text.rpartition(":")
    if not colon:
        raise fail("has no port (expected host:port)")
    if ":" in host:
        raise fail("is not host:port; an IPv6 address needs brackets, e.g. [::1]:443")
    return host, port


def _resolve(host: str, port: int, family: int | None, fail: _Fail, wanted: str) -> IPAddress:
    """Resolve a hostname once, at start-up, to its first address of ``family``."""
    if not _HOSTNAME.fullmatch(host) or host.rstrip(".").rsplit(".", 1)[-1].isdigit():
        # Not a name; an all-numeric last label means a malformed address
        # ("1.2.3", "01.2.3.4"), which getaddrinfo would quietly accept.
        raise fail(f'has "{host}", which is neither an IP address nor a hostname')
    if _is_legacy_ipv4(host):
        raise fail(f'has "{host}", which is not a valid IPv4 address')
    try:
        infos = socket.getaddrinfo(host, port, family or socket.AF_UNSPEC, socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else error
        raise fail(f'cannot be resolved: "{host}": {reason}') from None
    for info_family, _type, _proto, _name, sockaddr in infos:
        if info_family in (socket.AF_INET, socket.AF_INET6):
            return ipaddress.ip_address(str(sockaddr[0]).partition("%")[0])
    raise fail(f'cannot be resolved: "{host}" has no {wanted}address')


def _is_legacy_ipv4(host: str) -> bool:
    """True for inet_aton's forms ("0x7f000001", "127.1") that getaddrinfo would accept."""
    try:
        socket.inet_aton(host)
    except OSError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class Config:
    """Everything the daemon needs, validated; build it with :func:`build_config`."""

    protocol: Protocol
    listen: Endpoint
    target4: Endpoint
    target6: Endpoint
    allow_list: AllowList
    listeners: int
    mark: int
    verbose: int
    close_after: int  # seconds an idle UDP flow is kept
    dynamic_destination: bool
    listen_transparent: bool
    header_timeout: float  # seconds to wait for a complete PROXY header
    log_format: LogFormat
    connect_timeout: float = 5.0  # seconds to connect to the backend
    drain_timeout: float = 30.0  # seconds live connections get after SIGTERM/SIGINT
    udp_header: UdpHeader = "every"  # which datagrams carry a PROXY header (-p udp)
    max_udp_flows: int = 0  # 0: derived from the descriptor limit at start-up
    metrics: Endpoint | None = None  # where to serve Prometheus metrics; None: off
    routing_check: bool = True  # warn at start-up about missing policy routing
    idle_timeout: float = 0.0  # seconds with no data either way before closing; 0: off
    relay: Relay = "splice"  # how established TCP pairs are relayed (sockmap: in the kernel)
    # Where -dynamic-destination may connect; None: this host's own addresses only.
    allowed_destinations: AllowList | None = None
    max_connections: int = 0  # TCP connections at once; 0: derived from the descriptor limit

    def summary(self) -> dict[str, object]:
        """A JSON-serialisable view, for the start-up log and ``--check-config``.

        Keys are camelCase like go-mmproxy's log fields; endpoints are Go-style
        strings; ``allowedSubnets`` and ``allowedSubnetsCount`` (CIDRs after
        merging) are None when every peer is allowed.
        """
        everyone = self.allow_list.allows_everyone
        return {
            "protocol": self.protocol,
            "listen": str(self.listen),
            "target4": str(self.target4),
            "target6": str(self.target6),
            "allowedSubnets": self.allow_list.path,
            "allowedSubnetsCount": None if everyone else self.allow_list.count,
            "listeners": self.listeners,
            "mark": self.mark,
            "verbose": self.verbose,
            "closeAfter": self.close_after,
            "dynamicDestination": self.dynamic_destination,
            "listenTransparent": self.listen_transparent,
            "headerTimeout": self.header_timeout,
            "logFormat": self.log_format,
            "connectTimeout": self.connect_timeout,
            "drainTimeout": self.drain_timeout,
            "udpHeader": self.udp_header,
            "maxUdpFlows": self.max_udp_flows,
            "metrics": None if self.metrics is None else str(self.metrics),
            "routingCheck": self.routing_check,
            "idleTimeout": self.idle_timeout,
            "relay": self.relay,
            "allowedDestinations": (
                None if self.allowed_destinations is None else self.allowed_destinations.path
            ),
            "maxConnections": self.max_connections,
        }


def build_config(
    *,
    protocol: str,
    listen: str,
    target4: str,
    target6: str,
    allowed_subnets: str | None,
    listeners: int,
    mark: int,
    verbose: int,
    close_after: int,
    dynamic_destination: bool,
    listen_transparent: bool,
    header_timeout: float,
    log_format: str,
    connect_timeout: float = 5.0,
    drain_timeout: float = 30.0,
    udp_header: str = "every",
    max_udp_flows: int = 0,
    metrics: str | None = None,
    no_routing_check: bool = False,
    idle_timeout: float = 0.0,
    relay: str = "splice",
    allowed_destinations: str | None = None,
    max_connections: int = 0,
) -> Config:
    """Check every value and build the :class:`Config`.

    Raises :class:`FlagError` naming the flag (``-p``, ``-l``, ``-4``, ``-6``,
    ``-allowed-subnets``, ``-listeners``, ``-mark``, ``-v``, ``-close-after``,
    ``--header-timeout``, ``--log-format``, ``--connect-timeout``,
    ``--drain-timeout``, ``--udp-header``, ``--max-udp-flows``, ``--metrics``,
    ``--idle-timeout``, ``--relay``, ``-dynamic-destination``, ``--allowed-destinations``,
    ``--max-connections``).  Checks run in flag order, so the first bad flag is
    the one reported.  The allowed-subnets file is read here; an empty
    ``allowed_subnets`` (or None) allows every peer.
    """
    if protocol not in PROTOCOLS:
        raise FlagError("-p", f'"{protocol}" is not a protocol; use tcp or udp')
    listen_ep = parse_endpoint(listen, flag="-l", allow_port_zero=True)
    target4_ep = parse_endpoint(target4, flag="-4", family=socket.AF_INET)
    target6_ep = parse_endpoint(target6, flag="-6", family=socket.AF_INET6)
    if allowed_subnets:
        try:
            allow_list = AllowList.from_file(allowed_subnets)
        except ConfigError as error:
            raise FlagError("-allowed-subnets", str(error)) from error
    else:
        allow_list = AllowList.everyone()
    _check_range("-listeners", listeners, 1, MAX_LISTENERS)
    _check_range("-mark", mark, 0, MAX_MARK)
    _check_range("-v", verbose, 0, MAX_VERBOSE)
    _check_range("-close-after", close_after, 0, MAX_CLOSE_AFTER)
    _check_seconds("--header-timeout", header_timeout, MAX_HEADER_TIMEOUT)
    if log_format not in LOG_FORMATS:
        raise FlagError("--log-format", f'"{log_format}" is not a log format; use json or text')
    _check_seconds("--connect-timeout", connect_timeout, MAX_CONNECT_TIMEOUT)
    _check_seconds("--drain-timeout", drain_timeout, MAX_DRAIN_TIMEOUT, zero_ok=True)
    if udp_header not in UDP_HEADER_MODES:
        raise FlagError("--udp-header", f'"{udp_header}" is not a header mode; use every or first')
    _check_range("--max-udp-flows", max_udp_flows, 0, MAX_UDP_FLOWS)
    metrics_ep = None
    if metrics:
        metrics_ep = parse_endpoint(metrics, flag="--metrics", allow_port_zero=True)
    _check_seconds("--idle-timeout", idle_timeout, MAX_IDLE_TIMEOUT, zero_ok=True)
    if relay not in RELAYS:
        raise FlagError("--relay", f'"{relay}" is not a relay; use splice, sockmap or auto')
    destinations = _destinations(dynamic_destination, allow_list, allowed_destinations)
    _check_range("--max-connections", max_connections, 0, MAX_CONNECTIONS)
    return Config(
        protocol=protocol,
        listen=listen_ep,
        target4=target4_ep,
        target6=target6_ep,
        allow_list=allow_list,
        listeners=listeners,
        mark=mark,
        verbose=verbose,
        close_after=close_after,
        dynamic_destination=dynamic_destination,
        listen_transparent=listen_transparent,
        header_timeout=float(header_timeout),
        log_format=log_format,
        connect_timeout=float(connect_timeout),
        drain_timeout=float(drain_timeout),
        udp_header=udp_header,
        max_udp_flows=max_udp_flows,
        metrics=metrics_ep,
        routing_check=not no_routing_check,
        idle_timeout=float(idle_timeout),
        relay=relay,
        allowed_destinations=destinations,
        max_connections=max_connections,
    )


def _destinations(dynamic: bool, allow_list: AllowList, path: str | None) -> AllowList | None:
    """The ``--allowed-destinations`` list; refuses ``-dynamic-destination`` open to everyone."""
    if dynamic and allow_list.allows_everyone:
        raise FlagError(
            "-dynamic-destination",
            "needs -allowed-subnets: without it anyone who reaches the port "
            "chooses where mmproxy connects",
        )
    if path is None:
        return None
    if not dynamic:
        raise FlagError("--allowed-destinations", "only applies with -dynamic-destination")
    try:
        return AllowList.from_file(path)
    except ConfigError as error:
        raise FlagError("--allowed-destinations", str(error)) from error


def _check_seconds(flag: str, value: float, high: float, *, zero_ok: bool = False) -> None:
    low_ok = value >= 0 if zero_ok else value > 0
    if not (math.isfinite(value) and low_ok and value <= high):
        floor = "0 or more" if zero_ok else "above 0"
        raise FlagError(flag, f"{value:g} is out of range; use seconds {floor}, at most {high:g}")


def _check_range(flag: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise FlagError(flag, f"{value} is out of range {low}-{high}")
