"""The policy routing mmproxy needs, checked, added and removed over netlink (pyroute2).

mmproxy connects to the backend from the client's address, so the backend's
replies are addressed to a host that is not this one.  These rules and routes
bring them back to mmproxy's transparent socket on loopback (``T`` is the
table, 123 unless ``--table`` says otherwise; the fwmark rules only with
``-mark M``)::

    ip rule add from 127.0.0.1/8 iif lo table T
    ip route add local 0.0.0.0/0 dev lo table T
    ip -6 rule add from ::1/128 iif lo table T
    ip -6 route add local ::/0 dev lo table T
    ip rule add fwmark M lookup T
    ip -6 rule add fwmark M lookup T

Each is a :class:`Piece`; :class:`Netlink` tells whether one is present (a
rule or route with the same selectors, table and type; its priority and
protocol do not matter, so rules made by hand count), adds it, or deletes it.
What ``apply`` adds carries the netlink protocol attribute :data:`PROTOCOL`
(``FRA_PROTOCOL`` on rules, ``rtm_protocol`` on routes; ``ip`` shows it as
``proto 109``), and ``remove`` deletes only what carries it: a rule that an
operator or another proxy made stays, even when it is the same rule.
Nothing here parses ``ip``'s output.  The IPv6 pieces are left out on a host
without IPv6.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from mmproxy import upstream

DEFAULT_TABLE = 123
# Tables the kernel uses for itself: 0 (unspecified), 253 (default), 254 (main), 255 (local).
RESERVED_TABLES = frozenset({0, 253, 254, 255})
MAX_TABLE = 2**32 - 1

FR_ACT_TO_TBL = 1  # a rule's action: look the route up in its table
# The protocol mmproxy's rules and routes carry: 0-4 are the kernel's, and iproute2's
# rt_protos names 8-18, 42, 99 and 186-192 for routing daemons; 109 is none of them.
PROTOCOL = 109
RTN_LOCAL = 2  # a route's type: deliver locally
_LOOPBACK = {
    socket.AF_INET: ipaddress.ip_network("127.0.0.0/8"),
    socket.AF_INET6: ipaddress.ip_network("::1/128"),
}
_FROM_TEXT = {socket.AF_INET: "127.0.0.1/8", socket.AF_INET6: "::1/128"}
_ANY_TEXT = {socket.AF_INET: "0.0.0.0/0", socket.AF_INET6: "::/0"}

Kind = Literal["rule", "route", "fwmark"]


class RoutingError(Exception):
    """Netlink refused or failed; ``str()`` is one line, ``errno`` the kernel's error code."""

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.errno = code


@dataclass(frozen=True, slots=True)
class Piece:
    """One rule or route of the setup.

    ``kind`` is ``"rule"`` (replies from loopback that come in on ``lo`` use
    ``table``), ``"route"`` (in ``table``, everything is local) or
    ``"fwmark"`` (packets with ``mark`` use ``table``).
    """

    family: socket.AddressFamily
    kind: Kind
    table: int
    mark: int = 0

    def command(self, verb: str = "add") -> str:
        """The ``ip`` command that adds (or, with ``verb="del"``, deletes) this piece."""
        ip = "ip -6" if self.family == socket.AF_INET6 else "ip"
        if self.kind == "rule":
            selector = f"from {_FROM_TEXT[self.family]} iif lo table {self.table}"
            return f"{ip} rule {verb} {selector}"
        if self.kind == "fwmark":
            return f"{ip} rule {verb} fwmark {self.mark} lookup {self.table}"
        return f"{ip} route {verb} local {_ANY_TEXT[self.family]} dev lo table {self.table}"


def ipv6_available() -> bool:
    """True when this host (this network namespace) has IPv6 at all."""
    return socket.has_ipv6 and os.path.isdir("/proc/sys/net/ipv6")


def pieces(table: int = DEFAULT_TABLE, mark: int = 0, *, ipv6: bool = True) -> list[Piece]:
    """Every piece the setup needs, in the order the README lists them."""
    families = [socket.AF_INET, socket.AF_INET6] if ipv6 else [socket.AF_INET]
    found: list[Piece] = []
    for family in families:
        found += [Piece(family, "rule", table), Piece(family, "route", table)]
    if mark:
        found += [Piece(family, "fwmark", table, mark) for family in families]
    return found


def check_table(table: int) -> str | None:
    """Why ``table`` cannot be mmproxy's routing table, or None when it can."""
    if not 1 <= table <= MAX_TABLE:
        return f"{table} is out of range 1-{MAX_TABLE}"
    if table in RESERVED_TABLES:
        return f"{table} is one of the kernel's own tables (253 default, 254 main, 255 local)"
    return None


