"""Whom a PROXY header may impersonate and where it may send us: one policy for TCP and UDP.

:func:`decide` turns (header, peer, configuration) into a :class:`Route`: the
source address to impersonate (None: connect from this host's own address)
and the target.  The trust model it enforces (README: Security):

* A header's source must be one a real client can have.  Loopback,
  unspecified (``0.0.0.0/8``, ``::``), multicast and the limited broadcast
  address (and their IPv4-mapped forms) are refused as ``bad_source``: the
  backend would see a localhost client, or the connect could never complete.
* With ``-dynamic-destination`` the header names the target.  A destination
  must be in ``--allowed-destinations`` when that file is given, and otherwise
  one of this host's own addresses (the kernel's local table); unspecified,
  multicast and broadcast destinations are never allowed.  Anything else is
  refused as ``bad_destination`` before any upstream attempt.

LOCAL headers (and UNSPEC, UNKNOWN, AF_UNIX) carry no source to check: they are
relayed from this host's address, as before.  The ``-4``/``-6`` targets are the
operator's own choice and are not checked.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from mmproxy.acl import AllowList, AllowListHolder
from mmproxy.config import Config, Endpoint
from mmproxy.errors import ConfigError, Refusal, RefusedError
from mmproxy.header import IPAddress
from mmproxy.protocol import InetAddress, ProxyHeader
from mmproxy.upstream import plain_address

REASONS = (Refusal.BAD_SOURCE, Refusal.BAD_DESTINATION)  # what decide() can refuse with

LOCAL_TABLE = 255  # the kernel's table of this host's own addresses
RTN_LOCAL = 2  # a route of type "local": an address of this host
# Seconds a read of the local table is trusted: an address added or removed is seen this late.
LOCAL_TABLE_MAX_AGE = 1.0

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class Route:
    """What to do with one connection or flow: whom to impersonate and where to connect."""

    source: tuple[IPAddress, int] | None  # None: from this host's own address (LOCAL & co.)
    target: Endpoint


def _kind(host: IPAddress) -> str | None:
    """Which kind of address no peer can have ``host`` is, from its bits (a few integer tests:
    this runs for every connection, and ipaddress' properties build networks to compare)."""
    value = int(host)
    if host.version == 4:
        first = value >> 24
        if first == 127:
            return "a loopback address"
        if first == 0:
            return "an unspecified address"
        if 224 <= first <= 239:
            return "a multicast address"
        if value == 0xFFFFFFFF:
            return "the broadcast address"
        return None
    if value == 1:
        return "a loopback address"
    if value == 0:
        return "an unspecified address"
    if value >> 120 == 0xFF:
        return "a multicast address"
    return None


def unusable_source(host: IPAddress) -> str | None:
    """Why no real client can have ``host`` as its address, or None when one can.

    ``host`` is plain (an IPv4-mapped address already unwrapped to IPv4).
    """
    return _kind(host)


def unusable_destination(host: IPAddress) -> str | None:
    """Why ``host`` can never be a target, whatever the lists say, or None.

    Loopback is not among them: it is one of this host's own addresses.  0.0.0.0 is: a
    connect() to it reaches this host's loopback.
    """
    kind = _kind(host)
    return None if kind == "a loopback address" else kind


def read_local_table() -> list[Network]:
    """The ``local`` routes of the kernel's local table (this network namespace), over netlink."""
    from pyroute2 import IPRoute  # ~0.2 s to import: only with -dynamic-destination

    networks: list[Network] = []
    with IPRoute() as ipr:
        for family in (socket.AF_INET, socket.AF_INET6):
            for route in ipr.get_routes(family=family, table=LOCAL_TABLE):
                if route["type"] != RTN_LOCAL:
                    continue
                dst = route.get_attr("RTA_DST")
                if dst is None:
                    continue
                networks.append(ipaddress.ip_network(f"{dst}/{route['dst_len']}", strict=False))
    return networks


class LocalAddresses:
    """This host's own addresses, as the kernel's local table lists them, kept current.

    A lookup re-reads the table when the last read is older than ``max_age``
    seconds; only one thread reads at a time, the others use the snapshot in
    force (an immutable tuple, swapped as one reference).  A read that fails
    keeps the previous snapshot.  :attr:`generation` changes whenever the
    snapshot's content does, so callers that cache decisions know to drop them.
    """

    def __init__(
        self,
        load: Callable[[], Iterable[Network]] = read_local_table,
        clock: Callable[[], float] = time.monotonic,
        max_age: float = LOCAL_TABLE_MAX_AGE,
    ) -> None:
        self._load = load
        self._clock = clock
        self._max_age = max_age
        self._reading = threading.Lock()
        self._networks: tuple[Network, ...] = ()
        self._read_at = -float("inf")
        self.generation = 0
        try:
            self._networks = tuple(load())
        except OSError as error:
            raise ConfigError(
                f"cannot read this host's addresses (the local table): {error.strerror or error}"
            ) from error
        self._read_at = clock()

    def refresh(self) -> int:
        """Re-read the table if the snapshot is too old; return :attr:`generation`."""
        if self._clock() - self._read_at >= self._max_age and self._reading.acquire(False):
            try:
                networks = tuple(self._load())
                if set(networks) != set(self._networks):
                    self._networks = networks  # one reference: readers see old or new
                    self.generation += 1
            except Exception:  # noqa: BLE001, S110 - keep the last good snapshot; retry later
                pass
            finally:
                self._read_at = self._clock()
                self._reading.release()
        return self.generation

    def __contains__(self, host: IPAddress) -> bool:
        self.refresh()
        return any(host in network for network in self._networks if network.version == host.version)


class Destinations:
    """Where ``-dynamic-destination`` may connect: the listed subnets, or this host's addresses.

    :meth:`generation` changes when the answer for some address may have changed (the list
    was reloaded, or the host's addresses changed); UDP drops its cached routes then.
    """

    def __init__(self, listed: AllowList | None, local: LocalAddresses | None = None) -> None:
        self._listed = AllowListHolder(listed) if listed is not None else None
        self._local = local if local is not None or listed is not None else LocalAddresses()
        self._reloads = 0

    @classmethod
    def for_config(cls, config: Config) -> Destinations | None:
        """The destinations of ``config``; None without ``-dynamic-destination``."""
        if not config.dynamic_destination:
            return None
        return cls(config.allowed_destinations)

    def why_not(self, host: IPAddress) -> str | None:
        """Why ``host`` may not be a target, or None when it may."""
        fixed = unusable_destination(host)
        if fixed is not None:
            return f"is {fixed}"
        if self._listed is not None:
            if self._listed.current.allows(str(host)):
                return None
            return "is not in --allowed-destinations"
        if self._local is not None and host in self._local:
            return None
        return "is not an address of this host (see --allowed-destinations)"

    def generation(self) -> tuple[int, int]:
        local = self._local.refresh() if self._local is not None else 0
        return (self._reloads, local)

    def reload(self) -> AllowList | None:
        """Re-read ``--allowed-destinations`` (SIGHUP); None when there is no such file.

        Raises :class:`ConfigError` and keeps the list in force when the file has an error.
        """
        if self._listed is None:
            return None
        new = self._listed.reload()
        self._reloads += 1
        return new


def decide(
    header: ProxyHeader, peer: IPAddress, config: Config, destinations: Destinations | None
) -> Route:
    """The source to impersonate and the target for ``header``, received from ``peer``.

    Raises :class:`RefusedError` (``bad_source``, ``bad_destination``) for what the
    trust model refuses; nothing has been sent anywhere then.
    """
    client = header.client
    if client is None:  # LOCAL, UNSPEC, UNKNOWN, AF_UNIX: no address to impersonate
        host = plain_address(peer)
        source = None
    else:
        host = plain_address(client.host)
        why = unusable_source(host)
        if why is not None:
            raise RefusedError(
                Refusal.BAD_SOURCE,
                "forged source in PROXY header",
                f"source {Endpoint(host, client.port)} is {why}",
            )
        source = (host, client.port)
    target = config.target4 if host.version == 4 else config.target6
    destination = header.destination
    if config.dynamic_destination and isinstance(destination, InetAddress):
        target = _dynamic_target(destination, destinations)
        if source is not None and target.host.version != host.version:
            raise RefusedError(
                Refusal.BAD_DESTINATION,
                "unusable destination in PROXY header",
                f"source {client} and destination {destination} differ in family",
            )
    return Route(source, target)


def _dynamic_target(destination: InetAddress, destinations: Destinations | None) -> Endpoint:
    host = plain_address(destination.host)
    if destination.port == 0:
        why: str | None = "has port 0"
    elif destinations is None:  # a caller without the list: fail closed
        why = "cannot be checked"
    else:
        why = destinations.why_not(host)
    if why is not None:
        detail = f"destination {destination} {why}"
        raise RefusedError(Refusal.BAD_DESTINATION, "unusable destination in PROXY header", detail)
    return Endpoint(host, destination.port)
