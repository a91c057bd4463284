"""Command lines read the way Go's ``flag`` package reads them.

go-mmproxy's unit files and scripts must keep working, so ``-name value``,
``-name=value``, ``--name value`` and ``--name=value`` all mean the same; a
bool flag is set by ``-name`` alone or ``-name=false`` (Go's
strconv.ParseBool words); integers take Go's literals (``0x10``, ``0o17``,
``017``, ``1_000``).  Click alone would read ``-v=2`` as ``-v`` with the
value ``"=2"`` and ``-list`` as ``-l ist``, so :func:`go_argv` first rewrites
the command line into canonical ``--name value`` pairs and rejects what Go
would reject; click then parses those.

Both the daemon's command (:mod:`mmproxy.cli`) and the tools
(:mod:`mmproxy.commands`) read flags through this module, and both fail the
same way: one line on stderr and exit code 2 (:func:`fail`).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import click

from mmproxy.errors import ConfigError

PROG = "mmproxy"
EXIT_USAGE = 2

# strconv.ParseBool's words, the only ones Go's bool flags take.
GO_BOOLS = {
    **dict.fromkeys(("1", "t", "T", "TRUE", "true", "True"), True),
    **dict.fromkeys(("0", "f", "F", "FALSE", "false", "False"), False),
}
# strconv.ParseInt(s, 0, 64) syntax; int() checks the underscores' placement.
_GO_INT = re.compile(r"[+-]?(?:0[xX][_0-9a-fA-F]+|0[oO][_0-7]+|0[bB][_01]+|0[_0-7]*|[1-9][_0-9]*)")
_SECONDS = re.compile(r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+")
# Words that act instead of setting a flag; click knows them by their long names.
_ACTIONS = {"h": "--help", "help": "--help", "version": "--version"}


def fail(message: str) -> NoReturn:
    """Print the one error line and exit 2; line breaks inside the message become spaces."""
    click.echo(f"{PROG}: error: {' '.join(message.splitlines())}", err=True)
    sys.exit(EXIT_USAGE)


def parse_go_int(text: str) -> int:
    """Parse an integer as Go's int flags do (base prefixes, legacy octal, underscores)."""
    invalid = ValueError(f"{text!r} is not a Go integer literal")
    if not _GO_INT.fullmatch(text):
        raise invalid
    sign = text[0] if text[0] in "+-" else ""
    digits = text[len(sign) :]
    if len(digits) > 1 and digits[0] == "0" and digits[1] not in "xXoObB":
        digits = "0o" + digits[1:]  # Go reads a leading 0 as octal
    try:
        return int(sign + digits, 0)
    except ValueError:
        raise invalid from None


class GoInt(click.ParamType[int, Any]):
    """An integer flag value in Go's literal syntax."""

    name = "integer"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_go_int(value)
        except ValueError:
            self.fail(f'"{value}" is not an integer', param, ctx)


class GoBool(click.ParamType[bool, Any]):
    """A bool flag value: one of strconv.ParseBool's words."""

    name = "boolean"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> bool:
        if isinstance(value, bool):
            return value
        if value not in GO_BOOLS:
            self.fail(f'"{value}" is not a boolean; use true or false', param, ctx)
        return GO_BOOLS[value]


class Seconds(click.ParamType[float, Any]):
    """A non-negative decimal number of seconds (no exponent, no sign)."""

    name = "seconds"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        if isinstance(value, float):
            return value
        if not (isinstance(value, str) and _SECONDS.fullmatch(value)):
            self.fail(f'"{value}" is not a number of seconds', param, ctx)
        return float(value)


@dataclass(frozen=True)
class Flag:
    """One flag: its Go name (no dashes), where its value goes, and how it reads."""

    name: str
    dest: str
    type: click.ParamType[Any, Any]
    default: Any
    help: str
    env: tuple[str, ...] = ()
    go: bool = True  # a go-mmproxy flag, named "-x" in messages; ours are "--x"
    metavar: str | None = None

    @property
    def display(self) -> str:
        return f"-{self.name}" if self.go else f"--{self.name}"

    @property
    def is_bool(self) -> bool:
        return isinstance(self.type, GoBool)


def go_argv(argv: Sequence[str], flags: Mapping[str, Flag]) -> list[str]:
    """Read ``argv`` as Go's flag package would; return canonical ``--name value`` tokens.

    ``flags`` maps each flag's name to its :class:`Flag`.  Raises ConfigError
    for an unknown flag, a missing value, a value given to a flag that takes
    none, or any positional argument (go-mmproxy would silently stop reading
    flags there).
    """
    out: list[str] = []
    previous: Flag | None = None
    args = iter(argv)
    for word in args:
        if word == "--":
            rest = list(args)
            if rest:
                raise ConfigError(f'unexpected argument "{rest[0]}"')
            break
        if not word.startswith("-") or word == "-":
            hint = ""
            if previous is not None and previous.is_bool and word in GO_BOOLS:
                hint = f" (a bool flag takes its value after '=': {previous.display}={word})"
            raise ConfigError(f'unexpected argument "{word}"{hint}')
        spelled, has_value, value = word.partition("=")
        name = spelled[2:] if spelled.startswith("--") else spelled[1:]
        if not name or name.startswith("-"):
            raise ConfigError(f'bad flag syntax: "{word}"')
        if name in _ACTIONS:
            if has_value:
                raise ConfigError(f"{spelled}: takes no value")
            out.append(_ACTIONS[name])
            continue
        flag = flags.get(name)
        if flag is None:
            raise ConfigError(f"{spelled}: unknown flag (see {PROG} -h)")
        previous = flag
        if flag.is_bool:
            value = value if has_value else "true"
        elif not has_value:
            following = next(args, None)  # Go takes the next word even if it starts with "-"
            if following is None:
                raise ConfigError(f"{spelled}: needs a value")
            value = following
        out += [f"--{flag.name}", value]
    return out
