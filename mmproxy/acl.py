"""Which peers may send PROXY headers: the ``-allowed-subnets`` list.

A PROXY header lets its sender choose the client address the backend sees, so
only the load balancers in this list may send one.  The file holds one CIDR or
bare address per line (a bare address is a /32 or /128); blank lines and
``#`` comments are ignored, IPv4 and IPv6 may be mixed.

Parsing is strict, with two deliberate leniencies kept for go-mmproxy's files:
host bits may be set (``192.0.2.7/24`` means ``192.0.2.0/24``) and the prefix
length may have leading zeros.  IPv4-mapped IPv6 entries are stored as their
IPv4 equivalent, and mapped peer addresses are looked up as IPv4, so a
dual-stack socket matches the IPv4 lines.

Unlike go-mmproxy, which logs a bad file and then allows everyone, any problem
with the file (unreadable, a bad line, no entries at all) is a
:class:`~mmproxy.errors.ConfigError` that stops start-up: we fail closed.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import threading
from collections.abc import Callable, Iterable

import netaddr

from mmproxy.errors import ConfigError

_IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Only what a person may type in a prefix length: ASCII digits, no sign, no
# netmask form ("/255.255.255.0"), which go-mmproxy's ParseCIDR rejects too.
_PREFIX = re.compile(r"[0-9]+")
_IPV4ISH = re.compile(r"[0-9.]+")

# IPSet membership walks up to 128 supernets (an IPv6 miss is slow).
# Real peers are a handful of load balancers, so a small LRU cache of answers
# makes the per-connection check a dictionary hit.  functools.lru_cache is
# thread-safe, with or without the GIL.
_CACHE_SIZE = 4096


class AllowList:
    """An immutable set of allowed peer subnets; safe to read from any thread.

    Build one with :meth:`everyone` or :meth:`from_file` (or
    :meth:`from_lines`).  Nothing mutates it afterwards, and a membership test
    only reads the set, so concurrent :meth:`allows` calls need no lock.
    """

    __slots__ = ("_cidrs", "_lookup", "_path", "_set")

    def __init__(self, networks: Iterable[str] | None, path: str | None = None) -> None:
        """Wrap ``networks`` (CIDR strings), or allow everyone when it is ``None``.

        Prefer the named constructors: this one does no syntax checking beyond
        netaddr's own.
        """
        self._path = path
        if networks is None:
            self._set: netaddr.IPSet | None = None
            self._cidrs: tuple[str, ...] = ()
        else:
            self._set = netaddr.IPSet(networks)
            # IPSet merges adjacent and nested entries: this is the effective list.
            self._cidrs = tuple(str(cidr) for cidr in self._set.iter_cidrs())
        self._lookup: Callable[[str], bool] = functools.lru_cache(maxsize=_CACHE_SIZE)(self._member)

    @classmethod
    def everyone(cls) -> AllowList:
        """The list used when ``-allowed-subnets`` is not given: every peer is allowed."""
        return cls(None)

    @classmethod
    def from_file(cls, path: str) -> AllowList:
        """Read and validate an allowed-subnets file.

        Raises ConfigError with a one-line message: ``"{path}: {strerror}"`` if
        the file cannot be read, ``"{path}:{lineno}: {reason}"`` for a bad line,
        and ``"{path}: ..."`` if the file lists no subnet at all.
        """
        try:
            with open(path, "rb") as file:
                data = file.read()
        except OSError as error:
            raise ConfigError(f"{path}: {error.strerror or error}") from error
        lines: list[str] = []
        for lineno, raw in enumerate(data.splitlines(), start=1):
            try:
                lines.append(raw.decode("utf-8"))
            except UnicodeDecodeError as error:
                raise ConfigError(f"{path}:{lineno}: not UTF-8 text") from error
        return cls.from_lines(lines, source=path)

    @classmethod
    def from_lines(cls, lines: Iterable[str], *, source: str) -> AllowList:
        """Parse the file format from ``lines``.

        ``source`` names the lines in error messages and becomes :attr:`path`.
        """
        networks: list[str] = []
        for lineno, line in enumerate(lines, start=1):
            if lineno == 1:
                line = line.removeprefix("\ufeff")  # a byte-order mark left by some editors
            tokens = line.split("#", 1)[0].split()
            if not tokens:
                continue
            if len(tokens) > 1:
                shown = " ".join(f'"{token}"' for token in tokens)
                raise ConfigError(
                    f"{source}:{lineno}: expected one address or CIDR per line, got {shown}"
                )
            try:
                networks.append(str(parse_network(tokens[0])))
            except ValueError as error:
                raise ConfigError(f"{source}:{lineno}: {error}") from error
        if not networks:
            raise ConfigError(
                f"{source}: no subnets listed; an empty list would refuse every connection"
            )
        return cls(networks, source)

    @property
    def allows_everyone(self) -> bool:
        """True when no list was given and every peer may send PROXY headers."""
        return self._set is None

    @property
    def path(self) -> str | None:
        """The file the list came from, or None for :meth:`everyone`."""
        return self._path

    @property
    def cidrs(self) -> tuple[str, ...]:
        """The effective subnets, merged and sorted (empty when everyone is allowed)."""
        return self._cidrs

    @property
    def count(self) -> int:
        """How many CIDRs :attr:`cidrs` holds (0 when everyone is allowed).

        A property, not ``__len__``, so that ``AllowList.everyone()`` is never falsy.
        """
        return len(self._cidrs)

    def allows(self, address: str) -> bool:
        """Whether a peer at ``address`` (as getpeername returns it) may send a header.

        IPv4-mapped IPv6 peers (``::ffff:192.0.2.1``) are matched as IPv4, and a
        ``%scope`` suffix is ignored.  Anything that is not an IP address is
        refused: the check fails closed.
        """
        if self._set is None:
            return True
        return self._lookup(address)

    def _member(self, address: str) -> bool:
        """The uncached netaddr lookup behind :meth:`allows` (the set is not None)."""
        ipset = self._set
        if ipset is None:
            return True
        try:
            ip = netaddr.IPAddress(address.partition("%")[0])
        except (netaddr.AddrFormatError, ValueError, TypeError):
            return False
        if ip.version == 6 and ip.is_ipv4_mapped():
            ip = ip.ipv4()
        return ip in ipset

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AllowList):
            return NotImplemented
        return (self._set is None, self._cidrs, self._path) == (
            other._set is None,
            other._cidrs,
            other._path,
        )

    def __hash__(self) -> int:
        return hash((self._set is None, self._cidrs, self._path))

    def __repr__(self) -> str:
        if self._set is None:
            return "AllowList.everyone()"
        return f"AllowList(path={self._path!r}, cidrs={len(self._cidrs)})"


class AllowListHolder:
    """The allow-list in force, swapped as a whole by a reload (SIGHUP).

    Readers take :attr:`current` once per new connection or flow and use that
    list for the whole decision; :meth:`replace` swaps the reference under a
    lock, so a reader sees either the old list or the new one, never a mix.
    Decisions already made (open connections) are not revisited.
    """

    __slots__ = ("_current", "_lock")

    def __init__(self, initial: AllowList) -> None:
        self._lock = threading.Lock()
        self._current = initial

    @property
    def current(self) -> AllowList:
        """The list to check a new peer against.

        Read without the lock (UDP reads it for every datagram): reading one
        reference is atomic, with or without the GIL, and the list it names is
        immutable.  Only writers serialise, in :meth:`replace`.
        """
        return self._current

    def replace(self, new: AllowList) -> AllowList:
        """Put ``new`` in force; return the list it replaced."""
        with self._lock:
            old, self._current = self._current, new
        return old

    def reload(self) -> AllowList | None:
        """Re-read the file the current list came from and put it in force.

        Returns the new list, or None when the current list came from no file
        (every peer allowed: there is nothing to re-read).  Raises
        :class:`~mmproxy.errors.ConfigError` (``file:line: reason``) and keeps
        the current list when the file cannot be read or has an error.
        """
        path = self.current.path
        if path is None:
            return None
        new = AllowList.from_file(path)
        self.replace(new)
        return new


def parse_network(token: str) -> _IPNetwork:
    """Parse one allowed-subnets entry strictly; raise ValueError saying what is wrong.

    Host bits are cleared (``192.0.2.7/24`` -> ``192.0.2.0/24``), a bare
    address becomes a /32 or /128, and an IPv4-mapped IPv6 network becomes its
    IPv4 equivalent.
    """
    address_text, slash, prefix_text = token.partition("/")
    if not address_text:
        raise ValueError(f'"{token}": missing address before "/"')
    address = _parse_address(address_text, token)
    prefix: int
    if not slash:
        prefix = address.max_prefixlen
    elif not prefix_text:
        raise ValueError(f'"{token}": missing prefix length after "/"')
    elif not _PREFIX.fullmatch(prefix_text):
        raise ValueError(f'"{token}": prefix length "{prefix_text}" is not a decimal number')
    else:
        # Compare the text's length first: int() of a huge digit string is slow or refused.
        prefix = int(prefix_text) if len(prefix_text) <= 3 else address.max_prefixlen + 1
        if prefix > address.max_prefixlen:
            raise ValueError(
                f'"{token}": prefix length {prefix_text} is out of range for '
                f"IPv{address.version} (0-{address.max_prefixlen})"
            )
    network = ipaddress.ip_network((address, prefix), strict=False)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        if prefix < 96:
            raise ValueError(f'"{token}": an IPv4-mapped network needs a prefix of /96 or longer')
        return ipaddress.IPv4Network((address.ipv4_mapped, prefix - 96), strict=False)
    return network


def _parse_address(text: str, token: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """Parse the address part of ``token`` with the stdlib's strict rules."""
    if "%" in text:
        raise ValueError(f'"{token}": scoped addresses (with "%") are not allowed')
    try:
        if ":" in text:
            return ipaddress.IPv6Address(text)
        if _IPV4ISH.fullmatch(text):
            return ipaddress.IPv4Address(text)
    except ValueError as error:
        # The stdlib says what is wrong ("Expected 4 octets in '1.2.3'").
        raise ValueError(f'"{token}" is not a valid IP address: {error}') from None
    raise ValueError(f'"{token}" is not an IP address or CIDR (hostnames are not allowed)')
