"""The settings of one benchmark run and the targets it compares, checked before anything starts.

Every check here turns a bad flag into :class:`SettingsError` with one line that names the flag,
so that the command line never answers with a traceback.
"""

from __future__ import annotations

import os
import re
import shlex
import string
from dataclasses import dataclass, field, replace
from pathlib import Path

DIRECT = "direct"
MMPROXY = "mmproxy"
MMPROXY_FT = "mmproxy-ft"  # mmproxy on a free-threaded interpreter (--free-threaded)
MMPROXY_SOCKMAP = "mmproxy-sockmap"  # mmproxy with the kernel relay (--sockmap)
PLACEHOLDERS = frozenset({"listen", "target4", "target6", "protocol"})
PROTOCOLS = ("tcp", "udp")
_PEER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")


class SettingsError(ValueError):
    """A flag's value cannot be used; the message is the one line shown to the user."""


@dataclass(frozen=True)
class Target:
    """Something the load goes through: nothing (``direct``), mmproxy, or a peer's command.

    ``template`` is the peer's command line with ``{listen}``, ``{target4}`` and ``{target6}``
    placeholders, and optionally ``{protocol}`` (``tcp`` or ``udp``, the workload's); for
    mmproxy ``flags`` are added after the harness's own, and ``python`` is the interpreter that
    runs it (None: the run's ``--python``).  Two targets of kind ``mmproxy`` run side by side
    with ``--free-threaded``: ``mmproxy`` on ``--python`` and ``mmproxy-ft`` on its own one.
    """

    name: str
    kind: str  # "direct", "mmproxy" or "peer"
    template: str = ""
    flags: tuple[str, ...] = ()
    python: str | None = None

    @property
    def is_proxy(self) -> bool:
        return self.kind != DIRECT

    def command(self, listen: str, target4: str, target6: str, protocol: str = "tcp") -> list[str]:
        """A peer's argv with the placeholders filled in (no shell is involved)."""
        filled = self.template.format(
            listen=listen, target4=target4, target6=target6, protocol=protocol
        )
        return shlex.split(filled)

    @property
    def selects_protocol(self) -> bool:
        """Whether the peer's template has ``{protocol}`` (without it, it runs in one mode)."""
        return "{protocol}" in self.template


@dataclass(frozen=True)
class Settings:
    """Everything one run needs to know; built once by :func:`bench.cli.parse`."""

    duration: float = 3.0
    repeats: int = 3
    workloads: tuple[str, ...] = ()
    targets: tuple[Target, ...] = ()
    python: str = ""  # --python: the interpreter of an mmproxy target that names none
    free_threaded: str | None = None  # --free-threaded: None not asked, "" provide one, or PATH
    header: str = "v1"  # the PROXY header version the load generator sends
    idle_connections: int = 2000
    limit_connections: int = 9000
    limit_nofile: int = 20000
    json_path: Path | None = None
    png_path: Path | None = None
    replay: Path | None = None  # --from-json: print a saved run instead of measuring
    extra: dict[str, str] = field(default_factory=dict)  # recorded as-is in the JSON

    @property
    def proxies(self) -> tuple[Target, ...]:
        return tuple(target for target in self.targets if target.is_proxy)

    def interpreter(self, target: Target) -> str:
        """The interpreter that runs an mmproxy target: its own, else ``--python``."""
        return target.python or self.python

    def with_free_threaded(self, python: str) -> Settings:
        """These settings plus ``mmproxy-ft`` on ``python``, right after ``mmproxy``.

        It takes mmproxy's flags, so the two differ only in their interpreter.
        """
        targets = [target for target in self.targets if target.name != MMPROXY_FT]
        names = [target.name for target in targets]
        at = names.index(MMPROXY) + 1 if MMPROXY in names else len(targets)
        flags = targets[at - 1].flags if MMPROXY in names else ()
        targets.insert(at, Target(MMPROXY_FT, MMPROXY, flags=flags, python=python))
        return replace(self, targets=tuple(targets))


def parse_peer(text: str) -> Target:
    """``NAME=COMMAND TEMPLATE`` from ``--peer``."""
    name, sep, template = text.partition("=")
    name = name.strip()
    if not sep or not template.strip():
        raise SettingsError(f"--peer: {text!r} is not NAME='COMMAND TEMPLATE'")
    if not _PEER_NAME.fullmatch(name) or name in {DIRECT, MMPROXY, MMPROXY_FT, MMPROXY_SOCKMAP}:
        raise SettingsError(
            f"--peer: {name!r} is not a usable name (letters, digits, '_.-'; "
            f"not {DIRECT!r}, {MMPROXY!r}, {MMPROXY_FT!r} or {MMPROXY_SOCKMAP!r})"
        )
    try:
        fields = {
            field_name
            for _, field_name, _, _ in string.Formatter().parse(template)
            if field_name is not None
        }
    except ValueError as error:
        raise SettingsError(f"--peer {name}: {error} in the command template") from None
    unknown = fields - PLACEHOLDERS
    if unknown:
        raise SettingsError(
            f"--peer {name}: unknown placeholder {{{sorted(unknown)[0]}}} "
            "(use {listen}, {target4}, {target6}, {protocol})"
        )
    if "listen" not in fields:
        raise SettingsError(f"--peer {name}: the command template needs {{listen}}")
    target = Target(name=name, kind="peer", template=template)
    try:
        argv = target.command("127.0.0.1:1", "127.0.0.1:2", "[::1]:2")
    except ValueError as error:
        raise SettingsError(f"--peer {name}: {error}") from None
    if not argv:
        raise SettingsError(f"--peer {name}: the command is empty")
    return target


def parse_flags(text: str, flag: str) -> tuple[str, ...]:
    """Split a flag string the way a shell would."""
    try:
        return tuple(shlex.split(text))
    except ValueError as error:
        raise SettingsError(f"{flag}: {error}") from None


def parse_only(text: str, known: tuple[str, ...]) -> tuple[str, ...]:
    """``--only a,b``: known workload names, in the harness's order."""
    wanted = [name.strip() for name in text.split(",") if name.strip()]
    if not wanted:
        raise SettingsError("--only: no workload named")
    for name in wanted:
        if name not in known:
            raise SettingsError(f"--only: unknown workload {name!r} (known: {', '.join(known)})")
    return tuple(name for name in known if name in wanted)


def check_python(path: str, flag: str = "--python") -> str:
    """An interpreter that runs mmproxy: an executable file, as an absolute path.

    Absolute because the children run from ``/``; symlinks are kept, since a virtual
    environment's interpreter is one and needs its own path to find its packages.
    """
    if not os.path.isfile(path) or not os.access(path, os.X_OK):
        raise SettingsError(f"{flag}: {path} is not an executable file")
    return os.path.abspath(path)


def unique_names(targets: list[Target]) -> None:
    seen: set[str] = set()
    for target in targets:
        if target.name in seen:
            raise SettingsError(f"--peer: the name {target.name!r} is used twice")
        seen.add(target.name)
