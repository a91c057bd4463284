"""The ``mmproxy`` command: go-mmproxy's flags, same names, meanings and defaults.

The flags are read as Go reads them (:mod:`mmproxy.goflags`), so existing
command lines and unit files keep working.  Each flag can also come from
``MMPROXY_<NAME>`` (one-letter flags have a readable alias too); the command
line beats the environment, which beats the default.  Every error is one line
on stderr, ``mmproxy: error: <message>``, with exit code 2.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

import click
from click.core import ParameterSource

from mmproxy import __version__, goflags, logs, runtime
from mmproxy.config import Config, FlagError, build_config
from mmproxy.errors import ConfigError
from mmproxy.goflags import PROG, GoBool, GoInt, fail
from mmproxy.goflags import Flag as _Flag
from mmproxy.goflags import Seconds as _Seconds

# Words that, first on the command line, name a tool instead of starting the
# daemon.  A go-mmproxy command line never starts with a bare word.
SUBCOMMANDS = ("routing", "demo")


def _env(*names: str) -> tuple[str, ...]:
    return tuple(f"MMPROXY_{name}" for name in names)


_INT, _BOOL = GoInt(), GoBool()
FLAGS: tuple[_Flag, ...] = (
    _Flag("l", "listen", click.STRING, "0.0.0.0:8443",
          "Address the proxy listens on", _env("L", "LISTEN"), metavar="ADDR:PORT"),
    _Flag("4", "target4", click.STRING, "127.0.0.1:443",
          "Address to which IPv4 traffic will be forwarded to", _env("4", "TARGET4"),
          metavar="ADDR:PORT"),
    _Flag("6", "target6", click.STRING, "[::1]:443",
          "Address to which IPv6 traffic will be forwarded to", _env("6", "TARGET6"),
          metavar="[ADDR]:PORT"),
    _Flag("allowed-subnets", "allowed_subnets", click.STRING, None,
          "Path to a file that contains allowed subnets of the proxy servers "
          "(not set: every peer is allowed)", _env("ALLOWED_SUBNETS"), metavar="PATH"),
    _Flag("listeners", "listeners", _INT, 1,
          "Number of listener sockets that will be opened for the listen address",
          _env("LISTENERS")),
    _Flag("mark", "mark", _INT, 0,
          "The mark that will be set on outbound packets", _env("MARK")),
    _Flag("v", "verbose", _INT, 0,
          "0 - no logging of individual connections; 1 - log errors occurring in "
          "individual connections; 2 - log all state changes of individual connections",
          _env("V", "VERBOSE")),
    _Flag("p", "protocol", click.STRING, "tcp",
          "Protocol that will be proxied: tcp, udp", _env("P", "PROTOCOL"), metavar="tcp|udp"),
    _Flag("close-after", "close_after", _INT, 60,
          "Number of seconds after which UDP socket will be cleaned up", _env("CLOSE_AFTER")),
    _Flag("dynamic-destination", "dynamic_destination", _BOOL, False,
          "Traffic will be forwarded to the destination specified in the PROXY protocol header "
          "(needs -allowed-subnets; only to this host's own addresses unless "
          "--allowed-destinations says otherwise)",
          _env("DYNAMIC_DESTINATION")),
    _Flag("allowed-destinations", "allowed_destinations", click.STRING, None,
          "With -dynamic-destination: a file of the subnets headers may send traffic to, "
          "in the -allowed-subnets format (not set: this host's own addresses only)",
          _env("ALLOWED_DESTINATIONS"), go=False, metavar="PATH"),
    _Flag("listen-transparent", "listen_transparent", _BOOL, False,
          "Listen with IP_TRANSPARENT, accepting traffic for any address routed to this host",
          _env("LISTEN_TRANSPARENT")),
    _Flag("header-timeout", "header_timeout", _Seconds(), 10.0,
          "Seconds a peer has to send a complete PROXY header", _env("HEADER_TIMEOUT"), go=False),
    _Flag("connect-timeout", "connect_timeout", _Seconds(), 5.0,
          "Seconds to wait for the backend to accept a connection", _env("CONNECT_TIMEOUT"),
          go=False),
    _Flag("drain-timeout", "drain_timeout", _Seconds(), 30.0,
          "Seconds live connections may take to finish after SIGTERM/SIGINT",
          _env("DRAIN_TIMEOUT"), go=False),
    _Flag("udp-header", "udp_header", click.STRING, "every",
          "With -p udp: which datagrams carry a PROXY header: every one, or only the "
          "first of each flow (Cloudflare Spectrum)", _env("UDP_HEADER"), go=False,
          metavar="every|first"),
    _Flag("max-udp-flows", "max_udp_flows", _INT, 0,
          "With -p udp: most flows open at once (0: derived from the descriptor limit)",
          _env("MAX_UDP_FLOWS"), go=False),
    _Flag("max-connections", "max_connections", _INT, 0,
          "Most TCP connections at once; at the cap, accepting pauses (0: derived from the "
          "descriptor limit)", _env("MAX_CONNECTIONS"), go=False),
    _Flag("idle-timeout", "idle_timeout", _Seconds(), 0.0,
          "Seconds a relayed connection may pass no data in either direction before it is "
          "closed (0: never)", _env("IDLE_TIMEOUT"), go=False),
    _Flag("relay", "relay", click.STRING, "splice",
          "How established TCP connections are relayed: splice (threads, zero copy), sockmap "
          "(inside the kernel, needs CAP_BPF and Linux 5.13+; no backpressure yet), auto "
          "(splice, until sockmap has backpressure)",
          _env("RELAY"), go=False, metavar="splice|sockmap|auto"),
    _Flag("log-format", "log_format", click.STRING, "json",
          "Log format: json or text", _env("LOG_FORMAT"), go=False, metavar="json|text"),
    _Flag("metrics", "metrics", click.STRING, None,
          "Serve Prometheus metrics over HTTP on this address (not set: off)",
          _env("METRICS"), go=False, metavar="ADDR:PORT"),
    _Flag("no-routing-check", "no_routing_check", _BOOL, False,
          "Do not check the policy routing at start-up (see: mmproxy routing check)",
          _env("NO_ROUTING_CHECK"), go=False),
    # No environment variable: a leftover one would turn the daemon into a checker.
    _Flag("check-config", "check_config", _BOOL, False,
          "Validate the configuration (the allowed-subnets file too), print it as JSON "
          "and exit", go=False),
)  # fmt: skip
_BY_NAME = {flag.name: flag for flag in FLAGS}
_BY_DISPLAY = {flag.display: flag for flag in FLAGS}


def go_argv(argv: Sequence[str]) -> list[str]:
    """The daemon's command line as canonical ``--name value`` tokens (:func:`goflags.go_argv`)."""
    return goflags.go_argv(argv, _BY_NAME)


