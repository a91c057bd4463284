"""The daemon: the process around a server: limits, signals, readiness, reload, stopping.

Start-up order matters.  Signals are blocked before the first thread starts
(threads inherit the mask), so only the main thread ever receives them, by
``sigwait``: no handler runs at a random point of another thread, and no
KeyboardInterrupt traceback can appear.  Then the descriptor limit is raised,
every listener is bound (a failure stops start-up with one line), and only
then do the acceptor threads start.

Stopping (SIGTERM or SIGINT): the server (:mod:`mmproxy.server`) stops admitting and
winds down.  TCP: live connections get ``drain_timeout`` seconds to finish on their own,
then the rest are shut down; a second signal during the drain cuts it short.  UDP has no
end of a flow to wait for: its flows are closed at once.

Reloading (SIGHUP): the ``-allowed-subnets`` file is read again and, if it is
valid, put in force for connections accepted from then on; connections already
open are not touched.  A file with an error keeps the old list and is logged
as a warning with the file's ``path:line: reason``.
"""

from __future__ import annotations

import logging
import os
import resource
import signal
import socket
import threading
from collections.abc import Callable

from mmproxy import logs, notify, policy, runtime, upstream
from mmproxy.acl import AllowList, AllowListHolder
from mmproxy.config import Config
from mmproxy.errors import ConfigError
from mmproxy.listener import open_listeners
from mmproxy.metrics import NO_METRICS, Metrics, MetricsServer, PrometheusMetrics
from mmproxy.relay import PipeBudget
from mmproxy.server import Server
from mmproxy.sockmap import KernelRelay, UnavailableError
from mmproxy.tcp import TcpServer
from mmproxy.udp import UdpServer
from mmproxy.watchdog import Watchdog

EXIT_OK = 0
EXIT_FAILURE = 1

STACK_SIZE = 256 * 1024  # bytes per thread; the relay threads use a few KiB of it
# The descriptor budget.  A connection needs its 2 sockets; a pipe (2 fds) is
# needed only while a direction moves data, and one that gets none copies
# through a buffer (mmproxy.relay.PipeBudget).  So connections are budgeted at
# 2 descriptors and a share of the room is kept for pipes, which lets idle
# connections use most of the limit while pipes never starve accept().
FDS_PER_CONNECTION = 2
PIPE_SHARE = 16  # 1/PIPE_SHARE of the descriptor room is kept for pipes
FDS_PER_FLOW = 1  # a UDP flow's upstream socket
DEFAULT_FLOW_CEILING = (
    65536  # default --max-udp-flows on a huge limit: a flow is a socket, no thread
)
FDS_RESERVED = 64  # stdio, listeners, log files, and room for the daemon's own work
# Why --relay auto runs splice (README: the kernel relay's limits).
AUTO_DECLINES = (
    "the kernel relay has no backpressure: toward a backend that does not read, a client's "
    "data queues in kernel memory without bound; use --relay sockmap to choose it anyway"
)

# Pairs the kernel relay's maps hold at most (2 entries each); more go to splice, counted.
MAX_KERNEL_PAIRS = 65536

STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})
HANDLED_SIGNALS = STOP_SIGNALS | {signal.SIGHUP}


