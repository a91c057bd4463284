"""The tools beside the daemon: ``mmproxy routing check|apply|remove`` and ``mmproxy demo``.

`mmproxy.cli.main` hands the command line here when its first word is
``routing`` or ``demo``.  Flags read as the daemon's do (``-mark 5``,
``--mark=0x5``, ``MMPROXY_MARK``), so an environment file shared with the
daemon gives both the same mark.  A bad flag is one line on stderr and exit
code 2; a failure of the tool itself is one line and exit code 1.
"""

from __future__ import annotations

import errno
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import click

from mmproxy import routing
from mmproxy.config import MAX_MARK
from mmproxy.goflags import EXIT_USAGE, PROG, GoInt, fail

EXIT_PROBLEM = 1

_CONTEXT = {"help_option_names": ["-h", "-help", "--help"], "max_content_width": 100}


def main(argv: Sequence[str]) -> NoReturn:
    """Run the tool named by ``argv[0]`` with the rest of ``argv``; always exits."""
    try:
        code = tools.main(list(argv), PROG, standalone_mode=False)
    except click.BadParameter as error:
        name = error.param.opts[0] if error.param is not None and error.param.opts else "flag"
        fail(f"{name}: {error.message}")
    except click.Abort:
        sys.exit(130)
    except click.ClickException as error:
        fail(error.format_message())
    sys.exit(code if isinstance(code, int) else 0)


def _fatal(what: str, error: object) -> NoReturn:
    click.echo(f"{PROG}: error: {what}: {error}", err=True)
    sys.exit(EXIT_PROBLEM)


def _check_table(ctx: click.Context, param: click.Parameter, value: int) -> int:
    del ctx, param
    problem = routing.check_table(value)
    if problem:
        raise click.BadParameter(problem)
    return value


def _check_mark(ctx: click.Context, param: click.Parameter, value: int) -> int:
    del ctx, param
    if not 0 <= value <= MAX_MARK:
        raise click.BadParameter(f"{value} is out of range 0-{MAX_MARK}")
    return value


def _routing_options(function: Any) -> Any:
    function = click.option(
        "-table",
        "--table",
        type=GoInt(),
        default=routing.DEFAULT_TABLE,
        show_default=True,
        envvar="MMPROXY_ROUTING_TABLE",
        show_envvar=True,
        callback=_check_table,
        help="The routing table for replies to mmproxy's upstream connections.",
    )(function)
    return click.option(
        "-mark",
        "--mark",
        type=GoInt(),
        default=0,
        envvar="MMPROXY_MARK",
        show_envvar=True,
        callback=_check_mark,
        help="mmproxy's -mark: also route packets with this firewall mark by the table.",
    )(function)


@click.group(
    context_settings=_CONTEXT,
    help="Tools beside the mmproxy daemon (which runs when no tool is named).",
)
def tools() -> None:
    """The group: ``routing`` and ``demo``."""


@tools.group(context_settings=_CONTEXT, invoke_without_command=True)
@click.pass_context
def routing_group(ctx: click.Context) -> None:
    """Check, add or remove the policy routing that brings the backend's replies back."""
    if ctx.invoked_subcommand is None:  # "mmproxy routing" alone: say what it takes
        click.echo(ctx.get_help(), err=True)
        ctx.exit(EXIT_USAGE)


tools.add_command(routing_group, "routing")


@routing_group.command("check")
@_routing_options
def routing_check(table: int, mark: int) -> int:
    """Report each rule and route, and whether IP_TRANSPARENT can be set.

    Exits 1 with the commands to run when something is missing, 0 when all is in place.
    """
    try:
        statuses = routing.check(table, mark)
    except routing.RoutingError as error:
        _fatal("routing check", error)
    click.echo(f"policy routing (table {table}{f', fwmark {mark}' if mark else ''}):")
    for status in statuses:
        word = "present" if status.present else "missing"
        click.echo(f"  {word:8} {status.piece.command()}")
    if not routing.ipv6_available():
        click.echo("  (no IPv6 on this host: IPv6 rules not needed)")
    transparent = routing.transparent_families()
    denied = {name: why for name, why in transparent.items() if why and "CAP_NET_ADMIN" in why}
    click.echo("IP_TRANSPARENT (binding the upstream socket to the client's address):")
    for name, why in transparent.items():
        click.echo(f"  {'ok' if why is None else 'no':8} {name}{f': {why}' if why else ''}")
    missing = [status.piece for status in statuses if not status.present]
    if missing:
        flags = "" if table == routing.DEFAULT_TABLE else f" --table {table}"
        flags += f" -mark {mark}" if mark else ""
        click.echo(
            f"\n{len(missing)} missing. Add them as root with "
            f"'{PROG} routing apply{flags}', or run:"
        )
        for piece in missing:
            click.echo(f"  {piece.command()}")
    if denied:
        click.echo(
            "\nmmproxy needs CAP_NET_ADMIN to set IP_TRANSPARENT: run it as root or grant the "
            "capability (systemd: AmbientCapabilities=CAP_NET_ADMIN)."
        )
    if missing or denied:
        return EXIT_PROBLEM
    click.echo("\nall in place")
    return 0


def _permission_hint(error: routing.RoutingError) -> str:
    if error.errno == errno.EPERM:
        return f"{error} (needs root or CAP_NET_ADMIN)"
    return str(error)


@routing_group.command("apply")
@_routing_options
def routing_apply(table: int, mark: int) -> int:
    """Add the rules and routes that are missing (idempotent)."""
    try:
        results = routing.apply(table, mark)
    except routing.RoutingError as error:
        _fatal("routing apply", _permission_hint(error))
    for piece, added in results:
        click.echo(f"{'added' if added else 'present':8} {piece.command()}")
    return 0


@routing_group.command("remove")
@_routing_options
def routing_remove(table: int, mark: int) -> int:
    """Delete the rules and routes that apply added, where present (idempotent).

    Copies made by hand or by another program (without mmproxy's protocol mark) are kept.
    """
    try:
        results = routing.remove(table, mark)
    except routing.RoutingError as error:
        _fatal("routing remove", _permission_hint(error))
    for piece, removed, kept in results:
        if kept and not removed:
            click.echo(f"kept     {piece.command()} (not added by mmproxy routing apply)")
        else:
            click.echo(f"{'removed' if removed else 'absent':8} {piece.command('del')}")
    return 0


@tools.command("demo", context_settings=_CONTEXT)
def demo_command() -> int:
    """As root: show mmproxy working, in a private network namespace, and clean up.

    A backend that reports the address it sees, mmproxy in front of it, and a few
    connections with PROXY v1 and v2 headers from documentation addresses (IPv4 and
    IPv6).  Exits 0 only when the backend saw every client the header named.
    """
    from mmproxy import demo  # only the demo needs its imports

    return demo.run()