def transparent_families() -> dict[str, str | None]:
    """For IPv4 and IPv6: None when a socket can take IP_TRANSPARENT here, else why not."""
    result: dict[str, str | None] = {}
    for name, family in (("IPv4", socket.AF_INET), ("IPv6", socket.AF_INET6)):
        try:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                upstream.set_transparent(probe, family)
        except PermissionError:
            result[name] = "needs CAP_NET_ADMIN (run as root or grant the capability)"
        except OSError as error:
            result[name] = f"not available: {error.strerror or error}"
        else:
            result[name] = None
    return result


def _attr(message: Any, name: str) -> Any:
    return message.get_attr(name)


def _protocol(message: Any, kind: Kind) -> int:
    """Who made a rule (``FRA_PROTOCOL``) or a route (``rtm_protocol``, the header's field)."""
    if kind == "route":
        return int(message["proto"])
    return int(_attr(message, "FRA_PROTOCOL") or 0)


def _table(message: Any, attr: str) -> int:
    table = _attr(message, attr)  # the header's own field only holds tables up to 255
    return int(table if table is not None else message["table"])


class Netlink:
    """A netlink (rtnetlink) connection to the current network namespace; use with ``with``."""

    def __init__(self) -> None:
        try:
            self._ipr = IPRoute()
        except OSError as error:
            raise RoutingError(f"cannot open a netlink socket: {error.strerror}") from error
        self._lo: int | None = None

    def __enter__(self) -> Netlink:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._ipr.close()

    # ------------------------------------------------------------ reading

    def _call(self, what: str, function: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except NetlinkError as error:
            code = int(error.code)
            raise RoutingError(f"{what}: {os.strerror(code)}", code) from error
        except OSError as error:
            raise RoutingError(f"{what}: {error.strerror or error}", error.errno or 0) from error

    def loopback_index(self) -> int:
        if self._lo is None:
            found = self._call("looking up lo", self._ipr.link_lookup, ifname="lo")
            if not found:
                raise RoutingError("this network namespace has no loopback interface (lo)")
            self._lo = int(found[0])
        return self._lo

    def set_up_loopback(self) -> None:
        """``ip link set lo up`` (a new network namespace starts with it down)."""
        lo = self.loopback_index()
        self._call("setting lo up", self._ipr.link, "set", index=lo, state="up")

    def find(self, piece: Piece, *, any_table: bool = False) -> list[Any]:
        """The rules or routes that are ``piece`` (any table with ``any_table``)."""
        if piece.kind == "route":
            routes = self._call(
                f"reading table {piece.table}",
                self._ipr.get_routes,
                family=piece.family,
                table=piece.table,
            )
            lo = self.loopback_index()
            return [route for route in routes if self._is_route(route, piece, lo)]
        rules = self._call("reading the rules", self._ipr.get_rules, family=piece.family)
        return [rule for rule in rules if self._is_rule(rule, piece, any_table)]

    def present(self, piece: Piece) -> bool:
        return bool(self.find(piece))

    @staticmethod
    def _is_rule(rule: Any, piece: Piece, any_table: bool) -> bool:
        if rule["action"] != FR_ACT_TO_TBL or rule["dst_len"] != 0:
            return False
        if not any_table and _table(rule, "FRA_TABLE") != piece.table:
            return False
        if _attr(rule, "FRA_OIFNAME") or _attr(rule, "FRA_GOTO"):
            return False
        fwmark = _attr(rule, "FRA_FWMARK") or 0
        if piece.kind == "fwmark":
            mask = _attr(rule, "FRA_FWMASK")
            return (
                fwmark == piece.mark
                and mask in (None, 0xFFFFFFFF)
                and rule["src_len"] == 0
                and not _attr(rule, "FRA_IIFNAME")
            )
        if fwmark or _attr(rule, "FRA_IIFNAME") != "lo":
            return False
        source = _attr(rule, "FRA_SRC")
        if source is None:
            return False
        network = ipaddress.ip_network(f"{source}/{rule['src_len']}", strict=False)
        return network == _LOOPBACK[piece.family]

    @staticmethod
    def _is_route(route: Any, piece: Piece, lo: int) -> bool:
        return (
            route["type"] == RTN_LOCAL
            and route["dst_len"] == 0
            and _table(route, "RTA_TABLE") == piece.table
            and _attr(route, "RTA_OIF") == lo
        )

    # ------------------------------------------------------------ changing

    def add(self, piece: Piece) -> bool:
        """Add ``piece`` unless it is present; True when it was added."""
        if self.present(piece):
            return False
        try:
            function, kwargs = self._request(piece)
            self._call(piece.command(), function, "add", **kwargs)
        except RoutingError as error:
            if error.errno == errno.EEXIST:  # added meanwhile, or an exact twin
                return False
            raise
        return True

    def delete(self, piece: Piece) -> tuple[int, int]:
        """Delete every copy of ``piece`` that ``apply`` added; returns (deleted, kept).

        Kept: copies without mmproxy's :data:`PROTOCOL`, made by someone else.
        """
        found = self.find(piece)
        ours = [message for message in found if _protocol(message, piece.kind) == PROTOCOL]
        for message in ours:
            function, kwargs = self._request(piece)
            if piece.kind != "route":
                kwargs["priority"] = _attr(message, "FRA_PRIORITY") or 0
            try:
                self._call(piece.command("del"), function, "del", **kwargs)
            except RoutingError as error:
                if error.errno not in (errno.ENOENT, errno.ESRCH):  # deleted meanwhile
                    raise
        return len(ours), len(found) - len(ours)

    def _request(self, piece: Piece) -> tuple[Any, dict[str, Any]]:
        """The pyroute2 call and its keyword arguments that add or delete ``piece``."""
        v6 = piece.family == socket.AF_INET6
        if piece.kind == "route":
            kwargs: dict[str, Any] = {
                "family": piece.family,
                "dst": "::" if v6 else "0.0.0.0",
                "dst_len": 0,
                "type": "local",
                "oif": self.loopback_index(),
                "table": piece.table,
                "proto": PROTOCOL,
            }
            if not v6:
                kwargs["scope"] = "host"  # what ip(8) sets for an IPv4 local route
            return self._ipr.route, kwargs
        kwargs = {"family": piece.family, "table": piece.table, "protocol": PROTOCOL}
        if piece.kind == "fwmark":
            kwargs.update(fwmark=piece.mark, fwmask=0xFFFFFFFF)
        else:
            network = _LOOPBACK[piece.family]
            kwargs.update(src="::1" if v6 else "127.0.0.1", src_len=network.prefixlen, iifname="lo")
        return self._ipr.rule, kwargs


@dataclass(frozen=True, slots=True)
class Status:
    """One piece and whether it is in place."""

    piece: Piece
    present: bool


def check(table: int = DEFAULT_TABLE, mark: int = 0) -> list[Status]:
    """Whether each piece of the setup is in place (raises RoutingError if netlink fails)."""
    with Netlink() as netlink:
        return [
            Status(piece, netlink.present(piece))
            for piece in pieces(table, mark, ipv6=ipv6_available())
        ]


def apply(table: int = DEFAULT_TABLE, mark: int = 0) -> list[tuple[Piece, bool]]:
    """Add what is missing; returns each piece and whether it was added (False: present)."""
    with Netlink() as netlink:
        return [(piece, netlink.add(piece)) for piece in pieces(table, mark, ipv6=ipv6_available())]


def remove(table: int = DEFAULT_TABLE, mark: int = 0) -> list[tuple[Piece, int, int]]:
    """Delete the pieces ``apply`` added; returns each piece, copies deleted and copies kept."""
    with Netlink() as netlink:
        ordered = reversed(pieces(table, mark, ipv6=ipv6_available()))
        return [(piece, *netlink.delete(piece)) for piece in ordered]


def startup_problems(
    mark: int = 0, families: Iterable[socket.AddressFamily] = (socket.AF_INET, socket.AF_INET6)
) -> list[str]:
    """What the daemon warns about at start-up: one line per missing piece.

    Only ``families`` are checked (the daemon passes those whose backend is on
    loopback, which is what these routes are for).  The daemon does not know
    which table the operator chose, so a rule from loopback with ``iif lo``
    counts whatever its table, and the local route is looked for in the table
    that rule names (123 when there is none).  Any fwmark rule for ``mark``
    counts.  This never raises: a netlink failure is one line too.
    """
    asked = set(families)
    wanted: list[socket.AddressFamily] = [
        f for f in (socket.AF_INET, socket.AF_INET6) if f in asked
    ]
    if not ipv6_available():
        wanted = [f for f in wanted if f != socket.AF_INET6]
    if not wanted:
        return []
    try:
        with Netlink() as netlink:
            return list(_startup_problems(netlink, mark, wanted))
    except RoutingError as error:
        return [f"cannot read the policy routing: {error}"]
    except Exception as error:  # noqa: BLE001 - an advisory check must never stop start-up
        return [f"cannot read the policy routing: {type(error).__name__}: {error}"]


def _startup_problems(
    netlink: Netlink, mark: int, families: list[socket.AddressFamily]
) -> Iterable[str]:
    for family in families:
        rule = Piece(family, "rule", DEFAULT_TABLE)
        found = netlink.find(rule, any_table=True)
        table = _table(found[0], "FRA_TABLE") if found else DEFAULT_TABLE
        if not found:
            yield f"missing policy rule: {rule.command()}"
        route = Piece(family, "route", table)
        if not netlink.present(route):
            yield f"missing local route: {route.command()}"
        if mark:
            fwmark = Piece(family, "fwmark", table, mark)
            if not netlink.find(fwmark, any_table=True):
                yield f"missing fwmark rule: {fwmark.command()}"