def run(config: Config, log: logging.Logger) -> int:
    """Serve until told to stop; return the process exit code."""
    signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
    threading.stack_size(STACK_SIZE)
    limit = raise_descriptor_limit()
    problem = check_transparent(config)
    if problem:
        log.error(problem)
        return EXIT_FAILURE
    if config.routing_check:
        from mmproxy import routing  # pyroute2 takes ~0.2 s to import: only when it is used

        for missing in routing.startup_problems(config.mark, routed_families(config)):
            log.warning(f"{missing} (see: mmproxy routing check)")
    room = limit - FDS_RESERVED - config.listeners
    pipe_fds = room // PIPE_SHARE
    budget = max(1, (room - pipe_fds) // FDS_PER_CONNECTION)
    capacity = config.max_connections or budget
    kernel: KernelRelay | None = None
    if config.protocol == "tcp":
        try:
            kernel = choose_relay(config, capacity, log)
        except UnavailableError as error:
            log.error(f"--relay sockmap: cannot relay in the kernel: {error}")
            return EXIT_FAILURE
    kind = socket.SOCK_DGRAM if config.protocol == "udp" else socket.SOCK_STREAM
    try:
        sockets = open_listeners(config, kind)
    except OSError as error:
        if kernel is not None:
            kernel.close()
        log.error(
            logs.MSG_BIND_FAILED,
            extra={
                logs.LISTEN_ADR: str(config.listen),
                logs.PROTOCOL: config.protocol,
                logs.ERROR: f"cannot listen on {config.listen}: {error.strerror or error}",
            },
        )
        return EXIT_FAILURE
    metrics: Metrics = NO_METRICS
    metrics_server = None
    if config.metrics is not None:
        prometheus = PrometheusMetrics()
        try:
            metrics_server = MetricsServer(config.metrics, prometheus.registry)
        except OSError as error:
            for sock in sockets:
                sock.close()
            if kernel is not None:
                kernel.close()
            log.error(f"cannot serve metrics on {config.metrics}: {error.strerror or error}")
            return EXIT_FAILURE
        metrics = prometheus
    allow_list = AllowListHolder(config.allow_list)  # what SIGHUP replaces
    try:
        destinations = policy.Destinations.for_config(config)  # and this, its list
    except ConfigError as error:
        for sock in sockets:
            sock.close()
        if kernel is not None:
            kernel.close()
        log.error(str(error))
        return EXIT_FAILURE
    server: Server
    if config.protocol == "udp":
        flows = config.max_udp_flows or max(1, min(room // FDS_PER_FLOW, DEFAULT_FLOW_CEILING))
        server = UdpServer(config, log, sockets, flows, allow_list, metrics, destinations)
        ready: dict[str, object] = {"maxUdpFlows": flows, "descriptorLimit": limit}
        if flows > room // FDS_PER_FLOW:
            log.warning(
                "--max-udp-flows exceeds what the descriptor limit allows; "
                "flows beyond it will fail to open",
                extra=ready,
            )
    else:
        pipes = PipeBudget(max(1, pipe_fds // 2))
        server = TcpServer(
            config, log, sockets, capacity, allow_list, metrics, pipes, kernel, destinations
        )
        ready = {
            "maxConnections": capacity,
            "maxWorkers": server.max_workers,
            "maxPipes": pipes.limit,
            "descriptorLimit": limit,
            "relay": "splice" if kernel is None else "sockmap",
        }
        if capacity > budget:
            log.warning(
                "--max-connections exceeds what the descriptor limit allows; "
                "connections beyond it will fail",
                extra=ready,
            )
    server.start()
    # Every import the daemon makes has happened by now: the GIL is as it will stay.
    gil_problem = runtime.gil_problem()
    if gil_problem:
        log.warning(f"free-threaded Python, but {gil_problem}; the relay is slower with the GIL")
    ready["gil"] = runtime.gil_enabled()
    watchdog: Watchdog | None = None
    if metrics_server is not None:
        metrics_server.start()
        log.info("serving metrics", extra={"metricsAddr": metrics_server.address})
    try:
        log.info("ready", extra=ready)
        tell_systemd(log, notify.READY, f"STATUS=relaying {server.relays} from {config.listen}")
        interval = notify.watchdog_interval()
        if interval is not None:
            watchdog = Watchdog(interval, server.healthy, log)
            watchdog.start()
        cause = wait_for_stop(log, allow_list, destinations)
        if watchdog is not None:
            watchdog.stop()  # the acceptors stop next: systemd's stop timeout takes over
        server.stop(
            cause,
            lambda status: tell_systemd(log, notify.STOPPING, f"STATUS={status}"),
            lambda: second_stop_signal(log),
        )
    finally:
        if metrics_server is not None:
            metrics_server.close()
    return EXIT_OK


def choose_relay(config: Config, capacity: int, log: logging.Logger) -> KernelRelay | None:
    """The kernel relay for ``--relay sockmap``; one log line says which relay runs and why.

    ``auto`` runs splice while the kernel relay has no backpressure (the reason says so).
    Raises UnavailableError for ``sockmap`` when it cannot work (start-up then stops).
    """
    if config.relay == "splice":
        log.info("relay: splice", extra={"relay": "splice", "reason": "--relay splice"})
        return None
    if config.relay == "auto":
        log.info(
            "relay: splice (auto does not choose the kernel relay: it has no backpressure)",
            extra={"relay": "splice", "reason": AUTO_DECLINES},
        )
        return None
    kernel = KernelRelay.open(min(capacity, MAX_KERNEL_PAIRS))
    log.info(
        "relay: sockmap (established connections are relayed inside the kernel)",
        extra={
            "relay": "sockmap",
            "reason": f"--relay {config.relay}",
            "kernelPairs": kernel.capacity,
        },
    )
    return kernel


def wait_for_stop(
    log: logging.Logger,
    allow_list: AllowListHolder,
    destinations: policy.Destinations | None = None,
) -> str:
    """Block until SIGTERM/SIGINT, reloading the allow-lists on SIGHUP; return the signal."""
    while True:
        signum = signal.sigwait(HANDLED_SIGNALS)
        if signum in STOP_SIGNALS:
            return signal.Signals(signum).name
        reload_allow_list(log, allow_list)
        if destinations is not None:
            reload_destinations(log, destinations)


def second_stop_signal(log: logging.Logger) -> bool:
    """While draining: has a second SIGTERM/SIGINT arrived (stop waiting at once)?"""
    caught = signal.sigtimedwait(HANDLED_SIGNALS, 0)
    if caught is not None and caught.si_signo in STOP_SIGNALS:
        log.info("second stop signal: not waiting any longer")
        return True
    return False


def reload_allow_list(log: logging.Logger, allow_list: AllowListHolder) -> None:
    """SIGHUP: re-read the allowed-subnets file; on any error keep the list in force."""
    if allow_list.current.path is None:
        log.info("SIGHUP: nothing to reload (no -allowed-subnets file)")
        return
    reload_list(log, "allowed subnets", allow_list.reload)


def reload_destinations(log: logging.Logger, destinations: policy.Destinations) -> None:
    """SIGHUP: re-read ``--allowed-destinations``; on any error keep the list in force."""
    reload_list(log, "allowed destinations", destinations.reload)


def reload_list(log: logging.Logger, name: str, reload: Callable[[], AllowList | None]) -> None:
    """Run ``reload`` and log the outcome; the list in force stays when the file has an error."""
    try:
        new = reload()
    except ConfigError as error:
        log.warning(
            f"{name} not reloaded: keeping the previous list", extra={logs.ERROR: str(error)}
        )
        return
    if new is not None:
        log.info(f"{name} reloaded", extra={"path": new.path, "count": new.count})


def routed_families(config: Config) -> list[socket.AddressFamily]:
    """The families whose replies need the loopback policy routes: backend on loopback."""
    if config.dynamic_destination:  # any destination, loopback included
        return [socket.AF_INET, socket.AF_INET6]
    targets = (config.target4, config.target6)
    return [target.family for target in targets if target.host.is_loopback]


def tell_systemd(log: logging.Logger, *assignments: str) -> None:
    """sd_notify: tell systemd (``Type=notify``) about a state change; nothing outside systemd."""
    try:
        notify.notify(*assignments)
    except OSError as error:
        log.warning(
            f"cannot notify systemd: {error.strerror or error}",
            extra={"notifySocket": os.environ.get("NOTIFY_SOCKET")},
        )


def raise_descriptor_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (OSError, ValueError):
            pass  # keep what we have; the cap below follows it
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def check_transparent(config: Config) -> str | None:
    """Why upstream sockets could not impersonate clients here, or None when they can."""
    families = {config.target4.family, config.target6.family}
    for family in sorted(families):
        try:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                upstream.set_transparent(probe, family)
        except PermissionError:
            return (
                "cannot set IP_TRANSPARENT: mmproxy needs CAP_NET_ADMIN "
                "(run as root or grant the capability)"
            )
        except OSError:
            continue  # this address family is not available here; -4/-6 alone still work
    return None