class _GoFlagCommand(click.Command):
    """A click command that reads Go-style flags and fails with one line and exit code 2."""

    def main(  # type: ignore[override]
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> None:
        """Run the command; always ends in SystemExit unless it returns after a check.

        ``standalone_mode`` is accepted for click's API but ignored: click's
        own exception handling would print multi-line usage blocks.
        """
        del standalone_mode
        argv = list(sys.argv[1:] if args is None else args)
        try:
            rv = super().main(
                go_argv(argv),
                prog_name or PROG,
                complete_var,
                standalone_mode=False,
                windows_expand_args=False,
                **extra,
            )
        except click.BadParameter as error:
            fail(_describe_bad_parameter(error))
        except click.Abort:
            sys.exit(130)  # interrupted: click already ended the line on stderr
        except click.ClickException as error:
            fail(error.format_message())
        except ConfigError as error:
            fail(str(error))
        if isinstance(rv, int) and rv:
            sys.exit(rv)


def _describe_bad_parameter(error: click.BadParameter) -> str:
    param = error.param
    flag = next((f for f in FLAGS if param is not None and f.dest == param.name), None)
    if flag is None or error.ctx is None:
        return error.format_message()
    return f"{flag.display}{_from_env(error.ctx, flag)}: {error.message}"


def _from_env(ctx: click.Context, flag: _Flag) -> str:
    """`` (from MMPROXY_X)`` when the flag's value came from the environment, else ``""``."""
    if ctx.get_parameter_source(flag.dest) is not ParameterSource.ENVIRONMENT:
        return ""
    name = next((name for name in flag.env if os.environ.get(name)), None)
    return f" (from {name})" if name else ""


def _show_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        click.echo(f"{PROG} {__version__}")
        ctx.exit()


def _start(**values: Any) -> None:
    """The command's body: build the Config, then check it or run the daemon."""
    ctx = click.get_current_context()
    check_only = values.pop("check_config")
    try:
        config = build_config(**values)
    except FlagError as error:
        flag = _BY_DISPLAY.get(error.flag)
        source = _from_env(ctx, flag) if flag is not None else ""
        raise ConfigError(f"{error.flag}{source}: {error.reason}") from error
    if check_only:
        resolved = {**config.summary(), "allowedSubnetsCidrs": list(config.allow_list.cidrs)}
        click.echo(json.dumps(resolved))
        return
    logger = logs.configure(config.log_format, config.verbose)
    _log_start(logger, config)
    from mmproxy import daemon  # the daemon's imports cost nothing on --help or errors

    sys.exit(daemon.run(config, logger))


def _log_start(logger: logging.Logger, config: Config) -> None:
    logger.info(
        "starting",
        extra={
            "version": __version__,
            "python": runtime.interpreter(),
            "gil": runtime.gil_enabled(),
            **config.summary(),
        },
    )
    allow_list = config.allow_list
    if allow_list.allows_everyone:
        logger.warning("allowed subnets not set: every peer may send PROXY headers")
    else:
        for cidr in allow_list.cidrs:
            logger.info(logs.MSG_ALLOWED_SUBNET, extra={"subnet": cidr})
        logger.info("allowed subnets", extra={"path": allow_list.path, "count": allow_list.count})


def _option(flag: _Flag) -> click.Option:
    return click.Option(
        [f"-{flag.name}", f"--{flag.name}", flag.dest],
        type=flag.type,
        default=flag.default,
        show_default=not flag.is_bool and flag.default is not None,
        envvar=list(flag.env) or None,
        show_envvar=bool(flag.env),
        metavar="" if flag.is_bool else flag.metavar,  # Go bool flags are written bare
        help=flag.help,
    )


command = _GoFlagCommand(
    PROG,
    callback=_start,
    options_metavar="[flags]",
    params=[
        *(_option(flag) for flag in FLAGS),
        click.Option(
            ["-version", "--version"],
            is_flag=True,
            expose_value=False,
            is_eager=True,
            callback=_show_version,
            help="Print the version and exit.",
        ),
    ],
    help="Unwrap the PROXY protocol so the backend sees the real client address "
    "(a go-mmproxy drop-in). Flags take one or two dashes, and -name=value.",
    epilog="Tools: 'mmproxy routing check|apply|remove' (the policy routing mmproxy needs), "
    "'mmproxy demo' (see it work in a private network namespace, as root).",
    context_settings={"help_option_names": ["-h", "-help", "--help"], "max_content_width": 100},
)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run ``mmproxy`` with ``argv`` (default ``sys.argv[1:]``).

    ``mmproxy routing ...`` and ``mmproxy demo`` are tools (:mod:`mmproxy.commands`);
    anything else is the daemon's command line.
    """
    runtime.watch_gil()  # before the daemon's lazy imports, so that one that needs the GIL is named
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in SUBCOMMANDS:
        from mmproxy import commands  # the tools' imports cost the daemon nothing

        commands.main(args)  # exits
    command.main(args, PROG)
